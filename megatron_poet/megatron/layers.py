"""POET drop-ins for Megatron's ``ColumnParallelLinear`` and ``RowParallelLinear``.

Design (POET_SPEC.md §6). With ``A = P A0 R``:

- Column-parallel (``A0`` split by rows over TP ranks): ``P`` is local (its
  permutation stays inside the rank's row shard, see :mod:`.sharding`); ``R``
  is replicated and applied to the replicated input *before* Megatron's
  copy-to-TP region, so that region's backward all-reduce already sums ``R``'s
  gradient. With sequence parallelism ``R`` is applied to the local tokens before
  the all-gather; its gradient is then partial and is all-reduced by
  ``finalize_model_grads`` like a LayerNorm weight (``param.sequence_parallel``).
- Row-parallel (``A0`` split by columns): ``R`` is local; ``P`` is replicated
  and applied after the reduce-from-TP region (or the reduce-scatter with
  sequence parallelism), where the output is replicated.

Replicated factors are drawn from the same seed on every TP rank and their gradients are
reduced over the TP group, so they stay bitwise identical; merges need no
communication (each rank folds ``P A0 R`` for its own rows/columns), except that a
data-parallel-sharded fp32 master of ``A0`` is gathered over DP for the fold.

Saved for backward (:mod:`megatron_poet.poet.functional`): "fast" keeps ``R``'s input
and, column-parallel without bias, ``P``'s output (which attention and SwiGLU keep
anyway), else ``P``'s input; "mem" keeps only the layer input (plus, row-parallel at
TP > 1, ``P``'s input: recomputing it would repeat the all-reduce). The column-parallel
"mem" backward repeats the sequence-parallel all-gather, as Megatron's own linears do.

Activations are ``(s, b, h)`` as everywhere in Megatron (any leading dims work).
"""
from __future__ import annotations

import torch
from torch import nn

from ..poet.config import POETConfig
from ..poet.functional import frozen_linear, recomputed_poet_linear, rotate_input, rotate_output
from ..poet.init import fill_frozen_weight
from ..poet.linear import POETModule, pick_rows
from ..poet.side import OrthogonalSide
from . import compat
from .layer_checkpoint import MasterShard, from_canonical_state, sharded_poet_state_dict, to_canonical_state
from .sharding import ShardedDimension, draw_permutation, mix_seed

