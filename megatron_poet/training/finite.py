"""A run never trusts a non-finite number: skipped updates, the divergence stop, the check before saving.

Following Megatron-LM's ``--check-for-nan-in-loss-and-grad`` (on by default; ``--no-...`` turns
it off), an iteration whose global-batch loss or global gradient norm is not finite is *skipped*,
and so is, with ``--loss-spike-factor F`` (off by default), one whose loss exceeds ``F`` times the
mean loss of the previous ``--loss-spike-window`` applied iterations (checked once that many
exist, also after a resume). A skipped iteration changes nothing but the iteration counter and
the consumed samples (the batch is used up, not retried, as in Megatron-LM): no parameter, no
optimizer state (fp32 masters, Adam moments and step), no LR-schedule position (Megatron-LM
advances its ``OptimizerParamScheduler`` only after a successful update, and so do both engines),
no POET state (the merge schedule counts applied updates only). The decision is the same on
every rank: the loss verdict is all-reduced over all ranks (only the last pipeline stage holds
the loss), and the gradient norm the engines test is already global (a NaN anywhere makes the
all-reduced norm NaN everywhere).

After ``--max-skipped-iters`` consecutive skips the run stops with :class:`TrainingDiverged`
(exit code 3, nothing saved). Before every save (periodic, ``--exit-interval``, signal) the
engine's whole state is checked (:func:`check_state_before_save`): a non-finite value anywhere
stops the run the same way instead of writing it, so ``latest_checkpointed_iteration.txt`` never
points at a non-finite checkpoint. The export refuses one too (:func:`nonfinite_tensors`).

POET factors can go wrong while staying finite: skew blocks so large that their Cayley-Neumann
series is far from orthogonal (the folded weights of such a run reached 1e38). The largest
orthogonality error ``||G^T G - I||_F``, measured at log steps, before merges and before every
save, is checked by :class:`FactorCheck`: past ``--poet-orthogonality-warning`` the log warns
once; past ``--poet-max-orthogonality-error`` the run stops like a diverged one (exit code 3),
before a merge folds such factors or a checkpoint holds them. Stopping, not folding the nearest
orthogonal matrix and going on: the forward pass used the non-orthogonal factors, so a fold
would change the function, and a step that produced them is better redone from a checkpoint.
"""
from __future__ import annotations

import argparse
import collections
import math
from typing import Iterable

import torch

from .engine.base import BatchLoss, StepResult, TrainingEngine, device

EXIT_DIVERGED = 3  # exit code of a run stopped by TrainingDiverged


class TrainingDiverged(RuntimeError):
    """The run cannot continue without trusting non-finite numbers; the message says what to do."""


def nonfinite_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    """``(name, number of NaN/inf elements)`` of every floating-point tensor that has any (a tensor
    seen under several names is checked once, under the first).

    One reduction per tensor finds them: the float64 sum of finite fp32/bf16/fp16 values cannot overflow
    (below 2**31 x 3.4e38), while a NaN or inf makes it NaN or inf; elements are counted only then.
    """
    found, seen = [], set()
    for name, tensor in named_tensors:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if not tensor.is_floating_point() or not tensor.numel() or key in seen:
            continue
        seen.add(key)
        tensor = tensor.detach()
        if tensor.numel() < 2**31 and torch.isfinite(tensor.sum(dtype=torch.float64)):
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            found.append((name, bad))
    return found


def describe(found: list[tuple[str, int]], limit: int = 8) -> str:
    """``"a (3 non-finite), b (1 non-finite) and 4 more"`` for messages."""
    names = [f"{name} ({count} non-finite)" for name, count in found[:limit]]
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(names) + more


def _resume_hint(args: argparse.Namespace) -> str:
    from megatron_poet.checkpoint import checkpoint_dir, latest_iteration

    saved = latest_iteration(args.save) if args.save else None
    where = (f"the latest checkpoint, {checkpoint_dir(args.save, saved)}, holds finite values: resume from it"
             if saved is not None else "no checkpoint was saved: start again")
    return f"{where} with a lower --lr (or longer --lr-warmup-iters)"


