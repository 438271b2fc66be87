"""examples/reproduce_poet_llama60m.sh: the papers' LLaMA-60M recipe and its AdamW baseline.

In-process: both recipes parse and validate at full size (the POET block sizes fit every linear of
the 60M model) with the spec's numbers (docs/ALGORITHM.md §3). Then one CPU dry run (~15 s): the
script trained for 3 iterations on tinyshakespeare preprocessed by the session's ``data`` fixture
(tools/preprocess_data.py's code), sizes overridden by flags, and its error when no data is given.
"""
import os
import runpy
import subprocess

import pytest

from test_launcher import finish, no_noise, script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "reproduce_poet_llama60m.sh")
SIZES = ["--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "2",
         "--poet-block-size", "32", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--train-iters", "3", "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1", "--num-workers", "0"]


def test_recipes_parse_at_full_size_with_the_papers_numbers():
    from megatron_poet.training.arguments import parse_args

    recipe = runpy.run_path(SCRIPT)["recipe"]
    data = ["--data-path", "c4_prefix", "--tokenizer-model", "t5"]
    flags, user, checkpoint, required = recipe(data, cuda=True)
    poet = parse_args(flags + user, world_size=8)
    assert (user, checkpoint, required) == (data, "checkpoints/llama60m-poet", "optional")
    assert (poet.num_layers, poet.hidden_size, poet.ffn_hidden_size, poet.seq_length) == (8, 512, 1280, 256)
    assert poet.global_batch_size == 512 and poet.train_iters * 512 * 256 >= 30e9 > (poet.train_iters - 1) * 512 * 256
    assert (poet.poet, poet.poet_variant, poet.poet_block_size, poet.poet_init, poet.poet_neumann_terms) == (
        True, "bs", 256, "normalized", 3)
    assert (poet.poet_lr, poet.lr, poet.min_lr) == (1e-3, 1e-2, 1e-4)
    assert poet.poet_min_lr == pytest.approx(1e-5, rel=1e-12)  # cosine to 0.01x, both groups
    assert (poet.lr_decay_style, poet.clip_grad, poet.poet_clip_ramp_iters, poet.poet_merge_interval) == (
        "cosine", 0.1, 10, 400)
    assert poet.bf16 and not parse_args(recipe(data, cuda=False)[0] + data, world_size=1).bf16

    flags, user, checkpoint, required = recipe(["--baseline"], cuda=True)
    adamw = parse_args(flags + data, world_size=1)
    assert (user, checkpoint, required) == ([], "checkpoints/llama60m-adamw", "required")
    assert not adamw.poet and (adamw.lr, adamw.min_lr, adamw.hidden_size, adamw.train_iters) == (
        1e-3, 1e-5, 512, poet.train_iters)


def test_cpu_dry_run_and_missing_data(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    out = finish(subprocess.Popen(["bash", SCRIPT, *data, *SIZES], cwd=ROOT, env=script_env(CHECKPOINT_PATH=ckpt),
                                  text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    no_noise(out)
    assert "megatron_poet pretraining: POET" in out.stdout and "iteration        3/       3" in out.stdout
    assert "validation loss at iteration 3" in out.stdout and (ckpt / "latest_checkpointed_iteration.txt").exists()

    missing = subprocess.run(["bash", SCRIPT, "--baseline"], cwd=ROOT, env=script_env(), capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip() == "error: set DATA_PATH to the preprocessed data prefix " \
                                     "(tools/preprocess_data.py --output-prefix)"
