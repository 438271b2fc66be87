"""Triton kernels: block rotations of activations with the permutation fused into loads/stores.

Two kernels cover all four passes of both POET sides (``b = B``, ``n`` blocks, ``d = n*B``):

``rotate``:  ``out[t, oc(k*B + i)] = sum_j M[k, i, j] * inp[t, ic(k*B + j)]``
    where ``ic``/``oc`` are either the identity or a column map read from memory
    (``GATHER_IN``/``SCATTER_OUT``), and ``M`` is ``G`` or ``G^T`` (passed as strides).
    - input side forward:   inp = x,    ic = perm_in,  M = G          (z = BD(G) Pi x)
    - input side backward:  inp = dz,   M = G^T,       oc = perm_in   (dx = Pi^T BD(G)^T dz)
    - output side forward:  inp = h,    M = G,         oc = perm_out  (y = Pi^T BD(G) h)
    - output side backward: inp = dy,   ic = perm_out, M = G^T        (dh = BD(G)^T Pi dy)
``block_grad``: ``out[s, k, i, j] = sum_{t in split s} a[t, ac(k*B + i)] * c[t, cc(k*B + j)]``
    (the gradient of the blocks, split over tokens for parallelism; splits are summed after).

No permuted copy of an activation is ever written: gathers happen in the loads,
scatters in the stores (a permutation is a bijection, so scattered stores never collide).
Loads and products run in the activation dtype (tensor cores), accumulation in float32.
``UPCAST`` (set only under ``TRITON_INTERPRET=1`` for bfloat16) feeds the product float32
copies of the same bf16 values: Triton's CPU interpreter cannot multiply bf16 operands
(it hands their raw uint16 bits to numpy), and bf16 x bf16 products are exact in float32,
so the result equals the GPU's bf16 tensor-core dot with float32 accumulation.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import AUTOTUNE_OPTIONS, GRAD_CONFIGS, ROTATE_CONFIGS, prune_to_block


@triton.autotune(
    configs=ROTATE_CONFIGS,
    key=["n_rows", "B", "GATHER_IN", "SCATTER_OUT"],
    prune_configs_by={"early_config_prune": prune_to_block(("BLOCK_N", "BLOCK_K"))},
    **AUTOTUNE_OPTIONS,
)
@triton.jit
def rotate_kernel(
    inp_ptr, out_ptr, m_ptr, in_cols_ptr, out_cols_ptr,
    n_rows, stride_in, stride_out, stride_mk, stride_mi, stride_mj,
    B: tl.constexpr, GATHER_IN: tl.constexpr, SCATTER_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Axis 0 walks (block, output tile) fastest, so the programs that gather the same
    # token rows run together and share them through L2.
    tiles_n = B // BLOCK_N
    blk = tl.program_id(0) // tiles_n
    tile_n = tl.program_id(0) % tiles_n
    rows = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < n_rows
    out_local = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_range = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, B, BLOCK_K):
        in_local = k0 + k_range
        cols = blk * B + in_local
        if GATHER_IN:
            cols = tl.load(in_cols_ptr + cols)
        a = tl.load(inp_ptr + rows[:, None] * stride_in + cols[None, :], mask=row_ok[:, None], other=0.0)
        # (BLOCK_K, BLOCK_N) tile of M[blk]^T, so that acc[t, i] += sum_j a[t, j] * M[blk, i, j].
        m = tl.load(m_ptr + blk * stride_mk + out_local[None, :] * stride_mi + in_local[:, None] * stride_mj)
        m = m.to(a.dtype)  # the blocks enter the product in the activation dtype
        if UPCAST:
            a = a.to(tl.float32)
            m = m.to(tl.float32)
        acc = tl.dot(a, m, acc, input_precision=DOT_PRECISION)
    out_cols = blk * B + out_local
    if SCATTER_OUT:
        out_cols = tl.load(out_cols_ptr + out_cols)
    tl.store(out_ptr + rows[:, None] * stride_out + out_cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.autotune(
    configs=GRAD_CONFIGS,
    key=["n_rows", "B", "num_splits", "GATHER_A", "GATHER_C"],
    prune_configs_by={"early_config_prune": prune_to_block(("BLOCK_I", "BLOCK_J"))},
    **AUTOTUNE_OPTIONS,
)
@triton.jit
def block_grad_kernel(
    a_ptr, c_ptr, out_ptr, a_cols_ptr, c_cols_ptr,
    n_rows, num_splits, stride_a, stride_c,
    B: tl.constexpr, GATHER_A: tl.constexpr, GATHER_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
):
    tiles_i = B // BLOCK_I
    tiles_j = B // BLOCK_J
    pid = tl.program_id(0)
    blk = pid // (tiles_i * tiles_j)
    tile_i = (pid // tiles_j) % tiles_i
    tile_j = pid % tiles_j
    split = tl.program_id(1)
    local_i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
    local_j = tile_j * BLOCK_J + tl.arange(0, BLOCK_J)
    cols_a = blk * B + local_i
    cols_c = blk * B + local_j
    if GATHER_A:
        cols_a = tl.load(a_cols_ptr + cols_a)
    if GATHER_C:
        cols_c = tl.load(c_cols_ptr + cols_c)
    # Each split reduces a contiguous, BLOCK_T-aligned range of tokens. (Plain integer
    # ceil-division: tl.cdiv/tl.zeros are @jit library functions, which the interpreter
    # cannot call when Triton was imported before TRITON_INTERPRET=1 was set.)
    rows_per_split = (n_rows + num_splits - 1) // num_splits
    per_split = (rows_per_split + BLOCK_T - 1) // BLOCK_T * BLOCK_T
    start = split * per_split
    stop = tl.minimum(start + per_split, n_rows)
    t_range = tl.arange(0, BLOCK_T)
    acc = tl.full((BLOCK_I, BLOCK_J), 0.0, tl.float32)
    for t0 in range(start, stop, BLOCK_T):
        rows = (t0 + t_range).to(tl.int64)
        ok = rows < stop
        # a loaded transposed (BLOCK_I, BLOCK_T): acc[i, j] += sum_t a[t, i] * c[t, j].
        a_t = tl.load(a_ptr + rows[None, :] * stride_a + cols_a[:, None], mask=ok[None, :], other=0.0)
        c = tl.load(c_ptr + rows[:, None] * stride_c + cols_c[None, :], mask=ok[:, None], other=0.0)
        if UPCAST:
            a_t = a_t.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(a_t, c, acc, input_precision=DOT_PRECISION)
    # out is (num_splits, n, B, B) float32, contiguous.
    n_blocks = tl.num_programs(0) // (tiles_i * tiles_j)
    base = (split.to(tl.int64) * n_blocks + blk) * B * B
    tl.store(out_ptr + base + local_i[:, None] * B + local_j[None, :], acc)
