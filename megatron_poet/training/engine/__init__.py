"""Training engines: the megatron-core one and the DeepSpeed ZeRO one behind one interface (:mod:`.base`)."""
from __future__ import annotations

import argparse
import contextlib
from typing import ContextManager

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


def partitioned_construction(args: argparse.Namespace) -> tuple[ContextManager, object]:
    """How the engine ``args`` selects wants the model built: ``(context, full_parameters)``.

    DeepSpeed ZeRO-3: inside ``deepspeed.zero.Init``, each module's parameters partitioned over the
    data-parallel ranks as soon as the module is made (so no rank ever holds the whole model), and
    ``full_parameters`` gathers a layer's parameters while its initial values are drawn (see
    :data:`megatron_poet.megatron.layout_free_init.FullParameters`). Otherwise, and for ``--finetune``
    (whose weights are loaded into the built model before the engine wraps it): built whole,
    ``(nullcontext(), None)``.
    """
    if args.deepspeed and not args.finetune:
        from .deepspeed import zero3_construction

        return zero3_construction(args)
    return contextlib.nullcontext(), None


__all__ = ["BatchLoss", "StepResult", "TrainingEngine", "TrainingState", "build_engine", "partitioned_construction"]
