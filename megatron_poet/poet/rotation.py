"""Permuted block-orthogonal rotations of activations (the input-centric POET-X ops), without autograd.

A side transform of dimension ``d`` is ``Pi^T BD(G) Pi``: a permutation ``Pi``
(``perm``: ``(Pi x)[i] = x[perm[i]]``) followed by ``n`` orthogonal ``b x b`` blocks
``G``. Block ``k`` acts on the permuted coordinates ``k*s .. k*s+b-1``, where ``s`` is
the side's *segment* (``n*s = d``): ``s = b`` tiles the dimension with blocks (POET-BS);
``s > b`` rotates the first ``b`` coordinates of every segment and passes the rest
through (POET-FS: one random ``b``-subset per segment). Block-diagonal or dense
matrices are never built: blocks are a batch dimension.

Every function takes activations in row form ``(..., d)``. For supported CUDA tensors
(block-stochastic layout) they run the Triton kernels of ``megatron_poet.kernels``, which
fuse the permutation into their loads/stores; otherwise PyTorch ops
(``MEGATRON_POET_KERNELS=0`` forces PyTorch). Autograd lives in :mod:`.functional`.
"""
from __future__ import annotations

import torch

from megatron_poet import kernels as _kernels  # imports no Triton until a kernel runs


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _ops():
    """The kernels as custom ops (``torch.ops.megatron_poet``): opaque to ``torch.compile``."""
    from megatron_poet.kernels import library

    return library


def _use_kernels(x: torch.Tensor, blocks: torch.Tensor, segment: int) -> bool:
    return segment == blocks.shape[-1] and _kernels.rotation_supported(x, blocks)


