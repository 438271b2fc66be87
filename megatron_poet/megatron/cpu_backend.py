"""Run megatron-core on a CPU-only machine (gloo); a no-op wherever CUDA is available.

megatron-core assumes CUDA in a handful of places that a CPU run reaches:

1. ``torch.cuda.current_device()`` used as a device (DDP grad buffers, weight
   init, optimizer) -> returns ``torch.device("cpu")``.
2. ``device="cuda"`` literals (``get_default_causal_mask``, optimizer found-inf
   and scale tensors, ``clip_grads``, ``schedules`` token counters) and
   ``Tensor.cuda()`` -> the factory functions ``torch.{tensor, zeros, ones, empty,
   full, arange}`` map a CUDA device to the CPU (and drop ``pin_memory``, which
   needs CUDA); ``Tensor.cuda()`` returns the tensor itself.
3. The tensor-parallel RNG tracker keeps CUDA generator states and
   ``model_parallel_cuda_manual_seed`` (mandatory before building a model) seeds
   the CUDA generator -> the "CUDA generator" becomes the CPU default generator:
   ``torch.cuda.{manual_seed, get_rng_state, set_rng_state}`` and megatron's
   ``_get/_set_cuda_rng_state`` act on it, and the tracker's ``fork`` no longer
   warns that the CPU state changed (on CPU that is the point of forking).
4. ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``
   -> rebound to the same scaling without that assertion.
5. ``torch.cuda.synchronize`` / ``current_stream`` / ``default_stream`` /
   ``Stream`` / ``stream`` (checkpointing, DDP, MoE's alltoall dispatcher) -> no-ops on a dummy
   stream whose events are already complete.
6. The constructors of ``DistributedOptimizer`` and (``--bf16``) ``Float16OptimizerWithFloat16Params``
   accept only ``torch.cuda.*Tensor`` type names -> they run with CPU tensors reporting the CUDA
   names (only inside the constructor); the distributed optimizer's gradient reduce-scatter falls
   back to all-reduce + the local slice where gloo lacks reduce-scatter (torch 2.13's gloo has it).

7. MoE's alltoall token dispatcher converts its split sizes to numpy only when copying them off a
   GPU, and ``all_to_all_single`` refuses them as tensors -> CPU tensors are converted the same way.

Nothing else changes: all computation is ordinary CPU PyTorch over gloo.

dist_checkpointing needs ``psutil`` (megatron-core does not declare it; without
it a save hangs instead of failing), so :func:`use_cpu_backend_if_no_cuda`
checks for it up front.

Entry points: :func:`use_cpu_backend_if_no_cuda` (idempotent) and
:func:`initialize_distributed`, which also creates the process group and
megatron's parallel state and seeds the model-parallel RNG.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import os

import torch
import torch.distributed as dist
import torch.utils._device

_INSTALLED = False
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")


def use_cpu_backend_if_no_cuda() -> bool:
    """Install the CPU patches when CUDA is unavailable; return whether they are active.

    Call it before building any megatron-core object (importing megatron first
    is fine). Safe to call repeatedly.
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available():
        return False
    if importlib.util.find_spec("psutil") is None:
        raise RuntimeError(
            "megatron-core's dist_checkpointing needs psutil (not declared by megatron-core; "
            "without it a checkpoint save hangs): pip install psutil"
        )
    _patch_devices()
    _patch_streams()
    _patch_rng()
    _patch_grad_clipping()
    _patch_optimizers()
    _patch_moe_dispatcher()
    _INSTALLED = True
    return True


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a CUDA device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


