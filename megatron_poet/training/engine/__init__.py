"""Training engines: the megatron-core one and the DeepSpeed ZeRO one behind one interface (:mod:`.base`)."""
from __future__ import annotations

import argparse

from torch import nn

from .base import BatchLoss, StepResult, TrainingEngine, TrainingState
from .deepspeed_state import full_numel


def build_engine(args: argparse.Namespace, model_chunks: list[nn.Module]) -> TrainingEngine:
    """The engine ``args`` selects: DeepSpeed with ``--deepspeed``/``--zero-stage``, else megatron-core.

    ``model_chunks`` are this rank's freshly built (unwrapped) model chunks.
    """
    if args.deepspeed:
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(args, model_chunks)
    from .megatron import MegatronEngine

    return MegatronEngine(args, model_chunks)


def partitioned_construction(args: argparse.Namespace):
    """How the engine ``args`` selects wants the model built: a
    :class:`~megatron_poet.megatron.model.PartitionedBuild`, or ``None`` (built whole).

    DeepSpeed ZeRO-3 (:func:`.deepspeed.zero3_construction`): each module's parameters partitioned
    over the data-parallel ranks as soon as it is made, so no rank ever holds the whole model. Built whole
    otherwise, and for ``--finetune`` (whose weights are loaded into the model before the engine wraps it).
    """
    if args.deepspeed and not args.finetune:
        from .deepspeed import zero3_construction

        return zero3_construction(args)
    return None


__all__ = ["BatchLoss", "StepResult", "TrainingEngine", "TrainingState", "build_engine", "full_numel",
           "partitioned_construction"]
