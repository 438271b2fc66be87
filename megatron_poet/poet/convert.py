"""Swap the ``nn.Linear`` modules of any model for ``POETLinear``."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import POETConfig
from .linear import POETLinear


def convert_model(
    model: nn.Module,
    *,
    block_size: int = 256,
    neumann_terms: int | None = 3,
    mode: str = "fast",
    init: str = "normalized",
    variant: str = "bs",
    exclude: Iterable[str] = ("lm_head", "output"),
    keep_weights: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` (not under a name in ``exclude``) by a ``POETLinear``, in place.

    A module is excluded when any component of its dotted path equals an entry
    of ``exclude`` (e.g. ``"lm_head"``). Every layer is validated before any is
    replaced, so a bad block size raises one ``ValueError`` naming all offending
    layers and leaves the model untouched. ``keep_weights=True`` keeps each
    layer's weight as ``A0`` (same function, for fine-tuning); by default ``A0``
    is freshly drawn with ``init`` (pre-training). Returns ``model``.
    """
    config = POETConfig(block_size, neumann_terms, mode, init, variant)
    excluded = set(exclude)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not excluded.intersection(name.split("."))
    ]
    errors = []
    for name, module in targets:
        for what, dim in (("in_features", module.in_features), ("out_features", module.out_features)):
            try:
                config.num_blocks(dim, what, name)
            except ValueError as err:
                errors.append(str(err))
    if errors:
        raise ValueError("cannot convert to POET:\n  " + "\n  ".join(errors))
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, POETLinear.from_linear(
            module, config, keep_weight=keep_weights, generator=generator, name=name))
    return model
