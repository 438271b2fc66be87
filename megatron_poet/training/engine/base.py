"""The engine seam: everything the training loop asks of the machinery that trains the model.

:func:`megatron_poet.training.train.train` is one loop over a :class:`TrainingEngine`:

    batch = engine.train_batch(iterator)     # zero grads, forward + backward of one global batch
    result = engine.step(skip)               # clip, update, advance the LR schedule (or change nothing)
    engine.merge_scheduler.step()            # POET merge (calls engine.reset_poet_state)
    engine.save_checkpoint(state)            # / engine.load_checkpoint() at start-up
    engine.finish_saves()                    # complete background saves that are done

Two implementations: :class:`~.megatron.MegatronEngine` (megatron-core DDP or distributed
optimizer, megatron's pipeline schedules, ``dist_checkpointing``) and
:class:`~.deepspeed.DeepSpeedEngine` (DeepSpeed ZeRO-1/2/3, data parallelism only).

Per-micro-batch work is shared: :func:`forward_step` feeds one micro-batch to a model and
:func:`masked_loss` turns its per-token losses into ``(sum, count)``, the pair both engines
reduce over data-parallel ranks into a :class:`BatchLoss`.
"""
from __future__ import annotations

import abc
import argparse
from dataclasses import dataclass
from functools import partial
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from megatron_poet.checkpoint import CheckpointFormat
from megatron_poet.poet.optim import MergeScheduler


@dataclass
class TrainingState:
    """Everything the loop advances; restored from a checkpoint on resume."""

    iteration: int = 0
    consumed_samples: int = 0


@dataclass
class StepResult:
    """Outcome of :meth:`TrainingEngine.step`.

    Attributes:
        updated: the update was applied; ``False`` means nothing changed (parameters,
            optimizer state, LR schedule), so the POET merge schedule must not advance either.
        grad_norm: global gradient 2-norm before clipping (``None`` when not computed).
    """

    updated: bool
    grad_norm: float | None


@dataclass
class BatchLoss:
    """``[sum of token losses, token count]`` of one or more global batches, summed over data-parallel ranks."""

    pair: torch.Tensor  # (2,) float32

    def mean(self) -> float:
        return float(self.pair[0] / self.pair[1].clamp(min=1))

    def __add__(self, other: "BatchLoss") -> "BatchLoss":
        return BatchLoss(self.pair + other.pair)


