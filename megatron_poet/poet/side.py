"""One side (input or output) of a POET layer: a permutation and its orthogonal blocks.

The blocks ``G = CN(skew)`` change only at the optimizer step, so within a step (opened by
:func:`begin_step`, which the training engines call before each global batch) they are built
once, when the step opens, and every micro-batch's forward and backward uses that one tensor:
a leaf whose ``.grad`` accumulates the micro-batches' block gradients. When the step's last
backward pass has delivered its block gradient, the side takes it through the Cayley–Neumann
series once, inside that backward pass (a nested ``torch.autograd.backward``), so ``skew`` gets
its gradient like any parameter (megatron's DDP hooks, DeepSpeed's ZeRO hooks, pipeline schedules
see it as usual). Outside a step (evaluation, a plain training loop) the blocks are built per
forward, with a graph to ``skew`` that recomputes the series in backward instead of keeping its
intermediates.
"""
from __future__ import annotations

import torch
from torch import nn

from .cayley import cayley_neumann, cayley_neumann_vjp, num_skew_params, orthogonality_error
from .config import POETConfig
from .rotation import inverse_permutation, times_inverse_transpose


class CayleyNeumannBlocks(torch.autograd.Function):
    """``blocks = side.build_blocks(skew)`` saving only ``skew``: backward differentiates the series from
    ``skew`` (:meth:`OrthogonalSide.skew_gradient`; its intermediates are never kept between forward and backward)."""

    @staticmethod
    def forward(ctx, skew, side):
        ctx.side = side
        ctx.save_for_backward(skew)
        return side.build_blocks(skew)

    @staticmethod
    def backward(ctx, grad_blocks):
        (skew,) = ctx.saved_tensors
        return ctx.side.skew_gradient(skew, grad_blocks), None


