"""The model of a DeepSpeed-engine checkpoint (any ZeRO stage), read in one process without unsafe unpickling.

- ZeRO-1/2: ``mp_rank_00_model_states.pt`` holds the whole model state dict (the model copy
  each rank trains, in its training dtype), POET layers in their layout-independent form.
- ZeRO-3: every parameter is partitioned, ``A0`` included; DeepSpeed's own
  ``zero_to_fp32`` reassembles them (trainable parameters from the fp32 optimizer
  partitions, frozen ones from the per-rank fragments, buffers from the model states).
  Its file reads go through :func:`~megatron_poet.training.engine.deepspeed_checkpoint.safe_load`.
"""
from __future__ import annotations

import contextlib
import io
import os
import types

import torch

from megatron_poet.training.engine.deepspeed import import_deepspeed
from megatron_poet.training.engine.deepspeed_checkpoint import read_common, safe_load

from .checkpoint import CheckpointReadError


@contextlib.contextmanager
def _safe_zero_to_fp32():
    """DeepSpeed's ``zero_to_fp32`` module with its ``torch.load`` calls routed to :func:`safe_load`."""
    from deepspeed.utils import zero_to_fp32

    proxy = types.ModuleType("torch_safe_load")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.load = lambda f, map_location=None, **kwargs: safe_load(f, map_location)
    saved, zero_to_fp32.torch = zero_to_fp32.torch, proxy
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints what it reassembled
            yield zero_to_fp32
    finally:
        zero_to_fp32.torch = saved


def read_model_state(path: str) -> dict[str, torch.Tensor]:
    """The model state dict of the DeepSpeed-engine checkpoint directory ``path`` (``iter_XXXXXXX``)."""
    try:
        import_deepspeed()
    except ImportError:
        raise CheckpointReadError('reading a DeepSpeed checkpoint needs deepspeed: pip install -e ".[deepspeed]"') \
            from None
    if read_common(path)["zero_stage"] < 3:
        return safe_load(os.path.join(path, "mp_rank_00_model_states.pt"))["module"]
    with _safe_zero_to_fp32() as zero_to_fp32:
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(os.path.normpath(path)),
                                                                     tag=os.path.basename(os.path.normpath(path)))


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Load the model of DeepSpeed-engine checkpoint ``path`` into ``model`` (built at TP=1)."""
    try:
        state = read_model_state(path)
    except CheckpointReadError:
        raise
    except Exception as err:  # any failure here means an unreadable checkpoint
        raise CheckpointReadError(f"cannot read DeepSpeed checkpoint {path}: {type(err).__name__}: {err}") from err
    model.load_state_dict(state)
