"""The pretraining program with non-finite numbers injected and every optimizer step recorded
(run by tests/test_reliability.py).

``torchrun ... tests/_guard_driver.py REPORT_DIR PLAN [program flags]`` trains exactly as
``python -m megatron_poet.training.pretrain`` (either engine) except at the iterations PLAN names,
a JSON object whose keys (all optional) map to ``{iteration: [ranks]}``:

- ``nan_loss``: these ranks' token losses become NaN (so their gradients too);
- ``nan_grad``: these ranks' gradients become NaN, their loss stays finite;
- ``spike``: these ranks' token losses are multiplied by 20 (a loss spike, finite gradients);
- ``nan_param``: after the step, one parameter element becomes NaN on these ranks;
- ``perturb``: after the step, layer 1's replicated QKV factor (``linear_qkv.input_side.skew``,
  the same on every rank) moves by 1e-6 in one element on these ranks;
- ``scale_replicated_grad``: during the iteration's backward, these ranks' gradient of that factor
  is multiplied by 1.01 before megatron reduces it.

Eval batches (no gradients) are never touched. Around every ``engine.step`` the driver records to
``REPORT_DIR/rank{R}.json``: the iteration, whether an update was requested to be skipped and
was applied, the names of the state tensors (model, fp32 masters, Adam moments and steps) whose
values changed, the LR-schedule step count and the POET merge counters at the step's start; and
the program's exit code to ``REPORT_DIR/exit{R}``.
"""
import json
import os
import sys

import torch

from megatron_poet.training.engine import base
from megatron_poet.training.engine.deepspeed import DeepSpeedEngine
from megatron_poet.training.engine.megatron import MegatronEngine

REPORT_DIR = sys.argv.pop(1)
PLAN = {kind: {int(i): ranks for i, ranks in plan.items()} for kind, plan in json.loads(sys.argv.pop(1)).items()}
STEPS = []
ITERATION = [0]  # iterations completed by this process's engine


def _injected(kind: str, iteration: int) -> bool:
    return torch.distributed.get_rank() in PLAN.get(kind, {}).get(iteration, [])


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


original_masked_loss = base.masked_loss


def masked_loss(loss_mask, losses):
    if torch.is_grad_enabled():  # a training batch of iteration ITERATION + 1
        iteration = ITERATION[0] + 1
        if _injected("nan_loss", iteration):
            losses = losses * float("nan")
        if _injected("spike", iteration):
            losses = losses * 20.0
        if _injected("nan_grad", iteration):
            losses = _NanGradient.apply(losses)
    return original_masked_loss(loss_mask, losses)


def _snapshot(engine) -> dict:
    return {name: t.detach().clone() for name, t in engine.state_tensors()}


def _schedule_steps(engine) -> int:
    scheduler = engine.scheduler if isinstance(engine, DeepSpeedEngine) else engine.optimizer.scheduler
    return scheduler.num_steps


def _replicated_qkv_factor(engine):
    (skew,) = [p for n, p in engine.model_chunks[0].named_parameters()
               if "layers.0.self_attention.linear_qkv.input_side.skew" in n]
    return skew


def _wrap(cls) -> None:
    original_step, original_load, original_train_batch = cls.step, cls.load_checkpoint, cls.train_batch

    def train_batch(self, iterator):
        if not _injected("scale_replicated_grad", ITERATION[0] + 1):
            return original_train_batch(self, iterator)
        handle = _replicated_qkv_factor(self).register_hook(lambda grad: grad * 1.01)
        try:
            return original_train_batch(self, iterator)
        finally:
            handle.remove()

    def step(self, skip=False):
        merges = self.merge_scheduler
        before = _snapshot(self)
        iteration = ITERATION[0] + 1
        record = {"iteration": iteration, "skip": skip, "schedule_steps_before": _schedule_steps(self),
                  "merge_before": [merges.merges_done, merges.steps_since_merge] if merges else None}
        result = original_step(self, skip)
        after = _snapshot(self)
        ITERATION[0] += 1
        record.update(updated=result.updated, schedule_steps_after=_schedule_steps(self),
                      changed=[name for name in before if not torch.equal(before[name], after[name])],
                      tensors=len(before))
        if _injected("nan_param", iteration):
            param = next(iter(self.model_chunks[0].parameters()))
            getattr(param, "ds_tensor", param).data.view(-1)[0] = float("nan")
        if _injected("perturb", iteration):
            with torch.no_grad():
                _replicated_qkv_factor(self).view(-1)[0] += 1e-6
        STEPS.append(record)
        with open(os.path.join(REPORT_DIR, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
            json.dump(STEPS, f)
        return result

    def load_checkpoint(self):
        state = original_load(self)
        ITERATION[0] = state.iteration
        return state

    cls.step, cls.load_checkpoint, cls.train_batch = step, load_checkpoint, train_batch


base.masked_loss = masked_loss
_wrap(MegatronEngine)
_wrap(DeepSpeedEngine)

if __name__ == "__main__":
    from megatron_poet.training.pretrain import main

    code = main(sys.argv[1:])
    with open(os.path.join(REPORT_DIR, f"exit{os.environ['RANK']}"), "w") as f:
        f.write(str(code))
    sys.exit(code)
