"""How a POET layer stores ``A0``: in its parameter dtype, or in 8 bits per entry (POET-XQ's scheme).

"int8" storage keeps the pre-permuted ``A0'`` as ``uint8`` codes ``q`` ``(d_out, d_in)``; each
row is cut into groups of ``group`` consecutive stored entries, and each group has a float32
scale ``s`` and zero point ``z`` (an integer in ``[0, 255]``, held as float32) with
``A0' ~= (q - z) s``. A group's range always includes 0 (so ``z`` is an exact code) and its
min and max map to codes 0 and 255 up to half a step, so every entry is off by at most ``s / 2``
(:func:`quantize_groups_`). That is the only resident copy: a GEMM dequantizes the layer's ``A0'``
into its own dtype when it runs (:class:`DequantizedGemm`), one layer at a time, and a merge
dequantizes, folds in float64 (:mod:`.merge`) and quantizes the result once.

Groups run along the stored (permuted) input order, so they are contiguous in memory and the
dequantization is one broadcast multiply. The tensor-parallel layers keep them independent of
the TP layout by requiring ``group`` to divide the sharded input side's permutation group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

STORAGES = ("native", "int8")
LEVELS = 255  # uint8 codes 0 .. 255
_ROWS_ELEMENTS = 1 << 18  # rows (de)quantized at once: about this many elements of float32 temporaries


def group_problem(d_in: int, group: int) -> str | None:
    """Why rows of ``d_in`` stored entries cannot be cut into quantization groups of ``group`` (None: they can)."""
    if group < 2:
        return f"the A0 quantization group size must be >= 2, got {group}"
    if d_in % group:
        return f"input features {d_in} are not a multiple of the A0 quantization group size {group}"
    return None


def _row_chunks(rows: int, cols: int):
    step = max(1, _ROWS_ELEMENTS // max(1, cols))
    for r0 in range(0, rows, step):
        yield slice(r0, min(r0 + step, rows))


@torch.no_grad()
def quantize_groups_(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Quantize ``weight`` ``(d_out, d_in)`` (any float dtype) into ``codes`` (uint8, same shape), ``scale`` and
    ``zero`` (float32, ``(d_out, d_in // group)``), in place, row chunk by row chunk.

    Per group: ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``s = (hi - lo) / 255`` (1 for an all-zero
    group), ``z = round(-lo / s)``, ``q = clamp(round(x / s) + z, 0, 255)``: ``|x - (q - z) s| <= s / 2``.
    A group holding inf or NaN gets a NaN scale, so its dequantized values are NaN (never a silent clamp).
    """
    d_out, d_in = weight.shape
    groups = scale.shape[1]
    for rows in _row_chunks(d_out, d_in):
        x = weight[rows].to(torch.float32).view(-1, groups, d_in // groups)
        lo = x.amin(dim=2).clamp(max=0)
        hi = x.amax(dim=2).clamp(min=0)
        s = (hi - lo) / LEVELS
        s = torch.where(s > 0, s, torch.ones_like(s))  # all zeros: any scale, codes equal to z
        z = torch.round(-lo / s).clamp(0, LEVELS)
        q = torch.round(x / s.unsqueeze(2)).add_(z.unsqueeze(2)).clamp_(0, LEVELS)
        codes[rows] = q.view(-1, d_in).to(torch.uint8)
        finite = torch.isfinite(x).all(dim=2)
        scale[rows] = torch.where(finite, s, torch.full_like(s, float("nan")))
        zero[rows] = z


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype,
                      rows: slice = slice(None)) -> torch.Tensor:
    """``(q - z) s`` for ``codes[rows]``, in ``dtype``: ``(rows, d_in)``.

    Computed in float32 row chunk by row chunk into the ``dtype`` result, so the only full-size tensor is
    the result (bf16: 2 bytes per entry, not a float32 copy beside it).
    """
    q, s, z = codes[rows], scale[rows], zero[rows]
    d_in, groups = q.shape[1], scale.shape[1]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    for chunk in _row_chunks(q.shape[0], d_in):  # (one expression: a chunk's float32 rows die before the next's)
        out[chunk] = (q[chunk].to(torch.float32).view(-1, groups, d_in // groups)
                      .sub_(z[chunk].unsqueeze(2)).mul_(s[chunk].unsqueeze(2)).view(-1, d_in))
    return out


class DequantizedGemm:
    """The frozen GEMM of a layer storing ``A0'`` in 8 bits: dequantize, then the ordinary GEMM.

    The dequantized ``A0'`` (in the input's dtype, :func:`dequantize_groups`) exists only during one call
    (forward, or the input gradient in backward); nothing is cached, so the layer's resident ``A0`` stays
    at 1 byte per entry plus its scales.
    Plugs into :func:`megatron_poet.poet.functional.frozen_gemm` like the FP8 GEMM.
    """

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor):
        self.scale, self.zero = scale, zero

    def dense(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_groups(codes, self.scale, self.zero, dtype)

    def forward(self, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``z A0'^T``: ``(..., d_in) -> (..., d_out)`` in ``z``'s dtype."""
        return F.linear(z, self.dense(codes, z.dtype))

    def input_grad(self, grad_h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``grad_h A0'``: ``(..., d_out) -> (..., d_in)`` in ``grad_h``'s dtype."""
        return torch.matmul(grad_h, self.dense(codes, grad_h.dtype))


def stored_bytes_per_entry(storage: str, element_size: int, group: int) -> float:
    """Resident bytes per ``A0`` entry: the dtype's size, or 1 + two float32 per ``group`` entries for "int8"."""
    return 1 + 8 / group if storage == "int8" else float(element_size)
