"""Checkpoints with megatron-core ``dist_checkpointing``: save, resume, crash safety.

Layout under ``--save``::

    iter_0000100/                       one dist_checkpointing directory per save
        manifest.json                   its files' sizes and SHA-256 (:mod:`.manifest`)
    latest_checkpointed_iteration.txt   the iteration to resume from (``--ckpt-step N``: another)

A save writes ``iter_XXXXXXX`` completely (every rank, then a barrier), then its manifest, and only
then rank 0 replaces the marker atomically (write a temporary file, fsync,
``os.replace``). A crash or kill at any moment of a save therefore leaves the
marker on the previous complete checkpoint; a partial directory is ignored and
removed by the next save of that iteration.

A checkpoint holds the model (incl. POET permutations and frozen weights), the optimizer and LR schedule, the iteration, consumed
samples, the merge scheduler (merge counter, steps since merge), the model-shape
arguments and every rank's RNG states. Resuming with the same layout restores
all of it, so an interrupted run continues bitwise like an uninterrupted one on
CPU. Loading with another tensor-/pipeline-/data-parallel layout (or other virtual
pipeline stages) restores everything but the per-rank RNG states (dist_checkpointing
reshards the tensors).

Loading never unpickles arbitrary objects (:mod:`megatron_poet.safe_loading`): the small files
are examined before any work (:func:`check_checkpoint_args`), and everything is read with
weights-only ``torch.load`` and a restricted unpickler for the tensor index.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil

import numpy as np
import torch

from megatron_poet.safe_loading import check_dist_checkpoint, restricted_loading

from .manifest import prune_old_checkpoints, verify_or_explain, write_manifest

MARKER = "latest_checkpointed_iteration.txt"

# Arguments that define the model's function: a --load checkpoint must agree on all of them.
SHAPE_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "model_style", "max_position_embeddings", "rotary_base", "poet", "poet_block_size",
    "poet_variant", "poet_neumann_terms", "vocab_size_unpadded", "poet_permutation_groups",
)
# Recorded too, for tools reading the checkpoint (export to Hugging Face ships the tokenizer).
RECORDED_ARGS = ("tokenizer_type", "tokenizer_model")


class CheckpointError(ValueError):
    """A ``--load`` checkpoint that does not fit the command line; the message says what to change."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    """The iteration the marker in ``root`` points to, ``None`` when there is no checkpoint."""
    path = os.path.join(root, MARKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; fix or delete it")
    return int(text)


def _write_marker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, f".{MARKER}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, MARKER))
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _layout() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``((pp, tp, dp) sizes, (pp, tp, dp) ranks)`` of this process."""
    from megatron.core import parallel_state as ps

    sizes = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    ranks = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_data_parallel_rank())
    return sizes, ranks


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sizes, ranks = _layout()
    return ShardedObject("rng_state", data, sizes, ranks, replica_id=0)


def shape_args(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in SHAPE_ARGS}


def recorded_args(args: argparse.Namespace) -> dict:
    """Plain values saved as the checkpoint's ``args``: :data:`SHAPE_ARGS` plus :data:`RECORDED_ARGS`."""
    from .model_provider import padded_vocab_size

    recorded = shape_args(args)
    recorded.update({name: getattr(args, name) for name in RECORDED_ARGS})
    recorded["padded_vocab_size"] = padded_vocab_size(args.vocab_size_unpadded, args)
    if recorded["tokenizer_model"]:
        recorded["tokenizer_model"] = os.path.abspath(recorded["tokenizer_model"])
    return recorded


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def optimizer_sharding_type(args: argparse.Namespace) -> str:
    """The distributed optimizer's checkpoint format (megatron's ``distrib_optim_sharding_type``).

    megatron-core's default, ``fully_sharded_model_space``, relies on
    ``ShardedTensor.flattened_range``, which 0.16.1 no longer accepts; like
    Megatron-LM we save ``dp_reshardable`` (parallel, reloads at another DP size)
    or, with ``--dist-ckpt-optim-fully-reshardable``, ``fully_reshardable``.
    """
    return "fully_reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp_reshardable"


def _model_keys(model_chunks) -> list[str]:
    """Megatron-LM's keys of the model chunks: ``model``, or ``model0``, ``model1``, ... with virtual stages.

    Only the nesting differs: the tensors inside are keyed by global layer numbers
    (megatron's layer offsets), so a checkpoint loads at any pipeline layout."""
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _state_dict(args, model_chunks, optimizer, *, is_loading: bool, with_rng: bool, sharding_type: str) -> dict:
    models = {key: _unwrap(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(model_chunks), model_chunks)}
    metadata = {"distrib_optim_sharding_type": sharding_type}
    state = {**models, **optimizer.sharded_state_dict(models, is_loading=is_loading, metadata=metadata)}
    if with_rng:
        state["rng_state"] = _rng_sharded_object(None if is_loading else _rng_state())
    return state


