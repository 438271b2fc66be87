"""The checkpoint directory both formats share: one ``iter_XXXXXXX`` per save, a marker, a manifest.

Layout under ``--save``::

    iter_0000100/                       one checkpoint (megatron dist_checkpointing or DeepSpeed files)
        manifest.json                   its files' sizes and SHA-256 (:mod:`.manifest`)
    latest_checkpointed_iteration.txt   the iteration to resume from (``--ckpt-step N``: another)

A save writes ``iter_XXXXXXX`` completely (every rank), then its manifest, and only then rank 0
replaces the marker atomically (write a temporary file, fsync, ``os.replace``): :func:`commit`.
A crash or kill at any moment of a save (or of a background save) therefore leaves the marker on
the previous complete checkpoint; a partial directory is ignored and replaced by the next save of
that iteration.
"""
from __future__ import annotations

import os

import torch

from .manifest import iterations, prune_old_checkpoints, write_manifest

MARKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says what to change."""


class CheckpointReadError(CheckpointError):
    """A checkpoint directory that is missing, incomplete, unreadable or refused as unsafe."""


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


def write_marker(root: str, iteration: int) -> None:
    """Point ``root``'s marker at ``iteration``, atomically and durably."""
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


_COMMITTED: set[str] = set()  # checkpoint directories this process has saved


def saved_by_this_run(path: str) -> bool:
    """Whether this process already saved checkpoint directory ``path`` (a directory of that name
    left by an earlier run, e.g. before a resume with --ckpt-step, is written again)."""
    return os.path.abspath(path) in _COMMITTED and os.path.isdir(path)


def prepare(root: str, path: str) -> None:
    """Make an empty ``path`` under ``root`` for a new save (all ranks call; rank 0 acts)."""
    if torch.distributed.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(path):  # left by a killed save (not marked) or an earlier run (see saved_by_this_run)
            import shutil

            shutil.rmtree(path)
        os.makedirs(path)
    torch.distributed.barrier()


def remember_saved(path: str) -> None:
    """Record that this process completed the save of checkpoint directory ``path``."""
    _COMMITTED.add(os.path.abspath(path))


def commit(root: str, path: str, iteration: int, keep_last: int | None = None, collective: bool = True) -> None:
    """Finish a save whose files are all written: the manifest, then the marker, then ``keep_last``
    (``--keep-last-checkpoints``: older checkpoints go once this one verifies).

    ``collective``: all ranks call (they share the manifest's reading; rank 0 moves the marker). Else
    rank 0 alone does everything (the background committer of :mod:`.background`).
    """
    write_manifest(path, collective)
    if collective:
        remember_saved(path)
    if not collective or torch.distributed.get_rank() == 0:
        write_marker(root, iteration)
        if keep_last:
            deleted = prune_old_checkpoints(root, iteration, keep_last, checksums=False)
            if deleted:
                print(f" deleted checkpoints of iterations {', '.join(map(str, sorted(deleted)))} "
                      f"(--keep-last-checkpoints {keep_last})", flush=True)
    if collective:
        torch.distributed.barrier()


def resolve(load: str, iteration: int | None, is_checkpoint) -> tuple[str, int | None]:
    """The ``iter_XXXXXXX`` directory to read under ``load`` (or ``load`` itself, if it is one).

    Args:
        load: a run's checkpoint root (with the marker) or one ``iter_XXXXXXX`` directory.
        iteration: a specific iteration; default: the marker's.
        is_checkpoint: ``fn(path) -> bool``, whether a directory holds a checkpoint of a known format.
    Returns ``(path, iteration)``; ``iteration`` is ``None`` for a directory whose name has no number.
    Raises :class:`CheckpointReadError` saying what is missing.
    """
    if not os.path.isdir(load):
        raise CheckpointReadError(f"checkpoint directory {load} does not exist")
    if is_checkpoint(load):  # an iteration directory itself
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
            found = [f"iter_{i:07d}" for i in sorted(iterations(load))]
            hint = f"; it has {', '.join(found)}: pass --iteration N" if found else ""
            raise CheckpointReadError(f"{load} is not a checkpoint of the training program: no {MARKER}{hint}")
    path = checkpoint_dir(load, iteration)
    if not os.path.isdir(path):
        raise CheckpointReadError(f"iteration {iteration} has no checkpoint: {path} does not exist")
    if not is_checkpoint(path):
        raise CheckpointReadError(f"{path} is incomplete or not a checkpoint of the training program "
                              f"(neither metadata.json nor common.json)")
    return path, iteration