def _patch_devices() -> None:
    # torch caches its table of factory functions (for `with torch.device(...)`) on first
    # use; built after the patch it would hold the wrappers, and transformers' meta-device
    # loading would then leave buffers such as RoPE's inv_freq uninitialised. Build it first.
    torch.utils._device._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _cpu_factory(getattr(torch, name)))
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class _NullEvent:
    """Stands in for ``torch.cuda.Event`` (megatron's alltoall dispatcher waits on one): already complete."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def synchronize(self) -> None:
        pass


def _patch_streams() -> None:
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NullStream()
    torch.cuda.default_stream = lambda device=None: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    # Only the CPU default generator: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mrandom.CudaRNGStatesTracker = _cpu_tracker_class(mrandom.CudaRNGStatesTracker, mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME)
    # A tracker built before the patch would still be a CUDA one.
    mrandom.initialize_rng_tracker(force_reset=True)


def _cpu_tracker_class(base: type, default_name: str) -> type:
    class CPURNGStatesTracker(base):
        """megatron's RNG tracker with the CPU default generator as its "CUDA" generator."""

        @contextlib.contextmanager
        def fork(self, name=default_name):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_name, outer_state = self._current_state_name, torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CPURNGStatesTracker


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's ``clip_grad_by_total_norm_fp32`` without its ``torch.cuda.FloatTensor`` assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_grad_clipping() -> None:
    import sys

    from megatron.core.optimizer import clip_grads

    original = clip_grads.clip_grad_by_total_norm_fp32
    # The optimizer modules imported the function by name: rebind every copy.
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "clip_grad_by_total_norm_fp32", None) is original:
            module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


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


def _constructed_with_cuda_type_names(cls: type) -> None:
    """``cls(...)`` sees CPU tensors reporting the CUDA type names (only inside its constructor)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        with _cpu_tensors_report_cuda_types():
            init(self, *args, **kwargs)

    cls.__init__ = __init__


def _patch_optimizers() -> None:
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for cls in (DistributedOptimizer, Float16OptimizerWithFloat16Params):  # the latter: --bf16
        _constructed_with_cuda_type_names(cls)
    param_and_grad_buffer.dist_reduce_scatter_func = _with_fallback(param_and_grad_buffer.dist_reduce_scatter_func)


def _patch_moe_dispatcher() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    to_cpu = token_dispatcher.maybe_move_tensor_to_cpu

    @functools.wraps(to_cpu)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        moved = to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)
        return moved.numpy() if as_numpy and torch.is_tensor(moved) else moved

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 10,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int = 1,
) -> str:
    """Set up ``torch.distributed``, megatron's parallel state and its RNG tracker.

    Reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (as set by
    torchrun). Uses nccl with one GPU per local rank when CUDA is available,
    otherwise installs the CPU backend and uses gloo. The data-parallel size is
    ``world_size / (tp * pp)``; ``virtual_pipeline_model_parallel_size`` is the number of model
    chunks per pipeline rank of the interleaved schedule (``None``: one); ``expert_model_parallel_size``
    the ranks MoE experts are spread over, ``expert_tensor_parallel_size`` the ranks each is split over
    (1 or the TP size). Returns the backend name.
    """
    cpu = use_cpu_backend_if_no_cuda()
    backend = "gloo" if cpu else "nccl"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % (tensor_model_parallel_size * pipeline_model_parallel_size):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"{tensor_model_parallel_size} x pipeline_model_parallel_size {pipeline_model_parallel_size}"
        )
    if not torch.distributed.is_initialized():
        if not cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            backend=backend,
            rank=int(os.environ.get("RANK", "0")),
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size, expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    model_parallel_cuda_manual_seed(seed)
    # Tensor-parallel ranks compute the replicated POET factors' rotations: one kernel configuration.
    from megatron_poet.kernels import agree_autotuning_over

    tp_group = parallel_state.get_tensor_model_parallel_group()
    agree_autotuning_over(tp_group if tensor_model_parallel_size > 1 else None)
    return backend


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the process group (end of a job or test)."""
    from megatron.core import parallel_state

    from megatron_poet.kernels import agree_autotuning_over

    agree_autotuning_over(None)
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def single_process(seed: int = 1234):
    """torch.distributed and megatron's parallel state for this one process (TP = PP = 1), for tools that
    build a model outside a launcher (export, import); inside an initialized world of size 1, nothing
    changes. Picks a free rendezvous port; the environment is restored afterwards."""
    import socket

    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise RuntimeError("this tool runs in a single process (world size 1)")
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    ours = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1")
    saved = {name: os.environ.get(name) for name in ours}  # a launcher in this process must not inherit them
    os.environ.update(ours)
    try:
        initialize_distributed(1, 1, seed=seed)
        try:
            yield
        finally:
            destroy_distributed()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