def _gather(x2: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x2[:, index]`` for rows ``(N, d)`` (``torch.gather`` is the fastest column gather on CPU)."""
    return torch.gather(x2, 1, index.to(x2.device).expand(x2.shape[0], -1))


def _inverse(perm: torch.Tensor, inv_perm: torch.Tensor | None) -> torch.Tensor:
    return inv_perm if inv_perm is not None else torch.argsort(perm)


def rotate_covered(t: torch.Tensor, blocks: torch.Tensor, segment: int, *, transpose: bool = False,
                   inplace: bool = False) -> torch.Tensor:
    """``out[:, k*s+i] = sum_j M[k, i, j] t[:, k*s+j]`` for ``i, j < b``; other coordinates copied.

    Args:
        t: rows ``(N, n*s)``; blocks: ``(n, b, b)`` in ``t``'s dtype; ``M = blocks`` or its
        transpose. ``inplace`` may write into ``t`` (only when the rotation does not cover it).
    Returns ``(N, n*s)``.
    """
    n_rows, d = t.shape
    n, b, _ = blocks.shape
    covered = t.view(n_rows, n, segment)[..., :b].transpose(0, 1)  # (n, N, b), strided
    rotated = torch.bmm(covered, blocks if transpose else blocks.transpose(1, 2))
    if segment == b:
        return rotated.transpose(0, 1).reshape(n_rows, d)
    out = t if inplace else t.clone()
    out.view(n_rows, n, segment)[..., :b] = rotated.transpose(0, 1)
    return out


def block_rotate(x: torch.Tensor, blocks: torch.Tensor, segment: int | None = None) -> torch.Tensor:
    """``BD(G) x`` without permutation, rows ``(..., d)`` (``segment`` defaults to the block size)."""
    return rotate_covered(_rows(x), blocks, segment or blocks.shape[-1]).view(x.shape)


def input_rotation(x: torch.Tensor, perm: torch.Tensor, blocks: torch.Tensor,
                   segment: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(z, Pi x or None)``: ``z = BD(G) Pi x`` ``(..., d)``, the input side without un-permuting
    (``A0`` is stored pre-permuted). The PyTorch path gathers ``Pi x`` as a separate pass and
    returns it (a by-product the backward can reuse); the kernels gather in their loads (``None``)."""
    x2 = _rows(x)
    if _use_kernels(x2, blocks, segment):
        return _ops().rotate_rows(x2.contiguous(), blocks, False, perm, None).view(x.shape), None
    xp = _gather(x2, perm)
    return rotate_covered(xp, blocks, segment).view(x.shape), xp.view(x.shape)


def output_rotation(h: torch.Tensor, blocks: torch.Tensor, perm: torch.Tensor, segment: int,
                    inv_perm: torch.Tensor | None = None) -> torch.Tensor:
    """``y = Pi^T BD(G) h`` ``(..., d)`` for ``h`` in permuted order (``y[..., perm[i]] = (BD(G) h)[..., i]``)."""
    h2 = _rows(h)
    if _use_kernels(h2, blocks, segment):
        return _ops().rotate_rows(h2.contiguous(), blocks, False, None, perm).view(h.shape)
    return _gather(rotate_covered(h2, blocks, segment), _inverse(perm, inv_perm)).view(h.shape)


def block_outer(a: torch.Tensor, c: torch.Tensor, blocks: torch.Tensor, segment: int,
                a_cols: torch.Tensor | None = None, c_cols: torch.Tensor | None = None) -> torch.Tensor:
    """``out[k, i, j] = sum_t a'[t, k*s+i] c'[t, k*s+j]`` with ``a' = a[:, a_cols]``, ``c' = c[:, c_cols]``
    (no gather when ``None``): the block gradient of a rotation.

    Rows ``(N, d)``; ``blocks`` ``(n, b, b)`` give the layout. Returns ``(n, b, b)`` in float32
    (float64 for float64 rows).
    """
    n, b, _ = blocks.shape
    if _use_kernels(a, blocks, segment):
        return _ops().block_grads(a.contiguous(), c.contiguous(), n, b, a_cols, c_cols)
    a = a if a_cols is None else _gather(a, a_cols)
    c = c if c_cols is None else _gather(c, c_cols)
    n_rows = a.shape[0]
    av = a.reshape(n_rows, n, segment)[..., :b]
    cv = c.reshape(n_rows, n, segment)[..., :b]
    return torch.bmm(av.permute(1, 2, 0), cv.transpose(0, 1)).to(torch.promote_types(a.dtype, torch.float32))


def input_side_grads(
    grad_z: torch.Tensor, blocks: torch.Tensor, perm: torch.Tensor, segment: int, *,
    x: torch.Tensor | None = None, x_perm: torch.Tensor | None = None,
    inv_perm: torch.Tensor | None = None, need_input_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For ``z = BD(G) Pi x``: ``(grad_x (..., d) or None, grad_blocks (n, b, b))``.

    Give the input as ``x`` or already permuted as ``x_perm`` (:func:`input_rotation`'s by-product).
    """
    gz2 = _rows(grad_z.to(blocks.dtype))
    kept, kept_cols = (_rows(x_perm), None) if x_perm is not None else (_rows(x), perm)
    grad_blocks = block_outer(gz2, kept, blocks, segment, c_cols=kept_cols)
    if not need_input_grad:
        return None, grad_blocks
    if _use_kernels(gz2, blocks, segment):
        grad_x = _ops().rotate_rows(gz2.contiguous(), blocks, True, None, perm)
    else:
        grad_x = _gather(rotate_covered(gz2, blocks, segment, transpose=True), _inverse(perm, inv_perm))
    return grad_x.view(grad_z.shape), grad_blocks


def output_side_grads(
    grad_y: torch.Tensor, blocks: torch.Tensor, perm: torch.Tensor, segment: int, *,
    h: torch.Tensor | None = None, y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``y = Pi^T BD(G) h``: ``(grad_h (..., d), outer (n, b, b))``.

    Give ``h`` (then ``outer = sum_t (Pi grad_y) h^T``, the block gradient) or ``y``
    (then ``outer = sum_t (Pi grad_y) (Pi y)^T``, which is the block gradient times ``G^T``).
    """
    gy2 = _rows(grad_y.to(blocks.dtype))
    other, other_cols = (_rows(h), None) if h is not None else (_rows(y), perm)
    if _use_kernels(gy2, blocks, segment):
        grad_h = _ops().rotate_rows(gy2.contiguous(), blocks, True, perm, None)
        outer = block_outer(gy2, other, blocks, segment, a_cols=perm, c_cols=other_cols)
    else:
        gu = _gather(gy2, perm)  # gathered once, used twice
        grad_h = rotate_covered(gu, blocks, segment, transpose=True)
        outer = block_outer(gu, other, blocks, segment, c_cols=other_cols)
    return grad_h.view(grad_y.shape), outer


def times_inverse_transpose(outer: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``outer G^{-T}`` per block ``(n, b, b)``, in ``outer``'s dtype (float32 or wider): the block gradient
    from :func:`output_side_grads`' ``y`` form. No host synchronization (no error check: ``G`` is close to
    orthogonal, so well conditioned, whenever the Neumann series converges)."""
    g = blocks.to(outer.dtype)
    return torch.linalg.solve_ex(g, outer.transpose(1, 2), check_errors=False)[0].transpose(1, 2)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv
