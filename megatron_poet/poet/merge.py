"""Spectrum-exact merge: fold into ``A0`` the orthogonal matrices nearest to the blocks the forward used.

A Cayley–Neumann block ``G = (I+Q)(I+Q+..+Q^k) = C (I - Q^(k+1))`` (``C`` the exact Cayley
transform) is only nearly orthogonal; folding ``G`` itself into ``A0`` would multiply the
spectrum by ``G``'s singular values at every merge (for odd ``k`` all ``<= 1``: it shrinks).
The merge instead folds ``U = polar(G)``, the orthogonal factor of ``G = U H``
(``U = W V^T`` from ``G = W S V^T``), computed per ``b x b`` block in float64:

- ``A0 <- BD(U_P) A0' BD(U_R)`` multiplies ``A0`` by orthogonal matrices only, so its
  singular values are unchanged up to the one rounding of the result to the storage dtype
  (the product runs in float64).
- ``U`` is the orthogonal matrix nearest to ``G`` in every unitarily invariant norm, and
  ``||G - U||_2 = max_i |s_i(G) - 1| <= ||G - C||_2 = ||Q^(k+1)||_2`` (Weyl: the singular
  values of ``G`` are within ``||G - C||`` of those of ``C``, which are all 1). So the layer's
  function changes at a merge by at most the Cayley–Neumann truncation error already present
  in its forward pass: ``||P_G A0 R_G - P_U A0 R_U||_2 <= ((1+e_P)(1+e_R) - 1) ||A0||_2`` with
  ``e = max_k ||G_k - U_k||_2``.

Docs: ``docs/POET.md``.
"""
from __future__ import annotations

import torch

from .rotation import rotate_covered
from .side import OrthogonalSide

# Rows of the weight folded at once (float64 working copy of about this many elements).
_FOLD_ELEMENTS = 1 << 22


def nearest_orthogonal(blocks: torch.Tensor) -> torch.Tensor:
    """The polar factor ``U = W V^T`` of each block ``G = W S V^T`` ``(n, b, b)``, in float64."""
    w, _, vh = torch.linalg.svd(blocks.double())
    return w @ vh


@torch.no_grad()
def fold_exact_(weight: torch.Tensor, input_side: OrthogonalSide, output_side: OrthogonalSide) -> torch.Tensor:
    """In place: ``weight <- BD(U_P) weight BD(U_R)`` for the pre-permuted ``weight`` ``(d_out, d_in)``.

    ``U`` = :func:`nearest_orthogonal` of each side's current blocks. Computed in float64 on
    chunks of whole output segments (``P`` mixes rows only within a segment, so chunks are
    independent) and rounded once to ``weight.dtype``. Returns ``weight``.
    """
    u_in = nearest_orthogonal(input_side.blocks()).to(weight.device)
    u_out = nearest_orthogonal(output_side.blocks()).to(weight.device)
    seg, b = output_side.segment, output_side.block_size
    d_out, d_in = weight.shape
    rows = seg * max(1, _FOLD_ELEMENTS // (seg * d_in))
    for r0 in range(0, d_out, rows):
        r1 = min(r0 + rows, d_out)
        # A BD(U): column block k of A times U_k, i.e. every row rotated by U_k^T.
        t = rotate_covered(weight[r0:r1].double(), u_in, input_side.segment, transpose=True, inplace=True)
        per_seg = t.view((r1 - r0) // seg, seg, d_in)
        first = r0 // seg
        per_seg[:, :b] = torch.bmm(u_out[first:first + per_seg.shape[0]], per_seg[:, :b])
        weight[r0:r1] = t
    return weight


@torch.no_grad()
def permuted_copy(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``weight[rows][:, cols]`` as one new tensor (no second full-size temporary)."""
    out = weight.index_select(0, rows.to(weight.device))
    cols = cols.to(weight.device)
    step = max(1, _FOLD_ELEMENTS // max(1, weight.shape[1]))
    for r0 in range(0, out.shape[0], step):
        out[r0:r0 + step] = out[r0:r0 + step].index_select(1, cols)
    return out


@torch.no_grad()
def permute_(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """In place: ``weight <- weight[rows][:, cols]`` with one transient copy of ``weight``. Returns ``weight``."""
    return weight.copy_(permuted_copy(weight, rows, cols))
