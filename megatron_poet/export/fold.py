"""Fold every POET layer of a model into its dense weight ``P A0 R``.

Works for any :class:`~megatron_poet.poet.linear.POETModule` with
``effective_weight()`` (``POETLinear`` and the Megatron tensor-parallel layers
both have it). The product is formed in float32 (float64 for a float64 layer),
never in half precision, so folding adds no rounding beyond the final cast to
the export dtype.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

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
def dense_state_dict(model: nn.Module, *, dtype: torch.dtype | None = None,
                     release: bool = False, exclude: str | None = None) -> dict[str, torch.Tensor]:
    """The model's state with every POET layer replaced by ``<layer>.weight = P A0 R``.

    Args:
        model: any module (e.g. a megatron-core ``GPTModel`` built at TP=1).
        dtype: the floating dtype of the result (default float32, or wider for wider tensors); each
            folded weight is cast as soon as it is formed (in float32), so the model's weights are never
            all held in float32 at once.
        release: free each POET layer's ``A0`` once folded (the model is unusable afterwards): the dense
            weights then take the room the factors held (the exporter of a checkpoint does this).
        exclude: leave out the entries and POET layers under this name prefix (e.g. ``"decoder.layers."``).
    Returns:
        ``{name: tensor}`` on the CPU with the names megatron's own
        (non-POET) layers would have; non-tensor entries (``_extra_state``) are dropped.
        A POET layer's bias and fused-norm entries are kept under their names.
    """
    from ..megatron.layer_checkpoint import canonical_a0

    def cast(v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            return v.detach().cpu()
        return v.detach().to("cpu", dtype or torch.promote_types(v.dtype, torch.float32))

    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, POETModule) and not (exclude and f"{name}.".startswith(exclude))]
    prefixes = [f"{name}." if name else "" for name, _ in layers]
    # the state's A0 entries are dropped below: take them without copies (nothing to do without POET layers)
    with canonical_a0(model) if layers else contextlib.nullcontext():
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
                 and not (exclude and k.startswith(exclude))
                 and not any(k.startswith(p) and k[len(p):] not in _DENSE_LINEAR_ENTRIES for p in prefixes)}
    state = {k: cast(v) for k, v in state.items()}
    for (name, module), prefix in zip(layers, prefixes):
        state[f"{prefix}weight"] = cast(poet_dense_weight(module))
        if release:
            for tensor in (module.frozen_weight, module.frozen_scale, module.frozen_zero,
                           getattr(module, "frozen_master", None)):
                if tensor is not None:
                    tensor.data = tensor.data.new_empty(0)
    return state


def dense_layer_states(model: nn.Module, progress: Callable | None = None, *, dtype: torch.dtype | None = None,
                       release: bool = False) -> tuple[dict[str, torch.Tensor], Iterator[tuple[int, dict[str, torch.Tensor]]]]:
    """:func:`dense_state_dict` of a megatron-core ``GPTModel`` a transformer layer at a time, so a caller
    can write each layer before the next is folded (with ``release``, the model's memory then holds
    the folded weights of one layer beside the layers not yet folded).

    Returns:
        ``(outer, layers)``: the entries outside ``decoder.layers`` (embeddings, final norm, output layer),
        and an iterator of ``(i, {megatron name: tensor})`` for layer ``i`` (names under ``decoder.layers.i.``),
        each folded when the iterator reaches it. ``progress``: optional callable wrapping an iterable
        (e.g. ``tqdm``) to show progress over the layers; the other arguments: as :func:`dense_state_dict`.
    """
    prefix = "decoder.layers."
    outer = dense_state_dict(model, dtype=dtype, release=release, exclude=prefix)
    layers = list(model.decoder.layers)

    def each_layer():
        for i, layer in enumerate(progress(layers) if progress and layers else layers):
            yield i, {f"{prefix}{i}.{k}": v for k, v in dense_state_dict(layer, dtype=dtype, release=release).items()}

    return outer, each_layer()


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
