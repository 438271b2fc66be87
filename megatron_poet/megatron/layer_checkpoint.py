"""Checkpoint layout of the tensor-parallel POET layers, and where their fp32 master of ``A0`` lives.

State (``state_dict`` hooks and ``sharded_state_dict``) is layout-independent: ``base_weight`` is
the un-permuted ``A0`` slice (float32 from the master when the layer keeps one, else in the
layer's dtype), the sharded side's permutation is stored as the *global* indices it reads, and
``base_weight``, that permutation, the sharded side's skew blocks and ``frozen_init_sq_norms``
are split along the TP axis (SwiGLU's ``linear_fc1``: the buffers each as one ``(2, rows, ...)`` tensor,
gate and up, see :func:`.compat.gated_sharded_tensor`; the skews in halves by megatron's SwiGLU factory),
so a checkpoint reshards to any TP size dividing ``permutation_groups``. Checkpoints written before hold
the buffers in halves too: they load with ``metadata[GATED_KEYS_AS_HALVES]``. With 8-bit ``A0`` storage,
``base_weight`` holds the uint8 codes un-permuted, and ``frozen_scale``/``frozen_zero`` their groups'
scales with canonical rows; their columns follow the stored input order, which within each
permutation group is the same at every TP size (the quantization group divides it), so they are
split along the TP axis like ``base_weight``. A master sharded over
data-parallel ranks is saved as each rank's piece of the same global ``base_weight``
(no gather), so it also reloads at another DP size.
"""
from __future__ import annotations

import contextlib

import torch

from ..poet.merge import permute_, permuted_copy
from . import compat

_QUANTIZATION_KEYS = ("frozen_scale", "frozen_zero")  # 8-bit A0 storage: per-group scales and zero points
GATED_KEYS_AS_HALVES = "poet_gated_keys_as_halves"  # sharded_state_dict metadata: older checkpoints' layout


class MasterShard:
    """The float32 master of a layer's local ``A0``, canonical (un-permuted) order.

    Unsharded: the whole local ``A0``. With ``shard_fp32_master`` and DP > 1: this data-parallel
    rank's ``1/DP`` of it along the TP-sharded axis (rows of a column-parallel layer, columns of
    a row-parallel one), taken from each part (SwiGLU gate/up) separately, so the piece is a
    contiguous block of the global matrix in every part; merges all-gather it (:meth:`gather`).
    """

    def __init__(self, layer, poet):
        self.axis = layer.sharded_axis
        self.shape = tuple(layer.frozen_weight.shape)
        self.parts, self.chunk = layer.sharded.parts, layer.sharded.chunk
        self.to_global = layer.global_indices
        group = compat.data_parallel_group() if poet.shard_fp32_master else None
        self.group = group if group is not None and group.size() > 1 else None
        self.size = self.group.size() if self.group else 1
        self.rank = self.group.rank() if self.group else 0
        if self.chunk % self.size:
            raise ValueError(
                f"POET layer {layer.name!r}: the fp32 master cannot be split over {self.size} data-parallel ranks: "
                f"they must divide the per-rank shard {self.chunk}"
            )
        self.index = self.rank_index(self.rank)

    def rank_index(self, rank: int) -> torch.Tensor:
        """Local indices (along :attr:`axis`) held by data-parallel rank ``rank``."""
        piece = self.chunk // self.size
        return torch.cat([s * self.chunk + rank * piece + torch.arange(piece) for s in range(self.parts)])

    def empty(self, device) -> torch.Tensor:
        shape = list(self.shape)
        shape[self.axis] = self.index.numel()
        return torch.empty(shape, dtype=torch.float32, device=device)

    def global_rows_and_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ``A0`` indices of this piece's rows and columns."""
        full = [torch.arange(n) for n in self.shape]
        full[self.axis] = self.index
        return self.to_global(full[0], 0), self.to_global(full[1], 1)

    def gather(self, piece: torch.Tensor) -> torch.Tensor:
        """The whole local canonical master from every rank's ``piece`` (the piece itself when unsharded)."""
        if self.group is None:
            return piece
        pieces = [torch.empty_like(piece) for _ in range(self.size)]
        torch.distributed.all_gather(pieces, piece.contiguous(), group=self.group)
        full = torch.empty(self.shape, dtype=piece.dtype, device=piece.device)
        for rank, part in enumerate(pieces):
            full.index_copy_(self.axis, self.rank_index(rank).to(piece.device), part)
        return full

    def own_part(self, canonical: torch.Tensor) -> torch.Tensor:
        return canonical if self.group is None else canonical.index_select(self.axis, self.index.to(canonical.device))


