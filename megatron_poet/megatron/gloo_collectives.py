"""megatron-core's distributed optimizer on CPU processes (gloo), for tests and CPU runs.

Two things stop ``DistributedOptimizer`` on a CPU-only machine:

1. Its constructor sorts parameters by ``param.type()`` and accepts only
   ``torch.cuda.{Float,Half,BFloat16}Tensor``; a CPU ``torch.FloatTensor`` raises
   ``TypeError``. :func:`enable_distributed_optimizer_on_cpu` runs the
   constructor with CPU tensors reporting the CUDA type names (only there).
2. Gradient reduce-scatter uses ``torch.distributed.reduce_scatter_tensor``.
   gloo implements it in recent torch (2.13 does), older gloo raises
   "does not support". :func:`reduce_scatter_tensor` then emulates it:
   all-reduce the whole input (a copy), keep this rank's slice. Same result,
   ``world_size`` times the traffic, which only matters on CPU test runs.

Only for the CPU backend (:mod:`.cpu_backend`); with CUDA these are never installed.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_INSTALLED = False


class _DoneWork:
    """Handle of an already finished collective (what ``async_op=True`` callers ``wait()`` on)."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def reduce_scatter_by_all_reduce(output: torch.Tensor, input: torch.Tensor, op=dist.ReduceOp.SUM,
                                 group=None, async_op: bool = False):
    """``reduce_scatter_tensor`` from ``all_reduce``: ``output (n,)`` = slice ``rank`` of the reduced ``input (world*n,)``.

    ``input`` is left unchanged (the reduction runs on a copy), as the real collective does.
    """
    world = dist.get_world_size(group)
    if input.numel() != world * output.numel():
        raise ValueError(f"reduce_scatter: input has {input.numel()} elements, expected "
                         f"{world} x {output.numel()} (world size x output)")
    reduced = input.detach().clone()
    dist.all_reduce(reduced, op=op, group=group)
    rank = dist.get_rank(group)
    output.copy_(reduced.view(-1)[rank * output.numel():(rank + 1) * output.numel()].view_as(output))
    return _DoneWork() if async_op else None


def _with_fallback(native):
    @functools.wraps(native)
    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        try:
            return native(output, input, op=op, group=group, async_op=async_op)
        except (RuntimeError, NotImplementedError) as e:
            # Raised locally by a backend without the op, before any communication.
            if "support" not in str(e):
                raise
            return reduce_scatter_by_all_reduce(output, input, op=op, group=group, async_op=async_op)

    return reduce_scatter_tensor


@contextlib.contextmanager
def _cpu_tensors_report_cuda_types():
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def enable_distributed_optimizer_on_cpu() -> None:
    """Let ``DistributedOptimizer`` run on CPU tensors over gloo (idempotent; call before building it)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    init = DistributedOptimizer.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        with _cpu_tensors_report_cuda_types():
            init(self, *args, **kwargs)

    DistributedOptimizer.__init__ = __init__
    param_and_grad_buffer.dist_reduce_scatter_func = _with_fallback(param_and_grad_buffer.dist_reduce_scatter_func)
    _INSTALLED = True
