"""The POET linear map ``y = Pi_out^T BD(G_P) A0' BD(G_R) Pi_in x + bias``, two ways.

``A0'`` is the frozen weight stored pre-permuted (``A0'[i, j] = A0[perm_out[i], perm_in[j]]``).

- ``poet_linear(..., recompute=False)`` ("fast"): ordinary autograd over the
  input-centric ops; it keeps the permuted input and the GEMM output for backward.
- ``poet_linear(..., recompute=True)`` ("mem"): a custom autograd function that
  saves only the layer input (and references to the small blocks and the frozen
  weight) and recomputes the intermediates in backward.

Neither computes a gradient for the frozen weight: no weight-gradient GEMM runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rotation import block_rotate, block_rotate_grads, rotate_input, rotate_output


class _RecomputingPOETLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, frozen_weight, r_blocks, p_blocks, perm_in, inv_perm_out, bias):
        z = rotate_input(x, perm_in, r_blocks)
        y = rotate_output(F.linear(z, frozen_weight), p_blocks, inv_perm_out)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, frozen_weight, r_blocks, p_blocks, perm_in, inv_perm_out)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, frozen_weight, r_blocks, p_blocks, perm_in, inv_perm_out = ctx.saved_tensors
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])
        # Recompute the two intermediates the block gradients need.
        x_perm = x2.index_select(-1, perm_in)
        z = block_rotate(x_perm, r_blocks)
        h = F.linear(z, frozen_weight)
        # y = u[:, inv_perm_out]  =>  grad_u[:, inv_perm_out] = grad_y, i.e. scatter back.
        grad_u = torch.empty_like(grad_y2)
        grad_u[:, inv_perm_out] = grad_y2
        grad_h, grad_p = block_rotate_grads(h, grad_u, p_blocks)
        grad_z = grad_h @ frozen_weight  # input gradient of the GEMM; no weight gradient
        need_x = ctx.needs_input_grad[0]
        grad_x_perm, grad_r = block_rotate_grads(x_perm, grad_z, r_blocks, need_input_grad=need_x)
        grad_x = None
        if need_x:
            grad_x = torch.empty_like(grad_x_perm)
            grad_x[:, perm_in] = grad_x_perm
            grad_x = grad_x.reshape(shape)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[6]:
            grad_bias = grad_y2.sum(0)
        return grad_x, None, grad_r, grad_p, None, None, grad_bias


def poet_linear(
    x: torch.Tensor,
    frozen_weight: torch.Tensor,
    r_blocks: torch.Tensor,
    p_blocks: torch.Tensor,
    perm_in: torch.Tensor,
    inv_perm_out: torch.Tensor,
    bias: torch.Tensor | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """POET forward, input-centric.

    Args:
        x: ``(..., d_in)``.
        frozen_weight: ``(d_out, d_in)`` pre-permuted ``A0'``; never receives a gradient.
        r_blocks: ``(n_in, b, b)`` input-side blocks; p_blocks: ``(n_out, b, b)``.
        perm_in: ``(d_in,)``; inv_perm_out: ``(d_out,)`` inverse of the output permutation.
        bias: ``(d_out,)`` or None.
        recompute: "mem" mode (save only ``x``) instead of "fast" (autograd keeps intermediates).
    Returns:
        ``(..., d_out)``.
    """
    if recompute:
        return _RecomputingPOETLinear.apply(x, frozen_weight, r_blocks, p_blocks, perm_in, inv_perm_out, bias)
    y = rotate_output(F.linear(rotate_input(x, perm_in, r_blocks), frozen_weight), p_blocks, inv_perm_out)
    return y if bias is None else y + bias
