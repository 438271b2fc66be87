"""Read megatron ``dist_checkpointing`` checkpoints without unsafe unpickling.

A torch_dist checkpoint directory holds ``metadata.json`` (JSON), ``common.pt``
(the non-sharded state, written by ``torch.save``), ``.metadata`` (the tensor
index, written by ``pickle.dump``) and ``*.distcp`` files (raw tensor bytes;
torch reads embedded objects with ``torch.load(weights_only=True)``).

Two of those would otherwise be unpickled with full power (a checkpoint from an
untrusted source could run arbitrary code on load):

- ``.metadata`` is read by torch's ``FileSystemReader`` with plain ``pickle.load``:
  :func:`safe_unpickling` swaps in :class:`_RestrictedUnpickler`, which only
  resolves the plain-data classes a checkpoint index consists of;
- ``common.pt`` is read by megatron with ``torch.load`` and no ``weights_only``
  argument (whose default depends on the torch version and the
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable): it is forced to
  ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import io
import os
import pickle
import types

import torch

from megatron_poet.training.checkpointing import MARKER, CheckpointError, checkpoint_dir, latest_iteration
from megatron_poet.training.engine.deepspeed_checkpoint import is_deepspeed_checkpoint


class CheckpointReadError(ValueError):
    """The checkpoint directory is missing, incomplete, unreadable or refused as unsafe."""


def _is_checkpoint(path: str) -> bool:
    """Whether ``path`` is one checkpoint: a megatron dist checkpoint or a DeepSpeed-engine one."""
    return os.path.isfile(os.path.join(path, "metadata.json")) or is_deepspeed_checkpoint(path)


def resolve_checkpoint(load: str, iteration: int | None = None) -> tuple[str, int | None]:
    """The ``iter_XXXXXXX`` directory to read under a training ``--save`` directory.

    Args:
        load: the training run's checkpoint root (with ``latest_checkpointed_iteration.txt``)
            or one ``iter_XXXXXXX`` directory itself.
        iteration: a specific iteration; default: the one the marker names.
    Returns:
        ``(path, iteration)``; ``iteration`` is ``None`` when ``load`` was an iteration directory
        whose name carries no number.
    Raises:
        CheckpointReadError: with what is missing and how to fix it.
    """
    if not os.path.isdir(load):
        raise CheckpointReadError(f"checkpoint directory {load} does not exist")
    if _is_checkpoint(load):  # an iteration directory itself
        if iteration is not None:
            raise CheckpointReadError(f"{load} is a single checkpoint; --iteration needs the directory above it")
        name = os.path.basename(os.path.normpath(load))
        number = name[len("iter_"):] if name.startswith("iter_") else ""
        return load, int(number) if number.isdigit() else None
    if iteration is None:
        try:
            iteration = latest_iteration(load)
        except CheckpointError as err:
            raise CheckpointReadError(str(err)) from None
        if iteration is None:
            found = sorted(d for d in os.listdir(load) if d.startswith("iter_"))
            hint = f"; it has {', '.join(found)}: pass --iteration N" if found else ""
            raise CheckpointReadError(
                f"{load} is not a checkpoint of the training program: no {MARKER}{hint}")
    path = checkpoint_dir(load, iteration)
    if not os.path.isdir(path):
        raise CheckpointReadError(f"iteration {iteration} has no checkpoint: {path} does not exist")
    if not _is_checkpoint(path):
        raise CheckpointReadError(f"{path} is incomplete or not a checkpoint of the training program "
                                  f"(neither metadata.json nor common.json)")
    return path, iteration


def _allowed_global(module: str, name: str):
    """The object a checkpoint index may reference, or ``None``.

    Allowed: ``torch.Size``, torch dtypes / layouts / memory formats, torch's
    layout decoder, ``collections.OrderedDict``, and the dataclasses and enums
    of torch's distributed-checkpoint metadata. None of them runs code beyond
    building plain data.
    """
    if (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"),
                          ("collections", "OrderedDict")}:
        return getattr(__import__(module, fromlist=[name]), name)
    if module == "torch":
        value = getattr(torch, name, None)
        return value if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) else None
    if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                  "torch.distributed.checkpoint.filesystem"):
        value = getattr(__import__(module, fromlist=[name]), name, None)
        is_data = isinstance(value, type) and (
            issubclass(value, enum.Enum) or hasattr(value, "__dataclass_fields__"))
        return value if is_data else None
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :func:`_allowed_global` objects."""

    def find_class(self, module: str, name: str):
        value = _allowed_global(module, name)
        if value is None:
            raise CheckpointReadError(
                f"checkpoint index references {module}.{name}, which is not plain checkpoint metadata; "
                f"refusing to unpickle it (the checkpoint may be corrupt or unsafe)")
        return value


