"""The POET linear map ``y = Pi_out^T BD(G_P) A0' BD(G_R) Pi_in x + bias``, two ways.

``A0'`` is the frozen weight stored pre-permuted (``A0'[i, j] = A0[perm_out[i], perm_in[j]]``).

- ``poet_linear(..., recompute=False)`` ("fast"): ordinary autograd over the
  input-centric ops; it keeps the permuted input and the GEMM output for backward.
- ``poet_linear(..., recompute=True)`` ("mem"): a custom autograd function that
  saves only the layer input (and references to the small blocks and the frozen
  weight) and recomputes the intermediates in backward.

Neither computes a gradient for the frozen weight: no weight-gradient GEMM runs.
Both use the Triton kernels of ``megatron_poet.kernels`` for supported CUDA tensors
(through ``rotate_input`` / ``rotate_output`` and the side gradients below).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rotation import block_rotate_grads, rotate_input, rotate_output

from megatron_poet import kernels as _kernels  # imports no Triton until a kernel runs


def _input_side_grads(
    x: torch.Tensor, grad_z: torch.Tensor, blocks: torch.Tensor, perm: torch.Tensor, need_input_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``z = BD(G) Pi x`` for rows ``(N, d)``: ``(grad_x or None, grad_blocks)``."""
    if _kernels.rotation_supported(x, blocks):
        from megatron_poet.kernels.rotation_ops import input_side_grads

        return input_side_grads(x, grad_z, perm, blocks, need_input_grad)
    grad_x_perm, grad_blocks = block_rotate_grads(x.index_select(-1, perm), grad_z, blocks, need_input_grad)
    if not need_input_grad:
        return None, grad_blocks
    grad_x = torch.empty_like(grad_x_perm)
    grad_x[:, perm] = grad_x_perm
    return grad_x, grad_blocks


def _output_side_grads(
    h: torch.Tensor, grad_y: torch.Tensor, blocks: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``y = Pi^T BD(G) h`` for rows ``(N, d)``: ``(grad_h, grad_blocks)``."""
    if _kernels.rotation_supported(h, blocks):
        from megatron_poet.kernels.rotation_ops import output_side_grads

        return output_side_grads(h, grad_y, blocks, perm)
    # y[:, perm] = u  =>  grad_u = grad_y[:, perm].
    return block_rotate_grads(h, grad_y.index_select(-1, perm), blocks)


class _RecomputingPOETLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, frozen_weight, r_blocks, p_blocks, perm_in, perm_out, bias):
        z = rotate_input(x, perm_in, r_blocks)
        y = rotate_output(F.linear(z, frozen_weight), p_blocks, perm_out)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x, frozen_weight, r_blocks, p_blocks, perm_in, perm_out)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, frozen_weight, r_blocks, p_blocks, perm_in, perm_out = ctx.saved_tensors
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])
        # Recompute the GEMM output the output-side block gradient needs.
        h = F.linear(rotate_input(x2, perm_in, r_blocks), frozen_weight)
        grad_h, grad_p = _output_side_grads(h, grad_y2, p_blocks, perm_out)
        grad_z = grad_h @ frozen_weight  # input gradient of the GEMM; no weight gradient
        need_x = ctx.needs_input_grad[0]
        grad_x, grad_r = _input_side_grads(x2, grad_z, r_blocks, perm_in, need_x)
        if need_x:
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
    perm_out: torch.Tensor,
    bias: torch.Tensor | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """POET forward, input-centric.

    Args:
        x: ``(..., d_in)``.
        frozen_weight: ``(d_out, d_in)`` pre-permuted ``A0'``; never receives a gradient.
        r_blocks: ``(n_in, b, b)`` input-side blocks; p_blocks: ``(n_out, b, b)``.
        perm_in, perm_out: ``(d_in,)``, ``(d_out,)`` the input and output permutations.
        bias: ``(d_out,)`` or None.
        recompute: "mem" mode (save only ``x``) instead of "fast" (autograd keeps intermediates).
    Returns:
        ``(..., d_out)``.
    """
    if recompute:
        return _RecomputingPOETLinear.apply(x, frozen_weight, r_blocks, p_blocks, perm_in, perm_out, bias)
    y = rotate_output(F.linear(rotate_input(x, perm_in, r_blocks), frozen_weight), p_blocks, perm_out)
    return y if bias is None else y + bias
