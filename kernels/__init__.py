"""Triton kernels for POET, installed as ``megatron_poet.kernels``.

- :mod:`.cayley_neumann`: packed skew parameters -> orthogonal blocks (and packed gradients).
- :mod:`.rotation_ops` / :mod:`.block_rotate`: permute + block-rotate activations with the
  permutation fused into the loads (input side) or stores (output side), forward and backward.
- :mod:`.dispatch`: the switch deciding when the core ops use them (``MEGATRON_POET_KERNELS``,
  :func:`kernels_mode`).

Only :mod:`.dispatch` is imported here; the Triton modules load on first use, so importing
the core never requires Triton. Callers go through ``megatron_poet.poet`` (``cayley_neumann``,
``rotate_input``, ``rotate_output``, ``poet_linear``), which dispatch automatically.
"""
from .dispatch import (
    ENV_VAR,
    SUPPORTED_BLOCK_SIZES,
    cayley_neumann_supported,
    current_mode,
    kernels_mode,
    rotation_supported,
)

__all__ = [
    "ENV_VAR",
    "SUPPORTED_BLOCK_SIZES",
    "cayley_neumann_supported",
    "current_mode",
    "kernels_mode",
    "rotation_supported",
]
