"""Permuted block-orthogonal rotations of activations (the input-centric POET-X ops).

A side transform of dimension ``d`` is ``Pi^T BD(G) Pi``: a permutation ``Pi``
(``perm``: ``(Pi x)[i] = x[perm[i]]``) followed by ``n`` orthogonal ``b x b``
blocks ``G`` applied to the first ``n*b`` permuted coordinates (the rest pass
through unchanged; that is the fully stochastic variant, where ``n = 1``).
Block-diagonal or dense matrices are never built: blocks are a batch dimension.
All functions take activations in row form ``(..., d)``.

``rotate_input`` / ``rotate_output`` use the Triton kernels of ``megatron_poet.kernels``
(permutation fused into loads / stores) for supported CUDA tensors and fall back to the
PyTorch ops below otherwise; ``MEGATRON_POET_KERNELS=0`` forces PyTorch.
"""
from __future__ import annotations

import torch

from megatron_poet import kernels as _kernels  # imports no Triton until a kernel runs


def block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``out[..., k, i] = sum_j blocks[k, i, j] * x[..., k, j]`` over the leading ``n*b`` features.

    Args:
        x: ``(..., d)`` with ``d >= n*b``.
        blocks: ``(n, b, b)``.
    Returns:
        ``(..., d)``; features ``n*b:`` are copied through.
    """
    n, b, _ = blocks.shape
    covered = n * b
    head = x[..., :covered].unflatten(-1, (n, b))
    rotated = torch.einsum("...kj,kij->...ki", head, blocks).flatten(-2)
    if covered == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., covered:]), dim=-1)


def block_rotate_grads(
    x: torch.Tensor, grad_out: torch.Tensor, blocks: torch.Tensor, need_input_grad: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``block_rotate(x, blocks)`` given ``grad_out`` (both ``(N, d)``).

    Returns ``(grad_x (N, d) or None, grad_blocks (n, b, b))``.
    """
    n, b, _ = blocks.shape
    covered = n * b
    go_head = grad_out[:, :covered].unflatten(-1, (n, b))
    x_head = x[:, :covered].unflatten(-1, (n, b))
    grad_blocks = torch.einsum("tki,tkj->kij", go_head, x_head)
    grad_x = block_rotate(grad_out, blocks.transpose(1, 2)) if need_input_grad else None
    return grad_x, grad_blocks


def rotate_input(x: torch.Tensor, perm: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Input side without the final un-permutation: ``BD(G) Pi x``, shape ``(..., d)``.

    The frozen weight is stored pre-permuted (``A0[:, perm]``), so the result
    feeds the GEMM directly.
    """
    if _kernels.rotation_supported(x, blocks):
        from megatron_poet.kernels.rotation_ops import rotate_input as fused

        return fused(x, perm, blocks)
    return block_rotate(x.index_select(-1, perm), blocks)


def rotate_output(h: torch.Tensor, blocks: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Output side: ``Pi^T BD(G) h`` for ``h`` in permuted order, shape ``(..., d)``.

    ``perm`` is the side's permutation: ``y[..., perm[i]] = (BD(G) h)[..., i]`` (a scatter,
    so no inverse permutation is needed).
    """
    if _kernels.rotation_supported(h, blocks):
        from megatron_poet.kernels.rotation_ops import rotate_output as fused

        return fused(h, blocks, perm)
    rotated = block_rotate(h, blocks)
    return torch.empty_like(rotated).index_copy(-1, perm, rotated)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv
