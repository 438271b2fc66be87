"""The training loop: forward/backward with megatron-core's schedules, optimizer step, POET merge,
logging, evaluation, checkpoints and signals. Set-up lives in :mod:`.pretrain`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch

from megatron_poet.poet.optim import MergeScheduler

from .checkpointing import save_checkpoint
from .logging import TrainingLogger
from .optimizer import TrainingOptimizer
from .signals import SignalHandler


@dataclass
class TrainingState:
    """Everything the loop advances; restored from a checkpoint on resume."""

    iteration: int = 0
    consumed_samples: int = 0


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """megatron-core ``forward_step_func``: one micro-batch ``tokens (m, s)`` -> per-token losses ``(m, s)``."""
    batch = {k: v.to(_device(), non_blocking=True) for k, v in next(data_iterator).items()}
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return losses, partial(_masked_loss, batch["loss_mask"])


def _masked_loss(loss_mask: torch.Tensor, losses: torch.Tensor):
    """``(sum of masked token losses, token count, {"lm loss": [sum, count]})``.

    The schedule divides the sum by the count and by the number of micro-batches
    (``calculate_per_token_loss=False``): the gradient of a mean token loss.
    """
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(losses.reshape(-1).float() * mask)
    count = mask.sum()
    return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(), count])}


def _reduce_loss(outputs: list[dict]) -> float | None:
    """Mean token loss over all micro-batches of all data-parallel ranks (``None`` off the last PP stage)."""
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    pair = torch.stack([o["lm loss"] for o in outputs]).sum(0)
    torch.distributed.all_reduce(pair, group=parallel_state.get_data_parallel_group())
    return float(pair[0] / pair[1].clamp(min=1))


def _run_schedule(args, model_chunks, data_iterator, forward_only: bool) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=args.global_batch_size // (args.micro_batch_size * args.data_parallel_size),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        decoder_seq_length=args.seq_length,
        forward_only=forward_only,
    )


def _max_over_model_parallel(value: float) -> float:
    """Max of a per-rank value over ranks holding different parameters (TP/PP)."""
    from megatron.core import parallel_state

    t = torch.tensor([value], device=_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_model_parallel_group())
    return float(t)


@torch.no_grad()
def evaluate(args, model_chunks, make_valid_iterator) -> float | None:
    """Mean validation token loss over ``--eval-iters`` global batches (the same batches every time)."""
    for chunk in model_chunks:
        chunk.eval()
    iterator = make_valid_iterator()
    outputs = []
    for _ in range(args.eval_iters):
        outputs += _run_schedule(args, model_chunks, iterator, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    return _reduce_loss(outputs)


def train(
    args: argparse.Namespace,
    model_chunks: list[torch.nn.Module],
    optimizer: TrainingOptimizer,
    merge_scheduler: MergeScheduler | None,
    train_iterator: Iterator[dict],
    make_valid_iterator,
    state: TrainingState,
    logger: TrainingLogger,
) -> TrainingState:
    """Train from ``state.iteration`` to ``--train-iters`` (or a signal / ``--exit-interval``)."""
    signals = SignalHandler()
    orth_max = 0.0
    try:
        while state.iteration < args.train_iters:
            if merge_scheduler is not None and args.poet_clip_ramp_iters and merge_scheduler.merges_done:
                j = merge_scheduler.steps_since_merge + 1  # j-th step after the last merge
                optimizer.set_clip_scale(min(1.0, j / args.poet_clip_ramp_iters))
            for chunk in model_chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            outputs = _run_schedule(args, model_chunks, train_iterator, forward_only=False)
            updated, grad_norm = optimizer.step()
            state.iteration += 1
            state.consumed_samples += args.global_batch_size
            loss = _reduce_loss(outputs)

            a0_drift = None
            if merge_scheduler is not None and updated:
                logging_now = state.iteration % args.log_interval == 0
                if logging_now or merge_scheduler.merge_due():
                    orth_max = max(orth_max, _max_over_model_parallel(merge_scheduler.max_orthogonality_error()))
                merge_scheduler.step()
                if logging_now or state.iteration == args.train_iters:  # after the merge, so a merge shows
                    a0_drift = _max_over_model_parallel(merge_scheduler.max_a0_norm_drift())
            if loss is not None:
                merges = merge_scheduler.merges_done if merge_scheduler else 0
                # orth_max: largest error measured since the last log line (at log steps and just before merges)
                if logger.iteration(state.iteration, state.consumed_samples, optimizer.learning_rate(), loss,
                                    grad_norm, merges, orth_max, a0_drift):
                    orth_max = 0.0

            last = state.iteration == args.train_iters
            if make_valid_iterator and args.eval_iters and (state.iteration % args.eval_interval == 0 or last):
                val = evaluate(args, model_chunks, make_valid_iterator)
                if val is not None:
                    logger.validation(state.iteration, val)
            stop = signals.should_stop()
            exit_now = args.exit_interval is not None and state.iteration % args.exit_interval == 0
            if args.save and (state.iteration % args.save_interval == 0 or last or exit_now
                              or (stop and args.save_on_signal)):
                path = save_checkpoint(args, state.iteration, state.consumed_samples, model_chunks, optimizer,
                                       merge_scheduler)
                logger.print(f" saved checkpoint at iteration {state.iteration} to {path}")
            if stop or exit_now:
                why = "a signal" if stop else "--exit-interval"
                logger.print(f" stopping at iteration {state.iteration} ({why})")
                break
    finally:
        signals.close()
    return state
