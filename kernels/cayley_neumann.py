"""Fused Cayley–Neumann: packed skew parameters -> orthogonal blocks, and back for gradients.

With ``Q`` skew (``Q^T = -Q``) and Neumann order ``k``, the core evaluates by Horner's rule

    S_1 = I + Q,   S_{t+1} = I + Q S_t (t < k),   G = S_k + Q S_k   (= (I+Q)(I+Q+...+Q^k)).

Reverse mode through that recurrence, with ``Gb = dL/dG`` and ``Q^T = -Q``:

    Sb_k = Gb - Q Gb,   Sb_t = -Q Sb_{t+1},
    dL/dQ = Gb S_k^T + sum_{t=1}^{k-1} Sb_{t+1} S_t^T + Sb_1,
    dL/dpacked[i<j] = dL/dQ[i, j] - dL/dQ[j, i].

``Q`` is never materialized: every kernel reads its tiles straight from the packed
strict upper triangle (``Q[i,j] = packed[idx(min, max)]`` with a sign). The powers
``S_t`` and ``Sb_t`` are genuine intermediates of a (k+1)-product chain; for b up to
512 they do not fit on chip, so they live in a float32 workspace. The last backward
kernel reduces the whole sum of products for a pair of mirrored tiles and writes the
packed gradient directly (no dL/dQ matrix). Products run in float32 (3xTF32 on GPU).

Shapes: packed ``(n, b(b-1)/2)`` float32; blocks ``(n, b, b)`` float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import AUTOTUNE_OPTIONS, CAYLEY_CONFIGS, prune_to_block

DOT_PRECISION = "tf32x3"


@triton.jit
def _skew_tile(packed_ptr, rows, cols, B: tl.constexpr):
    """``Q[rows, cols]`` of one block, read from its packed strict upper triangle."""
    i = rows[:, None]
    j = cols[None, :]
    lo = tl.minimum(i, j)
    hi = tl.maximum(i, j)
    # Row-major triu(offset=1) index of (lo, hi): rows 0..lo-1 hold B-1, B-2, ... entries.
    idx = lo * B - (lo * (lo + 1)) // 2 + (hi - lo - 1)
    v = tl.load(packed_ptr + idx, mask=i != j, other=0.0)
    return tl.where(i < j, v, -v)


@triton.jit
def _s_tile(packed_ptr, ws_ptr, rows, cols, B: tl.constexpr, FROM_PACKED: tl.constexpr):
    """A tile of ``S_1 = I + Q`` (from the packed parameters) or of a workspace matrix."""
    if FROM_PACKED:
        eye = (rows[:, None] == cols[None, :]).to(tl.float32)
        return _skew_tile(packed_ptr, rows, cols, B) + eye
    return tl.load(ws_ptr + rows[:, None] * B + cols[None, :])


@triton.autotune(
    configs=CAYLEY_CONFIGS, key=["B", "SIGN", "ADD_I", "ADD_X", "X_IS_S1"],
    prune_configs_by={"early_config_prune": prune_to_block(("BLOCK_T", "BLOCK_K"))},
    **AUTOTUNE_OPTIONS,
)
@triton.jit
def cn_step_kernel(
    packed_ptr, x_ptr, out_ptr, n_params,
    B: tl.constexpr, SIGN: tl.constexpr, ADD_I: tl.constexpr, ADD_X: tl.constexpr, X_IS_S1: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out = SIGN * Q @ X + ADD_I * I + ADD_X * X`` per block; ``X = I + Q`` if X_IS_S1 else ``x``."""
    tiles = B // BLOCK_T
    blk = tl.program_id(1)
    rows = (tl.program_id(0) // tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = (tl.program_id(0) % tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    packed = packed_ptr + blk.to(tl.int64) * n_params
    x = x_ptr + blk.to(tl.int64) * B * B
    acc = tl.full((BLOCK_T, BLOCK_T), 0.0, tl.float32)
    for k0 in range(0, B, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        q = _skew_tile(packed, rows, ks, B)
        acc = tl.dot(q, _s_tile(packed, x, ks, cols, B, X_IS_S1), acc, input_precision=DOT_PRECISION)
    acc = acc * SIGN
    if ADD_I:
        acc += (rows[:, None] == cols[None, :]).to(tl.float32)
    if ADD_X:
        acc += _s_tile(packed, x, rows, cols, B, X_IS_S1)
    tl.store(out_ptr + blk.to(tl.int64) * B * B + rows[:, None] * B + cols[None, :], acc)


@triton.jit
def _pair_products(l_ptr, r_ptr, packed, rows, cols, B: tl.constexpr, R_FROM_PACKED: tl.constexpr,
                   acc, BLOCK_K: tl.constexpr):
    """``acc += L[rows, :] @ R[cols, :]^T`` with ``R = I + Q`` if R_FROM_PACKED."""
    for k0 in range(0, B, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        lt = tl.load(l_ptr + rows[:, None] * B + ks[None, :])
        rt = tl.trans(_s_tile(packed, r_ptr, cols, ks, B, R_FROM_PACKED))
        acc = tl.dot(lt, rt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dq_tile(grad_ptr, sb_ptr, s_ptr, slot, packed, rows, cols, B: tl.constexpr, K_TERMS: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dL/dQ[rows, cols]`` of one block.

    ``sb_ptr + (t-1)*slot`` is Sb_t (t = 1..k), ``s_ptr + (t-2)*slot`` is S_t (t = 2..k);
    S_1 is read from the packed parameters.
    """
    acc = tl.full((BLOCK_T, BLOCK_T), 0.0, tl.float32)
    # Gb S_k^T
    acc = _pair_products(grad_ptr, s_ptr + (K_TERMS - 2) * slot, packed, rows, cols, B, K_TERMS == 1, acc, BLOCK_K)
    # Sb_{t+1} S_t^T for t = 1 .. k-1
    for t in tl.static_range(1, K_TERMS):
        acc = _pair_products(sb_ptr + t * slot, s_ptr + (t - 2) * slot, packed, rows, cols, B, t == 1, acc, BLOCK_K)
    # + Sb_1
    return acc + tl.load(sb_ptr + rows[:, None] * B + cols[None, :])


@triton.autotune(
    configs=CAYLEY_CONFIGS, key=["B", "K_TERMS"],
    prune_configs_by={"early_config_prune": prune_to_block(("BLOCK_T", "BLOCK_K"))},
    **AUTOTUNE_OPTIONS,
)
@triton.jit
def cn_packed_grad_kernel(
    packed_ptr, grad_ptr, sb_ptr, s_ptr, out_ptr, n_params, n_blocks,
    B: tl.constexpr, K_TERMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Packed gradient of one pair of mirrored tiles (I, J), I <= J, of one block."""
    tiles = B // BLOCK_T
    blk = tl.program_id(1)
    # Enumerate the upper-triangular tile pairs row by row: pair p -> (I, J).
    p = tl.program_id(0)
    ti = p * 0
    remaining = p
    for r in range(0, tiles):
        row_len = tiles - r
        if remaining >= row_len and ti == r:
            remaining -= row_len
            ti = r + 1
    tj = ti + remaining
    rows = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    # Workspaces are (slots, n, B, B): slot t of block blk is at (t * n + blk) * B * B.
    slot = n_blocks.to(tl.int64) * B * B
    block = blk.to(tl.int64) * B * B
    packed = packed_ptr + blk.to(tl.int64) * n_params
    upper = _dq_tile(grad_ptr + block, sb_ptr + block, s_ptr + block, slot, packed, rows, cols,
                     B, K_TERMS, BLOCK_T, BLOCK_K)
    lower = _dq_tile(grad_ptr + block, sb_ptr + block, s_ptr + block, slot, packed, cols, rows,
                     B, K_TERMS, BLOCK_T, BLOCK_K)
    dpacked = upper - tl.trans(lower)
    i = rows[:, None]
    j = cols[None, :]
    idx = i * B - (i * (i + 1)) // 2 + (j - i - 1)
    tl.store(out_ptr + blk.to(tl.int64) * n_params + idx, dpacked, mask=i < j)


def _step(packed, x, out, b, *, sign=1.0, add_i=False, add_x=False, x_is_s1=False):
    n = packed.shape[0]
    grid = lambda meta: ((b // meta["BLOCK_T"]) ** 2, n)  # noqa: E731
    cn_step_kernel[grid](packed, x, out, packed.shape[1], B=b, SIGN=sign, ADD_I=add_i, ADD_X=add_x, X_IS_S1=x_is_s1)
    return out


def _powers(packed: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """Workspace ``(max(k-1, 1), n, b, b)`` holding ``S_2 .. S_k`` (one unused slot when k = 1)."""
    n = packed.shape[0]
    ws = torch.empty(max(k - 1, 1), n, b, b, dtype=torch.float32, device=packed.device)
    for t in range(2, k + 1):  # S_t = I + Q S_{t-1}; S_1 = I + Q comes from the packed parameters
        _step(packed, ws[max(t - 3, 0)], ws[t - 2], b, add_i=True, x_is_s1=t == 2)
    return ws


def cayley_neumann_forward(packed: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """Blocks ``(n, b, b)`` float32 from packed ``(n, b(b-1)/2)`` float32, order ``k >= 1``."""
    packed = packed.contiguous()
    ws = _powers(packed, b, k)
    out = torch.empty(packed.shape[0], b, b, dtype=torch.float32, device=packed.device)
    return _step(packed, ws[max(k - 2, 0)], out, b, add_x=True, x_is_s1=k == 1)


def cayley_neumann_backward(packed: torch.Tensor, grad_blocks: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """``dL/dpacked`` ``(n, b(b-1)/2)`` float32 from ``dL/dG`` ``(n, b, b)``."""
    packed = packed.contiguous()
    grad = grad_blocks.float().contiguous()
    n = packed.shape[0]
    s = _powers(packed, b, k)  # recomputed: cheaper than keeping k b x b matrices per side alive
    sb = torch.empty(k, n, b, b, dtype=torch.float32, device=packed.device)
    _step(packed, grad, sb[k - 1], b, sign=-1.0, add_x=True)  # Sb_k = Gb - Q Gb
    for t in range(k - 1, 0, -1):  # Sb_t = -Q Sb_{t+1}
        _step(packed, sb[t], sb[t - 1], b, sign=-1.0)
    out = torch.empty_like(packed)
    grid = lambda meta: ((b // meta["BLOCK_T"]) * (b // meta["BLOCK_T"] + 1) // 2, n)  # noqa: E731
    cn_packed_grad_kernel[grid](packed, grad, sb, s, out, packed.shape[1], n, B=b, K_TERMS=k)
    return out


def cayley_neumann(packed: torch.Tensor, block_size: int, neumann_terms: int) -> torch.Tensor:
    """Kernel version of ``megatron_poet.poet.cayley.cayley_neumann`` (float32, ``k >= 1``), differentiable
    (saves only the packed parameters; the powers are recomputed): the custom op of :mod:`.library`."""
    from .library import cayley_neumann_forward as op

    return op(packed, block_size, neumann_terms)
