"""megatron-core ``dist_checkpointing``: the megatron engine's checkpoints, saved in the foreground or
in the background, and read back safely by the resume and the exporter.

A checkpoint holds the model (POET permutations and frozen weights included), the optimizer and
LR schedule, the iteration, consumed samples, the merge scheduler, the model's arguments and every
rank's RNG states. Resuming with the same layout restores all of it, so an interrupted run continues
bitwise on CPU; at another TP/PP/DP layout (or other virtual stages) everything but the per-rank RNG
states (dist_checkpointing reshards the tensors).

``--async-save`` uses megatron-core's asynchronous saving (:mod:`.background`): a forked process per
rank writes the tensors while training goes on (a fork sees the state as it was when the save
began); :meth:`DistFormat.finish_saves`, called every iteration, completes saves once every rank's
writer is done and rank 0 has read the files back for the manifest and moved the marker. A second
save waits for the first; the run waits for an in-flight save before it exits.

Files: ``metadata.json`` (JSON), ``common.pt`` (``torch.save``), ``.metadata`` (the tensor index,
``pickle``) and ``*.distcp``. Everything is read inside
:func:`megatron_poet.safe_loading.restricted_loading` after
:func:`~megatron_poet.safe_loading.check_dist_checkpoint` examined the small files.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os

import torch

from megatron_poet.safe_loading import UnsafeFileError, check_dist_checkpoint, restricted_loading

from .background import BackgroundSaves
from .base import CheckpointFormat
from .directory import CheckpointReadError, checkpoint_dir, commit, prepare, remember_saved, saved_by_this_run
from .record import layout, recorded_args, rng_state, set_rng_state

EMBEDDING_KEY = "embedding.word_embeddings.weight"


def optimizer_sharding_type(args: argparse.Namespace) -> str:
    """The distributed optimizer's checkpoint format (megatron's ``distrib_optim_sharding_type``).

    megatron-core's default, ``fully_sharded_model_space``, relies on ``ShardedTensor.flattened_range``,
    which 0.16.1 no longer accepts; like Megatron-LM we save ``dp_reshardable`` (parallel, reloads at
    another DP size) or, with ``--dist-ckpt-optim-fully-reshardable``, ``fully_reshardable``.
    """
    return "fully_reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable"


def _model_keys(model_chunks) -> list[str]:
    """Megatron-LM's keys of the model chunks: ``model``, or ``model0``, ``model1``, ... with virtual
    stages (the tensors inside are keyed by global layer numbers: any pipeline layout loads them)."""
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _model_metadata(shapes: dict[str, tuple[int, ...]] | None) -> dict:
    """``sharded_state_dict`` metadata of the model for a checkpoint whose tensors have global ``shapes`` (by
    key; ``None``: a new checkpoint). Checkpoints written before a gated ``linear_fc1``'s ``A0`` was saved whole
    (global ``(2, ffn, hidden)``) hold it in halves (``(2 ffn, hidden)``, as many dimensions as ``linear_fc2``'s)."""
    from megatron_poet.megatron.layer_checkpoint import GATED_KEYS_AS_HALVES

    if shapes is None:
        return {}
    halves = any(len(shape) == len(shapes.get(key.replace("linear_fc1.", "linear_fc2."), ()))
                 for key, shape in shapes.items() if key.endswith("linear_fc1.base_weight"))
    return {GATED_KEYS_AS_HALVES: True} if halves else {}


def _sharded_state(args, model_chunks, optimizer, *, loading: str | None, with_rng: bool, sharding_type: str) -> dict:
    """The sharded state to save (``loading=None``) or to load from checkpoint directory ``loading``."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    is_loading = loading is not None
    model_metadata = _model_metadata(read_tensor_shapes(loading) if is_loading else None)
    models = {key: _unwrap(chunk).sharded_state_dict(metadata=model_metadata)
              for key, chunk in zip(_model_keys(model_chunks), model_chunks)}
    metadata = {"distrib_optim_sharding_type": sharding_type}
    state = {**models, **optimizer.sharded_state_dict(models, is_loading=is_loading, metadata=metadata)}
    if with_rng:
        sizes, ranks = layout()
        state["rng_state"] = ShardedObject("rng_state", None if is_loading else rng_state(), sizes, ranks, replica_id=0)
    return state


def _canonical_a0(stack: contextlib.ExitStack, model_chunks) -> None:
    """Every chunk's POET ``A0`` un-permuted in place until ``stack`` closes: saving or loading then holds
    no copy of every ``A0`` (:func:`megatron_poet.megatron.layer_checkpoint.canonical_a0`)."""
    from megatron_poet.megatron.layer_checkpoint import canonical_a0

    for chunk in model_chunks:
        stack.enter_context(canonical_a0(_unwrap(chunk)))


def _read_error(path: str, err: Exception) -> CheckpointReadError:
    if isinstance(err, CheckpointReadError):
        return err
    if isinstance(err, UnsafeFileError):
        return CheckpointReadError(str(err))
    return CheckpointReadError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}")


def read_common_state(path: str) -> dict:
    """The non-sharded state of checkpoint directory ``path`` (``common.pt``), read safely.

    Raises :class:`~megatron_poet.safe_loading.UnsafeFileError` for a file that is not plain data.
    """
    from megatron.core import dist_checkpointing

    check_dist_checkpoint(path)
    with restricted_loading(f"checkpoint {path}"):
        return dist_checkpointing.load_common_state_dict(path)


def read_tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Global shape of every sharded tensor in the checkpoint, by sharded key."""
    from megatron.core import dist_checkpointing

    try:
        with restricted_loading(f"checkpoint {path}"):
            metadata = dist_checkpointing.load_tensors_metadata(path)
    except Exception as err:
        raise _read_error(path, err) from err
    return _global_shapes(metadata)


def _global_shapes(metadata: dict) -> dict[str, tuple[int, ...]]:
    """The global shape of each sharded tensor of a checkpoint's ``metadata`` (megatron's), by sharded key."""
    return {key: tuple(t.global_shape) for key, t in metadata.items() if hasattr(t, "global_shape")}


class DistFormat(CheckpointFormat):
    """megatron-core ``dist_checkpointing`` (see the module docstring)."""

    name = "megatron dist_checkpointing"

    def __init__(self):
        self._background = BackgroundSaves()

    def owns(self, path: str) -> bool:
        return os.path.isfile(os.path.join(path, "metadata.json"))

    def save(self, engine, iteration: int, consumed_samples: int) -> str:
        from megatron.core import dist_checkpointing

        args = engine.args
        path = checkpoint_dir(args.save, iteration)
        if saved_by_this_run(path) or self._background.pending(path):
            return path  # e.g. a signal right after a periodic save
        self.finish_saves(blocking=True)  # one save at a time
        prepare(args.save, path)
        optimizer = engine.optimizer
        with optimizer.saving(), contextlib.ExitStack() as stack:
            if not args.async_save:  # (a forked writer's snapshot would copy the A0s the loop permutes back)
                _canonical_a0(stack, engine.ddp_chunks)
            sharding_type = optimizer_sharding_type(args)
            state = _sharded_state(args, engine.ddp_chunks, optimizer, loading=None, with_rng=True,
                                   sharding_type=sharding_type)
            merges = engine.merge_scheduler
            state.update(optimizer_sharding_type=sharding_type, iteration=iteration, consumed_samples=consumed_samples,
                         merge_scheduler=merges.state_dict() if merges else None, args=recorded_args(args),
                         layout=layout()[0])
            finish = functools.partial(commit, args.save, path, iteration, args.keep_last_checkpoints)
            if not args.async_save:
                dist_checkpointing.save(state, path)
                torch.distributed.barrier()  # every rank has written its part
                finish()
                return path
            # Scheduled inside this block: the writer is forked now and sees the state as saving()
            # presents it (the shared Adam step).
            self._background.schedule(dist_checkpointing.save(state, path, async_sharded_save=True), path,
                                      functools.partial(finish, collective=False))
        return path

    def finish_saves(self, blocking: bool) -> list[str]:
        done = self._background.finish(blocking)
        for path in done:
            remember_saved(path)
        return done

    def load(self, engine, path: str) -> tuple[int, int]:
        from megatron.core import dist_checkpointing

        args, optimizer, merges = engine.args, engine.optimizer, engine.merge_scheduler
        common = read_common_state(path)
        same_layout = tuple(common["layout"]) == layout()[0]
        with contextlib.ExitStack() as stack:
            _canonical_a0(stack, engine.ddp_chunks)
            template = _sharded_state(args, engine.ddp_chunks, optimizer, loading=path, with_rng=same_layout,
                                      sharding_type=common["optimizer_sharding_type"])
            with restricted_loading(f"checkpoint {path}"):
                state = dist_checkpointing.load(template, path)
            for key, chunk in zip(_model_keys(engine.ddp_chunks), engine.ddp_chunks):
                _unwrap(chunk).load_state_dict(state[key])
        if merges is not None:
            merges.load_state_dict(state["merge_scheduler"])
        optimizer.load_state_dict(state, merges.steps_since_merge if merges else 0)
        if same_layout:
            set_rng_state(state["rng_state"])
        return int(state["iteration"]), int(state["consumed_samples"])

    def _common(self, path: str) -> dict:
        try:
            return read_common_state(path)
        except Exception as err:  # any failure here means an unreadable checkpoint
            raise _read_error(path, err) from err

    def read_args(self, path: str) -> dict:
        return self._common(path).get("args")

    def model_only(self, path: str) -> bool:
        return bool(self._common(path).get("model_only", False))

    def padded_vocab_size(self, path: str) -> int:
        shapes = read_tensor_shapes(path)
        if EMBEDDING_KEY not in shapes:
            raise CheckpointReadError(f"{path} has no {EMBEDDING_KEY}; cannot determine the vocabulary")
        return shapes[EMBEDDING_KEY][0]

    def load_model_weights(self, model: torch.nn.Module, path: str) -> None:
        """Only the model's own sharded tensors are requested, so the optimizer state is never read.
        Raises :class:`CheckpointReadError` when the checkpoint lacks tensors the model needs (e.g. a
        ``--no-poet`` checkpoint read into a POET model)."""
        with contextlib.ExitStack() as stack:
            _canonical_a0(stack, [model])
            self._load_model_weights(model, path)

    @staticmethod
    def _load_model_weights(model: torch.nn.Module, path: str) -> None:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

        try:
            with restricted_loading(f"checkpoint {path}"):
                available = load_sharded_metadata(path)
        except Exception as err:
            raise _read_error(path, err) from err
        sharded = {"model": model.sharded_state_dict(metadata=_model_metadata(_global_shapes(available)))}
        # Checked here rather than left to megatron, whose errors for a mismatch are obscure.
        requested = {v.key for v in nested_values(sharded) if hasattr(v, "key")}
        missing = sorted(requested - {v.key for v in available.values()})
        if missing:
            raise CheckpointReadError(f"checkpoint {path} lacks tensors of the model built from its own arguments: "
                                      f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
        try:
            with restricted_loading(f"checkpoint {path}"):
                state = dist_checkpointing.load(sharded, path)
        except Exception as err:
            raise _read_error(path, err) from err
        model.load_state_dict(state["model"])