@contextlib.contextmanager
def canonical_a0(model: torch.nn.Module):
    """Within: every tensor-parallel POET layer of ``model`` holds its ``A0`` (and 8-bit scales) un-permuted,
    in place, so the state dicts taken inside refer to the layers' own storage instead of copying every
    ``A0`` at once (one layer's transient at a time). On exit each layer is permuted back (exact: a
    gather), except those a ``load_state_dict`` inside has filled with the loaded, pre-permuted ``A0``.
    Layers keeping an fp32 master save the master and are left as they are.
    """
    layers = [m for m in model.modules() if getattr(m, "a0_canonical", None) is False and m.master is None
              and not hasattr(m.frozen_weight, "ds_id")]
    try:
        for layer in layers:
            _permute_a0_rows_and_cols(layer, layer.output_side.inv_perm, layer.input_side.inv_perm)
            layer.a0_canonical = True
        yield
    finally:
        for layer in layers:
            if layer.a0_canonical:
                _permute_a0_rows_and_cols(layer, layer.output_side.perm, layer.input_side.perm)
                layer.a0_canonical = False


@torch.no_grad()
def _permute_a0_rows_and_cols(layer, rows: torch.Tensor, cols: torch.Tensor) -> None:
    permute_(layer.frozen_weight, rows, cols)
    for name in _QUANTIZATION_KEYS if layer.frozen_scale is not None else ():
        stored = getattr(layer, name)
        stored.copy_(stored.index_select(0, rows))  # groups run along the stored columns: rows only
    if layer.fp8 is not None:
        layer.fp8.invalidate()


