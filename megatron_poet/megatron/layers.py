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

Replicated factors are drawn from the same seed on every TP rank and receive
identical gradients, so they stay bitwise identical; merges need no
communication (each rank folds ``P A0 R`` for its own rows/columns).

Activations are ``(s, b, h)`` as everywhere in Megatron (any leading dims work).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..poet.config import POETConfig
from ..poet.init import init_frozen_weight
from ..poet.linear import POETModule
from ..poet.rotation import rotate_input, rotate_output
from ..poet.side import OrthogonalSide
from . import compat
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


def _maybe_recompute(fn, recompute: bool, *args):
    """``fn(*args)``; in "mem" mode keep only the inputs and recompute the rest in backward."""
    if recompute:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


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
        if poet.variant != "bs":
            raise ValueError(
                f"POET layer {self.name!r}: the tensor-parallel layers implement the block-stochastic variant "
                f"only, got variant={poet.variant!r}"
            )
        if is_expert:
            raise ValueError(f"POET layer {self.name!r}: MoE expert linears are not supported")
        if getattr(config, "delay_wgrad_compute", False):
            raise ValueError(f"POET layer {self.name!r}: delay_wgrad_compute is not supported (no weight GEMM grads)")
        self.config, self.poet = config, poet
        self.input_size, self.output_size = input_size, output_size
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = bool(config.sequence_parallel)
        self.tp_group = compat.tp_group_or_default(tp_group)
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        self.tp_size = tp_size
        groups = poet.permutation_groups or tp_size
        sharded_size, replicated_size = (output_size, input_size) if self.column else (input_size, output_size)
        self.sharded = ShardedDimension(
            sharded_size, stride, tp_size, tp_rank, groups, poet, self.name,
            "output_size" if self.column else "input_size",
        )
        poet.num_blocks(replicated_size, "input_size" if self.column else "output_size", self.name)
        self.stride = stride

        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        dtype = config.params_dtype
        placeholder = torch.Generator().manual_seed(_PLACEHOLDER_SEED)
        kw = dict(layer=self.name, dtype=dtype, device=device, generator=placeholder)
        local_in = input_size if self.column else self.sharded.local_size
        local_out = self.sharded.local_size if self.column else output_size
        self.input_side = OrthogonalSide(local_in, poet, what="input_size", **kw)
        self.output_side = OrthogonalSide(local_out, poet, what="output_size", **kw)
        # A frozen parameter, not a buffer: DeepSpeed ZeRO-3 partitions parameters only (see POETModule).
        self.frozen_weight = nn.Parameter(torch.zeros(local_out, local_in, dtype=dtype, device=device),
                                          requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(local_out, dtype=dtype, device=device)) if bias else None

        sharded_side, replicated_side = self._sides()
        compat.mark_tensor_parallel(sharded_side.skew, dim=0)
        # Replicated factor with sequence parallelism sees only local tokens: finalize_model_grads
        # all-reduces params tagged like this one (the LayerNorm mechanism).
        replicated_side.skew.sequence_parallel = self.sequence_parallel
        if self.bias is not None:
            if self.column:
                compat.mark_tensor_parallel(self.bias, dim=0, stride=stride)
            else:
                self.bias.sequence_parallel = self.sequence_parallel
        self.initialized = False
        self.register_state_dict_post_hook(_to_canonical_state)
        self.register_load_state_dict_pre_hook(_from_canonical_state)

    # ----------------------------------------------------------------- layout helpers
    def _sides(self) -> tuple[OrthogonalSide, OrthogonalSide]:
        """``(sharded side, replicated side)``."""
        return (self.output_side, self.input_side) if self.column else (self.input_side, self.output_side)

    def _sharded_side_name(self) -> str:
        return "output_side" if self.column else "input_side"

    def _local_slice(self, dense: torch.Tensor) -> torch.Tensor:
        """This rank's rows (column-parallel) or columns (row-parallel) of a global ``(d_out, d_in)``."""
        index = self.sharded.local_to_global.to(dense.device)
        return dense.index_select(0 if self.column else 1, index)

    # ----------------------------------------------------------------- initialization and merge
    @torch.no_grad()
    def initialize(self, seed: int) -> None:
        """Draw ``A0`` (the global matrix, then this rank's slice) and the permutations from ``seed``.

        Every TP layout gets the same global layer for the same seed.
        """
        dense = init_frozen_weight(self.output_size, self.input_size, self.poet.init,
                                   torch.Generator().manual_seed(mix_seed(seed, "A0")))
        self._reset(seed, self._local_slice(dense))
        if self.bias is not None:
            self.bias.zero_()

    @torch.no_grad()
    def _reset(self, seed: int, local_dense: torch.Tensor) -> None:
        """Identity factors, permutations from ``seed``, frozen weight = ``local_dense`` pre-permuted."""
        sharded_side, replicated_side = self._sides()
        for side in (sharded_side, replicated_side):
            side.skew.zero_()
        sharded_side.set_permutation(self.sharded.draw_local_permutation(mix_seed(seed, "sharded")))
        replicated_side.set_permutation(draw_permutation(replicated_side.dim, mix_seed(seed, "replicated")))
        self._store_frozen(local_dense)
        self.initialized = True

    @torch.no_grad()
    def merge_and_reset(self, generator: torch.Generator | None = None) -> None:
        """Fold this rank's ``P A0 R`` into ``A0`` (no communication) and redraw the permutations.

        ``generator`` must be shared by all ranks (MergeScheduler's is): one number
        is drawn from it per layer, so the new permutations depend only on the
        merge, never on the TP layout.
        """
        if generator is None:
            raise ValueError(
                f"POET layer {self.name!r}: merging a tensor-parallel layer needs a generator shared by all ranks"
            )
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._reset(seed, self.effective_weight())

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
        """Layout-independent shards: the un-permuted ``A0`` slice (``base_weight``), canonical
        permutations, skew blocks and bias, split along the TP axis (gate/up halves separately for
        SwiGLU's ``linear_fc1``), so a checkpoint reshards to any TP size dividing ``permutation_groups``.
        """
        state = self.state_dict(prefix="", keep_vars=True)
        side = self._sharded_side_name()
        axis_map = {"base_weight": 0 if self.column else 1, f"{side}.perm": 0, f"{side}.skew": 0}
        if self.column and self.bias is not None:
            axis_map["bias"] = 0
        sharded = compat.make_sharded_tensors_for_checkpoint(
            state, prefix, axis_map, sharded_offsets, self.tp_group, metadata)
        if self.stride == 2:
            # MLP splits "weight"/"bias" of a gated linear_fc1 itself; the other sharded keys are ours.
            for key in ("base_weight", f"{side}.perm", f"{side}.skew"):
                sharded[prefix + key] = compat.apply_swiglu_sharded_factory(
                    sharded[prefix + key], sharded_offsets, self.tp_group, metadata)
        return sharded

    def extra_repr(self) -> str:
        p = self.poet
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, tp={self.tp_size}, "
            f"block_size={p.block_size}, neumann_terms={p.neumann_terms}, mode={p.mode}, "
            f"permutation_groups={self.sharded.groups}, stride={self.stride}"
        )


