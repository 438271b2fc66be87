"""Autograd for ``y = Pi_out^T BD(G_P) A0' BD(G_R) Pi_in x``, saving as little as possible.

``A0'`` is the frozen weight stored pre-permuted (``A0'[i, j] = A0[perm_out[i], perm_in[j]]``).
The pieces are separate so the tensor-parallel layers can put communication between them:

- :func:`rotate_input` (``z = BD(G_R) Pi_in x``) saves ``x`` (its permuted copy on the PyTorch
  path, where the gather is a separate pass anyway) and a reference to the blocks;
- :func:`frozen_linear` (``h = A0' z``) saves nothing but a reference to ``A0'``: no weight
  gradient exists, so the GEMM and its input gradient (:func:`frozen_gemm`,
  :func:`frozen_gemm_input_grad`) are the one place a different GEMM plugs in (FP8, or the
  dequantizing GEMM of an 8-bit ``A0'``: an object with ``forward`` and ``input_grad``);
- :func:`rotate_output` (``y = Pi_out^T BD(G_P) h``) saves ``h``, or its own output ``y``
  (``save_output=True``: free when the next op keeps ``y`` anyway, as attention and SwiGLU do);
- :func:`recomputed_poet_linear` ("mem" mode) saves only ``x`` and recomputes the rest in backward
  (with ``save_output`` it keeps ``y`` as well and recomputes no GEMM).

Each function takes the blocks ``G`` (:meth:`OrthogonalSide.forward_blocks
<megatron_poet.poet.side.OrthogonalSide.forward_blocks>`) and returns their gradient; within an
optimizer step all micro-batches share one block tensor per side, and the Cayley–Neumann series is
differentiated once per step, not per micro-batch (:mod:`.side`). No function keeps the series'
intermediates. With ``save_output``, the output side's block gradient comes from ``y`` instead of ``h``:
``dL/dG = sum_t du h^T = (sum_t du u^T) G^{-T}`` with ``u = Pi y = G h``; ``G`` is close to
orthogonal (well conditioned) whenever the Neumann series converges (``||Q|| < 1``), so the
solve is accurate.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .rotation import input_rotation, input_side_grads, output_rotation, output_side_grads, times_inverse_transpose
from .side import OrthogonalSide


def frozen_gemm(z: torch.Tensor, frozen_weight: torch.Tensor, gemm=None) -> torch.Tensor:
    """``h = z A0'^T``: ``(..., d_in) -> (..., d_out)``; through ``gemm`` when given (a layer's
    :meth:`~megatron_poet.poet.linear.POETModule.frozen_gemm`: FP8, or dequantizing an 8-bit ``A0'``)."""
    return F.linear(z, frozen_weight) if gemm is None else gemm.forward(z, frozen_weight)


def frozen_gemm_input_grad(grad_h: torch.Tensor, frozen_weight: torch.Tensor, gemm=None) -> torch.Tensor:
    """``dL/dz = dL/dh A0'``: ``(..., d_out) -> (..., d_in)`` (there is no weight gradient); through ``gemm`` when given."""
    return torch.matmul(grad_h, frozen_weight) if gemm is None else gemm.input_grad(grad_h, frozen_weight)


class _RotateInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, perm, inv_perm, side):
        z, x_perm = input_rotation(x, perm, blocks.to(x.dtype), side.segment)
        ctx.side, ctx.permuted = side, x_perm is not None
        ctx.save_for_backward(x if x_perm is None else x_perm, blocks, perm, inv_perm)
        return z

    @staticmethod
    def backward(ctx, grad_z):
        kept, blocks, perm, inv_perm = ctx.saved_tensors
        which = {"x_perm": kept} if ctx.permuted else {"x": kept}
        grad_x, grad_blocks = input_side_grads(grad_z, blocks.to(kept.dtype), perm, ctx.side.segment,
                                               inv_perm=inv_perm, need_input_grad=ctx.needs_input_grad[0], **which)
        return grad_x, _block_grad(grad_blocks, blocks, ctx.needs_input_grad[1]), None, None, None


def _block_grad(grad: torch.Tensor, blocks: torch.Tensor, needed: bool) -> torch.Tensor | None:
    return grad.to(blocks.dtype) if needed else None


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, frozen_weight, gemm):
        ctx.save_for_backward(frozen_weight)  # a reference: the version counter catches a merge mid-step
        ctx.gemm = gemm
        return frozen_gemm(z, frozen_weight, gemm)

    @staticmethod
    def backward(ctx, grad_h):
        (frozen_weight,) = ctx.saved_tensors
        return frozen_gemm_input_grad(grad_h, frozen_weight, ctx.gemm), None, None


