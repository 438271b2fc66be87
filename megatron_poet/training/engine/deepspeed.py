"""The DeepSpeed engine: ZeRO-1/2/3 data parallelism for the same megatron-core model.

``deepspeed.initialize`` wraps the megatron-core ``GPTModel`` (tensor- and pipeline-parallel
size 1) with a ZeRO optimizer around ``torch.optim.AdamW`` whose parameter groups are the
program's (POET factors: ``--poet-lr``, no weight decay, a group of their own); megatron's
``OptimizerParamScheduler`` drives their learning rates exactly as in the megatron engine.
One global batch is ``gradient_accumulation_steps`` micro-batches of forward +
``engine.backward``; DeepSpeed reduces (ZeRO-1: all-reduce, ZeRO-2/3: reduce-scatter) and
clips at the accumulation boundary.

Under ZeRO-3 every parameter is partitioned across data-parallel ranks, the frozen ``A0``
(a parameter with ``requires_grad=False``) included, so its memory per rank falls with the
number of ranks; it gets no gradient and no optimizer state. The model is built partitioned
(:func:`zero3_construction`: ``deepspeed.zero.Init``), so no rank ever holds all of it. POET layers are ZeRO-3 *leaf*
modules: their forward reaches the skew parameters of their ``OrthogonalSide`` children
through a method (``side.blocks()``), which DeepSpeed's per-module gathering hooks would not
see, so DeepSpeed gathers a POET layer's parameters as a whole. Merges and orthogonality
measurements gather one layer at a time (:func:`.deepspeed_state.gathered`).

On a CPU-only machine DeepSpeed would compile a shared-memory all-reduce op when it sets up
communication (a C++ build of ~15 minutes on 2 cores, which hangs later runs if killed);
gloo does the same job, so that op is never built here.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import warnings
from typing import Iterator

import torch
from torch import nn

from megatron_poet.checkpoint import DeepSpeedFormat
from megatron_poet.poet.optim import poet_modules, poet_param_groups
from megatron_poet.poet.side import begin_step, step_blocks_pay_off

from ..optimizer import canonical_learning_rate, dense_group_settings, lr_scheduler, poet_group_settings
from .base import BatchLoss, StepResult, TrainingEngine, forward_step, num_microbatches, reduce_loss
from .deepspeed_config import deepspeed_config
from .deepspeed_state import POET_GROUP_KEY, SkippableStep, full_shape, gathered, reset_poet_optimizer_state


def import_deepspeed():
    """``deepspeed``, quiet (warnings only) and, on CPUs, without its shared-memory communication op."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # instead of a warning per rank that it fell back to it
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.utils.logger.setLevel(logging.WARNING)
    # DeepSpeed's collectives use names torch deprecates; one warning per rank and call site is noise.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if get_accelerator().device_name() == "cpu":
        # (the submodule itself: the name deepspeed.comm.torch is shadowed by torch)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # gloo instead, see above
    return deepspeed


def param_groups(args: argparse.Namespace, model: nn.Module) -> list[dict]:
    """AdamW parameter groups with the keys megatron's ``OptimizerParamScheduler`` reads.

    POET factors: ``--poet-lr`` schedule, no weight decay; other matrices: ``--lr``, weight
    decay; other 1-D parameters (norms, biases): ``--lr``, no weight decay (Megatron's rule).
    """
    groups = poet_param_groups(model, args.lr, args.poet_lr, args.weight_decay, shape_of=full_shape)
    for group in groups:
        group.update(poet_group_settings(args) if group[POET_GROUP_KEY]
                     else dense_group_settings(args, decay=bool(group["weight_decay"])))
    return groups


def zero3_construction(args: argparse.Namespace):
    """ZeRO-3: a :class:`~megatron_poet.megatron.model.PartitionedBuild` that constructs the model inside
    ``deepspeed.zero.Init`` and draws each layer's initial values after it under ``GatheredParameters`` (every
    rank draws the same values from the seed: :func:`.deepspeed_state.gathered`). Otherwise ``None`` (built
    whole, partitioned by ``deepspeed.initialize``).

    ``zero.Init`` overrides only the device of the tensors made inside it, not their dtype: by default it casts
    every floating tensor to the run's dtype, in bf16 also those a whole build keeps in fp32 (RoPE's
    ``inv_freq``, a POET layer's initial row norms), which would change the model. So a bf16 model is built
    partitioned only where megatron makes every parameter in bf16: not GPT-2 style (its position embeddings
    are made in fp32) or MoE (its routers), which the engine casts to bf16 when it gets them built whole.
    """
    config = deepspeed_config(args)
    if config["zero_optimization"]["stage"] != 3 or (args.bf16 and (args.model_style != "llama" or args.num_experts)):
        return None
    from megatron_poet.megatron.model import PartitionedBuild

    deepspeed = import_deepspeed()
    from deepspeed.runtime.zero import DeepSpeedTensorOverride

    # on the process group the program made (as deepspeed.initialize does later), so the config sees every rank
    deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return PartitionedBuild(
        construction=lambda: deepspeed.zero.Init(config_dict_or_path=config, dtype=dtype,
                                                 tensor_overrides=[DeepSpeedTensorOverride.device]),
        full_parameters=lambda params: gathered(params, modified=True))


