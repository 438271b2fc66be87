"""FP8 quantization of GEMM operands: formats, scaling recipes, power-of-two scales, and the emulation.

Every FP8 GEMM here is ``out = A B^T`` with both operands contracted along their last dim:
``A`` ``(M, K)`` is an activation or a gradient (one row per token) and ``B`` ``(N, K)`` the
frozen weight (``A0'`` forward, ``A0'^T`` for the input gradient). A recipe says which entries
share a scale (:data:`GRANULARITIES`):

- ``tensorwise``: one scale per operand;
- ``rowwise``: one per row of ``A`` (token) and one per row of ``B``;
- ``blockwise``: ``A`` in 1x128 tiles along ``K``, ``B`` in 128x128 tiles (DeepSeek-V3's layout,
  the one ``torch._scaled_mm`` and Transformer Engine take on Hopper).

Scales are powers of two: ``x`` is multiplied by ``2^k`` with ``k`` the largest integer such that
``amax * 2^k <= fp8_max``, computed from the exponents (no division), so scaling and unscaling are
exact in float32 and nothing saturates. The only error is the rounding to FP8: relative at most
``2^-(m+1)`` (``m`` mantissa bits: 3 for e4m3, 2 for e5m2) for entries in the normal range, and at
most half the subnormal spacing ``2^(1-bias-m)`` times the scale below it (:func:`rounding_bounds`).
A group holding inf or NaN gets a NaN scale, so the non-finite value reaches the GEMM's output
(torch's e4m3 cast saturates inf to 448, which would hide an overflow from the non-finite checks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORMATS = ("e4m3", "hybrid")
RECIPES = ("tensorwise", "rowwise", "blockwise")
BLOCK = 128  # tile edge of the blockwise recipe (the only size the FP8 GEMMs take)
ALIGNMENT = 16  # the FP8 GEMMs (cuBLASLt, TE) need both weight dims divisible by this

# Per recipe: how activations/gradients (A) and weights (B) are grouped for one scale.
GRANULARITIES = {
    "tensorwise": ("tensor", "tensor"),
    "rowwise": ("row", "row"),
    "blockwise": ("tile", "block"),
}

_MANTISSA_BITS = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}
_EXPONENT_BIAS = {torch.float8_e4m3fn: 7, torch.float8_e5m2: 15}


FORWARD_DTYPE = torch.float8_e4m3fn  # activations and weights, in both formats


def gradient_dtype(fmt: str) -> torch.dtype:
    """FP8 dtype of output gradients: e5m2 for "hybrid" (range over precision), e4m3 for "e4m3"."""
    return torch.float8_e5m2 if fmt == "hybrid" else torch.float8_e4m3fn


def rounding_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """``(u, s)``: rounding ``x`` (already scaled) to ``dtype`` errs by at most ``max(u |x|, s)``.

    ``u = 2^-(m+1)`` is the unit roundoff of the normal range, ``s`` half the subnormal spacing.
    """
    m = _MANTISSA_BITS[dtype]
    return 2.0 ** -(m + 1), 2.0 ** (1 - _EXPONENT_BIAS[dtype] - m) / 2


@dataclass
class Quantized:
    """An FP8 operand: ``value = data * scale_inv`` (broadcast over its groups).

    Attributes:
        data: ``(R, K)`` float8 (may be a transposed view).
        scale_inv: float32 powers of two: ``()`` "tensor", ``(R, 1)`` "row", ``(R, K/128)`` "tile"
            (1x128), ``(R/128, K/128)`` "block" (128x128).
        granularity: "tensor", "row", "tile" or "block".
    """

    data: torch.Tensor
    scale_inv: torch.Tensor
    granularity: str

    def t(self) -> "Quantized":
        """The transposed operand (a view; "row" scales do not transpose: quantize the transpose instead)."""
        if self.granularity == "row":
            raise ValueError("a row-scaled operand has no transposed view with the same scales")
        scale = self.scale_inv.t() if self.granularity == "block" else self.scale_inv
        return Quantized(self.data.t(), scale, self.granularity)


def group_amax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """Max of ``|x|`` ``(R, K)`` per group, shaped like :attr:`Quantized.scale_inv`, float32."""
    a = x.detach().abs().float()
    rows, cols = a.shape
    if granularity == "tensor":
        return a.amax()
    if granularity == "row":
        return a.amax(dim=1, keepdim=True)
    if granularity == "tile":
        return a.view(rows, cols // BLOCK, BLOCK).amax(dim=2)
    if granularity == "block":
        return a.view(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK).amax(dim=(1, 3))
    raise ValueError(f"unknown FP8 scale granularity {granularity!r}")


def scale_exponent(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``k`` (int32, shaped like ``amax``): the largest integer with ``amax * 2^k <= fp8_max`` (0 where amax is 0).

    With ``amax = f 2^e`` and ``fp8_max = F 2^E`` (``f, F`` in [0.5, 1)): ``k = E - e - (f > F)``.
    Clamped to [-126, 126] so ``2^k`` and ``2^-k`` are normal float32 numbers.
    """
    big_f, big_e = math.frexp(torch.finfo(dtype).max)
    f, e = torch.frexp(amax.float())
    k = big_e - e - (f > big_f).int()
    k = torch.where(amax > 0, k, torch.zeros_like(k))
    return k.clamp(-126, 126)


def _expand(scale: torch.Tensor, granularity: str) -> torch.Tensor:
    """``scale`` broadcastable to its operand ``(R, K)``."""
    if granularity in ("tensor", "row"):
        return scale
    rows = 1 if granularity == "tile" else BLOCK
    return scale.repeat_interleave(rows, dim=0).repeat_interleave(BLOCK, dim=1)


def quantize(x: torch.Tensor, dtype: torch.dtype, granularity: str, amax_group=None) -> Quantized:
    """Quantize ``x`` ``(R, K)`` to FP8 ``dtype`` with one power-of-two scale per group.

    ``amax_group``: process group over which the group maxima are all-reduced (MAX) first, when
    a reduced axis is sharded across tensor-parallel ranks (every rank then uses the scales an
    unsharded layer would).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")
    amax = group_amax(x, granularity)
    if amax_group is not None and torch.distributed.get_world_size(amax_group) > 1:
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=amax_group)
    k = scale_exponent(amax, dtype)
    scale = torch.ldexp(torch.ones_like(amax), k)
    data = (x.float() * _expand(scale, granularity)).to(dtype).contiguous()  # row-major, as FP8 GEMMs want
    scale_inv = torch.where(torch.isfinite(amax), torch.ldexp(torch.ones_like(amax), -k), float("nan"))
    return Quantized(data, scale_inv, granularity)


def dequantize(q: Quantized) -> torch.Tensor:
    """``data * scale_inv`` as float32 (exact), with ``q.data``'s strides."""
    return q.data.float() * _expand(q.scale_inv, q.granularity)


def emulated_mm(a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """The reference FP8 GEMM ``A B^T``: dequantize both operands, multiply in float32, round once."""
    return torch.mm(dequantize(a), dequantize(b).t()).to(out_dtype)