class OrthogonalSide(nn.Module):
    """``Pi^T BD(G_1 .. G_n) Pi`` on a dimension ``dim`` (a factor ``R`` or ``P``).

    Block ``k`` rotates the permuted coordinates ``k*segment .. k*segment + b - 1``
    (:mod:`.rotation`). ``segment`` defaults to ``b`` for the block-stochastic variant
    (blocks tile the dimension) and to ``dim`` for the fully stochastic one (one block);
    the tensor-parallel layers pass their permutation-group size for "fs".

    Trainable: ``skew`` ``(n, b(b-1)/2)``, the packed strict upper triangles of
    the skew matrices ``Q_k`` (zero = identity). Buffers: ``perm`` ``(dim,)``
    (persistent, so a checkpoint restores it) and its inverse (derived).
    """

    def __init__(
        self,
        dim: int,
        config: POETConfig,
        *,
        what: str = "dimension",
        layer: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        segment: int | None = None,
    ):
        super().__init__()
        config.num_blocks(dim, what, layer)  # validates dim against the block size
        self.dim = dim
        self.block_size = config.block_size
        self.neumann_terms = config.neumann_terms
        self.segment = segment or (config.block_size if config.variant == "bs" else dim)
        if dim % self.segment or self.segment < self.block_size:
            where = f"POET layer {layer!r}: " if layer else "POET: "
            raise ValueError(f"{where}{what}={dim} cannot be cut into segments of {self.segment} "
                             f"holding a block of {self.block_size}")
        self.num_blocks = dim // self.segment
        self.skew = nn.Parameter(
            torch.zeros(self.num_blocks, num_skew_params(self.block_size), dtype=dtype, device=device)
        )
        self.register_buffer("perm", torch.empty(dim, dtype=torch.long, device=device))
        self.register_buffer("inv_perm", torch.empty(dim, dtype=torch.long, device=device), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_inverse())
        self.set_permutation(self.draw_permutation(generator))
        self._step_blocks: torch.Tensor | None = None  # the open step's blocks, a leaf (None: no step open)
        self._step_passes = 0  # backward passes the open step expects
        self._passes_seen = 0
        # Set by a layer whose every rotation of this side saves its output (see defers_inverse).
        self.gradient_from_output = False

    def draw_permutation(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniformly random permutation of ``range(dim)`` (drawn on the CPU for reproducibility)."""
        return torch.randperm(self.dim, generator=generator)

    @torch.no_grad()
    def set_permutation(self, perm: torch.Tensor) -> None:
        self.perm.copy_(perm)
        self._refresh_inverse()

    @torch.no_grad()
    def _refresh_inverse(self) -> None:
        self.inv_perm.copy_(inverse_permutation(self.perm))

    def build_blocks(self, skew: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Blocks ``(n, b, b)`` of the packed ``skew`` ``(n, b(b-1)/2)`` (autograd flows to ``skew``).

        Built in float32 (float64 for float64 parameters), never in half precision, then cast to ``dtype``.
        """
        build = torch.promote_types(skew.dtype, torch.float32)
        with torch.profiler.record_function("poet::cayley_neumann"):
            g = cayley_neumann(skew.to(build), self.block_size, self.neumann_terms)
        return g if dtype is None else g.to(dtype)

    def skew_gradient(self, skew: torch.Tensor, grad_blocks: torch.Tensor) -> torch.Tensor:
        """``dL/dskew`` (``skew``'s dtype) of :meth:`build_blocks` ``(skew)`` given ``dL/dG`` ``(n, b, b)``: the
        series differentiated in the build dtype without rebuilding its graph (:func:`.cayley.cayley_neumann_vjp`)."""
        build = torch.promote_types(skew.dtype, torch.float32)
        with torch.profiler.record_function("poet::cayley_neumann_backward"):
            grad = cayley_neumann_vjp(skew.detach().to(build), self.block_size, self.neumann_terms,
                                      grad_blocks.to(build))
        return grad.to(skew.dtype)

    def blocks(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """This side's blocks ``(n, b, b)`` (see :meth:`build_blocks`)."""
        return self.build_blocks(self.skew, dtype)

    def forward_blocks(self, skew: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks ``(n, b, b)`` (float32, float64 for float64 parameters) for a forward pass that rotates
        with them, differentiable towards ``skew`` (default: this side's; see the module docstring)."""
        if skew is not None and skew is not self.skew:
            return CayleyNeumannBlocks.apply(skew, self)
        if self._step_blocks is not None:
            return self._step_blocks
        if torch.is_grad_enabled() and self.skew.requires_grad:
            return CayleyNeumannBlocks.apply(self.skew, self)
        with torch.no_grad():
            return self.build_blocks(self.skew)

    def defers_inverse(self, skew: torch.Tensor | None = None) -> bool:
        """Whether a rotation that saves its output (``y``) hands this side ``dL/dG G^T`` instead of ``dL/dG``.

        True in an open step, on this side's own parameters, when its layer marked it ``gradient_from_output``.
        ``G^{-T}`` is linear and the step's blocks are one tensor, so the side applies it once, to the sum over
        the step's micro-batches, after the last pass: one batched solve per step instead of one per micro-batch.
        """
        return self.gradient_from_output and self._step_blocks is not None and (skew is None or skew is self.skew)

    def begin_step(self, backward_passes: int) -> None:
        """Open an optimizer step of ``backward_passes`` backward passes (micro-batches): its blocks are
        built now, once (a leaf that a compiled forward takes as an input); after the last pass, ``skew``
        gets the step's gradient (see the module docstring). A side that is not trained opens none."""
        self._step_blocks, self._passes_seen = None, 0
        if not self.skew.requires_grad:
            return
        with torch.no_grad():
            blocks = self.build_blocks(self.skew)
        blocks.requires_grad_()
        blocks.register_post_accumulate_grad_hook(self._block_gradient_accumulated)
        self._step_blocks, self._step_passes = blocks, backward_passes

    def _block_gradient_accumulated(self, blocks: torch.Tensor) -> None:
        self._passes_seen += 1
        if self._passes_seen < self._step_passes:
            return
        grad, blocks.grad = blocks.grad, None
        if self.gradient_from_output:  # the passes delivered dL/dG G^T (defers_inverse), with G rounded as they
            grad = times_inverse_transpose(grad, blocks.detach().to(self.skew.dtype))  # rotated: the params' dtype
        self._step_blocks = None  # the step's forward passes are over
        grad_skew = self.skew_gradient(self.skew, grad)  # one pass through the series
        with torch.enable_grad():  # (backward runs without grad mode) through autograd, so that the parameter's
            torch.autograd.backward(self.skew.view_as(self.skew), grad_skew)  # gradient hooks run as usual

    @torch.no_grad()
    def restart(self, perm: torch.Tensor) -> None:
        """Back to the identity with permutation ``perm`` (after a merge)."""
        self.skew.zero_()
        self._step_blocks = None
        self.set_permutation(perm)

    @torch.no_grad()
    def orthogonality_error(self) -> torch.Tensor:
        return orthogonality_error(self.blocks())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_blocks={self.num_blocks}, block_size={self.block_size}, segment={self.segment}"


def step_blocks_pay_off(backward_passes: int, compiled: bool) -> bool:
    """Whether the engines open a step (:func:`begin_step`) for ``backward_passes`` micro-batches.

    From two micro-batches on, the series then runs once per step instead of once per micro-batch.
    With one it runs once either way, and blocks built per forward are held only from the layer's
    forward to its backward, their gradient only inside that backward (under full recomputation not
    even between layers), where a step holds every side's blocks and gradient for the whole step.
    A compiled forward takes the step's blocks as an input (building them inside breaks its graph).
    """
    return backward_passes > 1 or compiled


def begin_step(model: nn.Module, backward_passes: int) -> None:
    """Open an optimizer step of ``backward_passes`` micro-batches on every POET side of ``model`` (the
    training engines call it before each global batch; see the module docstring)."""
    for module in model.modules():
        if isinstance(module, OrthogonalSide):
            module.begin_step(backward_passes)
