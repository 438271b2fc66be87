"""Resume is exact in every engine, precision and layout, with POET's own learning rate.

Each case trains 8 iterations at 2 processes with ``--poet-lr``/``--poet-min-lr`` different from
``--lr``/``--min-lr`` (cosine decay, so every group's learning rate moves each step), POET merges
after iterations 3 and 6 (one before, one after the resume point) and a checkpoint at iteration 4;
a second run resumes from it and must print iterations 5-8 exactly as the uninterrupted run did.
CPU math is deterministic and the checkpoint holds the whole state (model, masters, Adam moments
and steps, every group's schedule, permutations, merge counter, data position, RNG), so anything
but bitwise equality is a lost or misplaced piece of state. Cases with ``--poet-lr == --lr`` are
``test_training.py``'s and ``test_deepspeed.py``'s resume tests.

Before the fix of issue 19 the distributed-optimizer cases failed from iteration 8 on: megatron-core
paired the POET group with the no-decay group on load and gave it ``--lr``.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from test_training import TINY, losses, run

LR = ["--lr", "3e-3", "--min-lr", "3e-5", "--poet-lr", "1e-3", "--poet-min-lr", "1e-4", "--lr-decay-style", "cosine"]
COMMON = TINY + LR + ["--train-iters", "8", "--poet-merge-interval", "3", "--global-batch-size", "16",
                      "--save-interval", "4"]
BF16_MASTER = ["--bf16", "--poet-fp32-master-a0"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

CASES = {
    "ddp-dp2-fp32": [],
    "distopt-dp2-fp32": ["--use-distributed-optimizer"],
    # megatron's per-parameter format (before the fix: KeyError 'step' on every resume with torch's Adam)
    "distopt-dp2-fp32-fully-reshardable": ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"],
    "distopt-dp2-bf16-master": ["--use-distributed-optimizer", *BF16_MASTER],
    "distopt-tp2-bf16": ["--use-distributed-optimizer", "--tensor-model-parallel-size", "2", "--bf16"],
    "ddp-tp2-bf16-master": ["--tensor-model-parallel-size", "2", *BF16_MASTER],
    "distopt-tp2-bf16-int8": ["--use-distributed-optimizer", "--tensor-model-parallel-size", "2", "--bf16",
                              "--poet-a0-storage", "int8", "--poet-a0-group-size", "16"],
    "zero1-dp2-bf16": ["--zero-stage", "1", "--bf16"],
    "zero2-dp2-fp32": ["--zero-stage", "2"],
    "zero3-dp2-bf16": ["--deepspeed", "--deepspeed-config", "ZERO3", "--bf16"],
}


def _flags(case: str, tmp_path) -> list[str]:
    flags = list(CASES[case])
    if "ZERO3" in flags:  # partition even the smallest tensors (DeepSpeed's default keeps them whole)
        config = tmp_path / "ds_zero3.json"
        config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
        flags[flags.index("ZERO3")] = str(config)
    return flags


@pytest.mark.parametrize("case", list(CASES))
def test_resume_with_its_own_poet_lr_is_bitwise(case, data, tmp_path, monkeypatch):
    from megatron_poet.checkpoint import write_marker

    if case.startswith("zero"):
        if not HAS_DEEPSPEED:
            pytest.skip('deepspeed not installed (".[deepspeed]")')
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))  # no op is ever built
    ckpt = str(tmp_path / "ckpt")
    program = data + COMMON + _flags(case, tmp_path) + ["--save", ckpt]
    straight = losses(run(program, nproc=2))
    assert sorted(straight) == list(range(1, 9)), straight
    write_marker(ckpt, 4)
    out = run(program + ["--load", ckpt], nproc=2)
    assert "at iteration 4" in out.stdout
    assert losses(out) == {i: straight[i] for i in range(5, 9)}
