"""The megatron-core engine: DDP (or the distributed optimizer), pipeline schedules, ``dist_checkpointing``.

Every tensor-/pipeline-/data-parallel layout the program supports runs here. The model
chunks are wrapped in megatron's ``DistributedDataParallel``; one global batch runs through
``get_forward_backward_func()`` (which picks the pipeline schedule); the optimizer is
:class:`~megatron_poet.training.optimizer.MegatronTrainingOptimizer`; checkpoints are
:class:`megatron_poet.checkpoint.DistFormat`'s (foreground or ``--async-save``).
"""
from __future__ import annotations

import argparse
from typing import Iterator

import torch
from torch import nn

from megatron_poet.checkpoint import DistFormat
from megatron_poet.megatron.optimizer_state import leaf_optimizers
from megatron_poet.poet.side import begin_step, step_blocks_pay_off

from ..optimizer import MegatronTrainingOptimizer
from .base import BatchLoss, StepResult, TrainingEngine, forward_step, num_microbatches, reduce_loss


def _wrap_ddp(args: argparse.Namespace, model: nn.Module, config) -> nn.Module:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    ddp.broadcast_params()  # identical replicas whatever the per-rank init did
    return ddp


class MegatronEngine(TrainingEngine):
    """megatron-core training of ``model_chunks`` (one per virtual pipeline stage of this rank).

    Attributes:
        ddp_chunks: the chunks wrapped in megatron's ``DistributedDataParallel`` (what the
            schedules and the optimizer see).
        optimizer: the :class:`MegatronTrainingOptimizer` (optimizer + LR schedule).
    """

    def __init__(self, args: argparse.Namespace, model_chunks: list[nn.Module]):
        from megatron.core.distributed import finalize_model_grads

        super().__init__(args)
        self.name = "megatron distributed optimizer" if args.use_distributed_optimizer else "megatron DDP"
        self.model_chunks = model_chunks
        # One config object for the model, its DDP wrapper and the schedules: megatron's
        # schedules read their hooks (finalize_model_grads_func, ...) from the wrapper's config.
        config = model_chunks[0].config
        self.ddp_chunks = [_wrap_ddp(args, chunk, config) for chunk in model_chunks]
        self.optimizer = MegatronTrainingOptimizer(args, self.ddp_chunks)
        self.merge_scheduler = self._merge_scheduler()
        self.checkpoint_format = DistFormat()
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.optimizer.scale_loss
        if args.overlap_grad_reduce:
            no_sync = [chunk.no_sync for chunk in self.ddp_chunks]
            config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]

    def _run_schedule(self, data_iterator: Iterator[dict], forward_only: bool) -> BatchLoss | None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        args = self.args
        n = num_microbatches(args)
        # Each model chunk (virtual pipeline stage) reads the batch's micro-batches from an iterator of its own.
        micro_batches = [next(data_iterator) for _ in range(n)]
        iterators = [iter(micro_batches) for _ in self.ddp_chunks]
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.ddp_chunks if len(self.ddp_chunks) > 1 else self.ddp_chunks[0],
            num_microbatches=n,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            decoder_seq_length=args.seq_length,
            forward_only=forward_only,
        )
        return reduce_loss(outputs)

    def train_batch(self, data_iterator: Iterator[dict]) -> BatchLoss | None:
        for chunk in self.ddp_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        count = num_microbatches(self.args)
        if step_blocks_pay_off(count, self.args.compile):  # POET blocks: built once, differentiated once, per step
            for chunk in self.model_chunks:
                begin_step(chunk, count)
        return self._run_schedule(data_iterator, forward_only=False)

    @torch.no_grad()
    def eval_batch(self, data_iterator: Iterator[dict]) -> BatchLoss | None:
        return self._run_schedule(data_iterator, forward_only=True)

    def step(self, skip: bool = False) -> StepResult:
        return StepResult(*self.optimizer.step(skip))

    def reset_poet_state(self, params: list[nn.Parameter]) -> None:
        self.optimizer.reset_poet_state(params)

    def learning_rate(self) -> float:
        return self.optimizer.learning_rate()

    def set_clip_scale(self, scale: float) -> None:
        self.optimizer.set_clip_scale(scale)

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return [leaf.optimizer for leaf in leaf_optimizers(self.optimizer.optimizer)]