# A throwaway generator for the placeholder permutations drawn by OrthogonalSide at
# construction: drawing them from the default generator would shift Megatron's
# own (TP-layout-dependent) random stream. initialize() replaces them.
_PLACEHOLDER_SEED = 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    megatron-core 0.16.1's ``_reduce`` all-reduces ``grad.contiguous()`` but
    returns the original tensor, so a non-contiguous gradient reaching
    ``copy_to_tensor_model_parallel_region`` would silently stay un-reduced.
    """

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _ReplicatedInputComm:
    """What sits between a column-parallel layer's replicated ``R`` and its local GEMM, for
    :func:`recomputed_poet_linear`: an all-gather of the sequence (its gradient: a reduce-scatter)
    with sequence parallelism, else the identity (its gradient: an all-reduce)."""

    def __init__(self, group, sequence_parallel: bool):
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return compat.gather_from_sequence_parallel_region(z, group=self.group)
        return z

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return compat.reduce_scatter_to_sequence_parallel_region(grad, group=self.group)
        return compat.reduce_from_tensor_model_parallel_region(grad.contiguous(), group=self.group)


class _POETParallelLinear(POETModule):
    """Shared machinery; see :class:`POETColumnParallelLinear` and :class:`POETRowParallelLinear`."""

    column: bool  # set by the subclasses

    def __init__(
        self, input_size: int, output_size: int, *, config, poet: POETConfig, bias: bool, skip_bias_add: bool,
        is_expert: bool, tp_comm_buffer_name: str | None, tp_group, stride: int, name: str | None,
    ):
        super().__init__()
        self.name = name or tp_comm_buffer_name or type(self).__name__
        if not isinstance(poet, POETConfig):
            raise TypeError(f"POET layer {self.name!r}: poet must be a POETConfig, got {type(poet).__name__}")
        if is_expert and poet.shard_fp32_master:
            raise ValueError(f"POET layer {self.name!r}: an fp32 master of A0 sharded over data-parallel ranks is "
                             "not implemented for MoE experts")
        if getattr(config, "delay_wgrad_compute", False):
            raise ValueError(f"POET layer {self.name!r}: delay_wgrad_compute is not supported (no weight GEMM grads)")
        self.config, self.poet = config, poet
        self.input_size, self.output_size = input_size, output_size
        self.skip_bias_add = skip_bias_add
        # An expert's tokens arrive whole from megatron's token dispatcher: no sequence-parallel gather.
        self.is_expert = is_expert
        self.sequence_parallel = bool(config.sequence_parallel) and not is_expert
        self.tp_group = compat.tp_group_or_default(tp_group)
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        # Experts split over expert-TP ranks communicate nothing themselves either: the dispatcher hands
        # every rank all of its experts' tokens and sums their partial outputs (megatron's explicit expert comm).
        self.explicit_comm = is_expert and tp_size > 1
        self.tp_comm = tp_size > 1 and not self.explicit_comm  # the layer's own TP collectives run
        self.tp_size = tp_size
        groups = poet.permutation_groups or tp_size
        sharded_size, replicated_size = (output_size, input_size) if self.column else (input_size, output_size)
        self.sharded = ShardedDimension(
            sharded_size, stride, tp_size, tp_rank, groups, poet, self.name,
            "output_size" if self.column else "input_size",
        )
        poet.num_blocks(replicated_size, "input_size" if self.column else "output_size", self.name)
        self.stride = stride
        self.norm_axis = self.sharded_axis = 0 if self.column else 1

        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        dtype = config.params_dtype
        placeholder = torch.Generator().manual_seed(_PLACEHOLDER_SEED)
        kw = dict(layer=self.name, dtype=dtype, device=device, generator=placeholder)
        local_in = input_size if self.column else self.sharded.local_size
        local_out = self.sharded.local_size if self.column else output_size
        segments = (None, self.sharded.segment) if self.column else (self.sharded.segment, None)
        self.input_side = OrthogonalSide(local_in, poet, what="input_size", segment=segments[0], **kw)
        self.output_side = OrthogonalSide(local_out, poet, what="output_size", segment=segments[1], **kw)
        self._register_a0(local_out, local_in, dtype, device, poet)
        self.register_buffer("frozen_init_sq_norms", torch.ones(self.sharded.local_size, device=device))
        self.master = MasterShard(self, poet) if poet.fp32_master_a0 else None
        self.register_buffer("frozen_master", self.master.empty(device) if self.master else None, persistent=False)
        self.bias = nn.Parameter(torch.zeros(local_out, dtype=dtype, device=device)) if bias else None

        sharded_side, replicated_side = self._sides()
        compat.mark_tensor_parallel(sharded_side.skew, dim=0)
        # A0 is split too (no gradient: only the replica check of training/replicas.py reads this).
        compat.mark_tensor_parallel(self.frozen_weight, dim=0 if self.column else 1)
        # The replicated factor's gradient is reduced over TP by finalize_model_grads, so its copies
        # get identical updates by construction, whatever each rank's kernels summed in which order:
        # with sequence parallelism it sees only local tokens and the partial gradients are summed
        # (the LayerNorm mechanism); without, every rank has the whole gradient and they are averaged.
        # (an expert's replicated factor sees a partial gradient on each expert-TP rank: summed like SP's)
        replicated_side.skew.sequence_parallel = self.sequence_parallel or self.explicit_comm
        # (an expert's parameters are tagged as experts by the model builder: moe.mark_expert_parameters)
        replicated_side.skew.average_gradients_across_tp_domain = not (self.sequence_parallel or is_expert)
        if self.bias is not None:
            if self.column:
                compat.mark_tensor_parallel(self.bias, dim=0, stride=stride)
            else:
                self.bias.sequence_parallel = self.sequence_parallel
        self.initialized = False
        self.a0_canonical = False  # A0 un-permuted in place for a checkpoint (layer_checkpoint.canonical_a0)
        self.register_state_dict_post_hook(to_canonical_state)
        self.register_load_state_dict_pre_hook(from_canonical_state)

    # ----------------------------------------------------------------- layout helpers
    def _sides(self) -> tuple[OrthogonalSide, OrthogonalSide]:
        """``(sharded side, replicated side)``."""
        return (self.output_side, self.input_side) if self.column else (self.input_side, self.output_side)

    def _sharded_side_name(self) -> str:
        return "output_side" if self.column else "input_side"

    def tensor_parallel_layout(self) -> tuple:
        if self.tp_size == 1:
            return None, None, None
        sharded = (None, self.tp_group) if self.column else (self.tp_group, None)
        return *sharded, self.sharded.group_size

    def global_indices(self, local: torch.Tensor, axis: int) -> torch.Tensor:
        """Global (Megatron layout) indices of local indices along ``axis`` (0: rows, 1: columns)."""
        return self.sharded.local_to_global[local.cpu()] if axis == self.sharded_axis else local.cpu()

    # ----------------------------------------------------------------- initialization and merge
    @torch.no_grad()
    def initialize(self, seed: int) -> None:
        """Draw ``A0`` (this rank's part of the global matrix) and the permutations from ``seed``.

        Every TP layout gets the same global layer for the same seed; no full copy of ``A0`` is made.
        """
        sharded_side, replicated_side = self._sides()
        for side in (sharded_side, replicated_side):
            side.skew.zero_()
        sharded_side.set_permutation(self.sharded.draw_local_permutation(mix_seed(seed, "sharded")))
        replicated_side.set_permutation(draw_permutation(replicated_side.dim, mix_seed(seed, "replicated")))
        a0_seed = mix_seed(seed, "A0")
        shape = (self.output_size, self.input_size, self.poet.init, a0_seed)
        rows, cols = self.global_indices(self.output_side.perm, 0), self.global_indices(self.input_side.perm, 1)
        self._write_a0(lambda out, which: fill_frozen_weight(out, *shape, pick_rows(rows, which), cols), rows,
                       whole_draws=self.poet.init == "uniform_spectrum")
        if self.master:
            fill_frozen_weight(self.frozen_master, *shape, *self.master.global_rows_and_cols())
        self._record_initial_norms()
        if self.bias is not None:
            self.bias.zero_()
        self.initialized = True

    @torch.no_grad()
    def merge_and_reset(self, generator: torch.Generator | None = None) -> None:
        """Fold this rank's ``P A0 R`` into ``A0`` (spectrum-exact) and redraw the permutations.

        ``generator`` must be shared by all ranks (MergeScheduler's is): one number
        is drawn from it per layer, so the new permutations depend only on the
        merge, never on the TP layout.
        """
        if generator is None:
            raise ValueError(
                f"POET layer {self.name!r}: merging a tensor-parallel layer needs a generator shared by all ranks"
            )
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        sharded = self.sharded.draw_local_permutation(mix_seed(seed, "sharded"))
        replicated = draw_permutation(self._sides()[1].dim, mix_seed(seed, "replicated"))
        self._merge(*((replicated, sharded) if self.column else (sharded, replicated)))

    @torch.no_grad()
    def start_from(self, weight: torch.Tensor) -> None:
        """Compute the dense ``weight`` ``(output_size, input_size)``, Megatron's global layout: ``A0`` is
        this rank's part of it in the layer's pre-permuted layout, the factors are the identity (zero
        skews), the permutations stay. For continued pretraining from a released model: POET then
        only rotates ``weight``, whose singular values it keeps."""
        if tuple(weight.shape) != (self.output_size, self.input_size):
            raise ValueError(f"POET layer {self.name!r}: weight has shape {tuple(weight.shape)}, expected "
                             f"{(self.output_size, self.input_size)}")
        for side in self._sides():
            side.skew.zero_()
        rows = self.global_indices(self.output_side.perm, 0).to(weight.device)
        cols = self.global_indices(self.input_side.perm, 1).to(weight.device)
        self._write_a0(lambda out, which: out.copy_(
            weight.index_select(0, pick_rows(rows, which).to(weight.device)).index_select(1, cols)), rows)
        if self.master:
            master_rows, master_cols = self.master.global_rows_and_cols()
            self.frozen_master.copy_(weight.index_select(0, master_rows.to(weight.device))
                                     .index_select(1, master_cols.to(weight.device)))
        self._record_initial_norms()
        self.initialized = True

    def _canonical_master(self) -> torch.Tensor:
        return self.master.gather(self.frozen_master)

    def _set_master(self, canonical: torch.Tensor) -> None:
        self.frozen_master.copy_(self.master.own_part(canonical))

    @torch.no_grad()
    def gathered_effective_weight(self) -> torch.Tensor:
        """The full ``(output_size, input_size)`` ``P A0 R`` in Megatron's global layout (all-gather over TP)."""
        local = self.effective_weight()
        axis = 0 if self.column else 1
        if self.tp_size == 1:
            return local
        pieces = [torch.empty_like(local) for _ in range(self.tp_size)]
        torch.distributed.all_gather(pieces, local.contiguous(), group=self.tp_group)
        indices = [torch.empty_like(self.sharded.local_to_global) for _ in range(self.tp_size)]
        torch.distributed.all_gather(indices, self.sharded.local_to_global, group=self.tp_group)
        out = torch.empty(self.output_size, self.input_size, dtype=local.dtype, device=local.device)
        out.index_copy_(axis, torch.cat(indices).to(local.device), torch.cat(pieces, dim=axis))
        return out

    def backward_dw(self) -> None:
        """Megatron's delayed weight-gradient hook: POET's factor gradients are computed in the
        ordinary backward and ``A0`` has no gradient, so nothing is left to do."""

    # ----------------------------------------------------------------- forward pieces
    def _check_ready(self, x: torch.Tensor, features: int) -> None:
        if not self.initialized:
            raise RuntimeError(
                f"POET layer {self.name!r} has no A0 yet: call megatron_poet.megatron.model.initialize_poet_layers("
                "model, seed) (the model builders do) or load a checkpoint"
            )
        if x.shape[-1] != features:
            raise ValueError(f"POET layer {self.name!r}: input has {x.shape[-1]} features, expected {features}")

    def _bias_output(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.bias is None:
            return y, None
        if self.skip_bias_add:
            return y, self.bias
        return y + self.bias, None

    def _recompute(self) -> bool:
        return self.poet.mode == "mem"

    # ----------------------------------------------------------------- checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Layout-independent shards (see :func:`.layer_checkpoint.sharded_poet_state_dict`)."""
        return sharded_poet_state_dict(self, prefix, sharded_offsets, metadata)

    def extra_repr(self) -> str:
        p = self.poet
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, tp={self.tp_size}, "
            f"block_size={p.block_size}, neumann_terms={p.neumann_terms}, mode={p.mode}, variant={p.variant}, "
            f"permutation_groups={self.sharded.groups}, stride={self.stride}"
            + (f", fp32_master_a0 (1/{self.master.size} per DP rank)" if self.master else "")
            + (f", a0_storage=int8 (groups of {p.a0_group_size})" if self.frozen_scale is not None else "")
        )


class POETColumnParallelLinear(_POETParallelLinear):
    """``y = P A0 R x (+ b)`` with ``A0`` split by rows (output features) over TP ranks.

    Same constructor contract as Megatron's ``ColumnParallelLinear`` (as used for
    ``linear_qkv`` and ``linear_fc1``) plus ``poet``. ``stride=2`` is SwiGLU's
    ``[gate; up]`` layout: each rank holds its gate rows and its up rows, and the
    output permutation never mixes them.

    Shapes: input ``(s, b, input_size)`` (``(s/tp, b, input_size)`` with sequence
    parallelism) -> output ``(s, b, output_size/tp)`` (full ``output_size`` with
    ``gather_output``). Returns ``(output, bias or None)``.
    """

    column = True

    def __init__(
        self, input_size: int, output_size: int, *, config, init_method=None, bias: bool = True,
        gather_output: bool = False, stride: int = 1, skip_bias_add: bool = False, is_expert: bool = False,
        tp_comm_buffer_name: str | None = None, tp_group=None, poet: POETConfig, name: str | None = None, **kwargs,
    ):
        # init_method is Megatron's weight init; POET draws A0 with poet.init instead.
        super().__init__(
            input_size, output_size, config=config, poet=poet, bias=bias, skip_bias_add=skip_bias_add,
            is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group, stride=stride,
            name=name,
        )
        if gather_output and self.sequence_parallel:
            raise ValueError(f"POET layer {self.name!r}: gather_output is incompatible with sequence parallelism")
        self.gather_output = gather_output
        self.output_side.gradient_from_output = self.bias is None  # forward saves y (defers P's G^-T to the step)

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output: bool | None = None):
        if weight is not None:
            raise ValueError(f"POET layer {self.name!r}: an external weight cannot be used with POET")
        self._check_ready(input_, self.input_size)
        # Without a bias the consumer (attention, SwiGLU) keeps y anyway: saving it costs nothing (and in "mem"
        # mode spares the backward the recomputed rotation, all-gather and GEMM).
        save_output = self.output_side.gradient_from_output
        if self._recompute():
            comm = _ReplicatedInputComm(self.tp_group, self.sequence_parallel) if self.tp_comm else None
            y = recomputed_poet_linear(input_, self.frozen_weight, self.input_side, self.output_side, comm=comm,
                                       gemm=self.frozen_gemm(), save_output=save_output)
        else:
            z = rotate_input(input_, self.input_side)
            if self.sequence_parallel:
                z = compat.gather_from_sequence_parallel_region(z, group=self.tp_group)
            elif self.tp_comm:
                z = _ContiguousGrad.apply(compat.copy_to_tensor_model_parallel_region(z, group=self.tp_group))
            y = rotate_output(frozen_linear(z, self.frozen_weight, self.frozen_gemm()), self.output_side,
                              save_output=save_output)
        y, bias = self._bias_output(y)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and self.tp_size > 1:
            if self.stride != 1:
                raise ValueError(f"POET layer {self.name!r}: gather_output with stride={self.stride} is not supported")
            y = compat.gather_from_tensor_model_parallel_region(y, group=self.tp_group)
        return y, bias


class POETRowParallelLinear(_POETParallelLinear):
    """``y = P A0 R x (+ b)`` with ``A0`` split by columns (input features) over TP ranks.

    Same constructor contract as Megatron's ``RowParallelLinear`` (as used for
    ``linear_proj`` and ``linear_fc2``) plus ``poet``.

    Shapes: input ``(s, b, input_size/tp)`` -> output ``(s, b, output_size)``
    (``(s/tp, b, output_size)`` with sequence parallelism). Returns ``(output, bias or None)``.
    """

    column = False

    def __init__(
        self, input_size: int, output_size: int, *, config, init_method=None, bias: bool = True,
        input_is_parallel: bool = True, skip_bias_add: bool = False, stride: int = 1, is_expert: bool = False,
        tp_comm_buffer_name: str | None = None, tp_group=None, poet: POETConfig, name: str | None = None, **kwargs,
    ):
        if stride != 1:
            raise ValueError(f"POET layer {name or tp_comm_buffer_name!r}: row-parallel stride must be 1")
        super().__init__(
            input_size, output_size, config=config, poet=poet, bias=bias, skip_bias_add=skip_bias_add,
            is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group, stride=1, name=name,
        )
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError(f"POET layer {self.name!r}: sequence parallelism needs input_is_parallel=True")
        self.input_is_parallel = input_is_parallel

    def forward(self, input_: torch.Tensor):
        if not self.input_is_parallel and self.tp_size > 1:
            input_ = compat.scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        self._check_ready(input_, self.sharded.local_size)
        if self._recompute() and not self.tp_comm:  # nothing to reduce: recompute the whole layer
            return self._bias_output(
                recomputed_poet_linear(input_, self.frozen_weight, self.input_side, self.output_side, gemm=self.frozen_gemm()))
        if self._recompute():
            h = recomputed_poet_linear(input_, self.frozen_weight, self.input_side, None, gemm=self.frozen_gemm())
        else:
            h = frozen_linear(rotate_input(input_, self.input_side), self.frozen_weight, self.frozen_gemm())
        if self.sequence_parallel:
            h = compat.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        elif self.tp_comm:  # (split experts: the dispatcher sums the partial outputs)
            h = compat.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return self._bias_output(rotate_output(h, self.output_side))
