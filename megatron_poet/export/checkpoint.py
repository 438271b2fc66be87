"""Read megatron ``dist_checkpointing`` checkpoints without unsafe unpickling.

A torch_dist checkpoint directory holds ``metadata.json`` (JSON), ``common.pt``
(the non-sharded state, written by ``torch.save``), ``.metadata`` (the tensor
index, written by ``pickle.dump``) and ``*.distcp`` files (raw tensor bytes and
objects written by ``torch.save``). Everything is read inside
:func:`megatron_poet.safe_loading.restricted_loading` (weights-only ``torch.load``,
a restricted unpickler for the index), after :func:`~megatron_poet.safe_loading.check_dist_checkpoint`
has examined the small files: a checkpoint from an untrusted source cannot run code.
"""
from __future__ import annotations

import os

import torch

from megatron_poet.safe_loading import UnsafeFileError, restricted_loading
from megatron_poet.training import checkpointing
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


def _read_error(path: str, err: Exception) -> CheckpointReadError:
    if isinstance(err, CheckpointReadError):
        return err
    if isinstance(err, UnsafeFileError):
        return CheckpointReadError(str(err))
    return CheckpointReadError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}")


def read_common_state(path: str) -> dict:
    """The non-sharded part of a checkpoint (``common.pt``), read safely (see the module docstring)."""
    try:
        return checkpointing.read_common_state(path)
    except Exception as err:  # any failure here means an unreadable checkpoint
        raise _read_error(path, err) from err


def read_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Global shape of every sharded tensor in the checkpoint, by sharded key."""
    from megatron.core import dist_checkpointing

    try:
        with restricted_loading(f"checkpoint {path}"):
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
        with restricted_loading(f"checkpoint {path}"):
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
        with restricted_loading(f"checkpoint {path}"):
            state = dist_checkpointing.load(sharded, path)
    except Exception as err:
        raise _read_error(path, err) from err
    model.load_state_dict(state["model"])
