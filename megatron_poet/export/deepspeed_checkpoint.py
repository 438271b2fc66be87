"""The model of a DeepSpeed-engine checkpoint (any ZeRO stage), read in one process without unsafe unpickling.

- ZeRO-1/2: ``mp_rank_00_model_states.pt`` holds the whole model state dict (the model copy
  each rank trains, in its training dtype), POET layers in their layout-independent form.
- ZeRO-3: every parameter is partitioned, ``A0`` included; DeepSpeed's own
  ``zero_to_fp32`` reassembles them (trainable parameters from the fp32 optimizer
  partitions, frozen ones from the per-rank fragments, buffers from the model states).
  Its file reads, like the model-state read of ZeRO-1/2, happen inside
  :func:`~megatron_poet.training.engine.deepspeed_checkpoint.reading` (plain data only), after
  :func:`~megatron_poet.training.engine.deepspeed_checkpoint.check_files` examined every file.
"""
from __future__ import annotations

import contextlib
import io
import os

import torch

from megatron_poet.safe_loading import UnsafeFileError
from megatron_poet.training.engine.deepspeed import import_deepspeed
from megatron_poet.training.engine.deepspeed_checkpoint import check_files, read_common, reading

from .checkpoint import CheckpointReadError


def read_model_state(path: str) -> dict[str, torch.Tensor]:
    """The model state dict of the DeepSpeed-engine checkpoint directory ``path`` (``iter_XXXXXXX``)."""
    try:
        import_deepspeed()
    except ImportError:
        raise CheckpointReadError('reading a DeepSpeed checkpoint needs deepspeed: pip install -e ".[deepspeed]"') \
            from None
    stage = read_common(path)["zero_stage"]
    check_files(path)
    with reading(path):
        if stage < 3:
            return torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), map_location="cpu")["module"]
        from deepspeed.utils import zero_to_fp32

        with contextlib.redirect_stdout(io.StringIO()):  # it prints what it reassembled
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(os.path.normpath(path)),
                                                                         tag=os.path.basename(os.path.normpath(path)))


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Load the model of DeepSpeed-engine checkpoint ``path`` into ``model`` (built at TP=1)."""
    try:
        state = read_model_state(path)
    except CheckpointReadError:
        raise
    except UnsafeFileError as err:
        raise CheckpointReadError(str(err)) from None
    except Exception as err:  # any failure here means an unreadable checkpoint
        raise CheckpointReadError(f"cannot read DeepSpeed checkpoint {path}: {type(err).__name__}: {err}") from err
    model.load_state_dict(state)
