"""The megatron engine's optimizer: megatron-core's optimizer and LR schedule with POET groups.

:class:`MegatronTrainingOptimizer` wraps ``get_megatron_optimizer`` (plain or
``--use-distributed-optimizer``) and ``OptimizerParamScheduler`` for
:class:`~megatron_poet.training.engine.megatron.MegatronEngine`: ``zero_grad``, ``step``
(clip, update, advance the LR schedule), ``reset_poet_state`` (the merge),
``learning_rate``, ``set_clip_scale`` and the checkpoint hooks. :func:`lr_scheduler`
is the schedule of both engines.

Hyper-parameters (POET_SPEC §3): POET factors use Adam without weight decay at
``--poet-lr`` (scheduled to ``--poet-min-lr``; no hidden scale); everything
else AdamW at ``--lr`` with weight decay, except 1-D parameters and biases
(Megatron's usual no-decay rule). POET factors get optimizer parameter groups
of their own, so an optimizer that keeps its Adam step per group (apex/TE
FusedAdam) can reset it at a merge.
"""
from __future__ import annotations

import argparse
import contextlib
import math

import torch
from torch import nn

from megatron_poet.poet.optim import poet_modules

from megatron_poet.megatron.optimizer_state import (
    leaf_optimizers, per_param_steps_from_groups, reset_poet_optimizer_state, restore_poet_steps, shared_step_for_save,
)

# Attribute set on POET parameters so megatron's ParamKey(attr=...) can select them.
POET_PARAM_ATTR = "is_poet_parameter"


def poet_group_settings(args: argparse.Namespace) -> dict:
    """The parameter-group keys of the POET factors, for both engines (the one place they are set).

    ``--poet-lr`` scheduled to ``--poet-min-lr`` (``max_lr``/``min_lr``, read by megatron's
    ``OptimizerParamScheduler``), no weight decay, and ``is_decoupled_lr``: a learning rate of
    their own, which is what that key says in megatron-core. It is also one of the keys by
    which every megatron-core version (``param_group_identifier_keys``) pairs a checkpoint's
    groups with the optimizer's on load, so the POET group never collides with the no-decay
    group (same ``wd_mult``/``lr_mult``) and never takes that group's learning rate on resume.
    """
    return {"max_lr": args.poet_lr, "min_lr": args.poet_min_lr, "wd_mult": 0.0, "is_decoupled_lr": True}


def dense_group_settings(args: argparse.Namespace, decay: bool) -> dict:
    """The parameter-group keys of every other parameter: ``--lr`` to ``--min-lr``, weight decay if ``decay``."""
    return {"max_lr": args.lr, "min_lr": args.min_lr, "wd_mult": 1.0 if decay else 0.0, "is_decoupled_lr": False,
            "default_config": True}


def poet_parameters(model_chunks: list[nn.Module]) -> list[nn.Parameter]:
    """The POET factor parameters of all model chunks, in module order."""
    return [p for chunk in model_chunks for m in poet_modules(chunk) for p in m.poet_parameters()]


