"""Checkpoint manifests: every saved file with its size and SHA-256, so a damaged checkpoint is named.

A save writes ``manifest.json`` into its ``iter_XXXXXXX`` directory after every rank's files are
complete and before the ``latest_checkpointed_iteration.txt`` marker moves (both engines' formats).
The checksums are computed by reading the files back from disk, spread over the ranks (rank ``r``
reads every ``world``-th file), so the manifest describes what is on disk, not what was meant to be.

On ``--load`` (:func:`verify_or_explain`, before any work) every file is checked against it: present
and of the recorded size always, the same SHA-256 with ``--ckpt-verify-checksums`` (the whole
checkpoint is read). A missing, truncated or altered file gives one message that names it and the
newest checkpoint under the same directory that verifies. ``--keep-last-checkpoints K`` deletes
older checkpoints only once a newer one verified (:func:`prune_old_checkpoints`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import torch

MANIFEST = "manifest.json"
_ITERATION_DIR = re.compile(r"^iter_(\d{7})$")


def _files(path: str) -> list[str]:
    """Paths under checkpoint directory ``path`` (relative, sorted), the manifest excluded."""
    found = []
    for root, _, names in os.walk(path):
        found += [os.path.relpath(os.path.join(root, n), path) for n in names]
    return sorted(f for f in found if f != MANIFEST)


def _sha256(file: str) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(path: str, collective: bool | None = None) -> None:
    """Record every file of the complete checkpoint directory ``path``.

    ``collective`` (default: whether torch.distributed is initialized): all ranks call, after the
    barrier that follows the save, and share the reading; rank 0 writes the file atomically. Else this
    process alone does it all (a background committer, a conversion tool).
    """
    distributed = torch.distributed.is_initialized() if collective is None else collective
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    files = _files(path)
    mine = {f: {"size": os.path.getsize(os.path.join(path, f)), "sha256": _sha256(os.path.join(path, f))}
            for f in files[rank::world]}
    parts = [None] * world
    if distributed:
        torch.distributed.all_gather_object(parts, mine)
    else:
        parts = [mine]
    if rank == 0:
        entries = {name: entry for part in parts for name, entry in part.items()}
        tmp = os.path.join(path, f".{MANIFEST}.tmp")
        with open(tmp, "w") as f:
            json.dump({"files": dict(sorted(entries.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, MANIFEST))
    if distributed:
        torch.distributed.barrier()


def problems(path: str, checksums: bool) -> list[str]:
    """What is wrong with checkpoint directory ``path`` against its manifest (``[]``: it verifies).

    A checkpoint without a manifest (written before manifests existed) has nothing to check
    against and verifies by sizes; with ``checksums`` it is reported as unverifiable.
    """
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_file):
        return [f"{manifest_file} is missing, so its checksums cannot be verified"] if checksums else []
    try:
        with open(manifest_file) as f:
            entries = json.load(f)["files"]
        assert isinstance(entries, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        return [f"its manifest {manifest_file} is unreadable ({err})"]
    found = []
    for name, entry in entries.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            found.append(f"{file} is missing")
            continue
        size = os.path.getsize(file)
        if size != entry["size"]:
            found.append(f"{file} has {size} bytes, the manifest records {entry['size']}"
                         + (" (truncated)" if size < entry["size"] else ""))
        elif checksums and _sha256(file) != entry["sha256"]:
            found.append(f"{file} does not match its SHA-256 in the manifest (altered or damaged)")
    return found


def iterations(root: str) -> list[int]:
    """Iterations of the ``iter_XXXXXXX`` directories under ``root``, newest first."""
    if not os.path.isdir(root):
        return []
    return sorted((int(m.group(1)) for m in map(_ITERATION_DIR.match, os.listdir(root)) if m), reverse=True)


def verify_or_explain(root: str, iteration: int, checksums: bool) -> str | None:
    """``None`` if checkpoint ``iteration`` under ``root`` verifies, else one message naming what is
    damaged and the newest other checkpoint that verifies (and how to resume from it)."""
    path = os.path.join(root, f"iter_{iteration:07d}")
    found = problems(path, checksums)
    if not found:
        return None
    what = "; ".join(found[:3]) + (f"; and {len(found) - 3} more files" if len(found) > 3 else "")
    good = next((i for i in iterations(root) if i != iteration
                 and os.path.isfile(os.path.join(root, f"iter_{i:07d}", MANIFEST))
                 and not problems(os.path.join(root, f"iter_{i:07d}"), checksums)), None)
    hint = (f"the newest checkpoint that verifies is iteration {good}: resume from it with --ckpt-step {good}"
            if good is not None else "no other checkpoint under it verifies")
    return f"checkpoint {path} is damaged: {what}; {hint}"


def prune_old_checkpoints(root: str, newest: int, keep: int, checksums: bool) -> list[int]:
    """Delete all but the ``keep`` newest checkpoints under ``root``, once ``newest`` verifies (call on
    one rank). Returns the iterations deleted (none when ``newest`` does not verify)."""
    if problems(os.path.join(root, f"iter_{newest:07d}"), checksums):
        return []
    older = [i for i in iterations(root) if i <= newest][keep:]
    for iteration in older:
        shutil.rmtree(os.path.join(root, f"iter_{iteration:07d}"), ignore_errors=True)
    return older
