"""Optimizer glue: POET parameter groups and the merge-then-reinitialize schedule."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from .init import mix_seed
from .linear import POETModule


def poet_modules(model: nn.Module) -> list[POETModule]:
    """Every POET layer in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, POETModule)]


def poet_param_groups(model: nn.Module, lr: float, poet_lr: float, weight_decay: float,
                      shape_of: Callable[[nn.Parameter], torch.Size] = lambda p: p.shape) -> list[dict]:
    """Parameter groups for ``torch.optim.AdamW`` (or any optimizer taking groups).

    - POET factors: ``lr=poet_lr``, no weight decay (the papers' recipe; no hidden
      scale is applied to ``poet_lr``), tagged ``"poet": True``.
    - Other parameters with >= 2 dims (embeddings, output layer): ``lr``, ``weight_decay``.
    - Other 1-D parameters (norms, biases): ``lr``, no weight decay.
    Frozen parameters are skipped; empty groups are dropped. ``shape_of``: a parameter's full shape
    (for a parameter stored partitioned, where its own tensor is a flat piece).
    """
    poet_ids = {id(p) for m in poet_modules(model) for p in m.poet_parameters()}
    poet, decay, no_decay = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (poet if id(p) in poet_ids else decay if len(shape_of(p)) >= 2 else no_decay).append(p)
    groups = [
        {"params": poet, "lr": poet_lr, "weight_decay": 0.0, "poet": True},
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "poet": False},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "poet": False},
    ]
    return [g for g in groups if g["params"]]


def reset_torch_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Forget the state of ``params`` in a ``torch.optim`` optimizer.

    Adam/AdamW initialize state lazily, so the next step on these parameters is
    a fresh Adam step: zero moments and bias correction from step 1.
    """
    for p in params:
        optimizer.state.pop(p, None)


class MergeScheduler:
    """Merge every POET layer each ``merge_interval`` optimizer steps and reset their optimizer state.

    Call :meth:`step` once after every ``optimizer.step()``. At merge ``i`` each layer draws
    its permutations from a generator seeded with ``(seed, i, the layer's identity)``: its
    ``identity`` attribute when set (the Megatron builders set the global layer name, the
    same on every pipeline stage and layout), else its module path in ``model``. So the
    schedule is reproducible and its whole state is two counters (:meth:`state_dict`).

    Args:
        model: module containing POET layers.
        merge_interval: ``T_m`` (the papers use 200–400).
        reset_optimizer_state: ``fn(params)`` that clears the optimizer state of
            the POET parameters. Pass ``optimizer=`` for ``torch.optim``
            optimizers; Megatron's or DeepSpeed's optimizers plug in their own.
        seed: base seed of the permutations drawn at merges.
        materialize: ``fn(params, modified) -> context manager`` within which ``params``
            hold their full values (and, if ``modified``, keep what is written to them);
            DeepSpeed ZeRO-3 gathers its partitions there. Layers are visited one at a
            time. Default: parameters are always complete (no context).
    """

    def __init__(
        self,
        model: nn.Module,
        merge_interval: int,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        reset_optimizer_state: Callable[[list[nn.Parameter]], None] | None = None,
        seed: int = 0,
        materialize: Callable[[list[nn.Parameter], bool], ContextManager] | None = None,
    ):
        if not isinstance(merge_interval, int) or merge_interval < 1:
            raise ValueError(f"merge_interval must be a positive integer, got {merge_interval!r}")
        if (optimizer is None) == (reset_optimizer_state is None):
            raise ValueError("give exactly one of optimizer= or reset_optimizer_state=")
        self.model = model
        self.merge_interval = merge_interval
        self.seed = seed
        self._reset = reset_optimizer_state or (lambda ps: reset_torch_optimizer_state(optimizer, ps))
        self._materialize = materialize or (lambda params, modified: contextlib.nullcontext())
        self.steps_since_merge = 0
        self.merges_done = 0

    def merge_due(self) -> bool:
        """Whether the next :meth:`step` merges."""
        return self.steps_since_merge + 1 >= self.merge_interval

    def step(self) -> bool:
        """Count one optimizer step; merge when the interval is reached. Returns whether it merged."""
        merging = self.merge_due()
        self.steps_since_merge += 1
        if not merging:
            return False
        self.merge_now()
        return True

    @torch.no_grad()
    def merge_now(self) -> None:
        """Merge every layer now; layer ``L``'s new permutations come from ``(seed, merge index, L's identity)``."""
        named = [(m.identity or name, m) for name, m in self.model.named_modules()
                 if isinstance(m, POETModule)]
        layers = [layer for _, layer in named]
        for identity, layer in named:
            # From the layer's global identity, never its position among a stage's local layers.
            generator = torch.Generator().manual_seed(mix_seed(self.seed, "merge", self.merges_done, identity))
            with self._materialize(list(layer.parameters()), True):
                layer.merge_and_reset(generator)
        self._reset([p for layer in layers for p in layer.poet_parameters()])
        self.merges_done += 1
        self.steps_since_merge = 0

    def max_orthogonality_error(self) -> float:
        """Largest ``||G^T G - I||_F`` over all POET blocks of the model (a log diagnostic)."""
        return self._max_over_layers(lambda layer: layer.poet_parameters(), lambda layer: layer.orthogonality_error())

    def max_a0_norm_drift(self) -> float:
        """Largest relative change of an ``A0``'s Frobenius norm since initialization (a log diagnostic:
        orthogonal factors preserve every singular value, so merges should leave it at rounding level)."""
        return self._max_over_layers(lambda layer: [layer.frozen_weight], lambda layer: layer.a0_norm_drift())

    def _max_over_layers(self, params, measure) -> float:
        """Max of ``measure(layer)`` (a 0-d tensor) over the POET layers, each with ``params(layer)`` materialized."""
        values = []
        for layer in poet_modules(self.model):
            with self._materialize(params(layer), False):
                values.append(measure(layer))
        return float(torch.stack(values).max()) if values else 0.0  # one device-to-host copy

    def state_dict(self) -> dict:
        return {"steps_since_merge": self.steps_since_merge, "merges_done": self.merges_done, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.steps_since_merge = int(state["steps_since_merge"])
        self.merges_done = int(state["merges_done"])
        self.seed = int(state["seed"])
