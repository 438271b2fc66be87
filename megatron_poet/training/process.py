"""How a training process behaves towards its launcher, its children and the terminal.

What every rank does (:func:`prepare_training_process` first thing, then
:func:`prepare_checkpoint_results_queue` once its arguments are good):

- **dies with its launcher.** Under a launcher (``LOCAL_RANK`` set: torchrun or
  ``megatron_poet.launch``) the kernel sends this process SIGKILL when the
  launcher dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``), so a killed
  launcher leaves no rank running.
- **starts no helper process that outlives it.** megatron-core's checkpoint
  writer passes its results through a ``multiprocessing`` Manager queue, by
  default a spawned process (~440 MB: it re-imports the program) that outlives a
  killed rank. Synchronous saves put and read the results in this process, so an
  in-process queue does the job without the extra process. Background saves
  (``--async-save``) put them from a forked writer: their Manager is forked (no
  re-import) and dies with the rank (``PR_SET_PDEATHSIG``).
- **stops quietly during set-up.** SIGTERM raises ``KeyboardInterrupt`` like
  SIGINT until the training loop installs its own handlers (which finish the
  iteration and save); the program turns it into exit code 130 without a
  traceback, and the launcher reports the stop in one line.
- filters the known harmless library warnings (:mod:`megatron_poet.library_warnings`).
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal
import sys

from megatron_poet.library_warnings import filter_known_warnings

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCHER_PID_ENV = "MEGATRON_POET_LAUNCHER_PID"  # set by megatron_poet.launch for its workers


def rank_from_env() -> int:
    """This process's global rank as the launcher set it (0 outside a launcher)."""
    return int(os.environ.get("RANK", "0"))


def request_death_signal() -> bool:
    """Ask the kernel for SIGKILL when the parent process dies (Linux); whether that was granted.

    The kernel tracks the parent *thread*: launchers start their ranks from their
    main thread (torchrun and :mod:`megatron_poet.launch` do).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def die_with_parent() -> None:
    """:func:`request_death_signal`, and exit at once if the launcher is already gone."""
    if not request_death_signal():
        return  # not fatal: only the clean-up after a killed launcher is lost
    expected = os.environ.get(LAUNCHER_PID_ENV)
    parent = os.getppid()
    if parent == 1 or (expected is not None and parent != int(expected)):
        os._exit(1)  # the launcher died before the request took effect


_RESULTS_MANAGER = None  # the forked Manager serving --async-save's results queue (kept alive here)


def prepare_checkpoint_results_queue(background_saves: bool) -> None:
    """Give megatron's ``FileSystemWriterAsync`` its results queue (see the module docstring): in this
    process for synchronous saves, from a forked Manager that dies with this process for background ones.
    Call before any thread or process group exists (the Manager is forked)."""
    global _RESULTS_MANAGER
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None:  # megatron-core 0.16 - 0.19 have it
        return
    if not background_saves:
        filesystem_async._results_queue = queue.Queue()
        return
    from multiprocessing.managers import SyncManager

    _RESULTS_MANAGER = SyncManager(ctx=multiprocessing.get_context("fork"))
    _RESULTS_MANAGER.start(initializer=request_death_signal)
    filesystem_async._results_queue = _RESULTS_MANAGER.Queue()


def prepare_training_process() -> None:
    """Everything above but the checkpoint queue, for the current process (call before importing
    megatron-core); :func:`prepare_checkpoint_results_queue` once the arguments are known to be good."""
    filter_known_warnings()
    if "LOCAL_RANK" in os.environ:
        die_with_parent()
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@contextlib.contextmanager
def output_on_rank_zero_only():
    """Discard stdout and stderr on every rank but 0 (``--help`` and argument errors come before
    the process group exists, when every rank would print them)."""
    if rank_from_env() == 0:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield
