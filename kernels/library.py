"""The Triton kernels as ``torch.library`` custom ops (``torch.ops.megatron_poet.*``), with fake-tensor
implementations: ``torch.compile`` treats each as one opaque op of known output shape, so a compiled
POET layer or transformer block keeps the kernels and breaks no graph. The PyTorch fallback paths of
:mod:`megatron_poet.poet.rotation` are plain torch ops that the compiler traces (and fuses) itself.

Shapes as in :mod:`.rotation_ops` and :mod:`.cayley_neumann`: rows ``(N, d)``, blocks ``(n, b, b)``,
packed skew parameters ``(n, b(b-1)/2)``, permutations ``(d,)``.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("megatron_poet::rotate_rows", mutates_args=())
def rotate_rows(inp: torch.Tensor, blocks: torch.Tensor, transpose: bool, in_cols: torch.Tensor | None,
                out_cols: torch.Tensor | None) -> torch.Tensor:
    """:func:`.rotation_ops.rotate_rows`: ``(N, d) -> (N, d)``."""
    from .rotation_ops import rotate_rows as launch

    return launch(inp, blocks, transpose=transpose, in_cols=in_cols, out_cols=out_cols)


@rotate_rows.register_fake
def _(inp, blocks, transpose, in_cols, out_cols):
    return torch.empty_like(inp)


@torch.library.custom_op("megatron_poet::block_grads", mutates_args=())
def block_grads(a: torch.Tensor, c: torch.Tensor, n_blocks: int, b: int, a_cols: torch.Tensor | None,
                c_cols: torch.Tensor | None) -> torch.Tensor:
    """:func:`.rotation_ops.block_grads`: ``(N, d), (N, d) -> (n, b, b)`` float32."""
    from .rotation_ops import block_grads as launch

    return launch(a, c, n_blocks, b, a_cols=a_cols, c_cols=c_cols)


@block_grads.register_fake
def _(a, c, n_blocks, b, a_cols, c_cols):
    return a.new_empty((n_blocks, b, b), dtype=torch.float32)


@torch.library.custom_op("megatron_poet::cayley_neumann_forward", mutates_args=())
def cayley_neumann_forward(packed: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """:func:`.cayley_neumann.cayley_neumann_forward`: ``(n, b(b-1)/2) -> (n, b, b)`` float32."""
    from .cayley_neumann import cayley_neumann_forward as launch

    return launch(packed, b, k)


@cayley_neumann_forward.register_fake
def _(packed, b, k):
    return packed.new_empty((packed.shape[0], b, b), dtype=torch.float32)


@torch.library.custom_op("megatron_poet::cayley_neumann_backward", mutates_args=())
def cayley_neumann_backward(packed: torch.Tensor, grad_blocks: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """:func:`.cayley_neumann.cayley_neumann_backward`: ``dL/dG (n, b, b) -> dL/dpacked (n, b(b-1)/2)``."""
    from .cayley_neumann import cayley_neumann_backward as launch

    return launch(packed, grad_blocks, b, k)


@cayley_neumann_backward.register_fake
def _(packed, grad_blocks, b, k):
    return torch.empty_like(packed, dtype=torch.float32)


def _cn_setup_context(ctx, inputs, output):
    packed, b, k = inputs
    ctx.save_for_backward(packed)
    ctx.b, ctx.k = b, k


def _cn_backward(ctx, grad_blocks):
    (packed,) = ctx.saved_tensors
    return cayley_neumann_backward(packed, grad_blocks, ctx.b, ctx.k), None, None


cayley_neumann_forward.register_autograd(_cn_backward, setup_context=_cn_setup_context)
