"""POET merge with optimizer-state reset for megatron-core's optimizers.

A POET merge (``MergeScheduler.merge_now``) folds ``P A0 R`` into ``A0`` and sets
every skew parameter ``Q`` of the *model* to 0. Megatron's optimizers keep their
own copy of what they update, so the merge must reach it too:

- ``FP32Optimizer``: the torch optimizer updates the model parameters themselves.
- ``Float16OptimizerWithFloat16Params`` (bf16): fp32 main copies in
  ``fp32_from_float16_groups``, parallel to ``float16_groups``.
- ``DistributedOptimizer``: each rank updates an fp32 shard (a 1-D slice of the
  parameter's range in the grad buffer); ``model_param_group_index_map[param]``
  gives ``(group, position)`` of that shard in the inner optimizer's groups.
  Parameters with no range on this rank are absent from the map.
- ``ChainedOptimizer``: any of the above, several times.

For each POET parameter this module zeroes the main copy (if it were left, the
next step would copy the pre-merge ``Q`` back over the merged layer) and resets
its Adam state to a fresh one: zero moments and step 0, so the bias correction
starts again from step 1. torch's Adam keeps ``step`` per parameter; apex/TE
FusedAdam keep it per parameter group, which is why :mod:`megatron_poet.training.optimizer` puts the
POET parameters in groups of their own.

Megatron's checkpoints store one Adam step shared by all parameters, so around a
save :func:`shared_step_for_save` gives the POET parameters the common step and
:func:`restore_poet_steps` sets their own step (= steps since the last merge,
kept by the merge scheduler) back after a load.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


def leaf_optimizers(optimizer) -> list:
    """The non-chained megatron optimizers inside ``optimizer``."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def main_params(optimizer, params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    """The tensors ``optimizer``'s inner torch optimizer updates for the model ``params``.

    Returns main params (full tensors or this rank's 1-D shards) of those of
    ``params`` this (leaf) optimizer holds on this rank; order follows ``params``.
    """
    wanted = list(params)
    index_map = getattr(optimizer, "model_param_group_index_map", None)
    if index_map is not None:  # DistributedOptimizer
        groups = optimizer.optimizer.param_groups
        return [groups[g]["params"][i] for p in wanted if p in index_map for g, i in [index_map[p]]]
    if hasattr(optimizer, "float16_groups"):  # Float16OptimizerWithFloat16Params
        to_main = {}
        for model_group, main_group in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups):
            to_main.update(zip(model_group, main_group))
        for group in optimizer.fp32_from_fp32_groups:
            to_main.update((p, p) for p in group)
        return [to_main[p] for p in wanted if p in to_main]
    held = {p for group in optimizer.optimizer.param_groups for p in group["params"]}  # FP32Optimizer
    return [p for p in wanted if p in held]


def _poet_groups(inner: torch.optim.Optimizer, mains: list[torch.Tensor]) -> list[dict]:
    """Parameter groups that hold POET ``mains`` and keep their Adam step per group (apex/TE FusedAdam)."""
    ids = {id(m) for m in mains}
    groups = [g for g in inner.param_groups if "step" in g and any(id(p) in ids for p in g["params"])]
    for g in groups:
        if not all(id(p) in ids for p in g["params"]):
            raise RuntimeError(
                "a POET parameter shares an optimizer parameter group with other parameters and this "
                "optimizer keeps its Adam step per group, so the step could not be reset alone (build the "
                "optimizer with megatron_poet.training.optimizer.MegatronTrainingOptimizer)"
            )
    return groups


@torch.no_grad()
def zero_main_and_adam_state(inner: torch.optim.Optimizer, main: torch.Tensor) -> None:
    """Zero ``main`` (a main copy of POET factors: the merged layer has ``Q = 0``) and its state in the
    torch optimizer ``inner``: Adam moments 0 and a per-parameter ``step`` 0 (bias correction restarts)."""
    main.zero_()
    for key, value in inner.state.get(main, {}).items():
        if torch.is_tensor(value):
            value.zero_()
        else:
            inner.state[main][key] = 0


@torch.no_grad()
def reset_poet_optimizer_state(optimizer, params: Iterable[nn.Parameter]) -> None:
    """Zero the main copies of the POET ``params`` and give them fresh Adam state.

    Use as ``MergeScheduler(model, T_m, reset_optimizer_state=lambda ps: reset_poet_optimizer_state(opt, ps))``.
    Works for every rank of a distributed optimizer (each resets its own shards).
    """
    params = list(params)
    for leaf in leaf_optimizers(optimizer):
        mains = main_params(leaf, params)
        inner = leaf.optimizer
        for main in mains:
            zero_main_and_adam_state(inner, main)
        for group in _poet_groups(inner, mains):
            group["step"] = 0


def _step_slots(optimizer, params: list[nn.Parameter]) -> Iterator[tuple[dict, str]]:
    """Every ``(container, "step")`` holding an Adam step of a POET main param."""
    for leaf in leaf_optimizers(optimizer):
        mains = main_params(leaf, params)
        inner = leaf.optimizer
        for main in mains:
            if "step" in inner.state.get(main, {}):
                yield inner.state[main], "step"
        for group in _poet_groups(inner, mains):
            yield group, "step"


def _common_step(optimizer, poet_ids: set[int]):
    """The Adam step shared by the non-POET parameters (``None`` before the first step)."""
    for leaf in leaf_optimizers(optimizer):
        inner = leaf.optimizer
        for group in inner.param_groups:
            if any(id(p) in poet_ids for p in group["params"]):
                continue
            if "step" in group and group["params"]:
                return group["step"]
            for p in group["params"]:
                step = inner.state.get(p, {}).get("step")
                if step is not None:
                    return step
    return None


@contextlib.contextmanager
def shared_step_for_save(optimizer, params: Iterable[nn.Parameter]):
    """Within the block, the POET parameters carry the common Adam step (as Megatron's checkpoints require)."""
    params = list(params)
    poet_ids = {id(m) for leaf in leaf_optimizers(optimizer) for m in main_params(leaf, params)}
    common = _common_step(optimizer, poet_ids)
    slots = list(_step_slots(optimizer, params)) if common is not None else []
    saved = [(c, k, c[k].clone() if torch.is_tensor(c[k]) else c[k]) for c, k in slots]
    for c, k in slots:
        _set_step(c, k, common)
    try:
        yield
    finally:
        for c, k, value in saved:
            _set_step(c, k, value)


@torch.no_grad()
def per_param_steps_from_groups(optimizer) -> None:
    """After a load: give torch Adam its Adam step per parameter again.

    megatron's distributed optimizer checkpoints torch Adam's step in the
    parameter groups; on load it leaves that ``group["step"]`` behind and keeps
    whatever per-parameter step the state held before loading. Bias correction
    reads the per-parameter one, so copy it there and drop the group key.
    """
    for leaf in leaf_optimizers(optimizer):
        inner = leaf.optimizer
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            step = group.pop("step")
            for p in group["params"]:
                inner.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32)


@torch.no_grad()
def restore_poet_steps(optimizer, params: Iterable[nn.Parameter], steps_since_merge: int) -> None:
    """After loading a checkpoint: the POET parameters' Adam step = optimizer steps since the last merge."""
    for c, k in list(_step_slots(optimizer, list(params))):
        _set_step(c, k, steps_since_merge)


def _set_step(container: dict, key: str, value) -> None:
    current = container[key]
    if torch.is_tensor(current):
        current.fill_(float(value) if not torch.is_tensor(value) else value.item())
    else:
        container[key] = int(value.item()) if torch.is_tensor(value) else value
