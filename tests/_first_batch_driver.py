"""The pretraining program, saving the micro-batches of its first global batch to ``FIRST_BATCH_OUT``
(one process: ``{"tokens", "labels", "loss_mask"}`` stacked), so a test can compute another model's loss
on exactly the batch the program's first logged loss was computed on."""
import os
import sys

import torch

from megatron_poet.training.engine import megatron as engine_module

OUT = os.environ["FIRST_BATCH_OUT"]
original_forward_step = engine_module.forward_step
seen: list[dict] = []


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    if seen is not None:
        seen.append({k: batch[k].clone() for k in ("tokens", "labels", "loss_mask")})
    return original_forward_step(iter([batch]), model)


def save_first_batch(*args, **kwargs):
    global seen
    if seen:
        torch.save({k: torch.cat([b[k] for b in seen]) for k in seen[0]}, OUT)
        seen = None
    return original_step(*args, **kwargs)


original_step = engine_module.MegatronEngine.step
engine_module.forward_step = forward_step
engine_module.MegatronEngine.step = save_first_batch

if __name__ == "__main__":
    from megatron_poet.training.pretrain import main

    sys.exit(main(sys.argv[1:]))
