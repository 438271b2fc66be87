"""Where DeepSpeed ZeRO keeps the POET factors, so that a merge can reset them everywhere.

The DeepSpeed engine gives the POET factors an optimizer parameter group of their own
(``"poet": True``). DeepSpeed flattens every group and keeps, per rank:

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and bf16 ZeRO-1 (``BF16_Optimizer``): the model's
  parameters in full, plus this rank's fp32 slice of each flattened group, which is the one
  parameter of the corresponding group of the wrapped torch optimizer (its Adam state is
  keyed by it);
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): only a partition of every parameter
  (``param.ds_tensor``, frozen ``A0`` included) and fp32 flat partitions per sub-group
  (``fp32_partitioned_groups_flat``, ``sub_group_to_group_id`` names their group); the torch
  optimizer's groups hold them only while it steps.

A merge writes the model's copy (under ZeRO-3 inside :func:`gathered`, which makes DeepSpeed
write the partitions back); :func:`reset_poet_optimizer_state` zeroes the fp32 copies and gives
them fresh Adam state. A group of its own also gives the POET factors an Adam ``step`` of their
own, which optimizers keeping one step per flat tensor or per group need.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from megatron_poet.megatron.optimizer_state import zero_main_and_adam_state

POET_GROUP_KEY = "poet"  # the key poet.optim.poet_param_groups sets


def full_shape(param: torch.Tensor) -> torch.Size:
    """``param``'s shape; the whole tensor's for a parameter ZeRO-3 partitioned (DeepSpeed's ``ds_shape``)."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param: torch.Tensor) -> int:
    """``param``'s number of elements; the whole tensor's under ZeRO-3 (``ds_numel``)."""
    return getattr(param, "ds_numel", param.numel())


def poet_masters(ds_optimizer) -> list[torch.Tensor]:
    """This rank's fp32 flat tensors holding the POET factors' main copies (see the module docstring)."""
    inner = ds_optimizer.optimizer
    groups = {i for i, group in enumerate(inner.param_groups) if group.get(POET_GROUP_KEY)}
    if hasattr(ds_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return [flat for sub, flat in enumerate(ds_optimizer.fp32_partitioned_groups_flat)
                if ds_optimizer.sub_group_to_group_id[sub] in groups]
    return [flat for i in sorted(groups) for flat in inner.param_groups[i]["params"]]


@torch.no_grad()
def reset_poet_optimizer_state(ds_optimizer) -> None:
    """Zero the POET factors' fp32 copies and their Adam moments and step on this rank."""
    for master in poet_masters(ds_optimizer):
        zero_main_and_adam_state(ds_optimizer.optimizer, master)


def gathered(params: list[nn.Parameter], modified: bool) -> contextlib.AbstractContextManager:
    """Within the block, ZeRO-3-partitioned ``params`` hold their full values; if ``modified``, what
    is written to them (identically on every rank) becomes their new partitions on exit."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modified else None)


class SkippableStep:
    """The ZeRO optimizer's inner torch-optimizer step, left out when the iteration must be skipped.

    DeepSpeed's ``engine.step()`` must run at every accumulation boundary: it clears the gradients
    and its accumulation state. Its optimizer (ZeRO-1/2/3, or bf16 ZeRO-1's ``BF16_Optimizer``) first
    computes the global gradient norm (``_global_grad_norm``, all-reduced), then calls the inner
    optimizer's ``step`` and copies the fp32 masters back to the model. Installed as that ``step``,
    this object runs it only when nothing asks to skip: neither :attr:`skip` nor, with ``check_grads``,
    a non-finite norm. A skipped step leaves the fp32 masters and the Adam moments and step as they
    were, and the copy back to the model rewrites the same values. DeepSpeed itself also skips
    steps whose norm is not finite (``was_step_applied()`` is then ``False``).

    Attributes:
        skip: skip the next step regardless of the norm (set before ``engine.step()``).
        skipped: whether the last step was left out here.
    """

    def __init__(self, ds_optimizer, check_grads: bool):
        self.ds_optimizer = ds_optimizer
        self.check_grads = check_grads
        self.skip = self.skipped = False
        inner = ds_optimizer.optimizer
        self._step = inner.step
        inner.step = self  # DeepSpeed calls self.optimizer.step() (once per parameter group / sub-group)

    def __call__(self, *args, **kwargs):
        norm = self.ds_optimizer._global_grad_norm
        nonfinite = norm is not None and not math.isfinite(float(norm))
        if self.skip or (self.check_grads and nonfinite):
            self.skipped = True
            return None
        return self._step(*args, **kwargs)
