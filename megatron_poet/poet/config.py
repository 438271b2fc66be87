"""One object for every POET option, shared by the plain and the Megatron layers."""
from __future__ import annotations

from dataclasses import dataclass

from .a0_storage import STORAGES
from .init import INIT_SCHEMES

MODES = ("fast", "mem")
VARIANTS = ("bs", "fs")


@dataclass(frozen=True)
class POETConfig:
    """POET hyper-parameters of a linear layer.

    Attributes:
        block_size: ``b``. Variant "bs": size of each orthogonal block; both layer
            dimensions must be divisible by it. Variant "fs": number of randomly
            chosen coordinates rotated per side (``b <= dimension``).
        neumann_terms: ``k`` in ``G = (I+Q)(I+Q+...+Q^k)``; ``None`` = exact Cayley.
        mode: "fast" keeps intermediates for backward, "mem" recomputes them.
        init: initialization of ``A0`` (see :mod:`megatron_poet.poet.init`).
        variant: "bs" (block-stochastic) or "fs" (fully stochastic).
        permutation_groups: tensor-parallel layers only (``megatron_poet.megatron``):
            the sharded side's permutation stays inside this many contiguous groups
            of the dimension, independently of the TP size, so runs at any TP size
            dividing it are identical. ``None`` = the run's TP size. With variant "fs"
            the sharded side rotates one ``block_size``-subset per group.
        fp32_master_a0: keep a float32 master copy of ``A0`` that merges fold (round to the
            layer's dtype once per merge instead of accumulating half-precision roundings).
        shard_fp32_master: tensor-parallel layers only: each data-parallel rank keeps
            ``1/DP`` of the master (gathered at merges), like the distributed optimizer's main params.
        a0_storage: "native" (``A0`` in the parameter dtype) or "int8" (8-bit codes with a float32 scale
            and zero point per ``a0_group_size`` entries of a row, POET-XQ's scheme; :mod:`.a0_storage`).
        a0_group_size: entries per quantization group of "int8" storage.
    """

    block_size: int = 256
    neumann_terms: int | None = 3
    mode: str = "fast"
    init: str = "normalized"
    variant: str = "bs"
    permutation_groups: int | None = None
    fp32_master_a0: bool = False
    shard_fp32_master: bool = False
    a0_storage: str = "native"
    a0_group_size: int = 256

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise ValueError(f"POET block_size must be an integer >= 2, got {self.block_size!r}")
        if self.neumann_terms is not None and (not isinstance(self.neumann_terms, int) or self.neumann_terms < 1):
            raise ValueError(
                f"POET neumann_terms must be an integer >= 1 or None (exact Cayley), got {self.neumann_terms!r}"
            )
        if self.mode not in MODES:
            raise ValueError(f"POET mode must be one of {MODES}, got {self.mode!r}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"POET init must be one of {INIT_SCHEMES}, got {self.init!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"POET variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.permutation_groups is not None and (
            not isinstance(self.permutation_groups, int) or self.permutation_groups < 1
        ):
            raise ValueError(
                f"POET permutation_groups must be a positive integer or None, got {self.permutation_groups!r}"
            )
        if self.shard_fp32_master and not self.fp32_master_a0:
            raise ValueError("POET shard_fp32_master needs fp32_master_a0=True")
        if self.a0_storage not in STORAGES:
            raise ValueError(f"POET a0_storage must be one of {STORAGES}, got {self.a0_storage!r}")
        if not isinstance(self.a0_group_size, int) or self.a0_group_size < 2:
            raise ValueError(f"POET a0_group_size must be an integer >= 2, got {self.a0_group_size!r}")
        if self.a0_storage == "int8" and self.fp32_master_a0:
            raise ValueError("POET fp32_master_a0 keeps a master of a half-precision A0; int8 storage folds "
                             "its dequantized values (use one or the other)")

    def num_blocks(self, dim: int, what: str = "dimension", layer: str | None = None) -> int:
        """Blocks on a side of size ``dim``; raises a ValueError naming the layer if invalid."""
        where = f"POET layer {layer!r}: " if layer else "POET: "
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"{where}{what} must be a positive integer, got {dim!r}")
        if self.variant == "fs":
            if self.block_size > dim:
                raise ValueError(
                    f"{where}{what}={dim} is smaller than the fully stochastic block_size={self.block_size}; "
                    f"use block_size <= {dim}"
                )
            return 1
        if dim % self.block_size:
            raise ValueError(where + divisibility_hint(dim, self.block_size, what))
        return dim // self.block_size


def divisibility_hint(dim: int, block_size: int, what: str) -> str:
    """Message for ``dim % block_size != 0`` naming the nearest valid sizes."""
    lower, upper = (dim // block_size) * block_size, (dim // block_size + 1) * block_size
    sizes = " or ".join(str(s) for s in (lower, upper) if s > 0)
    divisors = [b for b in range(2, dim + 1) if dim % b == 0]
    near = sorted(divisors, key=lambda b: (abs(b - block_size), b))[:3]
    blocks = ", ".join(map(str, sorted(near))) if near else "none (dimension < 2)"
    return (
        f"{what}={dim} is not divisible by block_size={block_size}; nearest valid {what}: {sizes}; "
        f"nearest block sizes dividing {dim}: {blocks}"
    )