def _to_canonical_state(module: _POETParallelLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post hook: store ``A0`` un-permuted and the sharded permutation in global indices.

    Under DeepSpeed ZeRO-3 this rank holds only a partition of ``A0`` (the state dict
    carries DeepSpeed's empty placeholder): the state is left as it is, DeepSpeed saves
    the partitions itself.
    """
    if hasattr(module.frozen_weight, "ds_id"):
        return
    frozen = state_dict.pop(prefix + "frozen_weight")
    out_inv, in_inv = module.output_side.inv_perm, module.input_side.inv_perm
    state_dict[prefix + "base_weight"] = frozen.detach().index_select(0, out_inv).index_select(1, in_inv)
    key = f"{prefix}{module._sharded_side_name()}.perm"
    state_dict[key] = module.sharded.to_canonical(state_dict[key])


def _from_canonical_state(module: _POETParallelLinear, state_dict: dict, prefix: str, *args) -> None:
    """Load pre hook: the inverse of :func:`_to_canonical_state` (before the sides load their perms)."""
    key = f"{prefix}{module._sharded_side_name()}.perm"
    if prefix + "base_weight" not in state_dict or key not in state_dict:
        return  # strict loading reports the missing keys
    state_dict[key] = module.sharded.from_canonical(state_dict[key], module.name)
    out_perm = state_dict[prefix + "output_side.perm"].to(torch.long)
    in_perm = state_dict[prefix + "input_side.perm"].to(torch.long)
    base = state_dict.pop(prefix + "base_weight")
    state_dict[prefix + "frozen_weight"] = base.index_select(0, out_perm.to(base.device)).index_select(
        1, in_perm.to(base.device))
    module.initialized = True


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

    def _local_gemm_and_p(self, z, frozen, p_blocks, perm):
        return rotate_output(F.linear(z, frozen), p_blocks, perm)

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output: bool | None = None):
        if weight is not None:
            raise ValueError(f"POET layer {self.name!r}: an external weight cannot be used with POET")
        self._check_ready(input_, self.input_size)
        recompute = self._recompute()
        x = _maybe_recompute(rotate_input, recompute, input_, self.input_side.perm, self.input_side.blocks(input_.dtype))
        if self.sequence_parallel:
            x = compat.gather_from_sequence_parallel_region(x, group=self.tp_group)
        elif self.tp_size > 1:
            x = _ContiguousGrad.apply(compat.copy_to_tensor_model_parallel_region(x, group=self.tp_group))
        y = _maybe_recompute(self._local_gemm_and_p, recompute, x, self.frozen_weight,
                             self.output_side.blocks(x.dtype), self.output_side.perm)
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

    def _r_and_local_gemm(self, x, perm, r_blocks, frozen):
        return F.linear(rotate_input(x, perm, r_blocks), frozen)

    def forward(self, input_: torch.Tensor):
        if not self.input_is_parallel and self.tp_size > 1:
            input_ = compat.scatter_to_tensor_model_parallel_region(input_, group=self.tp_group)
        self._check_ready(input_, self.sharded.local_size)
        recompute = self._recompute()
        h = _maybe_recompute(self._r_and_local_gemm, recompute, input_, self.input_side.perm,
                             self.input_side.blocks(input_.dtype), self.frozen_weight)
        if self.sequence_parallel:
            h = compat.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        elif self.tp_size > 1:
            h = compat.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        y = _maybe_recompute(rotate_output, recompute, h, self.output_side.blocks(h.dtype), self.output_side.perm)
        return self._bias_output(y)

