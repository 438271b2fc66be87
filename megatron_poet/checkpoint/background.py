"""Background saves (``--async-save``): from megatron-core's asynchronous write to the marker, without
blocking training.

Two stages per save, each off the training loop's path:

1. **writing**: ``dist_checkpointing.save(..., async_sharded_save=True)`` gives a request that
   megatron's ``AsyncCallsQueue`` runs in a process forked per rank (it sees the state as it was when
   forked). :meth:`BackgroundSaves.finish` asks, in one collective, whether every rank's writer is
   done; then megatron finalizes (rank 0 writes the tensor index).
2. **committing**: rank 0 alone reads the files back for the manifest (sizes, SHA-256), then moves
   the marker and prunes (:func:`.directory.commit` in one process), in a thread: hashing and file
   reads release the GIL, so a multi-GB checkpoint is verified while training goes on. Rank 0 then
   tells every rank which saves are complete (a broadcast, only while one is committing).

A kill at any moment leaves the marker on the previous complete checkpoint. Saves complete in the
order they were made; a failed commit (e.g. a full disk) is raised on every rank.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch


class BackgroundSaves:
    """The saves of one run that are still being written or committed (see the module docstring)."""

    def __init__(self):
        self._queue = None  # megatron's AsyncCallsQueue, made by the first save
        self._writing: list[str] = []  # directories, oldest first (the same on every rank)
        self._committing: list[str] = []
        self._threads: dict[str, threading.Thread] = {}  # rank 0: the committer of each directory
        self._errors: dict[str, str] = {}  # rank 0: why a commit failed

    def pending(self, path: str) -> bool:
        return path in self._writing or path in self._committing

    def schedule(self, request, path: str, commit: Callable[[], None]) -> None:
        """Start writing ``request`` (megatron's ``AsyncRequest`` for checkpoint directory ``path``) in
        the background; ``commit`` runs on rank 0 once every rank's files are written (all ranks call)."""
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        if self._queue is None:
            self._queue = AsyncCallsQueue(persistent=False)
        request.add_finalize_fn(lambda: self._start_commit(path, commit))
        self._queue.schedule_async_request(request)
        self._writing.append(path)

    def _start_commit(self, path: str, commit: Callable[[], None]) -> None:
        # megatron's finalization, on every rank, after its own (the tensor index is written).
        self._writing.remove(path)
        self._committing.append(path)
        if torch.distributed.get_rank() == 0:
            thread = threading.Thread(target=self._commit, args=(path, commit), name=f"commit {path}", daemon=True)
            self._threads[path] = thread
            thread.start()

    def _commit(self, path: str, commit: Callable[[], None]) -> None:
        try:
            commit()
        except Exception as err:  # reported on every rank by finish()
            self._errors[path] = f"{type(err).__name__}: {err}"

    def finish(self, blocking: bool) -> list[str]:
        """The directories whose saves completed since the last call, oldest first (all ranks call;
        with ``blocking``, every save in flight). Raises ``RuntimeError`` for a failed commit."""
        if self._writing:
            self._queue.maybe_finalize_async_calls(blocking=blocking)
        if not self._committing:
            return []
        verdict = [0, None]  # [saves complete, error]
        if torch.distributed.get_rank() == 0:
            for path in self._committing:
                thread = self._threads[path]
                if blocking:
                    thread.join()
                if thread.is_alive():
                    break
                del self._threads[path]
                verdict[0] += 1
                if path in self._errors:
                    verdict[1] = f"writing the manifest or marker of checkpoint {path} failed: {self._errors.pop(path)}"
                    break
        torch.distributed.broadcast_object_list(verdict, src=0)
        done, self._committing = self._committing[:verdict[0]], self._committing[verdict[0]:]
        if verdict[1]:
            raise RuntimeError(verdict[1])
        return done
