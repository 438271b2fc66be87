"""A run never trusts a bad number: skipped updates, the divergence stop, no non-finite checkpoint or export,
and a resume that refuses a malicious checkpoint (CPU, gloo; ~1.5 min on 2 idle cores).

The runs go through ``tests/_guard_driver.py``: the pretraining program with NaN losses, NaN
gradients and loss spikes injected at chosen iterations and ranks, recording for every optimizer
step which state tensors changed (model, fp32 masters, Adam moments and steps), the LR-schedule
step count and the POET merge counters. One diverging megatron run (DP=2, distributed optimizer)
serves several tests; its checkpoint is reused for the export and the malicious-resume tests.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

from test_safe_loading import Exploit
from test_training import CORPUS, ROOT, TINY, _env, _free_port, run  # the data fixture: conftest.py

pytestmark = pytest.mark.skipif(not os.path.isfile(CORPUS), reason=f"corpus {CORPUS} not found")

GUARD = TINY + ["--poet-merge-interval", "2", "--loss-spike-factor", "3", "--loss-spike-window", "2"]
# Iteration -> ranks. 3: one rank's loss is NaN; 5: one rank's gradient is NaN (finite loss); 6: a loss
# spike (x20); 9-11: NaN losses in a row, the third of which stops the run (--max-skipped-iters 3).
DIVERGING = {"nan_loss": {3: [1], 9: [0, 1], 10: [0], 11: [1]}, "nan_grad": {5: [0]}, "spike": {6: [0, 1]}}
REASONS = {3: "the loss is not finite", 5: "the gradient norm is not finite", 6: "loss spike",
           9: "the loss is not finite", 10: "the loss is not finite"}


def _driver(report_dir, plan: dict, argv: list[str], nproc: int) -> tuple[subprocess.CompletedProcess, list, list]:
    """Run the guard driver; returns (process, per-rank step records, per-rank exit codes of the program)."""
    os.makedirs(report_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), "tests/_guard_driver.py", str(report_dir), json.dumps(plan), *argv]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), TORCH_EXTENSIONS_DIR=str(report_dir)), capture_output=True,
                         text=True, timeout=300)
    ranks = range(nproc)
    reports = [json.loads(open(os.path.join(report_dir, f"rank{r}.json")).read()) for r in ranks]
    codes = [int(open(os.path.join(report_dir, f"exit{r}")).read()) for r in ranks]
    return out, reports, codes


@pytest.fixture(scope="session")
def diverging_run(data, tmp_path_factory):
    """``(process, reports, exit codes, checkpoint root, tensorboard dir)`` of the diverging DP=2 run."""
    root = tmp_path_factory.mktemp("diverging")
    ckpt, tb = str(root / "ckpt"), str(root / "tb")
    argv = data + GUARD + ["--train-iters", "20", "--global-batch-size", "8", "--use-distributed-optimizer",
                           "--save", ckpt, "--save-interval", "4", "--max-skipped-iters", "3", "--tensorboard-dir", tb]
    out, reports, codes = _driver(root / "report", DIVERGING, argv, nproc=2)
    return out, reports, codes, ckpt, tb


def assert_skips_change_nothing(reports: list, skipped: set[int]) -> None:
    """Every rank skipped exactly ``skipped`` (requested or found itself) and a skipped step changed no
    state tensor, no LR-schedule position and (seen at the next step) no POET merge counter; an
    applied step (after the first, whose learning rate is 0) changed the state and the schedule."""
    decisions = [[(s["iteration"], s["updated"]) for s in steps] for steps in reports]
    assert all(d == decisions[0] for d in decisions), decisions  # the same decision on every rank
    for steps in reports:
        assert {s["iteration"] for s in steps if not s["updated"]} == skipped
        for step, following in zip(steps, steps[1:] + [None]):
            if not step["updated"]:
                assert step["changed"] == [] and step["schedule_steps_after"] == step["schedule_steps_before"], step
                if following is not None:
                    assert following["merge_before"] == step["merge_before"], (step, following)
            elif step["iteration"] > 1:
                assert step["changed"] and step["schedule_steps_after"] == step["schedule_steps_before"] + 1, step


def test_skipped_iterations_change_nothing_on_the_megatron_engine(diverging_run):
    _, reports, _, _, _ = diverging_run
    assert_skips_change_nothing(reports, {3, 5, 6, 9, 10, 11})
    assert [s["skip"] for s in reports[0] if s["iteration"] in (3, 5, 6)] == [True, False, True]  # 5: the engine's own
    merges = {s["iteration"]: s["merge_before"][0] for s in reports[0]}
    assert merges[8] == 2 and merges[11] == 2  # merge interval 2: after applied updates 2 and 4 (iterations 2, 7)


def test_diverged_run_stops_once_and_keeps_the_last_finite_checkpoint(diverging_run):
    from megatron_poet.checkpoint import latest_iteration

    out, _, codes, ckpt, _ = diverging_run
    assert codes == [3, 3], (codes, out.stderr[-3000:])
    errors = re.findall(r"^error: .*$", out.stderr, re.M)
    assert len(errors) == 1, out.stderr[-3000:]
    assert "iterations 9-11: 3 consecutive updates skipped" in errors[0] and "--max-skipped-iters 3" in errors[0]
    assert os.path.join(ckpt, "iter_0000008") in errors[0] and "lower --lr" in errors[0]
    assert latest_iteration(ckpt) == 8
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("iter_")) == ["iter_0000004", "iter_0000008"]


def test_skips_are_logged_and_recorded_in_tensorboard(diverging_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _, _, tb = diverging_run
    for iteration, reason in REASONS.items():
        assert re.search(rf"iteration +{iteration} skipped: {reason}.*nothing was updated", out.stdout), iteration
    line = re.search(r"iteration +3/ +20 .*", out.stdout).group(0)
    assert "lm loss: NAN" in line and "number of skipped iterations:   1" in line
    assert "number of skipped iterations:   0" in re.search(r"iteration +4/ +20 .*", out.stdout).group(0)
    events = EventAccumulator(tb)
    events.Reload()
    skipped = {e.step: e.value for e in events.Scalars("skipped-iterations")}
    assert (skipped[3], skipped[4], skipped[5], skipped[6], skipped[7]) == (1, 0, 1, 1, 0)


def test_a_non_finite_state_is_never_saved(data, tmp_path):
    """With the check off a NaN gradient reaches the parameters; the save at --exit-interval 2 is refused."""
    from megatron_poet.checkpoint import latest_iteration

    ckpt = str(tmp_path / "ckpt")
    argv = data + TINY + ["--train-iters", "6", "--no-check-for-nan-in-loss-and-grad", "--save", ckpt,
                          "--save-interval", "1", "--exit-interval", "2"]
    out, (steps,), codes = _driver(tmp_path / "report", {"nan_grad": {2: [0]}}, argv, nproc=1)
    assert codes == [3] and [s["updated"] for s in steps] == [True, True]  # the check is off: applied
    (error,) = re.findall(r"^error: .*$", out.stderr, re.M)
    assert "not saving iteration 2: the state holds non-finite values (rank 0: embedding.word_embeddings" in error
    assert latest_iteration(ckpt) == 1 and not os.path.exists(os.path.join(ckpt, "iter_0000002"))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason='deepspeed not installed (".[deepspeed]")')
def test_skipped_iterations_change_nothing_under_zero3(data, tmp_path):
    """ZeRO-3 (partitioned parameters, fp32 flat masters): the same skips change nothing either."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    plan = {"nan_loss": {3: [1]}, "nan_grad": {5: [0]}, "spike": {6: [0, 1]}}
    argv = data + GUARD + ["--train-iters", "7", "--global-batch-size", "16", "--deepspeed", "--deepspeed-config",
                           str(config)]
    out, reports, codes = _driver(tmp_path / "report", plan, argv, nproc=2)
    assert codes == [0, 0], out.stderr[-3000:]
    assert "engine DeepSpeed ZeRO-3" in out.stdout and "3 skipped" in out.stdout
    assert_skips_change_nothing(reports, {3, 5, 6})


