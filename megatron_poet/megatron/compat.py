"""The one place that knows which megatron-core version is installed (0.16.x and 0.19.x).

Differences handled here:
- 0.19 passes ``name=`` to the linear constructors (our layers take it as the
  layer name for error messages; 0.16 does not pass it).
- 0.19 stores a layer's MLP spec as ``functools.partial(MLP.as_mlp_submodule,
  submodules=MLPSubmodules(...))``, 0.16 as a ``ModuleSpec`` (:func:`replace_mlp_linears`).
- 0.19's ``apply_swiglu_sharded_factory`` takes the TP and DP groups; 0.16's does not.
- 0.16.1's ``_reduce`` all-reduces a contiguous copy but returns the original
  tensor (fixed in 0.19); the layers guard against it for every version.
- Without Apex/TE, 0.16's distributed optimizer gives torch Adam's states a ``step`` before loading
  the fully reshardable format, which saves none, then copies every state key from the checkpoint
  (``KeyError: 'step'``): :func:`load_fully_reshardable_without_step` keeps the step it set.
- Everything else our layers use (TP mappings, TP attributes, sharded-tensor
  helpers, ``apply_swiglu_sharded_factory``) is imported from here only, so a
  moved or re-signed helper is fixed in one file.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from megatron.core import package_info, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import mlp as _mlp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint as _make_sharded
from megatron.core.utils import get_tensor_model_parallel_group_if_none

MCORE_VERSION = tuple(int(p) for p in package_info.__version__.split(".")[:2])
SUPPORTED = ((0, 16), (0, 19))

copy_to_tensor_model_parallel_region = mappings.copy_to_tensor_model_parallel_region
reduce_from_tensor_model_parallel_region = mappings.reduce_from_tensor_model_parallel_region
gather_from_tensor_model_parallel_region = mappings.gather_from_tensor_model_parallel_region
scatter_to_tensor_model_parallel_region = mappings.scatter_to_tensor_model_parallel_region
reduce_scatter_to_sequence_parallel_region = mappings.reduce_scatter_to_sequence_parallel_region


def gather_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the sequence (first) dim; backward reduce-scatters."""
    return mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)


def tp_group_or_default(tp_group):
    """Megatron passes ``tp_group`` to linears; ``None`` means the global TP group."""
    return get_tensor_model_parallel_group_if_none(tp_group)


def mark_tensor_parallel(param: torch.nn.Parameter, dim: int, stride: int = 1) -> None:
    """Tag ``param`` as split over TP ranks along ``dim`` (grad-norm and checkpoint logic read this)."""
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=stride)


def data_parallel_group():
    """The data-parallel (with context-parallel) group, over which the distributed optimizer shards."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _dp_cp_group(metadata: dict | None):
    group = (metadata or {}).get("dp_cp_group")
    return group if group is not None else data_parallel_group()


def make_sharded_tensors_for_checkpoint(
    state_dict: dict, prefix: str, axis_map: dict, sharded_offsets, tp_group, metadata: dict | None
) -> dict:
    """ShardedTensors for ``state_dict``: keys in ``axis_map`` split over TP along that axis, others replicated."""
    return _make_sharded(
        state_dict, prefix, axis_map, sharded_offsets, tp_group=tp_group, dp_cp_group=_dp_cp_group(metadata)
    )


def tp_and_dp_sharded_tensor(key: str, data: torch.Tensor, axis: int, tp_rank: int, tp_size: int, dp_rank: int,
                             dp_size: int, sharded_offsets) -> ShardedTensor:
    """A ShardedTensor of a global tensor split along ``axis`` into ``tp_size x dp_size`` pieces,
    TP-major (this rank holds piece ``tp_rank * dp_size + dp_rank``); no replicas."""
    prepend = len(sharded_offsets)
    return ShardedTensor.from_rank_offsets(
        key, data, *sharded_offsets, (axis + prepend, tp_rank * dp_size + dp_rank, tp_size * dp_size),
        replica_id=0, prepend_axis_num=prepend,
    )


def gated_sharded_tensor(sharded_tensor: ShardedTensor, sharded_offsets) -> ShardedTensor:
    """A TP-sharded ``[gate; up]`` tensor (local ``(2c, ...)``, split along axis 0) as one ShardedTensor of
    global shape ``(2, C, ...)`` over the view ``(2, c, ...)`` of the same storage, split along axis 1.

    Reshards like :func:`apply_swiglu_sharded_factory`'s halves, but the saved tensor is the layer's own
    storage: megatron's writer clones every tensor that views part of a larger storage before it writes
    anything, so the halves would copy every layer's tensor at once.
    """
    prepend = len(sharded_offsets)
    local = sharded_tensor.local_shape
    if sharded_tensor.flattened_range is not None or local[0] % 2 or sharded_tensor.global_offset[prepend] % local[0]:
        raise ValueError(f"{sharded_tensor.key}: not a whole [gate; up] shard along axis 0 ({sharded_tensor})")
    rank_offset = sharded_tensor.global_offset[prepend] // local[0]
    fragments = sharded_tensor.axis_fragmentations[prepend]
    data = sharded_tensor.data.view(2, local[0] // 2, *local[1:])
    return ShardedTensor.from_rank_offsets(
        sharded_tensor.key, data, *sharded_offsets, (prepend + 1, rank_offset, fragments),
        replica_id=sharded_tensor.replica_id, prepend_axis_num=prepend,
    )


_SWIGLU_PARAMS = inspect.signature(_mlp.apply_swiglu_sharded_factory).parameters


def apply_swiglu_sharded_factory(sharded_tensor, sharded_offsets, tp_group, metadata: dict | None):
    """Split a TP-sharded ``[gate; up]`` tensor into separately sharded gate and up halves."""
    singleton = (metadata or {}).get("singleton_local_shards", False)
    if "tp_group" in _SWIGLU_PARAMS:  # 0.19
        return _mlp.apply_swiglu_sharded_factory(
            sharded_tensor, sharded_offsets, singleton, tp_group=tp_group, dp_group=_dp_cp_group(metadata)
        )
    return _mlp.apply_swiglu_sharded_factory(sharded_tensor, sharded_offsets, singleton)


def load_fully_reshardable_without_step() -> None:
    """Let the distributed optimizer load ``--dist-ckpt-optim-fully-reshardable`` checkpoints with torch's Adam
    (idempotent): a ``step`` the checkpoint lacks stays the one megatron set from the parameter groups."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "keeps_step", False):
        return

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group, order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    set_states.keeps_step = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def replace_mlp_linears(mlp_spec, **linears):
    """The MLP entry of a layer spec with its linears replaced, in the form this version stores it."""
    if isinstance(mlp_spec, functools.partial):  # 0.19: partial(MLP.as_mlp_submodule, submodules=...)
        keywords = dict(mlp_spec.keywords)
        keywords["submodules"] = dataclasses.replace(keywords["submodules"], **linears)
        return functools.partial(mlp_spec.func, *mlp_spec.args, **keywords)
    return replace_submodules(mlp_spec, **linears)


def replace_submodules(spec: ModuleSpec, **changes) -> ModuleSpec:
    """A copy of ``spec`` whose ``submodules`` dataclass has ``changes`` applied."""
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **changes))


def check_version() -> None:
    """Raise if the installed megatron-core is outside the tested lines."""
    if MCORE_VERSION not in SUPPORTED:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED)
        raise RuntimeError(
            f"megatron_poet.megatron supports megatron-core {supported}; found {package_info.__version__}"
        )