def save_checkpoint(args, iteration: int, consumed_samples: int, model_chunks, optimizer, merge_scheduler) -> str:
    """Save iteration ``iteration`` under ``args.save`` and move the marker to it (all ranks call)."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    path = checkpoint_dir(args.save, iteration)
    if saved_by_this_run(path):
        return path  # e.g. a signal right after a periodic save
    if rank == 0:
        os.makedirs(args.save, exist_ok=True)
        if os.path.exists(path):  # left by a killed save (not marked) or an earlier run (see saved_by_this_run)
            shutil.rmtree(path)
        os.makedirs(path)
    torch.distributed.barrier()
    with optimizer.saving():
        sharding_type = optimizer_sharding_type(args)
        state = _state_dict(args, model_chunks, optimizer, is_loading=False, with_rng=True,
                            sharding_type=sharding_type)
        sizes, _ = _layout()
        state.update(
            optimizer_sharding_type=sharding_type,
            iteration=iteration,
            consumed_samples=consumed_samples,
            merge_scheduler=merge_scheduler.state_dict() if merge_scheduler else None,
            args=recorded_args(args),
            layout=sizes,
        )
        dist_checkpointing.save(state, path)
    torch.distributed.barrier()  # every rank has written its part
    commit_checkpoint(args, path, iteration)
    return path


_COMMITTED: set[str] = set()  # checkpoint directories this process has saved


def saved_by_this_run(path: str) -> bool:
    """Whether this process already saved checkpoint directory ``path`` (a directory of that name
    left by an earlier run, e.g. before a resume with --ckpt-step, is written again)."""
    return os.path.abspath(path) in _COMMITTED and os.path.isdir(path)


def commit_checkpoint(args: argparse.Namespace, path: str, iteration: int) -> None:
    """Finish a save whose files are all written (both engines; all ranks call): the manifest, then
    the marker, then ``--keep-last-checkpoints`` (older checkpoints go once this one verifies)."""
    write_manifest(path)
    _COMMITTED.add(os.path.abspath(path))
    if torch.distributed.get_rank() == 0:
        _write_marker(args.save, iteration)
        if args.keep_last_checkpoints:
            deleted = prune_old_checkpoints(args.save, iteration, args.keep_last_checkpoints, checksums=False)
            if deleted:
                print(f" deleted checkpoints of iterations {', '.join(map(str, sorted(deleted)))} "
                      f"(--keep-last-checkpoints {args.keep_last_checkpoints})", flush=True)
    torch.distributed.barrier()


def iteration_to_load(args: argparse.Namespace) -> int | None:
    """``--ckpt-step`` if given, else the iteration the ``--load`` marker points to (``None``: none)."""
    if not args.load:
        return None
    return args.ckpt_step if args.ckpt_step is not None else latest_iteration(args.load)


def read_common_state(path: str) -> dict:
    """The non-sharded state of checkpoint directory ``path`` (``common.pt``), read safely.

    Raises :class:`~megatron_poet.safe_loading.UnsafeFileError` for a file that is not plain data.
    """
    from megatron.core import dist_checkpointing

    check_dist_checkpoint(path)
    with restricted_loading(f"checkpoint {path}"):
        return dist_checkpointing.load_common_state_dict(path)


def check_checkpoint_args(args: argparse.Namespace) -> int | None:
    """Before any work: the ``--load`` checkpoint's model shape must match the command line.

    Returns the iteration that will be loaded (``None``: nothing to load, fresh start).
    Raises :class:`CheckpointError` listing every mismatching flag, or
    :class:`~megatron_poet.safe_loading.UnsafeFileError` for a file that is not plain data.
    """
    iteration = iteration_to_load(args)
    if iteration is None:
        return None
    path = checkpoint_dir(args.load, iteration)
    if not os.path.isdir(path):
        source = f"--ckpt-step {iteration}" if args.ckpt_step is not None else \
            f"{os.path.join(args.load, MARKER)} points to iteration {iteration} but"
        raise CheckpointError(f"{source} {path} does not exist; restore the directory or fix the marker")
    damage = [verify_or_explain(args.load, iteration, args.ckpt_verify_checksums)
              if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(damage, src=0)  # one rank reads the files, all agree
    if damage[0]:
        raise CheckpointError(damage[0])
    from .engine import deepspeed_checkpoint

    if args.deepspeed or deepspeed_checkpoint.is_deepspeed_checkpoint(path):
        saved = deepspeed_checkpoint.saved_args_for_resume(args, path)
    else:
        saved = read_common_state(path)["args"]
    ours = shape_args(args)
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, command line {ours[k]!r}"
             for k in SHAPE_ARGS if saved.get(k) != ours[k]]
    if diffs:
        raise CheckpointError(
            f"--load {args.load} (iteration {iteration}) holds a model of another shape; change these flags "
            f"to the checkpoint's values or load another checkpoint:\n  " + "\n  ".join(diffs)
        )
    return iteration


def load_checkpoint(args, model_chunks, optimizer, merge_scheduler) -> tuple[int, int]:
    """Restore the newest checkpoint under ``args.load``; returns ``(iteration, consumed_samples)``.

    ``(0, 0)`` when there is none. Call :func:`check_checkpoint_args` first.
    """
    from megatron.core import dist_checkpointing

    iteration = iteration_to_load(args)
    if iteration is None:
        return 0, 0
    path = checkpoint_dir(args.load, iteration)
    common = read_common_state(path)
    sizes, _ = _layout()
    same_layout = tuple(common["layout"]) == sizes
    template = _state_dict(args, model_chunks, optimizer, is_loading=True, with_rng=same_layout,
                           sharding_type=common["optimizer_sharding_type"])
    with restricted_loading(f"checkpoint {path}"):
        state = dist_checkpointing.load(template, path)
    for key, chunk in zip(_model_keys(model_chunks), model_chunks):
        _unwrap(chunk).load_state_dict(state[key])
    if merge_scheduler is not None:
        merge_scheduler.load_state_dict(state["merge_scheduler"])
    steps_since_merge = merge_scheduler.steps_since_merge if merge_scheduler else 0
    optimizer.load_state_dict(state, steps_since_merge)
    if same_layout:
        _set_rng_state(state["rng_state"])
    return int(state["iteration"]), int(state["consumed_samples"])
