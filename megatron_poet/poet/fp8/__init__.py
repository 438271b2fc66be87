"""FP8 for POET's frozen-weight GEMM: ``h = A0' z`` and its input gradient, nothing else.

Only the big GEMM with the frozen ``A0'`` runs in FP8; the block rotations and the Cayley–Neumann
blocks stay in bf16/fp32. ``A0'`` is quantized once per merge (it does not change in between) and
needs no weight-gradient GEMM. Formats: "e4m3" (everything e4m3) and "hybrid" (e4m3 forward,
e5m2 output gradients). Recipes (:mod:`.quantize`): "tensorwise", "rowwise", "blockwise".
Backends (:mod:`.backends`): Transformer Engine, ``torch._scaled_mm``, the emulation.
Docs: ``docs/FP8.md``.

Use: ``enable_fp8(model, FP8Config(...))`` after building a model with POET layers; each layer
then holds an :class:`.gemm.FP8FrozenGemm` as ``layer.fp8`` (not a module, buffer or parameter:
never saved).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backends import BACKENDS, resolve_backend
from .gemm import FP8FrozenGemm
from .quantize import ALIGNMENT, BLOCK, FORMATS, RECIPES

# Chosen from the accuracy measured on POET layers (docs/FP8.md, tools/fp8_accuracy.py).
DEFAULT_RECIPE = "rowwise"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class FP8Config:
    """FP8 options of the frozen GEMM.

    Attributes:
        format: "e4m3" or "hybrid" (e5m2 output gradients).
        recipe: "tensorwise", "rowwise" or "blockwise" scales.
        backend: "auto", "te", "scaled_mm" or "emulation" (:func:`.backends.resolve_backend`).
    """

    format: str = "e4m3"  # with per-row scales e4m3's range suffices and its gradients are 1.5x more accurate
    recipe: str = DEFAULT_RECIPE
    backend: str = "auto"

    def __post_init__(self):
        for what, value, allowed in (("format", self.format, FORMATS), ("recipe", self.recipe, RECIPES),
                                     ("backend", self.backend, BACKENDS)):
            if value not in allowed:
                raise ValueError(f"FP8 {what} must be one of {allowed}, got {value!r}")


def shape_problems(d_out: int, d_in: int, recipe: str, sharded_group_size: int | None = None) -> list[str]:
    """What keeps a local ``A0'`` of ``(d_out, d_in)`` from the FP8 GEMM (empty: nothing).

    Both dims must be multiples of 16 (cuBLASLt and TE FP8 GEMMs), of 128 for blockwise scales;
    blockwise under tensor parallelism also needs the sharded side's permutation groups to be
    multiples of 128, so that every 128x128 tile is the same whatever the TP size.
    """
    need = BLOCK if recipe == "blockwise" else ALIGNMENT
    problems = [f"{what}={n} is not a multiple of {need} ({recipe} FP8 GEMM)"
                for what, n in (("output features", d_out), ("input features", d_in)) if n % need]
    if recipe == "blockwise" and sharded_group_size is not None and sharded_group_size % BLOCK:
        problems.append(f"the tensor-parallel permutation group size {sharded_group_size} is not a multiple of "
                        f"{BLOCK}: blockwise FP8 tiles would depend on the TP layout")
    return problems


def enable_fp8(model: nn.Module, config: FP8Config) -> str:
    """Give every POET layer of ``model`` an FP8 frozen GEMM; returns a one-line description for logs.

    Raises ValueError (listing every layer's problem) before changing anything if a layer's
    shape or dtype cannot take the FP8 GEMM or the backend cannot run on the model's device.
    """
    from ..linear import POETModule

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, POETModule)]
    if not layers:
        raise ValueError("FP8: the model has no POET layers (FP8 applies to POET's frozen GEMM only)")
    problems = []
    for name, layer in layers:
        d_out, d_in = layer.frozen_weight.shape
        _, _, group_size = layer.tensor_parallel_layout()
        problems += [f"{name}: {p}" for p in shape_problems(d_out, d_in, config.recipe, group_size)]
        if layer.frozen_scale is not None:
            problems.append(f"{name}: A0 is stored in 8 bits; an FP8 copy would be a second one (use one of them)")
        elif layer.frozen_weight.dtype not in SUPPORTED_DTYPES:
            problems.append(f"{name}: FP8 GEMM outputs bf16 or fp32, the layer is {layer.frozen_weight.dtype}")
    backend, why = resolve_backend(config.backend, config.recipe, layers[0][1].frozen_weight.device)
    if problems:
        raise ValueError("FP8 cannot run these POET layers:\n  " + "\n  ".join(problems))
    for _, layer in layers:
        in_group, out_group, _ = layer.tensor_parallel_layout()
        if layer.fp8 is None:
            layer.register_load_state_dict_post_hook(_drop_fp8_copies)
        layer.fp8 = FP8FrozenGemm(config.format, config.recipe, backend, in_group=in_group, out_group=out_group,
                                  reason=why)
    return f"{layers[0][1].fp8.describe()}, {len(layers)} POET layers"


def _drop_fp8_copies(layer, incompatible_keys) -> None:
    """Load post hook: the loaded ``A0'`` needs a fresh FP8 copy."""
    if layer.fp8 is not None:
        layer.fp8.invalidate()


__all__ = ["BACKENDS", "DEFAULT_RECIPE", "FORMATS", "RECIPES", "FP8Config", "FP8FrozenGemm", "enable_fp8",
           "shape_problems"]
