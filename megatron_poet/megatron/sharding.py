"""Layout-independent permutations for the tensor-parallel (sharded) side of a POET layer.

The sharded dimension of a layer (rows of a column-parallel ``A0``, columns of a
row-parallel one) has a *global* layout of ``parts`` equal parts (2 for SwiGLU's
``[gate; up]`` ``linear_fc1``, else 1). Megatron gives TP rank ``r`` of ``t`` the
``r``-th chunk of every part, so its local layout is ``[part0_r; part1_r; ...]``.

Each part is cut into ``groups`` contiguous *permutation groups*; the
permutation of the sharded side only permutes inside a group, and group ``g``
of part ``s`` is drawn from a generator seeded by ``(layer seed, s, g)``. The
group count is a POET setting, independent of the TP size, so any TP size
dividing it gives every rank whole groups and the concatenation of the ranks'
permutations is the same global permutation: TP=1 and TP=2 train the same
function step for step. Blocks never straddle groups, so ``P`` (or ``R``) is
block-diagonal over ranks and stays local: block-stochastic ("bs") blocks tile each
group (``block_size`` divides the group size); the fully stochastic variant ("fs")
rotates one random ``block_size``-subset per group (the first ``block_size`` entries of
the group's permutation), so its sharded side has one block per group.

In checkpoints a permutation is stored in *canonical* form: the global index
(in the ``[part0; part1; ...]`` layout) each permuted position reads. That form
does not depend on the TP size, so it reshards to any layout whose shards the
permutation does not cross.
"""
from __future__ import annotations

import math

import torch

from ..poet.config import POETConfig
from ..poet.init import mix_seed

__all__ = ["ShardedDimension", "draw_permutation", "mix_seed"]