class IterationGuard:
    """Decides whether each iteration's update is applied and counts the skipped ones (see the module docstring).

    Every rank holds one and calls :meth:`loss_verdict` and :meth:`record` at the same points.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.window: collections.deque[float] = collections.deque(maxlen=args.loss_spike_window)
        self.consecutive = 0
        self.total = 0
        self._first_skipped = 0

    def loss_verdict(self, loss: BatchLoss | None, signal: bool = False) -> tuple[str | None, bool]:
        """``(why this iteration's update must be skipped because of its loss or None, whether any rank
        got a stop signal)``.

        One collective over all ranks, read back once: the non-finite and spike flags (computed on the
        device from the loss) and this rank's ``signal`` flag, maximized. ``loss`` is ``None`` off the
        last pipeline stage.
        """
        args = self.args
        flags = torch.zeros(3, device=device())  # [non-finite, spike, signal]
        flags[2] = float(signal)
        if loss is not None:
            value = loss.pair[0] / loss.pair[1].clamp(min=1)
            if args.check_for_nan_in_loss_and_grad:
                flags[0] = (~torch.isfinite(value)).float()
            if args.loss_spike_factor and len(self.window) == self.window.maxlen:
                flags[1] = (value > args.loss_spike_factor * self.mean()).float()
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        nonfinite, spike, stop = (bool(f) for f in flags.tolist())
        if nonfinite:
            return "the loss is not finite", stop
        if spike:
            return (f"loss spike: above --loss-spike-factor {args.loss_spike_factor:g} x the mean of the last "
                    f"{len(self.window)} applied iterations"), stop
        return None, stop

    def mean(self) -> float:
        return sum(self.window) / max(len(self.window), 1)

    def record(self, iteration: int, loss: BatchLoss | None, result: StepResult, verdict: str | None) -> str | None:
        """Count iteration ``iteration``'s outcome; returns the log message of a skip (``None``: applied).

        Raises :class:`TrainingDiverged` at the ``--max-skipped-iters``-th consecutive skip.
        """
        if result.updated:
            self.consecutive = 0
            if loss is not None:
                self.window.append(loss.mean())
            return None
        if verdict is None:
            norm = "n/a" if result.grad_norm is None else f"{result.grad_norm:g}"
            verdict = f"the gradient norm is not finite ({norm})"
        self.total += 1
        self.consecutive += 1
        if self.consecutive == 1:
            self._first_skipped = iteration
        limit = self.args.max_skipped_iters
        if self.consecutive >= limit:
            raise TrainingDiverged(
                f"iterations {self._first_skipped}-{iteration}: {self.consecutive} consecutive updates skipped "
                f"(last: {verdict}), the limit of --max-skipped-iters {limit}: the run has diverged; "
                f"{_resume_hint(self.args)}")
        return (f" iteration {iteration:8d} skipped: {verdict}; nothing was updated ({self.consecutive} consecutive, "
                f"{self.total} in this run, stop at --max-skipped-iters {limit})")


class FactorCheck:
    """Warns once, then stops, as the POET factors' orthogonality error grows (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, print_fn):
        self.args = args
        self.print = print_fn
        self.warned = False

    def __call__(self, error: float, iteration: int, when: str = "", state_is_finite: bool = False) -> None:
        """Check ``error``, the largest orthogonality error of the model (the same on every rank).

        Raises :class:`TrainingDiverged` past ``--poet-max-orthogonality-error``. A non-finite error
        usually means non-finite factors, which the non-finite guard and :func:`check_state_before_save`
        report by name: it is left to them unless ``state_is_finite`` (the caller just found every state
        tensor finite, so the error overflowed from finite but huge factors).
        """
        args = self.args
        if not math.isfinite(error) and not state_is_finite:
            return
        limit = args.poet_max_orthogonality_error
        if limit and error > limit:
            raise TrainingDiverged(
                f"iteration {iteration}{when}: a POET factor's orthogonality error ||G^T G - I||_F is {error:.3g}, "
                f"past --poet-max-orthogonality-error {limit:g}: its skew parameters left the range where the "
                f"Cayley-Neumann series is nearly orthogonal; {_resume_hint(args)} (or a lower --poet-lr)")
        if error > args.poet_orthogonality_warning and not self.warned:
            self.warned = True
            self.print(f"warning: iteration {iteration}: a POET factor's orthogonality error is {error:.3g}, past "
                       f"--poet-orthogonality-warning {args.poet_orthogonality_warning:g} (healthy runs stay near "
                       f"1e-6); the run stops at --poet-max-orthogonality-error {limit:g}")


def check_state_before_save(args: argparse.Namespace, engine: TrainingEngine, iteration: int,
                            factor_check: FactorCheck | None = None) -> None:
    """Raise :class:`TrainingDiverged` on every rank if any rank's model or optimizer state is not finite,
    or (with ``factor_check``) if the POET factors are past their orthogonality limit.

    Collective over all ranks; the message names the tensors (of every rank, a few each).
    """
    found = nonfinite_tensors(engine.state_tensors())
    names = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(names, describe(found, limit=3) if found else None)
    bad = [f"rank {rank}: {text}" for rank, text in enumerate(names) if text]
    if bad:
        raise TrainingDiverged(
            f"not saving iteration {iteration}: the state holds non-finite values ({'; '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}); {_resume_hint(args)}")
    if factor_check is not None and engine.merge_scheduler is not None:
        error = torch.tensor([engine.merge_scheduler.max_orthogonality_error()], device=device())
        torch.distributed.all_reduce(error, op=torch.distributed.ReduceOp.MAX)
        factor_check(float(error), iteration, when=" (before saving)", state_is_finite=True)
