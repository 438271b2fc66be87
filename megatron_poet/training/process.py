"""How a training process behaves towards its launcher, its children and the terminal.

What every rank does (:func:`prepare_training_process` first thing, then
:func:`use_in_process_checkpoint_results` once its arguments are good):

- **dies with its launcher.** Under a launcher (``LOCAL_RANK`` set: torchrun or
  ``megatron_poet.launch``) the kernel sends this process SIGKILL when the
  launcher dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``), so a killed
  launcher leaves no rank running.
- **starts no long-lived helper process.** megatron-core's checkpoint writer
  passes its results through a ``multiprocessing`` Manager queue, a spawned
  process (~440 MB: it re-imports the program) that outlives a killed rank.
  Our saves are synchronous: the results are put and read in this process, so
  an in-process queue does the same job without the extra process.
- **stops quietly during set-up.** SIGTERM raises ``KeyboardInterrupt`` like
  SIGINT until the training loop installs its own handlers (which finish the
  iteration and save); the program turns it into exit code 130 without a
  traceback, and the launcher reports the stop in one line.
- filters the known harmless library warnings (:mod:`megatron_poet.library_warnings`).
"""
from __future__ import annotations

import contextlib
import ctypes
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


def die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the parent process dies (Linux; a no-op elsewhere).

    The kernel tracks the parent *thread*: launchers start their ranks from their
    main thread (torchrun and :mod:`megatron_poet.launch` do).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not fatal: only the clean-up after a killed launcher is lost
    expected = os.environ.get(LAUNCHER_PID_ENV)
    parent = os.getppid()
    if parent == 1 or (expected is not None and parent != int(expected)):
        os._exit(1)  # the launcher died before the request took effect


def use_in_process_checkpoint_results() -> None:
    """Give megatron's ``FileSystemWriterAsync`` an in-process results queue (see the module docstring).

    Valid for synchronous ``dist_checkpointing.save`` only, the one this program
    uses: an asynchronous save would put its results in another process.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is None:  # megatron-core 0.16 - 0.19
        filesystem_async._results_queue = queue.Queue()


def prepare_training_process() -> None:
    """Everything above but the checkpoint queue, for the current process (call before importing
    megatron-core); :func:`use_in_process_checkpoint_results` once the arguments are known to be good."""
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
