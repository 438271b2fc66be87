"""The training loop: one global batch, optimizer step, POET merge, logging, evaluation, checkpoints
and signals per iteration, over a :class:`~megatron_poet.training.engine.TrainingEngine` (megatron-core
or DeepSpeed). Set-up lives in :mod:`.pretrain`; skipping non-finite iterations and the checks before
saving in :mod:`.finite`."""
from __future__ import annotations

import argparse
import time
from typing import Iterator

import torch

from .engine import TrainingEngine, TrainingState
from .engine.base import device
from .finite import FactorCheck, IterationGuard, TrainingDiverged, check_state_before_save
from .logging import TrainingLogger
from .moe_metrics import MoEMetrics
from .profiling import LoopInstruments
from .replicas import check_replicas
from .signals import SignalHandler


def _max_over_model_parallel(value: float) -> float:
    """Max of a per-rank value over ranks holding different parameters (TP/PP)."""
    from megatron.core import parallel_state

    t = torch.nan_to_num(torch.tensor([value], device=device()), nan=float("inf"))  # NaN must win the MAX
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_model_parallel_group())
    return float(t)


@torch.no_grad()
def evaluate(args, engine: TrainingEngine, make_valid_iterator) -> float | None:
    """Mean validation token loss over ``--eval-iters`` global batches (the same batches every time)."""
    for chunk in engine.model_chunks:
        chunk.eval()
    iterator = make_valid_iterator()
    total = None
    for _ in range(args.eval_iters):
        batch = engine.eval_batch(iterator)
        total = batch if total is None else total + batch
    for chunk in engine.model_chunks:
        chunk.train()
    return None if total is None else total.mean()


def train(
    args: argparse.Namespace,
    engine: TrainingEngine,
    train_iterator: Iterator[dict],
    make_valid_iterator,
    state: TrainingState,
    logger: TrainingLogger,
) -> TrainingState:
    """Train from ``state.iteration`` to ``--train-iters`` (or a signal / ``--exit-interval``).

    Raises :class:`~.finite.TrainingDiverged` after ``--max-skipped-iters`` consecutive skipped
    iterations, or instead of saving a non-finite state.
    """
    signals = SignalHandler()
    guard = IterationGuard(args)
    factor_check = FactorCheck(args, logger.print)
    merge_scheduler = engine.merge_scheduler
    orth_max = 0.0
    instruments = LoopInstruments(args)
    moe_metrics = MoEMetrics.for_run(args, engine.model_chunks)
    logger.start_training()
    try:
        while state.iteration < args.train_iters:
            instruments.begin(state.iteration + 1)
            if merge_scheduler is not None and args.poet_clip_ramp_iters and merge_scheduler.merges_done:
                j = merge_scheduler.steps_since_merge + 1  # j-th step after the last merge
                engine.set_clip_scale(min(1.0, j / args.poet_clip_ramp_iters))
            loss = engine.train_batch(train_iterator)
            verdict, stop = guard.loss_verdict(loss, signal=signals.received is not None)
            result = engine.step(skip=verdict is not None)
            state.iteration += 1
            state.consumed_samples += args.global_batch_size
            skipped = guard.record(state.iteration, loss, result, verdict)

            a0_drift = None
            if merge_scheduler is not None and result.updated:
                logging_now = state.iteration % args.log_interval == 0
                if logging_now or merge_scheduler.merge_due():
                    measured = _max_over_model_parallel(merge_scheduler.max_orthogonality_error())
                    factor_check(measured, state.iteration)  # before a merge folds the factors
                    orth_max = max(orth_max, measured)
                merge_scheduler.step()
                if logging_now or state.iteration == args.train_iters:  # after the merge, so a merge shows
                    a0_drift = _max_over_model_parallel(merge_scheduler.max_a0_norm_drift())
            hash_interval = args.check_weight_hash_across_dp_replicas_interval
            if hash_interval and state.iteration % hash_interval == 0:
                check_replicas(engine.model_chunks, state.iteration)
            extra = None
            if moe_metrics is not None:  # reduced over every rank at the logger's iterations
                moe_metrics.iteration_done()
                if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
                    extra = moe_metrics.reduce()
            if loss is not None:
                merges = merge_scheduler.merges_done if merge_scheduler else 0
                # orth_max: largest error measured since the last log line (at log steps and just before merges)
                if logger.iteration(state.iteration, state.consumed_samples, engine.learning_rate(), loss.mean(),
                                    result.grad_norm, merges, orth_max, a0_drift, skipped, extra):
                    orth_max = 0.0

            instruments.end(state.iteration)
            started = time.time()
            finished = engine.finish_saves()
            if finished:  # (the same on every rank) finalizing is time the loop was blocked
                logger.record_time("checkpointing", "finalize-background-save", time.time() - started)
            _report_saves(logger, finished)
            last = state.iteration == args.train_iters
            if make_valid_iterator and args.eval_iters and (state.iteration % args.eval_interval == 0 or last):
                instruments.before_eval()
                with logger.timed("evaluation", "evaluate"):
                    val = evaluate(args, engine, make_valid_iterator)
                if val is not None:
                    logger.validation(state.iteration, val)
            exit_now = args.exit_interval is not None and state.iteration % args.exit_interval == 0
            if args.save and (state.iteration % args.save_interval == 0 or last or exit_now
                              or (stop and args.save_on_signal)):
                with logger.timed("checkpointing", "save-checkpoint"):
                    _report_saves(logger, engine.finish_saves(blocking=True))  # one save at a time
                    check_state_before_save(args, engine, state.iteration, factor_check)
                    path = engine.save_checkpoint(state)
                if args.async_save:
                    logger.print(f" saving checkpoint at iteration {state.iteration} to {path} in the background")
                else:
                    logger.print(f" saved checkpoint at iteration {state.iteration} to {path}")
            if stop or exit_now:
                why = "a signal" if stop else "--exit-interval"
                logger.print(f" stopping at iteration {state.iteration} ({why})")
                break
    except TrainingDiverged:  # every rank at the same point: the save in flight holds an earlier, finite state
        _report_saves(logger, engine.finish_saves(blocking=True))
        raise
    finally:
        instruments.close()
        signals.close()
        if moe_metrics is not None:
            moe_metrics.close()
    if args.async_save:  # the run waits for its save in flight (end, signal, --exit-interval)
        with logger.timed("checkpointing", "wait-for-background-save"):
            _report_saves(logger, engine.finish_saves(blocking=True))
    return state


def _report_saves(logger: TrainingLogger, paths: list[str]) -> None:
    for path in paths:
        logger.print(f" saved checkpoint to {path} (background write complete)")
