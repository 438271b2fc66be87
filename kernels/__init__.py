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
import importlib.machinery
import importlib.util
import os
import sys


def _hand_name_to_installed_kernels() -> bool:
    """Imported as top-level ``kernels`` (the repository root is on ``sys.path``, as under ``python -m``
    from a checkout), this directory would shadow PyPI's ``kernels``, which transformers >= 5.25
    imports. Put the installed package under that name instead, if there is one; True if done."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
    spec.loader.exec_module(module)
    return True


if __name__ != "kernels" or not _hand_name_to_installed_kernels():
    from .dispatch import (
        ENV_VAR,
        SUPPORTED_BLOCK_SIZES,
        agree_autotuning_over,
        cayley_neumann_supported,
        current_mode,
        kernels_mode,
        rotation_supported,
    )

__all__ = [
    "ENV_VAR",
    "SUPPORTED_BLOCK_SIZES",
    "agree_autotuning_over",
    "cayley_neumann_supported",
    "current_mode",
    "kernels_mode",
    "rotation_supported",
]