def to_canonical_state(module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post hook: ``A0`` un-permuted as ``base_weight``, the sharded permutation in global indices.

    Under DeepSpeed ZeRO-3 this rank holds only a partition of ``A0`` (the state dict
    carries DeepSpeed's empty placeholder): the state is left as it is, DeepSpeed saves
    the partitions itself.
    """
    if hasattr(module.frozen_weight, "ds_id"):
        return
    frozen = state_dict.pop(prefix + "frozen_weight")
    if module.a0_canonical:  # inside canonical_a0: the layer's own tensors are the canonical state
        state_dict[prefix + "base_weight"] = frozen.detach()
    elif module.master is not None and module.master.group is None:
        state_dict[prefix + "base_weight"] = module.frozen_master.detach()
    else:
        out_inv, in_inv = module.output_side.inv_perm, module.input_side.inv_perm
        state_dict[prefix + "base_weight"] = permuted_copy(frozen.detach(), out_inv, in_inv)
    for key in _QUANTIZATION_KEYS if module.frozen_scale is not None and not module.a0_canonical else ():
        state_dict[prefix + key] = state_dict[prefix + key].index_select(0, module.output_side.inv_perm)
    key = f"{prefix}{module._sharded_side_name()}.perm"
    state_dict[key] = module.sharded.to_canonical(state_dict[key])


def from_canonical_state(module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre hook: the inverse of :func:`to_canonical_state` (before the sides load their perms).

    ``base_weight`` is the whole local ``A0`` or, for a data-parallel-sharded master loaded from a
    sharded checkpoint, this rank's piece of it (gathered here).
    """
    key = f"{prefix}{module._sharded_side_name()}.perm"
    if prefix + "base_weight" not in state_dict or key not in state_dict:
        return  # strict loading reports the missing keys
    for name in _gated_buffers(module) if module.stride == 2 else ():  # a sharded load gives (2, rows, ...)
        loaded = state_dict.get(prefix + name)
        if loaded is not None and loaded.dim() == _own_tensor(module, name).dim() + 1:
            state_dict[prefix + name] = loaded.flatten(0, 1)
    state_dict[key] = module.sharded.from_canonical(state_dict[key], module.name)
    out_perm = state_dict[prefix + "output_side.perm"].to(torch.long)
    in_perm = state_dict[prefix + "input_side.perm"].to(torch.long)
    base = state_dict.pop(prefix + "base_weight")
    if module.master is not None:
        with torch.no_grad():
            if tuple(base.shape) == module.master.shape:
                base = base.to(torch.float32)
                module.frozen_master.copy_(module.master.own_part(base))
            else:
                module.frozen_master.copy_(base)
                base = module.master.gather(module.frozen_master)
    state_dict[prefix + "frozen_weight"] = permuted_copy(base, out_perm, in_perm)
    module.a0_canonical = False  # what the layer holds after this load is pre-permuted (canonical_a0)
    for key in _QUANTIZATION_KEYS if module.frozen_scale is not None else ():
        if prefix + key in state_dict:  # (strict loading reports a missing one)
            state_dict[prefix + key] = state_dict[prefix + key].index_select(0, out_perm)
    module.initialized = True


def _gated_buffers(module) -> tuple[str, ...]:
    """The TP-sharded buffers of a layer (in a gated ``linear_fc1`` each holds gate and up parts); the
    sharded side's skews are TP-sharded too, but parameters."""
    quantized = _QUANTIZATION_KEYS if module.frozen_scale is not None else ()
    return ("base_weight", f"{module._sharded_side_name()}.perm", "frozen_init_sq_norms", *quantized)


def _own_tensor(module, name: str) -> torch.Tensor:
    """The layer's tensor behind state key ``name`` (``base_weight``: the ``A0`` it holds)."""
    owner, _, attr = name.rpartition(".")
    return module.frozen_weight if name == "base_weight" else getattr(module.get_submodule(owner), attr)


def sharded_poet_state_dict(module, prefix: str, sharded_offsets: tuple, metadata: dict | None) -> dict:
    """The layer's ``sharded_state_dict`` (see the module docstring)."""
    state = module.state_dict(prefix="", keep_vars=True)
    side = module._sharded_side_name()
    axis_map = {"base_weight": module.sharded_axis, f"{side}.perm": 0, f"{side}.skew": 0, "frozen_init_sq_norms": 0}
    quantized = _QUANTIZATION_KEYS if module.frozen_scale is not None else ()
    axis_map.update({key: module.sharded_axis for key in quantized})
    if module.column and module.bias is not None:
        axis_map["bias"] = 0
    dp_sharded = module.master is not None and module.master.group is not None
    if dp_sharded:
        state.pop("base_weight")
    sharded = compat.make_sharded_tensors_for_checkpoint(
        state, prefix, axis_map, sharded_offsets, module.tp_group, metadata)
    if dp_sharded:
        tp = module.tp_group
        sharded[prefix + "base_weight"] = compat.tp_and_dp_sharded_tensor(
            prefix + "base_weight", module.frozen_master, module.sharded_axis, tp.rank(), tp.size(),
            module.master.rank, module.master.size, sharded_offsets)
    if module.stride == 2:
        # MLP splits "weight"/"bias" of a gated linear_fc1 itself; the other sharded keys are ours. The buffers
        # are each one (2, rows, ...) tensor of the layer's own storage (megatron's writer would clone halves);
        # the skews keep megatron's factory, whose tensor is the parameter the optimizer state is mapped by.
        buffers = _gated_buffers(module)
        whole = () if (metadata or {}).get(GATED_KEYS_AS_HALVES) else buffers
        for key in (*buffers, f"{side}.skew"):
            sharded[prefix + key] = compat.gated_sharded_tensor(sharded[prefix + key], sharded_offsets) \
                if key in whole else compat.apply_swiglu_sharded_factory(
                    sharded[prefix + key], sharded_offsets, module.tp_group, metadata)
    return sharded
