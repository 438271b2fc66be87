"""Orthogonal blocks from skew-symmetric parameters (Cayley and Cayley–Neumann).

A block of size ``b`` is parameterized by the strict upper triangle of a
skew-symmetric ``Q`` (``b(b-1)/2`` numbers, "packed"). The orthogonal block is
the Cayley transform ``G = (I + Q)(I - Q)^-1``; POET replaces the inverse by a
truncated Neumann series of order ``k``:

    G_k = (I + Q)(I + Q + Q^2 + ... + Q^k)        (k=3: I + 2Q + 2Q^2 + 2Q^3 + Q^4)

Since ``(I - Q)(I + ... + Q^k) = I - Q^(k+1)``, ``G_k = C (I - Q^(k+1))`` with
``C`` the exact Cayley block, so ``G_k^T G_k - I = (I - Q^(k+1))^T (I - Q^(k+1)) - I``:
first order in ``Q^(k+1)`` for odd ``k`` (``Q^(k+1)`` symmetric), second order for
even ``k`` (``Q^(k+1)`` skew, the linear terms cancel). The periodic merge keeps
``Q`` small so the error stays small; :func:`orthogonality_error` measures it.
"""
from __future__ import annotations

import torch

from megatron_poet import kernels as _kernels  # imports no Triton until a kernel runs

_TRIU_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_FLAT_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def num_skew_params(block_size: int) -> int:
    """Packed parameter count of one ``block_size x block_size`` skew matrix."""
    return block_size * (block_size - 1) // 2


def _triu_indices(block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (block_size, device)
    if key not in _TRIU_CACHE:
        rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=device)
        _TRIU_CACHE[key] = (rows, cols)
    return _TRIU_CACHE[key]


