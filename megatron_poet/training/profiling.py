"""Profiling and garbage collection around the training loop, with Megatron-LM's flags.

- ``--profile --profile-step-start S --profile-step-end E --profile-ranks R...``: a ``torch.profiler``
  trace of iterations ``S .. E-1`` (the iteration numbers of the log, as in Megatron-LM) on the listed
  ranks, written when iteration ``E-1`` ends as a Chrome trace (``chrome://tracing``, Perfetto, or
  TensorBoard's profiler plugin) under ``--profile-dir``: ``rank{R}.iter{S}-{E-1}.pt.trace.json``.
  POET's ops are labelled ``poet::rotate_input``, ``poet::frozen_gemm``, ``poet::rotate_output`` and
  ``poet::recomputed_linear`` (their backward: the autograd nodes ``_RotateInputBackward`` ...).
- ``--manual-gc``: Python's automatic collector is off during training (its pauses come at random
  points and differ between ranks, which then wait for each other); ``gc.collect()`` runs every
  ``--manual-gc-interval`` iterations on every rank at once (0: never), and before evaluation unless
  ``--no-manual-gc-eval``.
"""
from __future__ import annotations

import argparse
import gc
import os

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("profiling")
    g.add_argument("--profile", action="store_true", help="write a torch.profiler trace of the iterations below")
    g.add_argument("--profile-step-start", type=int, default=10, help="first profiled iteration")
    g.add_argument("--profile-step-end", type=int, default=12, help="the profile ends before this iteration")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks that write a trace")
    g.add_argument("--profile-dir", default=None, help="where traces go; default: --tensorboard-dir, else ./profile")
    g.add_argument("--manual-gc", action="store_true",
                   help="disable Python's automatic garbage collection during training; collect every "
                        "--manual-gc-interval iterations on all ranks at once")
    g.add_argument("--manual-gc-interval", type=int, default=0, help="0 = only before evaluation")
    g.add_argument("--manual-gc-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="with --manual-gc: collect before each evaluation")


def argument_errors(args: argparse.Namespace) -> list[str]:
    """Problems of the profiling flags (checked with the other arguments, before any work)."""
    problems = []
    if args.profile and not 1 <= args.profile_step_start < args.profile_step_end:
        problems.append(f"--profile needs 1 <= --profile-step-start ({args.profile_step_start}) < "
                        f"--profile-step-end ({args.profile_step_end})")
    if args.manual_gc_interval < 0:
        problems.append(f"--manual-gc-interval must be >= 0, got {args.manual_gc_interval}")
    return problems


class LoopInstruments:
    """The profiler and the garbage-collection schedule of one training loop (see the module docstring).

    Call :meth:`begin` before and :meth:`end` after each iteration ``n`` (1-based), :meth:`before_eval`
    before an evaluation and :meth:`close` when the loop ends.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        rank = torch.distributed.get_rank()
        self.profiling = args.profile and rank in args.profile_ranks
        self.profiler = None
        self.step_range = None
        self.trace_dir = args.profile_dir or args.tensorboard_dir or "profile"
        self.trace_path = os.path.join(
            self.trace_dir, f"rank{rank}.iter{args.profile_step_start}-{args.profile_step_end - 1}.pt.trace.json")
        if args.manual_gc:
            gc.disable()
            gc.collect()

    def begin(self, iteration: int) -> None:
        if self.profiling and iteration == self.args.profile_step_start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        if self.profiler is not None:  # each iteration a range of its own, named as torch.profiler's steps
            self.step_range = torch.profiler.record_function(f"ProfilerStep#{iteration}")
            self.step_range.__enter__()

    def end(self, iteration: int) -> None:
        if self.profiler is not None:
            self.step_range.__exit__(None, None, None)
            if iteration == self.args.profile_step_end - 1:
                self._write_trace()
        interval = self.args.manual_gc_interval
        if self.args.manual_gc and interval and iteration % interval == 0:
            gc.collect()

    def before_eval(self) -> None:
        if self.args.manual_gc and self.args.manual_gc_eval:
            gc.collect()

    def close(self) -> None:
        if self.profiler is not None:  # the loop stopped inside the profiled range
            self._write_trace()
        if self.args.manual_gc:
            gc.enable()

    def _write_trace(self) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        os.makedirs(self.trace_dir, exist_ok=True)
        profiler.export_chrome_trace(self.trace_path)
        print(f" profile of iterations {self.args.profile_step_start}-{self.args.profile_step_end - 1} written to "
              f"{self.trace_path}", flush=True)