def device() -> torch.device:
    """This process's device: its CUDA GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def num_microbatches(args: argparse.Namespace) -> int:
    """Micro-batches per global batch on each data-parallel rank."""
    return args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)


def forward_step(data_iterator: Iterator[dict], model: nn.Module):
    """megatron-core ``forward_step_func``: one micro-batch ``tokens (m, s)`` -> per-token losses ``(m, s)``."""
    batch = {k: v.to(device(), non_blocking=True) for k, v in next(data_iterator).items()}
    losses = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return losses, partial(masked_loss, batch["loss_mask"])


def masked_loss(loss_mask: torch.Tensor, losses: torch.Tensor):
    """``(sum of masked token losses, token count, {"lm loss": [sum, count]})``.

    megatron's schedule divides the sum by the count and by the number of micro-batches
    (``calculate_per_token_loss=False``): the gradient of a mean token loss. The DeepSpeed
    engine does the same (DeepSpeed divides by the gradient-accumulation steps).
    """
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(losses.reshape(-1).float() * mask)
    count = mask.sum()
    return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(), count])}


def reduce_loss(outputs: list[dict]) -> BatchLoss | None:
    """Sum of the micro-batch ``lm loss`` pairs over all data-parallel ranks (``None`` off the last PP stage)."""
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    pair = torch.stack([o["lm loss"] for o in outputs]).sum(0)
    torch.distributed.all_reduce(pair, group=parallel_state.get_data_parallel_group())
    return BatchLoss(pair)


class TrainingEngine(abc.ABC):
    """What the training loop uses (see the module docstring).

    Attributes:
        name: short description for logs, e.g. ``"megatron DDP"`` or ``"DeepSpeed ZeRO-3"``.
        model_chunks: this rank's model chunks (unwrapped megatron-core modules) in pipeline
            order; one per virtual pipeline stage. The loop switches them to eval/train mode.
        merge_scheduler: the POET merge schedule (``None`` for ``--no-poet``), built by
            :meth:`_merge_scheduler` with this engine's optimizer-state reset.
        checkpoint_format: the :class:`~megatron_poet.checkpoint.CheckpointFormat` this engine's
            checkpoints are saved and loaded in.
    """

    name: str
    model_chunks: list[nn.Module]
    merge_scheduler: MergeScheduler | None
    checkpoint_format: CheckpointFormat

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def _merge_scheduler(
        self, materialize: Callable[[list[nn.Parameter], bool], ContextManager] | None = None,
    ) -> MergeScheduler | None:
        if not self.args.poet:
            return None
        return MergeScheduler(nn.ModuleList(self.model_chunks), self.args.poet_merge_interval,
                              reset_optimizer_state=self.reset_poet_state, seed=self.args.seed,
                              materialize=materialize)

    @abc.abstractmethod
    def train_batch(self, data_iterator: Iterator[dict]) -> BatchLoss | None:
        """Zero the gradients, then forward and backward over the micro-batches of one global batch.

        Reads ``global batch / (micro batch x DP)`` micro-batches from ``data_iterator``.
        Returns the batch loss (``None`` on ranks without the loss, i.e. off the last PP stage).
        """

    @abc.abstractmethod
    def eval_batch(self, data_iterator: Iterator[dict]) -> BatchLoss | None:
        """Forward only over one global batch (no gradients); as :meth:`train_batch` otherwise."""

    @abc.abstractmethod
    def step(self, skip: bool = False) -> StepResult:
        """Clip the gradients, update the parameters and advance the LR schedule by one iteration.

        With ``skip`` (decided identically on every rank), or when ``--check-for-nan-in-loss-and-grad``
        is on and the global gradient norm is not finite, change nothing instead: no parameter,
        optimizer state or LR-schedule position (``StepResult.updated`` is then ``False``).
        """

    @abc.abstractmethod
    def reset_poet_state(self, params: list[nn.Parameter]) -> None:
        """After a POET merge: zero every optimizer copy of the POET ``params`` and give them fresh
        Adam state (zero moments, step 0). The merge itself already zeroed the model's copy."""

    @abc.abstractmethod
    def learning_rate(self) -> float:
        """The current lr of the ``--lr`` schedule (POET groups follow ``--poet-lr``)."""

    @abc.abstractmethod
    def set_clip_scale(self, scale: float) -> None:
        """Multiply the configured gradient-clip threshold by ``scale`` (<= 1) from the next step."""

    @abc.abstractmethod
    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers holding this rank's optimizer state (fp32 masters and their Adam state)."""

    def state_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of everything a checkpoint of this rank holds: model parameters and buffers
        (under ZeRO-3 this rank's partitions) and the optimizer's masters and state."""
        for i, chunk in enumerate(self.model_chunks):
            prefix = f"model chunk {i}: " if len(self.model_chunks) > 1 else ""
            for name, tensor in (*chunk.named_parameters(), *chunk.named_buffers()):
                yield prefix + name, getattr(tensor, "ds_tensor", tensor)  # ZeRO-3 keeps the partition apart
        for i, optimizer in enumerate(self.torch_optimizers()):
            for g, group in enumerate(optimizer.param_groups):
                for j, param in enumerate(group["params"]):
                    where = f"optimizer {i} group {g} tensor {j}"
                    yield where, param
                    for key, value in optimizer.state.get(param, {}).items():
                        if isinstance(value, torch.Tensor):
                            yield f"{where} {key}", value

    def save_checkpoint(self, state: TrainingState) -> str:
        """Save everything needed to resume at ``state`` under ``--save``; returns the directory (all
        ranks call). With ``--async-save`` the files are written in the background and the marker moves
        at a later :meth:`finish_saves`."""
        return self.checkpoint_format.save(self, state.iteration, state.consumed_samples)

    def finish_saves(self, blocking: bool = False) -> list[str]:
        """Complete the background saves whose writes are done on every rank (all of them with
        ``blocking``); returns their directories (all ranks call)."""
        return self.checkpoint_format.finish_saves(blocking)

    def load_checkpoint(self) -> TrainingState:
        """Restore the checkpoint ``--load`` names (``TrainingState()`` when there is none).

        Call :func:`megatron_poet.training.checkpointing.check_checkpoint_args` first.
        """
        from ..checkpointing import load_checkpoint

        if not self.args.load or self.args.finetune:  # --finetune: weights loaded before the engine was built
            return TrainingState()
        return TrainingState(*load_checkpoint(self.args, self))
