"""Damaged files are named: checkpoint manifests, --ckpt-step, --keep-last-checkpoints, damaged tokenizers.

One run saves iterations 2, 4 and 6 with ``--keep-last-checkpoints 2`` (iteration 2 goes once 4 is
written and verified); copies of its directory are then damaged one way each. Every damage must give
exactly one ``error:`` line, naming the file and the newest checkpoint that verifies, before any
iteration runs. (Before issue 19 a truncated shard failed inside dist_checkpointing with a 40-line
EOFError traceback naming neither.)
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import pytest

from test_training import TINY, losses, run

SAVES = TINY + ["--train-iters", "6", "--poet-merge-interval", "3", "--save-interval", "2", "--keep-last-checkpoints", "2"]


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory) -> tuple[str, dict[int, str]]:
    """(checkpoint root holding iterations 4 and 6, the run's losses)."""
    root = str(tmp_path_factory.mktemp("damaged") / "ckpt")
    out = run(data + SAVES + ["--save", root])
    assert "deleted checkpoints of iterations 2 (--keep-last-checkpoints 2)" in out.stdout
    return root, losses(out)


def _copy(saved_root: str, tmp_path) -> str:
    root = str(tmp_path / "ckpt")
    shutil.copytree(saved_root, root)
    return root


def _one_error(out) -> str:
    errors = re.findall(r"^error: .*$", out.stderr, re.M)
    assert out.returncode != 0 and len(errors) == 1, out.stderr[-3000:]
    assert "[rank0]: Traceback" not in out.stderr and not losses(out), out.stderr[-3000:]  # (torchrun adds its own)
    return errors[0]


def test_manifest_lists_every_file_and_old_checkpoints_go(saved):
    root, _ = saved
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt"]
    files = json.load(open(os.path.join(root, "iter_0000006", "manifest.json")))["files"]
    on_disk = sorted(f for f in os.listdir(os.path.join(root, "iter_0000006")) if f != "manifest.json")
    assert sorted(files) == on_disk and all(len(e["sha256"]) == 64 for e in files.values())
    assert all(os.path.getsize(os.path.join(root, "iter_0000006", f)) == e["size"] for f, e in files.items())


def _distcp(root: str) -> str:
    return sorted(f for f in os.listdir(os.path.join(root, "iter_0000006")) if f.endswith(".distcp"))[0]


@pytest.mark.parametrize("damage", ["truncated", "missing", "altered"])
def test_damaged_checkpoint_is_named_with_the_newest_good_one(data, saved, tmp_path, damage):
    root = _copy(saved[0], tmp_path)
    shard = os.path.join(root, "iter_0000006", _distcp(root))
    flags = []
    if damage == "truncated":
        os.truncate(shard, 1000)
        expected = f"{shard} has 1000 bytes, the manifest records"
    elif damage == "missing":
        os.remove(shard)
        expected = f"{shard} is missing"
    else:  # same size, one byte changed: only the checksums see it
        with open(shard, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
        flags = ["--ckpt-verify-checksums"]
        expected = f"{shard} does not match its SHA-256 in the manifest"
    error = _one_error(run(data + TINY + ["--train-iters", "8", "--load", root, *flags], check=False))
    assert f"checkpoint {root}/iter_0000006 is damaged: {expected}" in error, error
    assert "the newest checkpoint that verifies is iteration 4: resume from it with --ckpt-step 4" in error, error


def test_resume_with_ckpt_step_past_a_damaged_checkpoint(data, saved, tmp_path):
    """--ckpt-step 4 resumes the verified checkpoint, reproduces iterations 5-6 bitwise and writes
    iteration 6 again over the damaged directory (which the marker still names)."""
    from megatron_poet.checkpoint import CheckpointReadError
    from megatron_poet.export.from_checkpoint import convert_checkpoint

    root, straight = _copy(saved[0], tmp_path), saved[1]
    os.truncate(os.path.join(root, "iter_0000006", _distcp(root)), 1000)
    with pytest.raises(CheckpointReadError, match=r"iter_0000006 is damaged: .* has 1000 bytes"):
        convert_checkpoint(root, str(tmp_path / "hf"), progress=False)
    out = run(data + SAVES + ["--load", root, "--ckpt-step", "4", "--save", root])
    assert losses(out) == {5: straight[5], 6: straight[6]}
    convert_checkpoint(root, str(tmp_path / "hf"), progress=False)  # iteration 6, written anew


def test_damaged_tokenizer_is_named(data, tmp_path):
    tokenizer = data[data.index("--tokenizer-model") + 1]
    broken = tmp_path / "tokenizer"
    shutil.copytree(tokenizer, broken)
    text = (broken / "tokenizer.json").read_text()
    (broken / "tokenizer.json").write_text(text[: len(text) // 2])
    argv = list(data)
    argv[argv.index("--tokenizer-model") + 1] = str(broken)
    error = _one_error(run(argv + TINY + ["--train-iters", "2"], check=False))
    assert f"{broken}/tokenizer.json is not a valid tokenizer.json" in error and "damaged or truncated" in error


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason='deepspeed not installed (".[deepspeed]")')
def test_damaged_deepspeed_checkpoint_is_named(data, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))  # no op is ever built
    root = str(tmp_path / "ckpt")
    argv = data + TINY + ["--train-iters", "2", "--zero-stage", "1", "--global-batch-size", "8", "--save", root,
                          "--save-interval", "1"]
    run(argv, nproc=2)
    files = json.load(open(os.path.join(root, "iter_0000002", "manifest.json")))["files"]
    victim = sorted(f for f in files if f.endswith(".pt") and "optim" in f)[0]
    os.truncate(os.path.join(root, "iter_0000002", victim), 10)
    error = _one_error(run(argv + ["--train-iters", "3", "--load", root], nproc=2, check=False))
    assert f"iter_0000002/{victim} has 10 bytes" in error and "--ckpt-step 1" in error, error
