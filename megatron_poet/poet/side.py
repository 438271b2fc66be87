"""One side (input or output) of a POET layer: a permutation and its orthogonal blocks."""
from __future__ import annotations

import torch
from torch import nn

from .cayley import cayley_neumann, num_skew_params, orthogonality_error
from .config import POETConfig
from .rotation import inverse_permutation


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
        g = cayley_neumann(skew.to(build), self.block_size, self.neumann_terms)
        return g if dtype is None else g.to(dtype)

    def blocks(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """This side's blocks ``(n, b, b)`` (see :meth:`build_blocks`)."""
        return self.build_blocks(self.skew, dtype)

    @torch.no_grad()
    def restart(self, perm: torch.Tensor) -> None:
        """Back to the identity with permutation ``perm`` (after a merge)."""
        self.skew.zero_()
        self.set_permutation(perm)

    @torch.no_grad()
    def orthogonality_error(self) -> torch.Tensor:
        return orthogonality_error(self.blocks())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_blocks={self.num_blocks}, block_size={self.block_size}, segment={self.segment}"