def _flat_indices(block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions in a ``b x b`` block of the packed entries (upper) and of their mirrors (lower)."""
    key = (block_size, device)
    if key not in _FLAT_CACHE:
        rows, cols = _triu_indices(block_size, device)
        _FLAT_CACHE[key] = (rows * block_size + cols, cols * block_size + rows)
    return _FLAT_CACHE[key]


class _SkewFromPacked(torch.autograd.Function):
    """``Q[i, j] = p``, ``Q[j, i] = -p`` for each packed ``p`` at ``(i < j)``; two scatters forward, two gathers back."""

    @staticmethod
    def forward(ctx, packed, block_size):
        upper, lower = _flat_indices(block_size, packed.device)
        ctx.block_size = block_size
        q = packed.new_zeros(packed.shape[0], block_size * block_size)
        q.index_copy_(1, upper, packed).index_copy_(1, lower, -packed)
        return q.view(-1, block_size, block_size)

    @staticmethod
    def backward(ctx, grad_q):
        upper, lower = _flat_indices(ctx.block_size, grad_q.device)
        g = grad_q.reshape(grad_q.shape[0], -1)
        return g.index_select(1, upper) - g.index_select(1, lower), None


def skew_from_packed(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """Skew-symmetric blocks from their packed strict upper triangles.

    Args:
        packed: ``(num_blocks, block_size*(block_size-1)/2)``, row-major order of
            ``torch.triu_indices(b, b, 1)``.
    Returns:
        ``Q`` of shape ``(num_blocks, block_size, block_size)`` with ``Q = -Q^T``.
    """
    if packed.dim() != 2 or packed.shape[1] != num_skew_params(block_size):
        raise ValueError(
            f"packed skew parameters must have shape (num_blocks, {num_skew_params(block_size)}) "
            f"for block_size={block_size}, got {tuple(packed.shape)}"
        )
    return _SkewFromPacked.apply(packed, block_size)


def packed_from_skew(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`skew_from_packed`: ``(n, b, b)`` -> ``(n, b(b-1)/2)``."""
    rows, cols = _triu_indices(q.shape[-1], q.device)
    return q[:, rows, cols]


def cayley_neumann_from_skew(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """Orthogonal (or nearly orthogonal) blocks from skew blocks ``q`` ``(n, b, b)``.

    ``neumann_terms=k >= 1`` evaluates ``(I + Q)(I + Q + ... + Q^k) = I + 2(Q + ... + Q^k) + Q^(k+1)``
    as a polynomial in ``Q^2`` whose coefficients are ``a I + c Q``, by Horner's rule in ``Q^2``:
    ``floor(k/2) + 1`` batched matmuls (k=3: ``(I + 2Q) + Q^2 (2I + 2Q + Q^2)``, 2) where Horner's rule
    in ``Q`` takes ``k``; the series' backward halves with it. ``neumann_terms=None`` is the exact
    Cayley transform ``(I - Q)^-1 (I + Q)`` (the two factors commute), for reference.
    """
    if neumann_terms is None:
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        return torch.linalg.solve(eye - q, eye + q)
    if neumann_terms < 1:
        raise ValueError(f"neumann_terms must be >= 1 (k=0 diverges in the paper), got {neumann_terms}")
    return _horner_steps(q, torch.bmm(q, q), neumann_terms)[0][-1]


def _neumann_pairs(neumann_terms: int) -> list[tuple[int, int]]:
    """``(a, c)`` per power of ``Q^2``: ``G_k = sum_j (a_j I + c_j Q) (Q^2)^j``."""
    coefficients = [1] + [2] * neumann_terms + [1]  # of Q^0 .. Q^(k+1)
    return [(coefficients[i], coefficients[i + 1] if i + 1 < len(coefficients) else 0)
            for i in range(0, len(coefficients), 2)]


def _horner_steps(q: torch.Tensor, q2: torch.Tensor, neumann_terms: int):
    """The evaluation of :func:`cayley_neumann_from_skew`: ``(steps, pairs, (c_top, folded))`` with ``steps``
    every Horner value (the last is ``G``), ``pairs`` the ``(a, c)`` the later steps added (applied last to
    first), and the first value's ``Q`` coefficient and whether it holds ``Q^2``."""
    pairs = _neumann_pairs(neumann_terms)
    top_a, top_c = pairs.pop()
    if top_c:
        steps, top = [_PlusIdentity.apply(q * top_c, top_a)], (top_c, False)
    else:  # the top coefficient is I (Q^(k+1)'s is 1): fold it into the next one without a matmul
        a, c = pairs.pop()
        steps, top = [_PlusIdentity.apply(torch.add(q2, q, alpha=c), a)], (c, True)
    for a, c in reversed(pairs):
        steps.append(torch.baddbmm(_PlusIdentity.apply(q * c, a), q2, steps[-1]))
    return steps, pairs, top


def cayley_neumann_vjp(packed: torch.Tensor, block_size: int, neumann_terms: int | None,
                       grad_blocks: torch.Tensor) -> torch.Tensor:
    """``dL/dpacked`` ``(n, b(b-1)/2)`` of ``G = cayley_neumann(packed)`` given ``dL/dG`` ``(n, b, b)``, without
    building ``G``'s graph (no gradient mode needed; ``packed``'s dtype).

    For the polynomial in ``Q^2`` (:func:`cayley_neumann_from_skew`): the Horner steps
    ``S' = (a I + c Q) + Q^2 S`` backwards (``dQ += c dS'``, ``dQ^2 += dS' S^T``, ``dS = Q^2 dS'``; ``Q^2`` is
    symmetric), then ``Q^2 = Q Q``: only the skew part of ``dQ`` reaches ``packed``, and for a symmetric
    ``M = (dQ^2 + dQ^2^T)/2`` that part of ``dQ^2 Q^T + Q^T dQ^2`` is the one of ``(M Q)^T - M Q``: one matmul.
    k=3: 4 matmuls, where autograd rebuilds the series (2) and differentiates it (4). CUDA float32 blocks
    of a supported size use the fused Triton kernel; the exact Cayley transform goes through autograd.
    """
    if _kernels.cayley_neumann_supported(packed, block_size, neumann_terms):
        from megatron_poet.kernels import library

        return library.cayley_neumann_backward(packed, grad_blocks, block_size, neumann_terms)
    if neumann_terms is None:
        with torch.enable_grad():
            leaf = packed.detach().requires_grad_()
            return torch.autograd.grad(cayley_neumann(leaf, block_size, None), leaf, grad_blocks)[0]
    with torch.no_grad():
        q = skew_from_packed(packed, block_size)
        q2 = torch.bmm(q, q)
        series, pairs, (c_top, folded) = _horner_steps(q, q2, neumann_terms)
        grad = grad_blocks.to(q.dtype)
        d_q, d_q2 = torch.zeros_like(q), torch.zeros_like(q)
        for (a, c), previous in zip(pairs, reversed(series[:-1])):  # backwards through the steps
            d_q.add_(grad, alpha=c)
            d_q2.baddbmm_(grad, previous.transpose(1, 2))
            grad = torch.bmm(q2, grad)
        d_q.add_(grad, alpha=c_top)
        if folded:
            d_q2.add_(grad)
        m = d_q2.add_(d_q2.transpose(1, 2).clone()).mul_(0.5)
        mq = torch.bmm(m, q)
        d_q.add_(mq.transpose(1, 2)).sub_(mq)
        upper, lower = _flat_indices(block_size, q.device)
        flat = d_q.view(d_q.shape[0], -1)
        return flat.index_select(1, upper) - flat.index_select(1, lower)


class _PlusIdentity(torch.autograd.Function):
    """``x + a I`` for a fresh batch ``x`` ``(n, b, b)``, in place on its diagonals; the gradient passes
    through unchanged (a broadcast add or autograd's in-place bookkeeping would each cost a pass)."""

    @staticmethod
    def forward(ctx, x, a):
        ctx.mark_dirty(x)
        x.diagonal(dim1=1, dim2=2).add_(a)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def cayley_neumann(packed: torch.Tensor, block_size: int, neumann_terms: int | None) -> torch.Tensor:
    """Blocks ``G`` ``(num_blocks, b, b)`` from packed skew parameters ``(num_blocks, b(b-1)/2)``.

    CUDA float32 parameters with a supported block size use the fused Triton kernel
    (``megatron_poet.kernels``; disable with ``MEGATRON_POET_KERNELS=0``), else PyTorch.
    """
    if _kernels.cayley_neumann_supported(packed, block_size, neumann_terms):
        from megatron_poet.kernels import library  # the kernel as a custom op (opaque to torch.compile)

        return library.cayley_neumann_forward(packed, block_size, neumann_terms)
    return cayley_neumann_from_skew(skew_from_packed(packed, block_size), neumann_terms)


# Limits on orthogonality_error (docs/POET.md, "Factors stay valid"). At 1e-2 the singular values of
# an applied block are within 0.5 % of 1: training is healthy well below it (1e-7..1e-4). At 0.25 they
# may be 13 % off: with the default k = 3 the skew blocks' largest rotation angle is then ~0.6 rad, past
# which the truncated series stops approximating an orthogonal matrix (it diverges at 1 rad).
ORTHOGONALITY_WARNING = 1e-2
MAX_ORTHOGONALITY_ERROR = 0.25


def orthogonality_error(blocks: torch.Tensor) -> torch.Tensor:
    """Max over blocks of the Frobenius norm ``||G^T G - I||_F`` (a 0-d tensor).

    The Frobenius norm bounds the spectral norm, so every singular value of
    every block lies in ``[sqrt(1 - e), sqrt(1 + e)]`` for the returned ``e``.
    """
    g = blocks.float() if blocks.dtype in (torch.float16, torch.bfloat16) else blocks
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    gram = torch.bmm(g.transpose(1, 2), g)
    return torch.linalg.matrix_norm(gram - eye, ord="fro").max()