def _prepare_zero3(deepspeed, model: nn.Module) -> None:
    """Gathering rules for parameters used outside their own module's forward."""
    classes = sorted({type(m) for m in poet_modules(model)}, key=lambda c: c.__qualname__)
    if classes:
        deepspeed.utils.set_z3_leaf_modules(model, classes)
    if getattr(model, "share_embeddings_and_output_weights", False) and getattr(model, "post_process", False):
        # GPT-2 style: the output layer multiplies by the embedding's weight.
        deepspeed.zero.register_external_parameter(model.output_layer, model.shared_embedding_or_output_weight())


class DeepSpeedEngine(TrainingEngine):
    """DeepSpeed ZeRO training of one model chunk (data parallelism only).

    Attributes:
        engine: the ``deepspeed.DeepSpeedEngine``.
        zero_stage: 1, 2 or 3.
        scheduler: megatron's ``OptimizerParamScheduler`` over the ZeRO optimizer's groups.
        inner_step: the :class:`~.deepspeed_state.SkippableStep` that leaves out skipped updates.
    """

    def __init__(self, args: argparse.Namespace, model_chunks: list[nn.Module]):
        super().__init__(args)
        deepspeed = import_deepspeed()
        (model,) = model_chunks  # no pipeline parallelism: the config checks exclude it
        config = deepspeed_config(args)
        self.zero_stage = config["zero_optimization"]["stage"]
        self.name = f"DeepSpeed ZeRO-{self.zero_stage}"
        self.model_chunks = model_chunks
        if self.zero_stage == 3:
            _prepare_zero3(deepspeed, model)
        optimizer = torch.optim.AdamW(param_groups(args, model), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_eps, weight_decay=args.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                    dist_init_required=False)
        self.scheduler = lr_scheduler(args, self.engine.optimizer)
        self.inner_step = SkippableStep(self.engine.optimizer, args.check_for_nan_in_loss_and_grad)
        self.merge_scheduler = self._merge_scheduler(gathered if self.zero_stage == 3 else None)
        self.checkpoint_format = DeepSpeedFormat()

    def _run(self, data_iterator: Iterator[dict], backward: bool) -> BatchLoss | None:
        count = num_microbatches(self.args)
        # POET blocks built once and differentiated once per step; not under ZeRO-3, where ``skew``
        # exists only while its (leaf) layer runs, so each forward builds its blocks.
        if backward and self.zero_stage < 3 and step_blocks_pay_off(count, self.args.compile):
            begin_step(self.engine.module, count)
        outputs = []
        for i in range(count):
            losses, loss_func = forward_step(data_iterator, self.engine)
            total, tokens, report = loss_func(losses)
            if backward:
                self.engine.backward(total / tokens)  # DeepSpeed divides by the accumulation steps
                if i < count - 1:
                    self.engine.step()  # not yet the accumulation boundary: DeepSpeed only counts it
            outputs.append(report)
        return reduce_loss(outputs)

    def train_batch(self, data_iterator: Iterator[dict]) -> BatchLoss | None:
        # DeepSpeed zeroes the gradients itself after every update.
        return self._run(data_iterator, backward=True)

    @torch.no_grad()
    def eval_batch(self, data_iterator: Iterator[dict]) -> BatchLoss | None:
        return self._run(data_iterator, backward=False)

    def step(self, skip: bool = False) -> StepResult:
        self.inner_step.skip, self.inner_step.skipped = skip, False
        self.engine.step()
        self.inner_step.skip = False
        updated = self.engine.was_step_applied() and not self.inner_step.skipped
        if updated:
            self.scheduler.step(increment=1)
        norm = self.engine.get_global_grad_norm()
        return StepResult(updated, None if norm is None else float(norm))

    def reset_poet_state(self, params: list[nn.Parameter]) -> None:
        reset_poet_optimizer_state(self.engine.optimizer)

    def learning_rate(self) -> float:
        return canonical_learning_rate(self.engine.optimizer.param_groups)

    def set_clip_scale(self, scale: float) -> None:
        self.engine.optimizer.clip_grad = self.args.clip_grad * scale

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.engine.optimizer.optimizer]
