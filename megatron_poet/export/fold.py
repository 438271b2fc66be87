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
