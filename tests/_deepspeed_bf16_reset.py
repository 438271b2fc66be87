"""bf16 POET merges under every DeepSpeed optimizer wrapper (run by tests/test_deepspeed.py; one process).

The training program refuses ``--bf16`` on CPUs (megatron's mixed precision needs CUDA), but
DeepSpeed's bf16 optimizers run on the CPU accelerator, so their POET reset is checked here on a
``POETLinear`` model: ZeRO-1 with fp32 gradient accumulation (``BF16_Optimizer``), ZeRO-2
(``DeepSpeedZeroOptimizer``) and ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``). Prints one JSON line
per case: the wrapper, the POET fp32 masters' size and largest magnitude before the merge and, after it, the largest magnitude
left in the masters, the Adam moments, the model's skew parameters, and the Adam steps.
"""
import json
import os

import torch

from megatron_poet.poet.linear import POETLinear
from megatron_poet.poet.optim import MergeScheduler, poet_param_groups
from megatron_poet.training.engine.deepspeed import import_deepspeed
from megatron_poet.training.engine.deepspeed_state import gathered, poet_masters, reset_poet_optimizer_state

CASES = (
    (1, {"data_types": {"grad_accum_dtype": "fp32"}}),
    (2, {}),
    (3, {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}),
)


def main() -> None:
    torch.distributed.init_process_group("gloo", rank=0, world_size=1,
                                         init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}")
    deepspeed = import_deepspeed()
    for stage, extra in CASES:
        torch.manual_seed(0)
        model = torch.nn.Sequential(POETLinear(32, 32, block_size=8), torch.nn.Linear(32, 8)).to(torch.bfloat16)
        config = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": stage}, **extra}
        if stage == 3:
            deepspeed.utils.set_z3_leaf_modules(model, [POETLinear])
        optimizer = torch.optim.AdamW(poet_param_groups(model, 1e-2, 1e-2, 0.1))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
        merges = MergeScheduler(model, 2, reset_optimizer_state=lambda ps: reset_poet_optimizer_state(engine.optimizer),
                                materialize=gathered if stage == 3 else None)
        for _ in range(2):
            # As inside a transformer, the POET layer's input requires grad: ZeRO-3 reduces a leaf
            # module's gradients in its full backward hook, which runs too early otherwise.
            x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
            engine.backward(engine(x).float().pow(2).mean())
            engine.step()
            trained = max(float(m.abs().max()) for m in poet_masters(engine.optimizer))  # before the merge
            merges.step()
        masters = poet_masters(engine.optimizer)
        states = [engine.optimizer.optimizer.state[m] for m in masters]
        with gathered(model[0].poet_parameters(), False):
            skew = max(float(p.abs().max()) for p in model[0].poet_parameters())
        print(json.dumps({
            "stage": stage, "wrapper": type(engine.optimizer).__name__, "merges": merges.merges_done, "trained": trained,
            "master_numel": sum(m.numel() for m in masters), "master_max": max(float(m.abs().max()) for m in masters),
            "moment_max": max(float(s[k].abs().max()) for s in states for k in ("exp_avg", "exp_avg_sq")),
            "steps": [float(s["step"]) for s in states], "model_skew_max": skew,
        }), flush=True)
        engine.destroy()


if __name__ == "__main__":
    main()
