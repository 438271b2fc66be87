"""Fold every POET layer of a model into its dense weight ``P A0 R``.

Works for any :class:`~megatron_poet.poet.linear.POETModule` with
``effective_weight()`` (``POETLinear`` and the Megatron tensor-parallel layers
both have it). The product is formed in float32 (float64 for a float64 layer),
never in half precision, so folding adds no rounding beyond the final cast to
the export dtype.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..poet.linear import POETModule


@torch.no_grad()
def poet_dense_weight(module: POETModule) -> torch.Tensor:
    """The dense weight ``P A0 R`` ``(d_out, d_in)`` of one POET layer, float32 or wider.

    At tensor-parallel size > 1 this is the weight of the local shard only;
    the exporter therefore folds models built at TP=1.
    """
    effective = getattr(module, "effective_weight", None)
    if not callable(effective):
        raise TypeError(f"{type(module).__name__} is a POETModule without effective_weight(); cannot fold it")
    weight = effective()
    return weight.to(torch.promote_types(weight.dtype, torch.float32))


# Entries of a POET layer's state that a dense megatron linear has too; everything else
# under the layer (frozen / base weight, permutations, skew factors, whatever form a layer
# class stores them in) describes the factors and is replaced by the folded weight.
_DENSE_LINEAR_ENTRIES = ("bias", "layer_norm_weight", "layer_norm_bias", "_extra_state")


@torch.no_grad()
def dense_state_dict(model: nn.Module, progress: Callable | None = None) -> dict[str, torch.Tensor]:
    """The model's state with every POET layer replaced by ``<layer>.weight = P A0 R``.

    Args:
        model: any module (e.g. a megatron-core ``GPTModel`` built at TP=1).
        progress: optional callable wrapping an iterable (e.g. ``tqdm``) to show
            progress over the POET layers.
    Returns:
        ``{name: float32 tensor}`` on the CPU with the names megatron's own
        (non-POET) layers would have; non-tensor entries (``_extra_state``) are dropped.
        A POET layer's bias and fused-norm entries are kept under their names.
    """
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, POETModule)]
    for name, module in (progress(layers) if progress and layers else layers):
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix) and k[len(prefix):] not in _DENSE_LINEAR_ENTRIES]:
            del state[key]
        state[f"{prefix}weight"] = poet_dense_weight(module)
    return {k: v.detach().to("cpu", torch.promote_types(v.dtype, torch.float32)) if v.is_floating_point()
            else v.detach().cpu() for k, v in state.items()}


# Norm names of megatron's local layer spec -> where the Transformer-Engine spec fuses them.
_FUSED_NORMS = {f".{norm}.{field}": f".{fused}.layer_norm_{field}"
                for norm, fused in (("input_layernorm", "self_attention.linear_qkv"), ("pre_mlp_layernorm", "mlp.linear_fc1"))
                for field in ("weight", "bias")}


def _fused_name(name: str) -> str:
    return next((name.replace(local, fused) for local, fused in _FUSED_NORMS.items() if name.endswith(local)), name)


@torch.no_grad()
def load_dense_state_dict(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`dense_state_dict`: make ``model`` (built at TP=1) compute ``dense``.

    Every POET layer starts from its dense weight (``start_from``: ``A0`` = the weight, identity
    factors); every other parameter is copied (local or TE-fused norm names). Raises ``ValueError``
    naming entries of another shape, entries the model lacks, and parameters ``dense`` does not give.
    """
    dense = dict(dense)
    problems = []
    poet_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, POETModule)]
    for name, module in poet_layers:
        weight = dense.pop(f"{name}.weight", None)
        if weight is None:
            problems.append(f"no weight for POET layer {name}")
        else:
            module.start_from(weight.to(module.frozen_weight.device, torch.float32))
    # A POET layer's factors are set by start_from; only its bias is a parameter of the dense layer too.
    factors = tuple(f"{name}." for name, _ in poet_layers)
    params = {n: p for n, p in model.named_parameters() if not n.startswith(factors) or n.endswith(".bias")}
    for name, tensor in dense.items():
        target = name if name in params else _fused_name(name)
        if target not in params:
            problems.append(f"{name}: the model has no such parameter")
        elif tuple(params[target].shape) != tuple(tensor.shape):
            problems.append(f"{name}: shape {tuple(tensor.shape)}, the model's {tuple(params[target].shape)}")
        else:
            params.pop(target).copy_(tensor)
    problems += [f"{name}: not given" for name in params]
    if problems:
        raise ValueError("the dense state does not fit the model: " + "; ".join(problems[:8])
                         + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