def lr_scheduler(args: argparse.Namespace, optimizer):
    """megatron's ``OptimizerParamScheduler`` over ``optimizer.param_groups`` (iterations as steps).

    Groups carrying ``max_lr``/``min_lr`` (the POET groups: ``--poet-lr``) follow those;
    the others ``--lr``/``--min-lr``. ``wd_mult`` scales ``--weight-decay`` per group.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )


def canonical_learning_rate(param_groups: list[dict]) -> float:
    """The lr of the ``--lr`` schedule: that of the first group marked ``default_config``."""
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    return get_canonical_lr_for_logging(param_groups)


class MegatronTrainingOptimizer:
    """megatron-core optimizer + ``OptimizerParamScheduler`` (iterations as scheduler steps).

    Attributes:
        optimizer: the ``MegatronOptimizer`` (possibly a ``ChainedOptimizer``).
        scheduler: its ``OptimizerParamScheduler``.
    """

    def __init__(self, args: argparse.Namespace, model_chunks: list[nn.Module]):
        from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer

        from megatron_poet.megatron import compat
        from megatron.core.optimizer import get_standard_config_overrides

        self.poet_params = poet_parameters(model_chunks)
        for p in self.poet_params:
            setattr(p, POET_PARAM_ATTR, True)
        config = OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer,
        )
        overrides = get_standard_config_overrides(config)
        if self.poet_params:
            overrides[ParamKey(attr=POET_PARAM_ATTR)] = poet_group_settings(args)
        self.optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=overrides)
        compat.load_fully_reshardable_without_step()
        self.scheduler = lr_scheduler(args, self.optimizer)
        self._configs = [leaf.config for leaf in leaf_optimizers(self.optimizer)]
        self._configs.append(self.optimizer.config)
        self._clip_grad = args.clip_grad
        self._check_grads = args.check_for_nan_in_loss_and_grad

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    @torch.no_grad()
    def step(self, skip: bool = False) -> tuple[bool, float | None]:
        """Clip, update and advance the LR schedule; returns ``(updated, global gradient norm)``.

        megatron's ``MegatronOptimizer.step`` in its parts, so that the update can be skipped once
        the norm is known: with ``skip``, or a non-finite norm under ``--check-for-nan-in-loss-and-grad``,
        ``step_with_ready_grads`` (the only part that writes parameters or optimizer state) is not
        called and the schedule stays where it is.
        """
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        optimizer = self.optimizer
        if optimizer.prepare_grads():  # fp16 loss-scale overflow: megatron's own skip (fp32/bf16: never)
            return False, None
        grad_norm = float(optimizer.get_grad_norm())  # all-reduced: the same on every rank
        if skip or (self._check_grads and not math.isfinite(grad_norm)):
            return False, grad_norm
        for leaf in leaf_optimizers(optimizer):
            params = [] if getattr(leaf, "is_stub_optimizer", False) else leaf.get_parameters()
            if leaf.config.clip_grad > 0 and params:
                clip_grad_by_total_norm_fp32(params, leaf.config.clip_grad, grad_norm,
                                             leaf.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        updated = optimizer.step_with_ready_grads()
        if updated:
            self.scheduler.step(increment=1)
        return updated, grad_norm

    def reset_poet_state(self, params: list[nn.Parameter]) -> None:
        reset_poet_optimizer_state(self.optimizer, params)

    def learning_rate(self) -> float:
        """The lr of the ``--lr`` schedule (POET groups follow ``--poet-lr``)."""
        return canonical_learning_rate(self.optimizer.param_groups)

    def set_clip_scale(self, scale: float) -> None:
        for config in self._configs:
            config.clip_grad = self._clip_grad * scale

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False,
                           metadata: dict | None = None) -> dict:
        """Optimizer part of a dist_checkpointing state dict (``optimizer`` and ``opt_param_scheduler``).

        ``metadata`` is megatron's sharded-state-dict metadata (e.g. ``distrib_optim_sharding_type``).
        """
        if is_loading:
            self._init_state_for_loading()
        return {
            "optimizer": self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading, metadata=metadata),
            "opt_param_scheduler": self.scheduler.state_dict(),
        }

    @torch.no_grad()
    def _init_state_for_loading(self) -> None:
        """Give every parameter an Adam state (zeros, step 0) for the loaded values to land in.

        The distributed optimizer's ``sharded_state_dict(is_loading=True)`` reads the
        per-parameter ``step`` of torch's Adam before anything is loaded, and a
        fresh optimizer has no state yet.
        """
        for leaf in leaf_optimizers(self.optimizer):
            inner = leaf.optimizer
            per_param_step = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    if not state:
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                        if per_param_step:
                            state["step"] = torch.zeros((), dtype=torch.float32)

    def saving(self) -> contextlib.AbstractContextManager:
        """Context for building and writing a checkpoint (uniform Adam steps, see :mod:`megatron_poet.megatron.optimizer_state`)."""
        return shared_step_for_save(self.optimizer, self.poet_params)

    def load_state_dict(self, state: dict, steps_since_merge: int) -> None:
        """Restore from a loaded :meth:`sharded_state_dict`; POET Adam steps from the merge counter."""
        with torch.no_grad():  # megatron copies into fp32 shards that view leaf parameters
            self.optimizer.load_state_dict(state["optimizer"])
        per_param_steps_from_groups(self.optimizer)
        self.scheduler.load_state_dict(state["opt_param_scheduler"])
        restore_poet_steps(self.optimizer, self.poet_params, steps_since_merge)

