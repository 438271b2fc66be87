"""Initializations of the frozen weight ``A0`` (spec §1, paper ablation on LLaMA-60M)."""
from __future__ import annotations

import hashlib
import math

import torch

INIT_SCHEMES = ("normalized", "standard", "xavier", "uniform_spectrum")


def mix_seed(*parts) -> int:
    """A 63-bit seed from any printable values (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_frozen_weight(
    out_features: int, in_features: int, scheme: str = "normalized", generator: torch.Generator | None = None
) -> torch.Tensor:
    """A float32 ``(out_features, in_features)`` matrix drawn on the CPU.

    - ``normalized`` (default): Gaussian, every row (one output neuron's incoming
      weights) scaled to unit L2 norm.
    - ``standard``: N(0, 0.02^2).
    - ``xavier``: Gaussian with variance ``2 / (fan_in + fan_out)``.
    - ``uniform_spectrum``: a standard init with all singular values set to 1 (``U V^T``).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown POET init {scheme!r}; choose one of {INIT_SCHEMES}")
    w = torch.randn(out_features, in_features, generator=generator, dtype=torch.float32)
    if scheme == "normalized":
        return w / w.norm(dim=1, keepdim=True)
    if scheme == "xavier":
        return w * math.sqrt(2.0 / (in_features + out_features))
    w = w * 0.02
    if scheme == "uniform_spectrum":
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        return u @ vh
    return w
