"""POET side transforms on the Triton kernels: launchers, raw gradients and autograd Functions.

Shapes: activations ``(..., d)`` (handled as ``(N, d)`` rows), blocks ``(n, b, b)`` with
``n*b == d``, permutations ``(d,)`` integer. Gradients of the blocks are reduced in
float32 and returned in the blocks' dtype. The caller (``megatron_poet.poet.rotation``)
checks :func:`~megatron_poet.kernels.dispatch.rotation_supported` first.
"""
from __future__ import annotations

import torch
import triton

from .block_rotate import block_grad_kernel, rotate_kernel
from .dispatch import interpreting


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 activations: 3xTF32 keeps ~fp32 accuracy on tensor cores; for half
    # dtypes the setting does not apply (operands are already 16-bit).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # The CPU interpreter cannot dot bf16 operands (see block_rotate's docstring).
    return dtype == torch.bfloat16 and interpreting()


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rotate_rows(
    inp: torch.Tensor, blocks: torch.Tensor, *, transpose: bool = False,
    in_cols: torch.Tensor | None = None, out_cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t, oc(k*b+i)] = sum_j M[k,i,j] inp[t, ic(k*b+j)]``, ``M = blocks`` or its transpose.

    Args:
        inp: ``(N, d)`` with unit stride along ``d``.
        blocks: ``(n, b, b)``, ``n*b == d``.
        in_cols: ``(d,)`` gather map ``ic`` (None = identity); out_cols: ``(d,)`` scatter map ``oc``.
    Returns:
        ``(N, d)`` in ``inp.dtype``.
    """
    n_rows, d = inp.shape
    n, b, _ = blocks.shape
    out = torch.empty_like(inp)
    s_k, s_i, s_j = blocks.stride()
    if transpose:
        s_i, s_j = s_j, s_i
    dummy = inp  # placeholder pointer for a disabled column map (never read)
    grid = lambda meta: (n * (b // meta["BLOCK_N"]), triton.cdiv(n_rows, meta["BLOCK_M"]))  # noqa: E731
    rotate_kernel[grid](
        inp, out, blocks, in_cols if in_cols is not None else dummy, out_cols if out_cols is not None else dummy,
        n_rows, inp.stride(0), out.stride(0), s_k, s_i, s_j,
        B=b, GATHER_IN=in_cols is not None, SCATTER_OUT=out_cols is not None,
        DOT_PRECISION=_dot_precision(inp.dtype), UPCAST=_upcast(inp.dtype),
    )
    return out


def _num_splits(n_rows: int, n_blocks: int, b: int, device: torch.device) -> int:
    """Token splits for the block-gradient reduction: enough programs to fill the GPU twice.

    Estimated with 64x64 output tiles; each split keeps at least ``min_rows`` tokens so
    the per-split reduction stays long enough to amortize its tile loads.
    """
    if device.type == "cuda":
        sms, min_rows = torch.cuda.get_device_properties(device).multi_processor_count, 256
    else:  # interpreter: small numbers so CPU tests exercise the split path
        sms, min_rows = 4, 16
    tiles = n_blocks * max(1, b // 64) ** 2
    return max(1, min(triton.cdiv(2 * sms, tiles), n_rows // min_rows))


def block_grads(
    a: torch.Tensor, c: torch.Tensor, n_blocks: int, b: int, *,
    a_cols: torch.Tensor | None = None, c_cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[k, i, j] = sum_t a[t, ac(k*b+i)] * c[t, cc(k*b+j)]`` as float32 ``(n, b, b)``.

    ``a``, ``c``: ``(N, d)`` of one dtype, unit stride along ``d``; ``a_cols``/``c_cols``
    optional gather maps ``(d,)``.
    """
    n_rows = a.shape[0]
    splits = _num_splits(n_rows, n_blocks, b, a.device)
    out = torch.empty(splits, n_blocks, b, b, dtype=torch.float32, device=a.device)
    grid = lambda meta: (n_blocks * (b // meta["BLOCK_I"]) * (b // meta["BLOCK_J"]), splits)  # noqa: E731
    block_grad_kernel[grid](
        a, c, out, a_cols if a_cols is not None else a, c_cols if c_cols is not None else c,
        n_rows, splits, a.stride(0), c.stride(0),
        B=b, GATHER_A=a_cols is not None, GATHER_C=c_cols is not None,
        DOT_PRECISION=_dot_precision(a.dtype), UPCAST=_upcast(a.dtype),
    )
    return out[0] if splits == 1 else out.sum(0)


def input_side_grads(
    x: torch.Tensor, grad_z: torch.Tensor, perm: torch.Tensor, blocks: torch.Tensor, need_input_grad: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``z = BD(G) Pi x``: ``(grad_x (..., d) or None, grad_blocks (n, b, b))``."""
    n, b, _ = blocks.shape
    x2, dz2 = _rows(x), _rows(grad_z.to(x.dtype))
    grad_x = rotate_rows(dz2, blocks, transpose=True, out_cols=perm).view(x.shape) if need_input_grad else None
    grad_blocks = block_grads(dz2, x2, n, b, c_cols=perm).to(blocks.dtype)
    return grad_x, grad_blocks


def output_side_grads(
    h: torch.Tensor, grad_y: torch.Tensor, blocks: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``y = Pi^T BD(G) h`` (``perm`` = the output permutation).

    Returns ``(grad_h (..., d), grad_blocks (n, b, b))``.
    """
    n, b, _ = blocks.shape
    h2, dy2 = _rows(h), _rows(grad_y.to(h.dtype))
    grad_h = rotate_rows(dy2, blocks, transpose=True, in_cols=perm).view(h.shape)
    grad_blocks = block_grads(dy2, h2, n, b, a_cols=perm).to(blocks.dtype)
    return grad_h, grad_blocks


class RotateInput(torch.autograd.Function):
    """``z = BD(G) Pi x``; saves ``x`` itself (never a permuted copy)."""

    @staticmethod
    def forward(ctx, x, perm, blocks):
        ctx.save_for_backward(x, perm, blocks)
        return rotate_rows(_rows(x), blocks, in_cols=perm).view(x.shape)

    @staticmethod
    def backward(ctx, grad_z):
        x, perm, blocks = ctx.saved_tensors
        grad_x, grad_blocks = input_side_grads(x, grad_z, perm, blocks, need_input_grad=ctx.needs_input_grad[0])
        return grad_x, None, grad_blocks if ctx.needs_input_grad[2] else None


class RotateOutput(torch.autograd.Function):
    """``y = Pi^T BD(G) h`` for ``h`` in permuted order; the un-permutation happens in the stores."""

    @staticmethod
    def forward(ctx, h, blocks, perm):
        ctx.save_for_backward(h, blocks, perm)
        return rotate_rows(_rows(h), blocks, out_cols=perm).view(h.shape)

    @staticmethod
    def backward(ctx, grad_y):
        h, blocks, perm = ctx.saved_tensors
        grad_h, grad_blocks = output_side_grads(h, grad_y, blocks, perm)
        return grad_h, grad_blocks if ctx.needs_input_grad[1] else None, None


def rotate_input(x: torch.Tensor, perm: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Kernel version of ``megatron_poet.poet.rotation.rotate_input``: ``(..., d) -> (..., d)``."""
    return RotateInput.apply(x, perm, blocks)


def rotate_output(h: torch.Tensor, blocks: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Kernel version of ``megatron_poet.poet.rotation.rotate_output``: ``(..., d) -> (..., d)``."""
    return RotateOutput.apply(h, blocks, perm)

