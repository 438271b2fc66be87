"""The pretraining program under DeepSpeed with measurements hooked in (run by tests/test_deepspeed.py).

``torchrun ... tests/_deepspeed_driver.py REPORT_DIR [program flags]`` trains exactly as
``python -m megatron_poet.training.pretrain`` does (the hooks only read state, and consume no
random numbers) and writes ``REPORT_DIR/rank{R}.json``:

- ``partition``: per POET layer, the elements of ``A0`` and of the skew parameters this rank
  holds vs their full size, and whether any ``A0`` reached the optimizer;
- ``merges``: per merge, measured around ``MergeScheduler.merge_now``: how far each layer's
  dense ``P A0 R`` moved (the layer's function), as a fraction of the bound a spectrum-exact
  merge guarantees (``((1 + e)^2 - 1) ||A0||_2`` with ``e`` the layer's orthogonality error:
  ``docs/POET.md`` §1), the distance of the merged ``A0`` from the un-sharded merge computed in
  float64 from the gathered pre-merge factors, and the largest magnitude left in every copy of
  the skew parameters (model, fp32 master, Adam moments, step);
- ``built_partitioned``: whether every parameter was already partitioned when the engine got the model;
- on rank 0, ``initial.pt``: every parameter and buffer of the model as the engine receives it
  (gathered: under ZeRO-3 the model is built partitioned), and RoPE's ``inv_freq``;
- and at each save, on rank 0, ``saved_dense_{iteration}.pt``: the dense ``P A0 R`` of every
  POET layer in memory at save time (for the export test).
"""
import json
import os
import sys

import torch

from megatron_poet.poet.linear import POETModule, dense_from_factors
from megatron_poet.poet.optim import MergeScheduler
from megatron_poet.training.engine import deepspeed as engine_module
from megatron_poet.training.engine.deepspeed_state import gathered, poet_masters

REPORT_DIR = sys.argv.pop(1)
REPORT = {"partition": None, "merges": []}
ENGINES = []


def _write_report() -> None:
    with open(os.path.join(REPORT_DIR, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(REPORT, f)


def _held(param) -> int:
    """Elements of ``param`` this rank stores (its ZeRO-3 partition, or all of it)."""
    return param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()


def _full(param) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def _layers(engine):
    return [(name, m) for name, m in engine.model_chunks[0].named_modules() if isinstance(m, POETModule)]


def _dense(layer, orthogonal: bool = False) -> torch.Tensor:
    """The layer's dense ``P A0 R`` (float32), or with ``orthogonal`` what a merge folds (float64)."""
    with gathered(list(layer.parameters()), False):
        return dense_from_factors(layer.frozen_weight, layer.input_side, layer.output_side, orthogonal).clone()


def _change_bound(layer) -> float:
    """``((1 + e)^2 - 1) ||A0||_2``: how far a spectrum-exact merge may move the layer's weight."""
    with gathered(list(layer.parameters()), False):
        e = float(layer.orthogonality_error())
        a0 = torch.linalg.matrix_norm(layer.frozen_weight.double(), ord=2).item()
    return ((1 + e) ** 2 - 1) * a0


original_init = engine_module.DeepSpeedEngine.__init__


def init(self, args, model_chunks):
    built_partitioned = all(hasattr(p, "ds_tensor") for p in model_chunks[0].parameters())
    original_init(self, args, model_chunks)
    ENGINES.append(self)
    optimizer = self.engine.optimizer
    groups = getattr(optimizer, "fp16_groups", None) or getattr(optimizer, "bit16_groups", None)
    optimized = {id(p) for group in groups for p in group}
    model = self.model_chunks[0]
    with gathered(list(model.parameters()), False):
        initial = {name: t.detach().clone() for name, t in (*model.named_parameters(), *model.named_buffers())}
    if getattr(model, "rotary_pos_emb", None) is not None:  # (an attribute, not a buffer)
        initial["rotary_pos_emb.inv_freq"] = model.rotary_pos_emb.inv_freq.clone()
    if torch.distributed.get_rank() == 0:
        torch.save(initial, os.path.join(REPORT_DIR, "initial.pt"))
    REPORT["built_partitioned"] = built_partitioned
    REPORT["partition"] = {
        name: {"a0_held": _held(m.frozen_weight), "a0_full": _full(m.frozen_weight),
               "a0_in_optimizer": id(m.frozen_weight) in optimized,
               "skew_held": sum(_held(p) for p in m.poet_parameters()),
               "skew_full": sum(_full(p) for p in m.poet_parameters())}
        for name, m in _layers(self)
    }
    _write_report()


original_merge = MergeScheduler.merge_now


def merge_now(self):
    (engine,) = ENGINES
    layers = _layers(engine)
    before = {name: _dense(m) for name, m in layers}
    bound = {name: _change_bound(m) for name, m in layers}
    reference = {name: _dense(m, orthogonal=True) for name, m in layers}  # the un-sharded merge, float64
    original_merge(self)
    change = error = model_skew = 0.0
    for name, m in layers:
        after = _dense(m)
        change = max(change, float((after - before[name]).abs().max()) / bound[name])
        with gathered(list(m.parameters()), False):
            merged_a0 = m.frozen_weight.index_select(0, m.output_side.inv_perm).index_select(1, m.input_side.inv_perm)
            error = max(error, float((merged_a0.double() - reference[name]).abs().max()))
            model_skew = max(model_skew, max(float(p.abs().max()) for p in m.poet_parameters()))
    optimizer = engine.engine.optimizer
    masters = poet_masters(optimizer)
    states = [optimizer.optimizer.state.get(t, {}) for t in masters]
    REPORT["merges"].append({
        "merges_done": self.merges_done, "max_function_change_over_bound": change, "max_error_vs_float64_merge": error,
        "model_skew_max": model_skew, "master_numel": sum(t.numel() for t in masters),
        "master_max": max(float(t.abs().max()) for t in masters if t.numel()),
        "adam_moment_max": max(float(s[k].abs().max()) for s in states for k in ("exp_avg", "exp_avg_sq")),
        "adam_steps": [float(s["step"]) for s in states],
    })
    _write_report()


original_save = engine_module.DeepSpeedEngine.save_checkpoint


def save(engine, state):
    dense = {name: _dense(m) for name, m in _layers(engine)}  # collective under ZeRO-3: every rank
    if torch.distributed.get_rank() == 0:
        torch.save(dense, os.path.join(REPORT_DIR, f"saved_dense_{state.iteration}.pt"))
    return original_save(engine, state)


engine_module.DeepSpeedEngine.__init__ = init
MergeScheduler.merge_now = merge_now
engine_module.DeepSpeedEngine.save_checkpoint = save

if __name__ == "__main__":
    from megatron_poet.training.pretrain import main

    sys.exit(main(sys.argv[1:]))
