"""``POETLinear``: a drop-in ``nn.Linear`` whose weight is ``P · A0 · R``."""
from __future__ import annotations

import torch
from torch import nn

from .config import POETConfig
from .functional import poet_linear
from .init import init_frozen_weight
from .rotation import block_rotate
from .side import OrthogonalSide


class POETModule(nn.Module):
    """Base class of every module holding POET factors (plain or tensor-parallel).

    The optimizer glue and the merge schedule find POET layers by this type.
    Subclasses hold ``input_side`` (R) and ``output_side`` (P), two
    :class:`OrthogonalSide`, and ``frozen_weight`` (their local ``A0``, stored
    pre-permuted ``A0[perm_out][:, perm_in]``), and implement :meth:`merge_and_reset`.
    ``frozen_weight`` is a parameter with ``requires_grad=False`` (no gradient, no
    optimizer state) rather than a buffer so that DeepSpeed ZeRO-3, which partitions
    parameters but never buffers, shards it across data-parallel ranks.
    """

    input_side: OrthogonalSide
    output_side: OrthogonalSide
    frozen_weight: torch.Tensor

    def poet_parameters(self) -> list[nn.Parameter]:
        """The trainable orthogonal-factor parameters (Adam, no weight decay, poet lr)."""
        return [self.input_side.skew, self.output_side.skew]

    def merge_and_reset(self, generator: torch.Generator | None = None) -> None:
        """Fold ``P A0 R`` into ``A0``, draw fresh permutations, set every ``Q`` to 0."""
        raise NotImplementedError

    @torch.no_grad()
    def orthogonality_error(self) -> torch.Tensor:
        """Max over blocks of ``||G^T G - I||_F``."""
        return torch.maximum(self.input_side.orthogonality_error(), self.output_side.orthogonality_error())

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """Dense local ``P A0 R`` ``(d_out, d_in)``, float32 (float64 for a float64 layer)."""
        return dense_from_factors(self.frozen_weight, self.input_side, self.output_side)

    @torch.no_grad()
    def _store_frozen(self, dense: torch.Tensor) -> None:
        """Store a dense ``(d_out, d_in)`` weight pre-permuted by the current permutations."""
        dense = dense.to(self.frozen_weight.device)
        permuted = dense.index_select(0, self.output_side.perm).index_select(1, self.input_side.perm)
        self.frozen_weight.copy_(permuted)


def dense_from_factors(
    frozen_weight: torch.Tensor, input_side: OrthogonalSide, output_side: OrthogonalSide
) -> torch.Tensor:
    """``P A0 R`` as a dense ``(d_out, d_in)`` matrix from the pre-permuted ``A0'``.

    Computed in float32, or float64 for a float64 layer (half precisions never).
    """
    dtype = torch.promote_types(frozen_weight.dtype, torch.float32)
    w = block_rotate(frozen_weight.to(dtype), input_side.blocks(dtype).transpose(1, 2))  # A0' BD(G_R)
    w = block_rotate(w.t(), output_side.blocks(dtype)).t()  # BD(G_P) A0' BD(G_R)
    return w.index_select(0, output_side.inv_perm).index_select(1, input_side.inv_perm)


class POETLinear(POETModule):
    """Linear layer ``y = P A0 R x + bias`` trained by POET / POET-X.

    ``A0`` is frozen (``frozen_weight``, ``requires_grad=False``, stored pre-permuted as
    ``A0[perm_out][:, perm_in]``); ``R = input_side`` and ``P = output_side`` are
    trainable block-orthogonal factors (Cayley–Neumann blocks after a random
    permutation). The forward never forms ``P A0 R``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: learn an additive bias (ordinary parameter).
        block_size, neumann_terms, mode, init, variant: see :class:`POETConfig`.
        generator: CPU generator for ``A0`` and the permutations.
        name: used in error messages (``convert_model`` passes the module path).

    Shapes: input ``(..., in_features)`` -> output ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int = 256,
        neumann_terms: int | None = 3,
        mode: str = "fast",
        init: str = "normalized",
        variant: str = "bs",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        name: str | None = None,
        initial_weight: torch.Tensor | None = None,
    ):
        super().__init__()
        self.config = POETConfig(block_size, neumann_terms, mode, init, variant)
        self.name = name
        for what, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"POETLinear {name or ''}: {what} must be a positive integer, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        if initial_weight is not None and tuple(initial_weight.shape) != (out_features, in_features):
            raise ValueError(
                f"POETLinear {name or ''}: initial_weight has shape {tuple(initial_weight.shape)}, "
                f"expected ({out_features}, {in_features})"
            )
        kw = dict(layer=name, dtype=dtype, device=device)
        weight = initial_weight.detach().float().cpu() if initial_weight is not None else None
        if weight is None:
            weight = init_frozen_weight(out_features, in_features, init, generator)
        self.input_side = OrthogonalSide(in_features, self.config, what="in_features", generator=generator, **kw)
        self.output_side = OrthogonalSide(out_features, self.config, what="out_features", generator=generator, **kw)
        self.frozen_weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                          requires_grad=False)
        self._store_frozen(weight)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: POETConfig, *, keep_weight: bool = False,
        generator: torch.Generator | None = None, name: str | None = None,
    ) -> "POETLinear":
        """A POET layer of the same shape, dtype and device as ``linear``.

        ``keep_weight=True`` uses ``linear.weight`` as ``A0`` (and copies the bias),
        so the converted model computes the same function (fine-tuning);
        otherwise ``A0`` is drawn with ``config.init`` (pre-training).
        """
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            block_size=config.block_size, neumann_terms=config.neumann_terms, mode=config.mode,
            init=config.init, variant=config.variant, dtype=w.dtype, device=w.device,
            generator=generator, name=name, initial_weight=w if keep_weight else None,
        )
        if keep_weight and linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"POETLinear {self.name or ''}: input has {x.shape[-1]} features, expected {self.in_features} "
                f"(input shape {tuple(x.shape)})"
            )
        return poet_linear(
            x, self.frozen_weight, self.input_side.blocks(x.dtype), self.output_side.blocks(x.dtype),
            self.input_side.perm, self.output_side.perm, self.bias, recompute=self.config.mode == "mem",
        )

    @torch.no_grad()
    def merge_and_reset(self, generator: torch.Generator | None = None) -> None:
        merged = self.effective_weight()  # float32 even when the module runs in bf16
        self.input_side.reset(generator)
        self.output_side.reset(generator)
        self._store_frozen(merged)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={c.block_size}, neumann_terms={c.neumann_terms}, mode={c.mode}, variant={c.variant}"
        )
