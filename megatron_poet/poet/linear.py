"""``POETLinear``: a drop-in ``nn.Linear`` whose weight is ``P · A0 · R``; ``POETModule``, what every POET layer shares."""
from __future__ import annotations

import torch
from torch import nn

from .a0_storage import DequantizedGemm, dequantize_groups, group_problem, quantize_groups_
from .config import POETConfig
from .functional import poet_linear
from .init import ROWS_PER_DRAW, fill_frozen_weight
from .merge import fold_exact_, nearest_orthogonal, permute_, permuted_copy
from .rotation import block_rotate
from .side import OrthogonalSide


class POETModule(nn.Module):
    """Base class of every module holding POET factors (plain or tensor-parallel).

    The optimizer glue and the merge schedule find POET layers by this type.
    Subclasses hold ``input_side`` (R) and ``output_side`` (P), two
    :class:`OrthogonalSide`; ``frozen_weight``, their local ``A0`` stored pre-permuted
    (``A0[perm_out][:, perm_in]``), a parameter with ``requires_grad=False`` (no gradient,
    no optimizer state) rather than a buffer so that DeepSpeed ZeRO-3, which partitions
    parameters but never buffers, shards it across data-parallel ranks (only ever updated
    in place); with "int8" ``A0`` storage (:mod:`.a0_storage`) ``frozen_weight`` holds uint8
    codes and ``frozen_scale``/``frozen_zero`` (float32 ``(d_out, d_in // group)``, else None)
    their groups' scales and zero points; optionally ``frozen_master``, a float32 copy of ``A0``
    in canonical (un-permuted) order that merges update instead when ``frozen_weight`` is half
    precision; and ``frozen_init_sq_norms``, squared norms of ``A0``'s lines along :attr:`norm_axis` at
    initialization (for :meth:`a0_norm_drift`). They implement :meth:`merge_and_reset`.
    """

    input_side: OrthogonalSide
    output_side: OrthogonalSide
    frozen_weight: torch.Tensor
    frozen_scale: torch.Tensor | None
    frozen_zero: torch.Tensor | None
    frozen_master: torch.Tensor | None
    norm_axis: int = 0  # 0: per row (output feature), 1: per column
    # The frozen GEMM in FP8 once megatron_poet.poet.fp8.enable_fp8 ran (an FP8FrozenGemm holding the
    # FP8 copies of A0: a plain attribute, never saved), else None.
    fp8 = None
    # Layout-independent name seeding this layer's merges (MergeScheduler); None: its module path.
    identity: str | None = None

    def poet_parameters(self) -> list[nn.Parameter]:
        """The trainable orthogonal-factor parameters (Adam, no weight decay, poet lr)."""
        return [self.input_side.skew, self.output_side.skew]

    def merge_and_reset(self, generator: torch.Generator | None = None) -> None:
        """Fold ``P A0 R`` into ``A0`` (spectrum-exact, :mod:`.merge`), draw fresh permutations, set every ``Q`` to 0."""
        raise NotImplementedError

    def tensor_parallel_layout(self) -> tuple:
        """``(input group, output group, permutation group size)``: the process group over which
        ``A0``'s input / output dimension is sharded (None: not sharded), and the sharded side's
        permutation group size (None without tensor parallelism)."""
        return None, None, None

    @torch.no_grad()
    def orthogonality_error(self) -> torch.Tensor:
        """Max over blocks of ``||G^T G - I||_F``."""
        return torch.maximum(self.input_side.orthogonality_error(), self.output_side.orthogonality_error())

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """Dense local ``P A0 R`` ``(d_out, d_in)``, float32 (float64 for a float64 layer)."""
        return dense_from_factors(self.dense_a0(), self.input_side, self.output_side)

    @torch.no_grad()
    def a0_norm_drift(self) -> torch.Tensor:
        """``| ||A0||_F / ||A0 at initialization||_F - 1 |`` (0-d float64): orthogonal factors leave it 0
        (8-bit storage: up to the requantization of each merge)."""
        now = line_sq_norms(self.dense_a0(), 0).double().sum()
        return (now / self.frozen_init_sq_norms.double().sum()).sqrt().sub(1).abs()

    def frozen_gemm(self):
        """What computes ``A0' z`` (:func:`.functional.frozen_gemm`): the FP8 GEMM, the dequantizing GEMM of
        an 8-bit ``A0'`` (:class:`.a0_storage.DequantizedGemm`), or None (``F.linear`` on ``frozen_weight``)."""
        if self.fp8 is not None:
            return self.fp8
        return None if self.frozen_scale is None else DequantizedGemm(self.frozen_scale, self.frozen_zero)

    # ----------------------------------------------------------------- storage of A0
    def _register_a0(self, d_out: int, d_in: int, dtype, device, config: POETConfig) -> None:
        """Create ``frozen_weight`` ``(d_out, d_in)`` and, for "int8" storage, ``frozen_scale``/``frozen_zero``."""
        int8 = config.a0_storage == "int8"
        if int8 and (problem := group_problem(d_in, config.a0_group_size)):
            raise ValueError(f"POET layer {self.name!r}: {problem}" if self.name else f"POET: {problem}")
        # A frozen parameter, not a buffer: DeepSpeed ZeRO-3 partitions parameters only (see the class docstring).
        self.frozen_weight = nn.Parameter(
            torch.zeros(d_out, d_in, dtype=torch.uint8 if int8 else dtype, device=device), requires_grad=False)
        groups = (d_out, d_in // config.a0_group_size)
        self.register_buffer("frozen_scale", torch.ones(groups, device=device) if int8 else None)
        self.register_buffer("frozen_zero", torch.zeros(groups, device=device) if int8 else None)

    def dense_a0(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The local pre-permuted ``A0'`` ``(d_out, d_in)`` as floats: ``frozen_weight`` itself when stored in
        ``dtype`` (default: as stored; float32 for 8-bit storage), else a converted or dequantized copy."""
        if self.frozen_scale is None:
            return self.frozen_weight if dtype in (None, self.frozen_weight.dtype) else self.frozen_weight.to(dtype)
        return dequantize_groups(self.frozen_weight, self.frozen_scale, self.frozen_zero, dtype or torch.float32)

    @torch.no_grad()
    def store_a0_(self, weight: torch.Tensor) -> None:
        """Make the pre-permuted ``weight`` ``(d_out, d_in)`` the layer's ``A0'``: copied, or quantized (8-bit)."""
        if self.frozen_scale is None:
            self.frozen_weight.copy_(weight)
        else:
            quantize_groups_(weight, self.frozen_weight, self.frozen_scale, self.frozen_zero)
        if self.fp8 is not None:
            self.fp8.invalidate()

    @torch.no_grad()
    def _write_a0(self, fill, rows: torch.Tensor, whole_draws: bool = False) -> None:
        """Write the pre-permuted ``A0'`` with ``fill(out, which)``, which writes the stored rows ``which`` (a
        LongTensor; None = all, in order) into ``out`` ``(len, d_in)``; ``rows`` ``(d_out,)``: the source row
        (e.g. global ``A0`` row) each stored row holds. Native storage: ``fill`` writes ``frozen_weight``
        itself. 8-bit: rows are filled and quantized a chunk at a time in the order of ``rows`` (so a
        chunk's source rows are contiguous and, aligned, drawn once), a float32 transient of a few MiB;
        ``whole_draws``: ``fill`` computes the whole matrix per call (uniform_spectrum's SVD), so one chunk.
        """
        if self.fp8 is not None:
            self.fp8.invalidate()
        if self.frozen_scale is None:
            fill(self.frozen_weight, None)
            return
        d_out, d_in = self.frozen_weight.shape
        order = torch.argsort(rows.cpu()).to(self.frozen_weight.device)
        # whole draws of init's ROWS_PER_DRAW rows per chunk (aligned source rows are then drawn once)
        step = d_out if whole_draws else max(1, (1 << 18) // d_in // ROWS_PER_DRAW) * ROWS_PER_DRAW
        for r0 in range(0, d_out, step):
            which = order[r0:r0 + step]
            chunk = torch.empty(which.numel(), d_in, dtype=torch.float32, device=which.device)
            fill(chunk, which)
            codes = torch.empty(chunk.shape, dtype=torch.uint8, device=which.device)
            scale, zero = self.frozen_scale[which], self.frozen_zero[which]
            quantize_groups_(chunk, codes, scale, zero)
            for stored, part in ((self.frozen_weight, codes), (self.frozen_scale, scale), (self.frozen_zero, zero)):
                stored.index_copy_(0, which, part)

    @torch.no_grad()
    def _record_initial_norms(self) -> None:
        """``frozen_init_sq_norms`` from the current ``A0`` (canonical order along :attr:`norm_axis`)."""
        side = self.output_side if self.norm_axis == 0 else self.input_side
        self.frozen_init_sq_norms.copy_(line_sq_norms(self.dense_a0(), self.norm_axis)[side.inv_perm])

    @torch.no_grad()
    def _merge(self, new_perm_in: torch.Tensor, new_perm_out: torch.Tensor) -> None:
        """Fold the exact orthogonal factors into ``A0`` and restart both sides with the new permutations."""
        if self.fp8 is not None:
            self.fp8.invalidate()  # freed before the fold's temporaries; rebuilt at the next GEMM
        rows = self.output_side.inv_perm[new_perm_out.to(self.output_side.inv_perm.device)]
        cols = self.input_side.inv_perm[new_perm_in.to(self.input_side.inv_perm.device)]
        if self.frozen_master is None:  # native storage: folded in place; 8-bit: a dequantized copy
            weight = self.dense_a0()
        else:  # fold the float32 master; the storage copy is rounded from it once
            weight = permuted_copy(self._canonical_master(), self.output_side.perm, self.input_side.perm)
        permute_(fold_exact_(weight, self.input_side, self.output_side), rows, cols)
        self.input_side.restart(new_perm_in)
        self.output_side.restart(new_perm_out)
        if weight is not self.frozen_weight:
            self.store_a0_(weight)  # rounded or quantized once per merge
        if self.frozen_master is not None:
            self._set_master(permute_(weight, self.output_side.inv_perm, self.input_side.inv_perm))

    def _canonical_master(self) -> torch.Tensor:
        """The whole local float32 master ``(d_out, d_in)`` in canonical order (gathered if sharded)."""
        return self.frozen_master

    def _set_master(self, canonical: torch.Tensor) -> None:
        """Keep this process's part of a canonical float32 ``A0``."""
        self.frozen_master.copy_(canonical)


def pick_rows(rows: torch.Tensor, which: torch.Tensor | None) -> torch.Tensor:
    """``rows[which]`` (all of ``rows`` for None): the source rows of the stored rows ``which``."""
    return rows if which is None else rows[which.to(rows.device)]


def line_sq_norms(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Squared L2 norms of the rows (``axis=0``) or columns (``axis=1``) of ``weight``, float32 or wider,
    reduced over row chunks (no full-size temporary)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    out = torch.zeros(weight.shape[axis], dtype=acc, device=weight.device)
    step = max(1, (1 << 18) // max(1, weight.shape[1]))
    for r0 in range(0, weight.shape[0], step):
        norms = torch.linalg.vector_norm(weight[r0:r0 + step], dim=1 - axis, dtype=acc).square()
        if axis == 0:
            out[r0:r0 + step] = norms
        else:
            out += norms
    return out


def dense_from_factors(
    frozen_weight: torch.Tensor, input_side: OrthogonalSide, output_side: OrthogonalSide, orthogonal: bool = False,
) -> torch.Tensor:
    """``P A0 R`` as a dense ``(d_out, d_in)`` matrix from the pre-permuted ``A0'``.

    Computed in float32, or float64 for a float64 layer (half precisions never). With
    ``orthogonal``: the weight a merge produces, from the orthogonal matrices nearest to the
    blocks (:func:`.merge.nearest_orthogonal`), in float64.
    """
    dtype = torch.float64 if orthogonal else torch.promote_types(frozen_weight.dtype, torch.float32)
    r, p = ((nearest_orthogonal(side.blocks()).to(frozen_weight.device) if orthogonal else side.blocks(dtype))
            for side in (input_side, output_side))
    w = block_rotate(frozen_weight.to(dtype), r.transpose(1, 2), input_side.segment)  # A0' BD(G_R)
    w = block_rotate(w.t().contiguous(), p, output_side.segment).t()  # BD(G_P) A0' BD(G_R)
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
        initial_weight: use this ``(out_features, in_features)`` matrix as ``A0`` (fine-tuning).
        fp32_master_a0: keep a float32 master copy of ``A0`` that merges update (for half-precision layers).
        a0_storage, a0_group_size: how ``A0`` is stored ("native" or "int8", :mod:`.a0_storage`).

    Shapes: input ``(..., in_features)`` -> output ``(..., out_features)``. "fast" mode keeps the
    rotated input and the GEMM output for backward, "mem" only the input (:mod:`.functional`).
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
        fp32_master_a0: bool = False,
        a0_storage: str = "native",
        a0_group_size: int = 256,
    ):
        super().__init__()
        self.config = POETConfig(block_size, neumann_terms, mode, init, variant, a0_storage=a0_storage,
                                 a0_group_size=a0_group_size)
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
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # A0's seed, drawn before the permutations
        kw = dict(layer=name, dtype=dtype, device=device)
        self.input_side = OrthogonalSide(in_features, self.config, what="in_features", generator=generator, **kw)
        self.output_side = OrthogonalSide(out_features, self.config, what="out_features", generator=generator, **kw)
        self._register_a0(out_features, in_features, dtype, device, self.config)
        master = torch.empty(out_features, in_features, dtype=torch.float32, device=device) if fp32_master_a0 else None
        self.register_buffer("frozen_master", master)
        self.register_buffer("frozen_init_sq_norms", torch.empty(out_features, dtype=torch.float32, device=device))
        rows, cols = self.output_side.perm, self.input_side.perm
        with torch.no_grad():
            if initial_weight is not None:
                source = initial_weight.detach()
                self._write_a0(lambda out, which: out.copy_(permuted_copy(source, pick_rows(rows, which), cols)), rows)
                if master is not None:
                    master.copy_(initial_weight.detach())
            else:
                self._write_a0(lambda out, which: fill_frozen_weight(out, out_features, in_features, init, seed,
                                                                     pick_rows(rows, which), cols), rows,
                               whole_draws=init == "uniform_spectrum")
                if master is not None:
                    fill_frozen_weight(master, out_features, in_features, init, seed)
        self._record_initial_norms()
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
            a0_storage=config.a0_storage, a0_group_size=config.a0_group_size,
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
        return poet_linear(x, self.frozen_weight, self.input_side, self.output_side, self.bias,
                           recompute=self.config.mode == "mem", gemm=self.frozen_gemm())

    @torch.no_grad()
    def merge_and_reset(self, generator: torch.Generator | None = None) -> None:
        new_in = self.input_side.draw_permutation(generator)
        self._merge(new_in, self.output_side.draw_permutation(generator))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={c.block_size}, neumann_terms={c.neumann_terms}, mode={c.mode}, variant={c.variant}"
            + (", fp32_master_a0=True" if self.frozen_master is not None else "")
            + (f", a0_storage=int8 (groups of {c.a0_group_size})" if self.frozen_scale is not None else "")
        )
