"""FP8 in the training program and under tensor parallelism, on CPU (gloo, torchrun subprocesses).

- The program with ``--bf16 --fp8-format hybrid`` at TP=2 against the same run in bf16 (the loss
  tracks it), resumed at TP=1 from its checkpoint (the same losses as TP=2, up to bf16 rounding);
  the startup log reports the backend.
- The tensor-parallel layers at TP=2 against TP=1, in float32 so that the comparison is sharp:
  ``tests/_fp8_tp_worker.py``.
- The flag checks.
Tiny model of test_training.py (hidden 64, 2 layers, POET block 16, seq 32), two permutation
groups so that TP=1 and TP=2 hold the same POET layers.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from test_training import CORPUS, ROOT, TINY, _env, losses, run  # the data fixture: conftest.py

pytestmark = pytest.mark.skipif(not os.path.isfile(CORPUS), reason=f"corpus {CORPUS} not found")

RUN = TINY + ["--bf16", "--train-iters", "6", "--poet-merge-interval", "3", "--poet-permutation-groups", "2",
              "--make-vocab-size-divisible-by", "32"]  # merges after iterations 3 and 6; 320 tokens pad to 320
FP8 = ["--fp8-format", "hybrid"]


@pytest.fixture(scope="module")
def fp8_tp2(data, tmp_path_factory):
    """``(losses, stdout, checkpoint dir)`` of the FP8 run at TP=2, saved after iteration 3."""
    ckpt = str(tmp_path_factory.mktemp("fp8_ckpt"))
    out = run(data + RUN + FP8 + ["--tensor-model-parallel-size", "2", "--save", ckpt, "--save-interval", "3"],
              nproc=2)
    return losses(out), out.stdout, ckpt


def test_fp8_run_tracks_the_bf16_run(data, fp8_tp2):
    """Tolerance 2% of the loss at every iteration: each FP8 GEMM errs by ~4% (6% for hybrid input
    gradients, docs/FP8.md), and the loss, a mean over 128 tokens of a smooth function of 8 such
    layers, moves much less (measured: 0.3% at most); a broken scale or format is off by far more."""
    fp8, stdout, _ = fp8_tp2
    assert "FP8 hybrid, rowwise scales, backend scaled_mm (no GPU), 8 POET layers" in stdout
    assert "merges: 2" in stdout
    bf16 = losses(run(data + RUN + ["--tensor-model-parallel-size", "2"], nproc=2))
    assert sorted(fp8) == sorted(bf16) == list(range(1, 7))
    for i in bf16:
        assert abs(float(fp8[i]) / float(bf16[i]) - 1) < 0.02, (i, fp8, bf16)
    assert float(fp8[6]) < float(fp8[1]) - 0.3  # it trains


def test_fp8_at_tp1_resumes_the_tp2_run(data, fp8_tp2):
    """TP=1 from the TP=2 run's iteration-3 checkpoint continues with its losses (iterations 4-6,
    across the merge after 6): the FP8 copies are rebuilt from the loaded A0 (none is saved) and the
    scales are the unsharded layer's. Tolerance 2e-3 relative: TP=2 rounds each rank's partial
    row-parallel output to bf16 before summing (2^-8 relative per element), measured 4e-4; the
    float32 layer-level comparison (test below) is the sharp one."""
    from megatron_poet.checkpoint import write_marker

    fp8, _, ckpt = fp8_tp2
    write_marker(ckpt, 3)
    out = run(data + RUN + FP8 + ["--load", ckpt])
    assert "resumed from" in out.stdout and "TP 1" in out.stdout
    resumed = losses(out)
    assert sorted(resumed) == [4, 5, 6]
    for i in resumed:
        assert abs(float(resumed[i]) / float(fp8[i]) - 1) < 2e-3, (i, resumed, fp8)


def test_fp8_tensor_parallel_layers_match_tp1(tmp_path):
    """float32 activations (the FP8 GEMMs output float32): TP=2 layers equal TP=1 ones up to the
    order of float32 sums (1e-6 relative), in every recipe, while FP8 changes them by percents."""
    result = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "tests", "_fp8_tp_worker.py"), str(result)]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    r = json.loads(result.read_text())
    # A scale over a sharded axis must be all-reduced: a shard 2^-20 of the other quantizes differently alone.
    for granularity in ("tensor", "row"):
        assert r["amax"][granularity] == {"with_group": True, "without_group": False}
    expected_groups = {
        "tensorwise": {"col": ["forward weight", "grad", "input_grad weight"],
                       "row": ["forward weight", "input", "input_grad weight"]},
        "rowwise": {"col": ["grad", "input_grad weight"], "row": ["forward weight", "input"]},
        "blockwise": {"col": [], "row": []},  # tiles never cross the permutation groups (= the shards)
    }
    for recipe, groups in expected_groups.items():
        assert r[recipe]["groups"] == groups, recipe
        assert r[recipe]["max_rel"] < 1e-6, (recipe, r[recipe])
        assert r[recipe]["fp8_effect"] > 1e-2, (recipe, r[recipe])
        assert not r[recipe]["fp8_in_state"], recipe


def _parse(argv: list[str], world_size: int = 1):
    from megatron_poet.training.arguments import parse_args

    return parse_args(argv, world_size=world_size)


@pytest.mark.parametrize("argv, world, message", [
    (["--fp8-format", "hybrid"], 1, "--fp8-format needs --bf16"),
    (["--fp8-recipe", "rowwise"], 1, "--fp8-recipe need --fp8-format"),
    (["--bf16", "--fp8-format", "e4m3", "--no-poet"], 1, "needs Transformer Engine on a GPU"),
    (["--bf16", "--fp8-format", "e4m3", "--no-poet", "--fp8-recipe", "rowwise"], 1, "is a POET recipe"),
    (["--bf16", "--fp8-format", "e4m3", "--zero-stage", "1"], 1, "not with --deepspeed"),
    (["--bf16", "--fp8-format", "e4m3", "--fp8-backend", "te"], 1, "needs Transformer Engine installed"),
    (["--bf16", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-backend", "scaled_mm"], 1,
     "_scaled_mm takes tensorwise and row-wise scales only"),
    (["--bf16", "--fp8-format", "e4m3", "--hidden-size", "72", "--num-attention-heads", "4",
      "--poet-block-size", "8"], 1, "input features=72 is not a multiple of 16"),
    (["--bf16", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--hidden-size", "256",
      "--tensor-model-parallel-size", "2", "--poet-permutation-groups", "4", "--poet-block-size", "32"], 2,
     "permutation group size 64 is not a multiple of 128"),
])
def test_fp8_flag_errors(argv, world, message):
    from megatron_poet.training.arguments import ArgumentError

    with pytest.raises(ArgumentError, match=re.escape(message)):
        _parse(argv, world)


def test_fp8_flag_defaults():
    from megatron_poet.poet.fp8 import DEFAULT_RECIPE

    args = _parse(["--bf16", "--fp8-format", "e4m3"])
    assert (args.fp8_recipe, args.fp8_backend) == (DEFAULT_RECIPE, "auto")
    assert _parse(["--bf16", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise"]).fp8_recipe == "blockwise"
    assert _parse([]).fp8_format is None
