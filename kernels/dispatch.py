"""When the POET ops run the Triton kernels, and when they take the PyTorch path.

Nothing here imports Triton at module import time, so the core stays usable on
machines without it. The switch, highest priority first:

- ``with kernels_mode("off" | "auto" | "force"):`` for a scope (debugging, tests);
- the environment variable ``MEGATRON_POET_KERNELS`` = ``0``/``off``, ``1``/``auto``
  (default) or ``force``.

``auto`` uses the kernels for CUDA tensors when Triton imports. ``force`` also runs
them on CPU tensors, which only works under ``TRITON_INTERPRET=1`` (CPU tests).
Either way an op whose shapes or dtypes a kernel does not support falls back to
PyTorch (see :func:`rotation_supported`, :func:`cayley_neumann_supported`): no
kernel is launched on a shape it was not written for.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

ENV_VAR = "MEGATRON_POET_KERNELS"
_ALIASES = {"0": "off", "off": "off", "false": "off", "no": "off",
            "1": "auto", "auto": "auto", "true": "auto", "yes": "auto", "": "auto",
            "force": "force"}
# Block sizes the kernels are written and tested for (tl.dot needs tiles >= 16;
# tiles are powers of two that divide the block).
SUPPORTED_BLOCK_SIZES = (32, 64, 128, 256, 512)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_mode_stack: list[str] = []
# Process group whose ranks must pick the same autotuned kernel configuration (set by the Megatron
# integration to the tensor-parallel group; see :func:`agree_autotuning_over`).
_autotune_group = None


def agree_autotuning_over(group) -> None:
    """Make every rank of ``group`` choose the same configuration whenever a kernel autotunes.

    Triton benchmarks each candidate on each rank and keeps the fastest, so ranks could pick
    configurations that sum in another order and compute values that should be replicated
    (the TP-replicated POET factor's rotation) differently. With a group set, each candidate's
    timings are replaced by their maximum over the group (:func:`.autotune.agreed_do_bench`):
    every rank then takes the same argmin. All ranks of ``group`` run the same kernels on the
    same shapes in the same order (tensor-parallel ranks do), so the extra all-reduce per
    candidate, once per shape, cannot deadlock. ``None`` turns it off.
    """
    global _autotune_group
    _autotune_group = group


def autotune_group():
    """The group set by :func:`agree_autotuning_over` (``None``: each rank tunes alone)."""
    return _autotune_group


def _validate(mode: str, source: str) -> str:
    key = str(mode).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"{source} must be one of 0/off, 1/auto, force; got {mode!r}")
    return _ALIASES[key]


def current_mode() -> str:
    """``"off"``, ``"auto"`` or ``"force"`` (innermost :func:`kernels_mode`, else the env var)."""
    if _mode_stack:
        return _mode_stack[-1]
    return _validate(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


@contextlib.contextmanager
def kernels_mode(mode: str):
    """Set the kernel mode for a ``with`` block (not thread-local: a debugging switch)."""
    _mode_stack.append(_validate(mode, "kernels_mode"))
    try:
        yield
    finally:
        _mode_stack.pop()


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _enabled_for(tensors) -> bool:
    mode = current_mode()
    if mode == "off" or not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    if mode == "force":
        if not interpreting():
            raise RuntimeError(
                f"{ENV_VAR}=force on CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported"
            )
        return all(t.device.type == "cpu" for t in tensors)
    return False


def rotation_supported(x: torch.Tensor, blocks: torch.Tensor) -> bool:
    """Whether the permute+block-rotate kernels apply to ``x (..., d)`` and ``blocks (n, b, b)``.

    They cover the block-stochastic layout only (``n*b == d``); the fully stochastic
    variant's pass-through tail takes the PyTorch path.
    """
    n, b, _ = blocks.shape
    return (
        b in SUPPORTED_BLOCK_SIZES
        and n * b == x.shape[-1]
        and x.dtype in ACTIVATION_DTYPES
        and blocks.dtype in ACTIVATION_DTYPES
        and x.numel() > 0
        and _enabled_for((x, blocks))
    )


def cayley_neumann_supported(packed: torch.Tensor, block_size: int, neumann_terms: int | None) -> bool:
    """Whether the fused Cayley–Neumann kernels apply (float32 parameters, a Neumann order)."""
    return (
        neumann_terms is not None
        and block_size in SUPPORTED_BLOCK_SIZES
        and packed.dtype == torch.float32
        and packed.dim() == 2
        and packed.shape[0] > 0
        and packed.shape[1] == block_size * (block_size - 1) // 2
        and _enabled_for((packed,))
    )
