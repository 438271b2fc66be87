"""Initializations of the frozen weight ``A0`` (spec §1, paper ablation on LLaMA-60M), drawn in row chunks.

``A0`` is drawn ``ROWS_PER_DRAW`` rows at a time, each chunk from its own generator
seeded by ``(seed, first row)``. A layer that holds only some rows (a column-parallel
shard) draws only their chunks, any layout of rows and columns is filled without
materializing the whole matrix, and the values do not depend on that layout.
"""
from __future__ import annotations

import hashlib
import math

import torch

INIT_SCHEMES = ("normalized", "standard", "xavier", "uniform_spectrum")
ROWS_PER_DRAW = 32  # small: a chunk (and its two gathered copies) stays far below one A0


def mix_seed(*parts) -> int:
    """A 63-bit seed from any printable values (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _draw_rows(start: int, count: int, in_features: int, out_features: int, scheme: str, seed: int) -> torch.Tensor:
    """Rows ``start : start+count`` of ``A0`` (float32, CPU) for the row-wise schemes."""
    g = torch.Generator().manual_seed(mix_seed(seed, "A0 rows", start))
    w = torch.randn(count, in_features, generator=g, dtype=torch.float32)
    if scheme == "normalized":
        return w.div_(w.norm(dim=1, keepdim=True))
    if scheme == "xavier":
        return w.mul_(math.sqrt(2.0 / (in_features + out_features)))
    return w.mul_(0.02)


def fill_frozen_weight(
    out: torch.Tensor, out_features: int, in_features: int, scheme: str, seed: int,
    rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill ``out[i, j] = A0[rows[i], cols[j]]`` for the ``(out_features, in_features)`` matrix ``A0`` of ``seed``.

    Schemes:

    - ``normalized`` (default): Gaussian, every row (one output neuron's incoming
      weights) scaled to unit L2 norm.
    - ``standard``: N(0, 0.02^2).
    - ``xavier``: Gaussian with variance ``2 / (fan_in + fan_out)``.
    - ``uniform_spectrum``: a standard init with all singular values set to 1 (``U V^T``).

    Args:
        out: ``(len(rows), len(cols))`` tensor of any dtype/device; written in place.
        rows, cols: global indices (default: all, in order).
    Returns ``out``. Transient memory: one chunk of ``ROWS_PER_DRAW`` full rows, except for
    ``uniform_spectrum``, whose SVD needs the whole matrix (and LAPACK's workspace).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown POET init {scheme!r}; choose one of {INIT_SCHEMES}")
    rows = torch.arange(out_features) if rows is None else rows.cpu()
    cols = torch.arange(in_features) if cols is None else cols.cpu()
    if scheme == "uniform_spectrum":
        full = fill_frozen_weight(torch.empty(out_features, in_features), out_features, in_features, "standard", seed)
        u, _, vh = torch.linalg.svd(full, full_matrices=False)
        out.copy_((u @ vh)[rows][:, cols])
        return out
    order = torch.argsort(rows)
    sorted_rows = rows[order]
    starts = torch.arange(0, out_features, ROWS_PER_DRAW)
    bounds = torch.searchsorted(sorted_rows, torch.cat((starts, torch.tensor([out_features])))).tolist()
    for chunk, start in enumerate(starts.tolist()):
        lo, hi = bounds[chunk], bounds[chunk + 1]
        if lo == hi:  # none of this chunk's rows live here
            continue
        count = min(ROWS_PER_DRAW, out_features - start)
        block = _draw_rows(start, count, in_features, out_features, scheme, seed)
        picked = block.index_select(0, sorted_rows[lo:hi] - start).index_select(1, cols)
        out.index_copy_(0, order[lo:hi].to(out.device), picked.to(out.device, out.dtype))
    return out