def replace_stored_item(iter_dir: str, fqn: str, payload: bytes) -> None:
    """Make checkpoint ``iter_dir`` read item ``fqn`` (a tensor or an object) from ``payload``, a new file,
    with a manifest to match (as a forged checkpoint would have: the manifest catches damage, not malice)."""
    from megatron_poet.checkpoint.manifest import write_manifest

    index = os.path.join(iter_dir, ".metadata")
    with open(index, "rb") as f:
        metadata = pickle.load(f)  # this test's own file
    keys = [k for k in metadata.storage_data if k.fqn == fqn]
    assert keys, sorted({k.fqn for k in metadata.storage_data})
    with open(os.path.join(iter_dir, "__replaced.distcp"), "wb") as f:
        f.write(payload)
    for key in keys:
        metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], relative_path="__replaced.distcp",
                                                         offset=0, length=len(payload))
    with open(index, "wb") as f:
        pickle.dump(metadata, f)
    write_manifest(iter_dir)


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_export_refuses_non_finite_tensors(diverging_run, tmp_path):
    from megatron_poet.checkpoint import CheckpointReadError
    from megatron_poet.export.from_checkpoint import convert_checkpoint

    _, _, _, ckpt, _ = diverging_run
    path = str(tmp_path / "iter_0000008")
    shutil.copytree(os.path.join(ckpt, "iter_0000008"), path)
    with open(os.path.join(path, ".metadata"), "rb") as f:
        (chunk,) = pickle.load(f).state_dict_metadata["embedding.word_embeddings.weight"].chunks
    replace_stored_item(path, "embedding.word_embeddings.weight", _saved(torch.full(tuple(chunk.sizes), float("nan"))))
    with pytest.raises(CheckpointReadError, match=r"non-finite values \(NaN/inf\) in 1 tensors: "
                                                  r"embedding\.word_embeddings\.weight \(20480 non-finite\).*"
                                                  r"--allow-non-finite"):
        convert_checkpoint(path, str(tmp_path / "hf"), progress=False)
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")
    convert_checkpoint(path, str(tmp_path / "hf"), progress=False, allow_non_finite=True)
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")


