"""Training engines: the megatron-core one and the DeepSpeed ZeRO one behind one interface (:mod:`.base`)."""
from __future__ import annotations

import argparse

from torch import nn

from .base import BatchLoss, StepResult, TrainingEngine, TrainingState


def build_engine(args: argparse.Namespace, model_chunks: list[nn.Module]) -> TrainingEngine:
    """The engine ``args`` selects: DeepSpeed with ``--deepspeed``/``--zero-stage``, else megatron-core.

    ``model_chunks`` are this rank's freshly built (unwrapped) model chunks.
    """
    if args.deepspeed:
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(args, model_chunks)
    from .megatron import MegatronEngine

    return MegatronEngine(args, model_chunks)


__all__ = ["BatchLoss", "StepResult", "TrainingEngine", "TrainingState", "build_engine"]