def draw_permutation(n: int, seed: int) -> torch.Tensor:
    """``randperm(n)`` from a CPU generator seeded with ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class ShardedDimension:
    """The TP-sharded dimension of one POET layer.

    Args:
        global_size: size of the dimension over all TP ranks.
        parts: 2 for SwiGLU's ``[gate; up]`` layout (Megatron's ``stride=2``), else 1.
        tp_size, tp_rank: tensor-parallel layout.
        groups: permutation groups per part (:attr:`POETConfig.permutation_groups`).
        config: block size used for validation.
        layer, what: names for error messages.
    Raises:
        ValueError naming the layer when the layout cannot hold whole groups and blocks.
    """

    def __init__(
        self, global_size: int, parts: int, tp_size: int, tp_rank: int, groups: int,
        config: POETConfig, layer: str, what: str,
    ):
        where = f"POET layer {layer!r}: {what}={global_size}"
        if global_size % parts:
            raise ValueError(f"{where} is not divisible into {parts} parts (gate/up)")
        self.part_size = global_size // parts
        if self.part_size % tp_size:
            raise ValueError(
                f"{where}: tensor_model_parallel_size={tp_size} does not divide the sharded size {self.part_size}"
            )
        if groups % tp_size:
            raise ValueError(
                f"{where}: permutation_groups={groups} must be a multiple of tensor_model_parallel_size={tp_size} "
                "so every rank holds whole permutation groups"
            )
        if self.part_size % groups:
            raise ValueError(f"{where}: permutation_groups={groups} does not divide the part size {self.part_size}")
        self.group_size = self.part_size // groups
        if config.variant == "fs" and self.group_size < config.block_size:
            raise ValueError(
                f"{where}: the fully stochastic block_size={config.block_size} exceeds the permutation group "
                f"size {self.group_size} (= {self.part_size} / permutation_groups={groups}); use a smaller "
                f"block size or fewer permutation groups"
            )
        if config.variant == "bs" and self.group_size % config.block_size:
            raise ValueError(
                f"{where}: block_size={config.block_size} does not divide the permutation group size "
                f"{self.group_size} (= {self.part_size} / permutation_groups={groups}); per-rank shard is "
                f"{self.part_size // tp_size} per part at tensor_model_parallel_size={tp_size}"
            )
        if config.a0_storage == "int8" and what == "input_size" and self.group_size % config.a0_group_size:
            # Quantization groups run along the stored input order: inside one permutation group they
            # are the same at every TP size.
            raise ValueError(
                f"{where}: the A0 quantization group size {config.a0_group_size} does not divide the permutation "
                f"group size {self.group_size} (= {self.part_size} / permutation_groups={groups})"
            )
        self.parts, self.tp_size, self.tp_rank, self.groups = parts, tp_size, tp_rank, groups
        self.chunk = self.part_size // tp_size  # per-rank size of one part
        self.local_size = parts * self.chunk
        # Where this side's blocks sit: every block_size for "bs", one block per group for "fs".
        self.segment = config.block_size if config.variant == "bs" else self.group_size
        part = torch.arange(self.local_size) // self.chunk
        # local_to_global[i]: global index (in the [part0; part1; ...] layout) of local index i.
        self.local_to_global = part * self.part_size + tp_rank * self.chunk + torch.arange(self.local_size) % self.chunk

    def draw_local_permutation(self, seed: int) -> torch.Tensor:
        """This rank's permutation ``(local_size,)`` in local indices, a restriction of the global one."""
        groups_per_rank = self.groups // self.tp_size
        pieces = []
        for s in range(self.parts):
            for j in range(groups_per_rank):
                g = self.tp_rank * groups_per_rank + j
                start = s * self.chunk + j * self.group_size
                pieces.append(start + draw_permutation(self.group_size, mix_seed(seed, s, g)))
        return torch.cat(pieces)

    def to_canonical(self, local_perm: torch.Tensor) -> torch.Tensor:
        """Local permutation -> the global indices it reads (checkpoint form), ``(local_size,)``."""
        return self.local_to_global.to(local_perm.device)[local_perm]

    def from_canonical(self, canonical: torch.Tensor, layer: str) -> torch.Tensor:
        """Inverse of :meth:`to_canonical`; raises if the permutation crosses this rank's shard."""
        canonical = canonical.to(torch.long)
        part = canonical // self.part_size
        offset = canonical - part * self.part_size - self.tp_rank * self.chunk
        own_part = torch.arange(self.local_size, device=canonical.device) // self.chunk
        if bool(((offset < 0) | (offset >= self.chunk) | (part != own_part)).any()):
            raise ValueError(
                f"POET layer {layer!r}: the checkpoint's sharded-side permutation crosses the shard boundaries of "
                f"tensor_model_parallel_size={self.tp_size}; it was trained with fewer permutation groups. Load it "
                "at a TP size dividing the permutation_groups it was trained with"
            )
        return part * self.chunk + offset


def layout_free_permutation_groups(sharded: list[tuple[int, int]], config: POETConfig, tp_size: int,
                                   max_groups: int = 8, min_blocks: int = 2) -> int:
    """A default :attr:`POETConfig.permutation_groups` that depends on the model's sizes, not on the TP size.

    The largest of ``max_groups, max_groups / 2, ..., 1`` that cuts every part of every sharded
    dimension (``sharded``: ``(size, parts)`` per layer, parts = 2 for SwiGLU's gate and up) into
    groups of at least ``min_blocks`` whole blocks (a group of one block would make the sharded
    side's permutation useless). Every TP size dividing it trains the same model; with a TP
    size that does not divide it (or variant "fs") this returns ``tp_size``, the layers' own default.
    """
    if config.variant != "bs":
        return tp_size
    # 8-bit A0: groups also hold whole quantization groups (needed on row-parallel inputs, asked of all).
    unit = math.lcm(config.block_size, config.a0_group_size) if config.a0_storage == "int8" else config.block_size
    groups = max_groups
    while groups > 1 and not all(
        size % (parts * groups * unit) == 0 and size // (parts * groups) >= min_blocks * config.block_size
        for size, parts in sharded
    ):
        groups //= 2
    return groups if groups % tp_size == 0 else tp_size