def test_resume_refuses_a_malicious_object_in_a_distcp_file(data, diverging_run, tmp_path):
    """Only rank 1's RNG state is malicious: rank 0 reports rank 1's refusal, once; nothing runs."""
    from megatron_poet.checkpoint import write_marker

    _, _, _, ckpt, _ = diverging_run
    shutil.copytree(os.path.join(ckpt, "iter_0000008"), tmp_path / "ckpt" / "iter_0000008")
    write_marker(str(tmp_path / "ckpt"), 8)
    pwned = tmp_path / "pwned"
    replace_stored_item(str(tmp_path / "ckpt" / "iter_0000008"), "rng_state/shard_0.0.1_1.1.2", _saved([Exploit(pwned)]))
    out = run(data + GUARD + ["--train-iters", "20", "--global-batch-size", "8", "--use-distributed-optimizer",
                              "--load", str(tmp_path / "ckpt")], nproc=2, check=False)
    errors = re.findall(r"^error: .*$", out.stderr, re.M)
    assert out.returncode != 0 and len(errors) == 1, out.stderr[-3000:]
    assert "refusing to load an object stored in checkpoint" in errors[0] and "posix.system" in errors[0]
    assert not pwned.exists()


def test_factors_far_from_orthogonal_stop_the_run_before_a_save(data, tmp_path):
    """--lr/--poet-lr 1e4: after iteration 2 the skew blocks are ~1e4 (finite, so the non-finite guard
    passes them) and G^T G - I is ~1e38. The run stops there, once, before saving iteration 2; the
    iteration-1 checkpoint it names exports as a finite model. (Before issue 19 the run saved such
    factors, and the export folded them into weights up to 2.8e38 and inf.)"""
    from megatron_poet.export.from_checkpoint import convert_checkpoint
    from megatron_poet.checkpoint import latest_iteration

    ckpt = str(tmp_path / "ckpt")
    out = run(data + TINY + ["--lr", "1e4", "--poet-lr", "1e4", "--train-iters", "4", "--save", ckpt,
                             "--save-interval", "1"], check=False)
    errors = re.findall(r"^error: .*$", out.stderr, re.M)
    assert out.returncode != 0 and len(errors) == 1, out.stderr[-3000:]
    assert "iteration 2: a POET factor's orthogonality error" in errors[0], errors
    assert "past --poet-max-orthogonality-error 0.25" in errors[0] and "iter_0000001" in errors[0], errors
    assert latest_iteration(ckpt) == 1 and not os.path.exists(os.path.join(ckpt, "iter_0000002"))
    convert_checkpoint(ckpt, str(tmp_path / "hf"), progress=False)