def _restricted_pickle_module() -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose ``load``/``loads`` are restricted."""
    module = types.ModuleType("restricted_pickle")
    module.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    module.load = lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load()
    module.loads = lambda data, **kwargs: _RestrictedUnpickler(io.BytesIO(data), **kwargs).load()
    module.Unpickler = _RestrictedUnpickler
    return module


def _weights_only_torch() -> types.ModuleType:
    """A stand-in for the ``torch`` module whose ``load`` always uses ``weights_only=True``."""
    proxy = types.ModuleType("torch_weights_only")
    proxy.__getattr__ = lambda name: getattr(torch, name)

    @functools.wraps(torch.load)
    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return torch.load(*args, **kwargs)

    proxy.load = load
    return proxy


@contextlib.contextmanager
def safe_unpickling():
    """Within this block, megatron / torch checkpoint readers never unpickle arbitrary objects.

    Swaps the ``pickle`` module seen by torch's distributed-checkpoint file reader
    and the ``torch`` module seen by megatron's common-state loader (module globals,
    restored on exit; nothing else in the process is affected).
    """
    from megatron.core.dist_checkpointing.strategies import common
    from megatron.core.msc_utils import MultiStorageClientFeature
    from torch.distributed.checkpoint import filesystem

    if MultiStorageClientFeature.is_enabled():
        # Its readers (msc.torch.load) bypass the module globals swapped below.
        raise CheckpointReadError("megatron's multi-storage client is enabled; disable it to convert safely")
    saved = filesystem.pickle, common.torch
    filesystem.pickle, common.torch = _restricted_pickle_module(), _weights_only_torch()
    try:
        yield
    finally:
        filesystem.pickle, common.torch = saved


def _read_error(path: str, err: Exception) -> CheckpointReadError:
    if isinstance(err, CheckpointReadError):
        return err
    return CheckpointReadError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}")


def read_common_state(path: str) -> dict:
    """The non-sharded part of a checkpoint (``common.pt``), loaded with ``weights_only=True``."""
    from megatron.core import dist_checkpointing

    try:
        with safe_unpickling():
            return dist_checkpointing.load_common_state_dict(path)
    except Exception as err:  # any failure here means an unreadable checkpoint
        raise _read_error(path, err) from err


def read_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Global shape of every sharded tensor in the checkpoint, by sharded key."""
    from megatron.core import dist_checkpointing

    try:
        with safe_unpickling():
            metadata = dist_checkpointing.load_tensors_metadata(path)
    except Exception as err:
        raise _read_error(path, err) from err
    return {key: tuple(t.global_shape) for key, t in metadata.items() if hasattr(t, "global_shape")}


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Load the model part of a checkpoint into ``model`` (any saved TP size; megatron reshards).

    Only the model's own sharded tensors are requested, so the optimizer state is never read.
    Raises :class:`CheckpointReadError` when the checkpoint lacks tensors the model needs
    (e.g. a ``--no-poet`` checkpoint read into a POET model) or has them in another shape.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    sharded = {"model": model.sharded_state_dict()}
    try:
        with safe_unpickling():
            available = load_sharded_metadata(path)
    except Exception as err:
        raise _read_error(path, err) from err
    # Checked here rather than left to megatron, whose errors for a mismatch are obscure.
    requested = {v.key for v in nested_values(sharded) if hasattr(v, "key")}
    missing = sorted(requested - {v.key for v in available.values()})
    if missing:
        raise CheckpointReadError(
            f"checkpoint {path} lacks tensors of the model built from its own arguments: "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    try:
        with safe_unpickling():
            state = dist_checkpointing.load(sharded, path)
    except Exception as err:
        raise _read_error(path, err) from err
    model.load_state_dict(state["model"])