class _RotateOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, blocks, perm, inv_perm, side, save_output, deferred):
        y = output_rotation(h, blocks.to(h.dtype), perm, side.segment, inv_perm)
        ctx.side, ctx.save_output, ctx.deferred = side, save_output, deferred
        ctx.save_for_backward(y if save_output else h, blocks, perm)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        kept, blocks, perm = ctx.saved_tensors
        used = blocks.to(kept.dtype)
        which = {"y": kept} if ctx.save_output else {"h": kept}
        grad_h, outer = output_side_grads(grad_y, used, perm, ctx.side.segment, **which)
        grad_blocks = times_inverse_transpose(outer, used) if ctx.save_output and not ctx.deferred else outer
        return grad_h, _block_grad(grad_blocks, blocks, ctx.needs_input_grad[1]), None, None, None, None, None


class _RecomputedPOETLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, frozen_weight, blocks_in, perm_in, inv_in, blocks_out, perm_out, inv_out, sides, comm, gemm,
                save_output, deferred):
        in_side, out_side = sides
        z, _ = input_rotation(x, perm_in, blocks_in.to(x.dtype), in_side.segment)
        h = frozen_gemm(comm.forward(z) if comm else z, frozen_weight, gemm)
        y = h if out_side is None else output_rotation(h, blocks_out.to(h.dtype), perm_out, out_side.segment, inv_out)
        ctx.sides, ctx.comm, ctx.gemm = sides, comm, gemm
        ctx.save_output, ctx.deferred = save_output and out_side is not None, deferred
        ctx.save_for_backward(x, frozen_weight, blocks_in, perm_in, inv_in, blocks_out, perm_out,
                              y if ctx.save_output else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, frozen_weight, blocks_in, perm_in, inv_in, blocks_out, perm_out, y = ctx.saved_tensors
        (in_side, out_side), comm = ctx.sides, ctx.comm
        needs = ctx.needs_input_grad
        g_r = blocks_in.to(x.dtype)
        grad_h, grad_out, x_perm = grad_y, None, None
        if ctx.save_output:  # P's block gradient from y: neither the rotation nor the GEMM is recomputed
            used = blocks_out.to(x.dtype)
            grad_h, outer = output_side_grads(grad_y, used, perm_out, out_side.segment, y=y)
            grad_p = outer if ctx.deferred else times_inverse_transpose(outer, used)
            grad_out = _block_grad(grad_p, blocks_out, needs[5])
        elif out_side is not None:
            z, x_perm = input_rotation(x, perm_in, g_r, in_side.segment)
            h = frozen_gemm(comm.forward(z) if comm else z, frozen_weight, ctx.gemm)
            del z
            grad_h, grad_p = output_side_grads(grad_y, blocks_out.to(x.dtype), perm_out, out_side.segment, h=h)
            del h
            grad_out = _block_grad(grad_p, blocks_out, needs[5])
        grad_z = frozen_gemm_input_grad(grad_h, frozen_weight, ctx.gemm)
        if comm:
            grad_z = comm.backward(grad_z)
        grad_x, grad_r = input_side_grads(grad_z, g_r, perm_in, in_side.segment, x=x, x_perm=x_perm,
                                          inv_perm=inv_in, need_input_grad=needs[0])
        return (grad_x, None, _block_grad(grad_r, blocks_in, needs[2]), None, None, grad_out,
                None, None, None, None, None, None, None)


def _deferred_inverse(side: OrthogonalSide, skew: torch.Tensor | None, save_output: bool, dtype: torch.dtype) -> bool:
    """Whether this rotation (of activations in ``dtype``) hands ``side`` ``dL/dG G^T``
    (:meth:`OrthogonalSide.defers_inverse`); the side then solves with its blocks rounded to its parameters' dtype."""
    deferred = side.defers_inverse(skew)
    if deferred and not save_output:
        raise RuntimeError(f"{side!r} is marked gradient_from_output, so every rotation of it in a step must save "
                           "its output (save_output=True): a block gradient taken from h would be mixed with ones "
                           "still to be multiplied by G^-T")
    if deferred and dtype != side.skew.dtype:
        raise RuntimeError(f"{side!r} is marked gradient_from_output: its rotations must run in its parameters' "
                           f"dtype {side.skew.dtype} (the G its step's solve uses), got {dtype}")
    return deferred


def _profiled(name: str):
    """Label each call in ``torch.profiler`` traces (``poet::...``; its backward shows as the autograd
    node, e.g. ``_RotateInputBackward``). Cheap when no profiler runs."""
    def decorate(fn):
        @functools.wraps(fn)
        def labelled(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        return labelled
    return decorate


@_profiled("poet::rotate_input")
def rotate_input(x: torch.Tensor, side: OrthogonalSide, skew: torch.Tensor | None = None) -> torch.Tensor:
    """``z = BD(G_R) Pi x`` ``(..., d) -> (..., d)`` (permuted order); saves ``x`` (gathered on the PyTorch path).

    ``skew`` defaults to ``side.skew``.
    """
    return _RotateInput.apply(x, side.forward_blocks(skew), side.perm, side.inv_perm, side)


@_profiled("poet::frozen_gemm")
def frozen_linear(z: torch.Tensor, frozen_weight: torch.Tensor, gemm=None) -> torch.Tensor:
    """``h = A0' z`` ``(..., d_in) -> (..., d_out)``; no gradient for ``A0'``, nothing saved but a reference.

    ``gemm``: the layer's frozen GEMM (:meth:`~megatron_poet.poet.linear.POETModule.frozen_gemm`) or None
    (``F.linear`` on ``frozen_weight``).
    """
    return _FrozenLinear.apply(z, frozen_weight, gemm)


@_profiled("poet::rotate_output")
def rotate_output(h: torch.Tensor, side: OrthogonalSide, *, save_output: bool = False,
                  skew: torch.Tensor | None = None) -> torch.Tensor:
    """``y = Pi^T BD(G_P) h`` ``(..., d) -> (..., d)``; saves ``h``, or ``y`` with ``save_output``."""
    return _RotateOutput.apply(h, side.forward_blocks(skew), side.perm, side.inv_perm, side, save_output,
                               _deferred_inverse(side, skew, save_output, h.dtype))


@_profiled("poet::recomputed_linear")
def recomputed_poet_linear(
    x: torch.Tensor, frozen_weight: torch.Tensor, input_side: OrthogonalSide, output_side: OrthogonalSide | None,
    *, comm=None, input_skew: torch.Tensor | None = None, output_skew: torch.Tensor | None = None, gemm=None,
    save_output: bool = False,
) -> torch.Tensor:
    """"mem" mode: ``P A0' R x`` (or ``A0' R x`` without ``output_side``), saving only ``x``.

    ``comm`` (optional) sits between ``R`` and the GEMM: ``comm.forward(z)`` in forward (and
    again in the backward recomputation), ``comm.backward(grad)`` on the GEMM's input gradient
    (the tensor-parallel layers pass their copy/all-gather here). ``gemm``: as :func:`frozen_linear`.
    ``save_output``: save ``y`` too, and take ``P``'s block gradient from it (as :func:`rotate_output`
    does) instead of recomputing ``R``, the communication and the GEMM; free where the next op keeps
    ``y`` anyway (attention, SwiGLU). Shapes ``(..., d_in) -> (..., d_out)``.
    """
    blocks_out = None if output_side is None else output_side.forward_blocks(output_skew)
    out_perms = (None, None) if output_side is None else (output_side.perm, output_side.inv_perm)
    return _RecomputedPOETLinear.apply(
        x, frozen_weight, input_side.forward_blocks(input_skew), input_side.perm, input_side.inv_perm,
        blocks_out, *out_perms, (input_side, output_side), comm, gemm, save_output,
        output_side is not None and _deferred_inverse(output_side, output_skew, save_output, x.dtype),
    )


def poet_linear(
    x: torch.Tensor, frozen_weight: torch.Tensor, input_side: OrthogonalSide, output_side: OrthogonalSide,
    bias: torch.Tensor | None = None, *, recompute: bool = False,
    input_skew: torch.Tensor | None = None, output_skew: torch.Tensor | None = None, gemm=None,
) -> torch.Tensor:
    """POET forward, input-centric: ``(..., d_in) -> (..., d_out)``.

    Args:
        frozen_weight: ``(d_out, d_in)`` pre-permuted ``A0'``; never receives a gradient.
        input_side, output_side: ``R`` and ``P`` (their ``skew`` unless ``input_skew``/``output_skew`` given).
        bias: ``(d_out,)`` or None.
        recompute: "mem" mode (saves ``x`` only) instead of "fast" (saves ``x`` and ``h``).
        gemm: the layer's frozen GEMM for ``A0'`` (:func:`frozen_linear`) or None.
    """
    if recompute:
        y = recomputed_poet_linear(x, frozen_weight, input_side, output_side,
                                   input_skew=input_skew, output_skew=output_skew, gemm=gemm)
    else:
        z = rotate_input(x, input_side, input_skew)
        y = rotate_output(frozen_linear(z, frozen_weight, gemm), output_side, skew=output_skew)
    return y if bias is None else y + bias