def test_export_refuses_factors_far_from_orthogonal(data, tmp_path):
    """With the stop off (--poet-max-orthogonality-error 0) the log warns once and the run saves such
    factors; the export checks the folded model and refuses it, naming the layers, unless told not to."""
    from megatron_poet.export.from_checkpoint import convert_checkpoint
    from megatron_poet.export.hf_export import UnsafeWeightsError

    ckpt = str(tmp_path / "ckpt")
    out = run(data + TINY + ["--lr", "1e4", "--poet-lr", "1e4", "--train-iters", "4", "--save", ckpt,
                             "--save-interval", "1", "--exit-interval", "3", "--poet-max-orthogonality-error", "0"])
    warnings = re.findall(r"^warning: .*orthogonality.*$", out.stdout, re.M)
    assert len(warnings) == 1 and "past --poet-orthogonality-warning 0.01" in warnings[0], out.stdout[-3000:]
    with pytest.raises(UnsafeWeightsError, match=r"refusing to export a diverged model: \d+ POET layers have "
                                                 r"factors past orthogonality error 0\.25 .*decoder\.layers\.0\."):
        convert_checkpoint(ckpt, str(tmp_path / "hf"), progress=False)
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")
    convert_checkpoint(ckpt, str(tmp_path / "hf"), progress=False, allow_non_finite=True)
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")


@pytest.mark.parametrize("layout, what", [(["--use-distributed-optimizer"], "data-parallel"),
                                          (["--tensor-model-parallel-size", "2"], "tensor-parallel")])
def test_replicas_that_drift_apart_are_caught(data, tmp_path, layout, what):
    """One rank's copy of a replicated POET factor moves by 1e-6 after iteration 4: the hash check of
    iteration 4 (every 2 iterations; iteration 2 passes) stops every rank with one message naming the
    tensor and the ranks. DP=2 compares every tensor across replicas; TP=2 the tensors TP does not split."""
    argv = data + TINY + ["--train-iters", "8", "--global-batch-size", "8", "--poet-merge-interval", "3",
                          "--check-weight-hash-across-dp-replicas-interval", "2", *layout]
    out, reports, codes = _driver(tmp_path / "report", {"perturb": {4: [1]}}, argv, nproc=2)
    assert codes == [3, 3], out.stderr[-3000:]
    assert [len(r) for r in reports] == [4, 4]  # stopped after iteration 4's step
    (error,) = re.findall(r"^error: .*$", out.stderr, re.M)
    assert "iteration 4: copies of the model that must be identical differ" in error, error
    assert (f"decoder.layers.0.self_attention.linear_qkv.input_side.skew differs across {what} ranks: "
            f"ranks [0] vs ranks [1]") in error, error


def test_replicated_factor_gets_identical_updates_by_construction(data, tmp_path):
    """TP=2: rank 1's gradient of a replicated factor is 1% off during iteration 2's backward (as a
    rank-dependent summation order would make it; no merge before the check folds it away); megatron's finalize_model_grads averages the
    replicated factors' gradients over TP, so both copies still take the same step and the hash check
    after every iteration passes. (Before issue 19 each rank applied its own gradient: they parted.)"""
    argv = data + TINY + ["--train-iters", "4", "--poet-merge-interval", "3", "--tensor-model-parallel-size", "2",
                          "--check-weight-hash-across-dp-replicas-interval", "1"]
    out, reports, codes = _driver(tmp_path / "report", {"scale_replicated_grad": {2: [1]}}, argv, nproc=2)
    assert codes == [0, 0], out.stderr[-3000:]
