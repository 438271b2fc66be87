"""GPT layer specs whose four linears (qkv, proj, fc1, fc2) are POET layers.

Built from megatron-core's own GPT layer specs, so attention, bias-dropout-add
and checkpoint key maps stay Megatron's; only the linears (and, where Megatron
fuses the norm into the linear, the norms) are replaced.

Backends: "local" (torch norms; runs on CPU) and "te" (Transformer Engine ``TENorm``). "auto"
picks "te" when ``transformer_engine`` is importable. Core attention (``attention``): "sdpa"
(:class:`~.attention.SDPAttention`, PyTorch's fused attention: no ``S x S`` matrix; the default),
"local" (Megatron's ``DotProductAttention``) or "te" (``TEDotProductAttention``, with the te backend).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from torch import nn

from ..poet.config import POETConfig
from . import compat
from .attention import SDPAttention
from .layers import POETColumnParallelLinear, POETRowParallelLinear
from .moe import moe_mlp_spec

BACKENDS = ("auto", "local", "te")
ATTENTION = ("sdpa", "local", "te")


class LocalNorm(nn.Module):
    """LayerNorm / RMSNorm (from ``config.normalization``) usable with sequence parallelism.

    Megatron's torch-norm wrapper refuses sequence parallelism; this one tags its
    parameters ``sequence_parallel`` so ``finalize_model_grads`` all-reduces their
    gradients over TP ranks. Shapes: ``(..., hidden_size)`` -> same.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"LocalNorm supports LayerNorm and RMSNorm, got {config.normalization!r}")
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("LocalNorm does not implement layernorm_zero_centered_gamma")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)


def _bound(cls: type, poet: POETConfig) -> type:
    """``cls`` with ``poet`` bound: a class, because Megatron builds ``linear_qkv`` by calling it
    directly and the other linears through ``build_module`` (which takes a class or a ModuleSpec)."""

    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, poet=poet, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__, "poet_config": poet})


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "te" if importlib.util.find_spec("transformer_engine") is not None else "local"
    return backend


def gpt_layer_spec(
    poet: POETConfig | None, normalization: str = "RMSNorm", backend: str = "auto", qk_layernorm: bool = False,
    attention: str = "sdpa", num_experts: int | None = None,
) -> ModuleSpec:
    """A TransformerLayer spec; ``poet=None`` keeps Megatron's linears (the AdamW baseline).

    Args:
        poet: POET options of the four linears, or None.
        normalization: "RMSNorm" (Llama) or "LayerNorm" (GPT-2).
        backend: "auto", "local" or "te"; attention: "sdpa", "local" or "te" (see module docstring).
        qk_layernorm: normalize queries and keys (Megatron option).
        num_experts: a mixture-of-experts MLP with this many experts (:mod:`.moe`); None: a dense MLP.
    """
    spec, _ = _layer_spec_and_norm(poet, normalization, resolve_backend(backend), qk_layernorm, attention,
                                   num_experts)
    return spec


def gpt_block_spec(config, poet: POETConfig | None, backend: str = "auto",
                   attention: str = "sdpa") -> TransformerBlockSubmodules:
    """Block spec for GPTModel: this pipeline stage's layers plus a final norm of the same backend.

    (Given only a layer spec, GPTModel would pick Megatron's default final norm,
    which refuses sequence parallelism on CPU.)
    """
    layer, norm = _layer_spec_and_norm(poet, config.normalization, resolve_backend(backend), config.qk_layernorm,
                                       attention, config.num_moe_experts, config.moe_grouped_gemm)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=norm)


def _core_attention(attention: str, backend: str):
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if attention == "sdpa":
        return SDPAttention
    if attention == "te":
        if backend != "te":
            raise ValueError("the te attention backend needs Transformer Engine (the te layer backend)")
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def _layer_spec_and_norm(poet, normalization, backend, qk_layernorm, attention="sdpa", num_experts=None,
                         batched_experts=False):
    spec, norm = _linears_and_norms(poet, normalization, backend, qk_layernorm)
    self_attention = compat.replace_submodules(spec.submodules.self_attention,
                                               core_attention=_core_attention(attention, backend))
    spec = compat.replace_submodules(spec, self_attention=self_attention)
    if num_experts:  # megatron's MoE layer never fuses the norm into its experts: a separate pre-MLP norm
        linears = (None, None) if poet is None else (_bound(POETColumnParallelLinear, poet),
                                                    _bound(POETRowParallelLinear, poet))
        spec = compat.replace_submodules(spec, mlp=moe_mlp_spec(num_experts, *linears, batched_experts),
                                         pre_mlp_layernorm=norm)
    return spec, norm


def _linears_and_norms(poet, normalization, backend, qk_layernorm):
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
        norm = TENorm  # TE fuses the norm into qkv/fc1; POET linears need it as a separate module
        if poet is None:
            return spec, norm
    else:
        spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
        norm = LocalNorm
        spec = compat.replace_submodules(spec, input_layernorm=norm, pre_mlp_layernorm=norm)
        if qk_layernorm:
            spec = compat.replace_submodules(spec, self_attention=compat.replace_submodules(
                spec.submodules.self_attention, q_layernorm=norm, k_layernorm=norm))
        if poet is None:
            return spec, norm
    column, row = _bound(POETColumnParallelLinear, poet), _bound(POETRowParallelLinear, poet)
    attention = compat.replace_submodules(spec.submodules.self_attention, linear_qkv=column, linear_proj=row)
    mlp = compat.replace_mlp_linears(spec.submodules.mlp, linear_fc1=column, linear_fc2=row)
    spec = compat.replace_submodules(
        spec, self_attention=attention, mlp=mlp, input_layernorm=norm, pre_mlp_layernorm=norm
    )
    return spec, norm
