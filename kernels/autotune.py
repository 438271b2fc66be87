"""Autotuning configurations: candidates for H100/H200, not yet tuned on a GPU; one config in the interpreter.

:data:`AUTOTUNE_OPTIONS` makes every kernel benchmark through :func:`agreed_do_bench`, so that the
ranks of the group set by :func:`.dispatch.agree_autotuning_over` pick one configuration (Triton >=
3.3 has the ``do_bench`` hook; older Triton tunes per rank, and the replicated factors still get
identical updates from their reduced gradients).

Every kernel prunes configs whose tiles exceed the block size ``B`` (tiles must
divide ``B``; all sizes here are powers of two), so a config never reads past a
block. Under ``TRITON_INTERPRET=1`` each config would run once per autotune
trial on the CPU, so there is exactly one config and no benchmarking.
"""
from __future__ import annotations

import inspect
import itertools

import torch
import triton

from .dispatch import autotune_group, interpreting


def agreed_do_bench(kernel_call, quantiles, measure=None):
    """Triton's ``do_bench`` whose timings are the maximum over the agreement group's ranks.

    Args:
        kernel_call: the candidate launch Triton hands in; quantiles: as ``triton.testing.do_bench``.
        measure: the benchmark (default ``triton.testing.do_bench``; tests inject one).
    Returns the timings (ms), identical on every rank of the group.
    """
    measure = measure or triton.testing.do_bench
    times = measure(kernel_call, quantiles=quantiles)
    group = autotune_group()
    if group is None or torch.distributed.get_world_size(group) == 1:
        return times
    on = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend(group) == "nccl" else "cpu"
    agreed = torch.tensor(times if isinstance(times, (list, tuple)) else [times], dtype=torch.float64, device=on)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX, group=group)
    values = agreed.tolist()
    return values if isinstance(times, (list, tuple)) else values[0]


# Keyword arguments of every @triton.autotune here.
AUTOTUNE_OPTIONS = {"do_bench": agreed_do_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


def _configs(space: dict[str, tuple[int, ...]], warps_stages: tuple[tuple[int, int], ...]) -> list[triton.Config]:
    names = list(space)
    return [
        triton.Config(dict(zip(names, values)), num_warps=w, num_stages=s)
        for values in itertools.product(*(space[k] for k in names))
        for w, s in warps_stages
    ]


def prune_to_block(tile_names: tuple[str, ...]):
    """``early_config_prune`` keeping configs whose named tiles are ``<= B`` (at least one kept)."""

    def prune(configs, named_args, **kwargs):
        b = kwargs.get("B", named_args.get("B"))
        kept = [c for c in configs if all(c.kwargs[t] <= b for t in tile_names)]
        return kept or [min(configs, key=lambda c: max(c.kwargs[t] for t in tile_names))]

    return prune


if interpreting():
    ROTATE_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    GRAD_CONFIGS = [triton.Config({"BLOCK_I": 32, "BLOCK_J": 32, "BLOCK_T": 16}, num_warps=4)]
    CAYLEY_CONFIGS = [triton.Config({"BLOCK_T": 32, "BLOCK_K": 32}, num_warps=4)]
else:
    # Rotation: a program owns BLOCK_M tokens x BLOCK_N outputs of one block; BLOCK_N = B
    # (for B <= 256) reads each gathered input tile once, smaller BLOCK_N gives more programs
    # for few tokens. bf16 tensor-core tiles want BLOCK_K >= 32 and 3-4 pipeline stages.
    ROTATE_CONFIGS = _configs(
        {"BLOCK_M": (64, 128), "BLOCK_N": (64, 128, 256), "BLOCK_K": (32, 64)},
        ((4, 3), (8, 3), (8, 4)),
    )
    # Block gradients: a (BLOCK_I x BLOCK_J) tile of one block, reducing over BLOCK_T tokens at a time.
    GRAD_CONFIGS = _configs(
        {"BLOCK_I": (64, 128), "BLOCK_J": (64, 128), "BLOCK_T": (32, 64)},
        ((4, 3), (8, 3), (8, 4)),
    )
    # Cayley–Neumann: fp32 (tf32x3) b x b products, tiny next to the layer GEMM.
    CAYLEY_CONFIGS = _configs({"BLOCK_T": (32, 64, 128), "BLOCK_K": (32, 64)}, ((4, 2), (8, 3)))
