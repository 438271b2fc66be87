"""The DeepSpeed engine (``--deepspeed`` / ``--zero-stage``) on CPU: 2 processes, gloo.

One 8-iteration run per ZeRO stage (micro batch 4, global batch 16: two accumulated
micro-batches per rank; POET merges after iterations 3 and 6; dropout on) goes through
``tests/_deepspeed_driver.py``, which records partition sizes and what every merge left
behind, and saves at iteration 4. A megatron-engine run of the same model and data is the
reference ("stage 0"). Resume and export reuse those checkpoints. Every DeepSpeed run gets an
empty ``TORCH_EXTENSIONS_DIR``: DeepSpeed must never compile an op (a C++ build takes minutes
on CPU).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from test_training import CORPUS, ROOT, TINY, _env, _free_port, losses, run  # the data fixture: conftest.py

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason='deepspeed not installed (".[deepspeed]")'),
    pytest.mark.skipif(not os.path.isfile(CORPUS), reason=f"corpus {CORPUS} not found"),
]

COMMON = TINY + ["--train-iters", "8", "--poet-merge-interval", "3", "--global-batch-size", "16",
                 "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--save-interval", "4"]
STAGES = (1, 2, 3)


@pytest.fixture(scope="session")
def extensions_dir(tmp_path_factory) -> str:
    """``TORCH_EXTENSIONS_DIR`` of every DeepSpeed run: must stay empty (no op is ever built)."""
    return str(tmp_path_factory.mktemp("torch_extensions"))


@pytest.fixture(scope="session")
def stage_flags(tmp_path_factory):
    """``stage_flags(stage)``: ZeRO-1/2 via the ``--zero-stage`` shortcut, ZeRO-3 via a config file that
    partitions even the smallest tensors (DeepSpeed's default keeps tensors under 1e5 elements whole)."""
    path = tmp_path_factory.mktemp("config") / "ds_zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    return lambda stage: ["--zero-stage", str(stage)] if stage < 3 else ["--deepspeed", "--deepspeed-config", str(path)]


def _torchrun(target: list[str], extensions_dir: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           *target]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), TORCH_EXTENSIONS_DIR=extensions_dir), capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


@pytest.fixture(scope="session")
def megatron_run(data, tmp_path_factory) -> tuple[dict[int, str], str]:
    """The megatron engine (DDP, DP=2) on the same model and data: losses and checkpoint directory."""
    ckpt = str(tmp_path_factory.mktemp("megatron_ckpt"))
    return losses(run(data + COMMON + ["--save", ckpt], nproc=2)), ckpt


@pytest.fixture(scope="session")
def zero_run(data, extensions_dir, stage_flags, tmp_path_factory):
    """``zero_run(stage)`` -> ``(losses, [report of rank 0, rank 1], checkpoint dir, report dir, stdout)``, run once."""
    done = {}

    def get(stage: int):
        if stage not in done:
            ckpt, report = str(tmp_path_factory.mktemp(f"zero{stage}_ckpt")), tmp_path_factory.mktemp(f"zero{stage}")
            out = _torchrun(["tests/_deepspeed_driver.py", str(report), *data, *COMMON, "--save", ckpt,
                             *stage_flags(stage)], extensions_dir)
            reports = [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]
            done[stage] = losses(out), reports, ckpt, report, out.stdout
        return done[stage]

    return get


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_trains_like_the_megatron_engine(stage, zero_run, megatron_run, extensions_dir):
    """Losses of every ZeRO stage agree with the megatron engine's through two merges.

    Tolerance 1e-5 relative: the same fp32 model, data and AdamW; DeepSpeed sums gradients over
    micro-batches and ranks in its own buffers (ZeRO-2/3 reduce-scatter per bucket), so sums may
    round differently. Measured: all 7 printed digits agree on this CPU.
    """
    got, _, _, _, stdout = zero_run(stage)
    reference, _ = megatron_run
    assert f"engine DeepSpeed ZeRO-{stage}" in stdout and "DP 2" in stdout and "merges: 2" in stdout
    assert sorted(got) == list(range(1, 9))
    for i in got:
        assert abs(float(got[i]) / float(reference[i]) - 1) < 1e-5, (i, got, reference)
    assert float(got[8]) < float(got[1]) - 0.3, got
    assert os.listdir(extensions_dir) == [], "DeepSpeed compiled an op"


@pytest.mark.parametrize("stage", STAGES)
def test_a0_is_partitioned_only_by_zero3_and_never_optimized(stage, zero_run):
    """ZeRO-3: each of 2 ranks holds half of every A0 and of the skew parameters; ZeRO-1/2: all of it.
    A0 never reaches the optimizer; the POET fp32 masters are half (ZeRO-1/2/3 shard optimizer state)."""
    _, reports, _, _, _ = zero_run(stage)
    for report in reports:
        assert len(report["partition"]) == 8  # 4 POET linears x 2 layers
        for layer in report["partition"].values():
            assert not layer["a0_in_optimizer"]
            share = 2 if stage == 3 else 1
            assert layer["a0_held"] * share == layer["a0_full"], layer
            assert layer["skew_held"] * share == layer["skew_full"], layer
        poet_total = sum(layer["skew_full"] for layer in report["partition"].values())
        assert all(2 * merge["master_numel"] == poet_total for merge in report["merges"])


def test_zero3_builds_the_same_model_partitioned(zero_run):
    """ZeRO-3 builds the model under ``deepspeed.zero.Init`` (each rank holds only its partition from the
    start: the test above); gathered, it is bitwise the model ZeRO-1 builds whole (same seed)."""
    assert all(report["built_partitioned"] for report in zero_run(3)[1])
    assert not any(report["built_partitioned"] for report in zero_run(1)[1])
    whole = torch.load(os.path.join(zero_run(1)[3], "initial.pt"))
    partitioned = torch.load(os.path.join(zero_run(3)[3], "initial.pt"))
    assert list(whole) == list(partitioned)
    for name, tensor in whole.items():
        assert torch.equal(tensor, partitioned[name]), name


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_zero3_builds_the_same_bf16_model_partitioned(style, data, extensions_dir, stage_flags, tmp_path):
    """In bf16 too (Llama style): ``zero.Init`` overrides only the device, so what a whole build keeps in fp32
    (RoPE's ``inv_freq``, POET's initial row norms) stays fp32, and the gathered model is bitwise, dtypes
    included, the one ZeRO-1 builds whole. GPT-2 style (fp32 position embeddings, cast by the engine) is built
    whole, so it is the same model too."""
    initial = {}
    for stage in (1, 3):
        report = tmp_path / f"zero{stage}"
        report.mkdir()
        _torchrun(["tests/_deepspeed_driver.py", str(report), *data, *TINY, "--model-style", style, "--bf16",
                   "--train-iters", "1", "--global-batch-size", "8", *stage_flags(stage)], extensions_dir)
        built = [json.loads((report / f"rank{r}.json").read_text())["built_partitioned"] for r in range(2)]
        assert built == [stage == 3 and style == "llama"] * 2
        initial[stage] = torch.load(report / "initial.pt")
    whole, partitioned = initial[1], initial[3]
    assert list(whole) == list(partitioned)
    fp32 = {name for name, t in whole.items() if t.dtype == torch.float32}
    assert any("frozen_init_sq_norms" in name for name in fp32)
    assert any(name.endswith("inv_freq") for name in fp32) == (style == "llama")
    positions = [t.dtype for name, t in whole.items() if name.endswith("position_embeddings.weight")]
    assert positions == ([torch.bfloat16] if style == "gpt2" else [])  # (every parameter follows the run)
    for name, tensor in whole.items():
        assert tensor.dtype == partitioned[name].dtype and torch.equal(tensor, partitioned[name]), name


@pytest.mark.parametrize("stage", STAGES)
def test_merge_resets_every_copy_and_keeps_the_function(stage, zero_run):
    """At both merges, on both ranks: each layer's dense P A0 R moves by at most the Cayley–Neumann
    truncation bound of the spectrum-exact merge (docs/POET.md §1), the merged A0 is the un-sharded
    merge (nearest orthogonal factors) recomputed in float64 from the gathered factors, and the skew
    parameters are zero in the model, the fp32 masters and the Adam moments, with Adam step 0.

    Tolerance: 1e-5 against float64 covers the one fp32 rounding of the merged A0 (entries ~1).
    """
    _, reports, _, _, _ = zero_run(stage)
    for report in reports:
        assert [m["merges_done"] for m in report["merges"]] == [1, 2]
        for merge in report["merges"]:
            assert merge["max_function_change_over_bound"] <= 1.0, merge
            assert merge["max_error_vs_float64_merge"] <= 1e-5, merge
            assert merge["model_skew_max"] == merge["master_max"] == merge["adam_moment_max"] == 0.0, merge
            assert merge["adam_steps"] and set(merge["adam_steps"]) == {0.0}, merge


@pytest.mark.parametrize("stage, stopped", [(1, True), (3, False)])
def test_resume_reproduces_the_uninterrupted_losses(stage, stopped, data, zero_run, stage_flags, extensions_dir,
                                                     tmp_path):
    """Iterations 5-8 resumed at iteration 4 print the uninterrupted losses exactly: model, fp32 masters,
    Adam state, LR schedule, permutations, merge counter, data position and every rank's RNG (dropout
    is on) are restored; deterministic CPU math leaves no other difference. ZeRO-1: from a run stopped
    by ``--exit-interval 4``; ZeRO-3: from the uninterrupted run's iteration-4 checkpoint."""
    from megatron_poet.checkpoint import write_marker

    uninterrupted, _, ckpt, _, _ = zero_run(stage)
    program = ["-m", "megatron_poet.training.pretrain", *data, *COMMON, *stage_flags(stage)]
    if stopped:
        ckpt = str(tmp_path / "ckpt")
        out = _torchrun(program + ["--save", ckpt, "--exit-interval", "4"], extensions_dir)
        assert "stopping at iteration 4 (--exit-interval)" in out.stdout
        assert losses(out) == {i: uninterrupted[i] for i in range(1, 5)}
    else:
        write_marker(ckpt, 4)
    out = _torchrun(program + ["--load", ckpt], extensions_dir)
    assert "resumed from" in out.stdout and "at iteration 4" in out.stdout
    assert losses(out) == {i: uninterrupted[i] for i in range(5, 9)}


def _hf_logits(hf_dir: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens).logits


def test_export_from_zero_checkpoints(zero_run, megatron_run, tmp_path):
    """A ZeRO-3 checkpoint (partitioned A0) and a ZeRO-1 one (whole model in one file) export to
    Hugging Face with POET folded: the exported weights are the in-memory dense ``P A0 R`` at save
    time exactly, and the logits match the export of the megatron engine's run of the same model
    and data (tolerance 1e-4 on logits of size ~1.6: the runs' weights differ only by the rounding of
    4 differently-ordered gradient sums, which Adam's normalized steps amplify; measured 2026-12-03
    over seeds 1234, 7, 3, 11 with 1 and 2 permutation groups: 1e-6 to 3.5e-5 for ZeRO-3)."""
    from safetensors.torch import load_file

    from megatron_poet.export.from_checkpoint import convert_checkpoint

    _, megatron_ckpt = megatron_run
    reference = convert_checkpoint(megatron_ckpt, str(tmp_path / "megatron"), iteration=4, progress=False)
    expected = _hf_logits(str(tmp_path / "megatron"))
    for stage in (3, 1):
        _, _, ckpt, report, _ = zero_run(stage)
        result = convert_checkpoint(ckpt, str(tmp_path / f"zero{stage}"), iteration=4, progress=False)
        assert result.poet_layers == reference.poet_layers == 8
        weights = load_file(str(tmp_path / f"zero{stage}" / "model.safetensors"))
        dense = torch.load(report / "saved_dense_4.pt")
        for i in range(2):
            assert torch.equal(weights[f"model.layers.{i}.mlp.down_proj.weight"], dense[f"decoder.layers.{i}.mlp.linear_fc2"])
            assert torch.equal(weights[f"model.layers.{i}.self_attn.o_proj.weight"],
                               dense[f"decoder.layers.{i}.self_attention.linear_proj"])
        assert (_hf_logits(str(tmp_path / f"zero{stage}")) - expected).abs().max() < 1e-4


def test_no_poet_gpt2_baseline_under_zero3(data, extensions_dir, stage_flags, tmp_path):
    """The AdamW baseline, GPT-2 style: its output layer multiplies by the embedding's (partitioned) weight."""
    out = _torchrun(["-m", "megatron_poet.training.pretrain", *data, *TINY, "--no-poet", "--model-style", "gpt2",
                     "--train-iters", "5", *stage_flags(3), "--tensorboard-dir", str(tmp_path / "tb")], extensions_dir)
    got = losses(out)
    assert "AdamW baseline, engine DeepSpeed ZeRO-3" in out.stdout
    assert float(got[5]) < float(got[1]) - 0.3, got
    assert os.listdir(tmp_path / "tb")


def _parse(argv: list[str], world_size: int = 2):
    from megatron_poet.training.arguments import parse_args

    return parse_args(argv, world_size=world_size)


def _config(tmp_path, text: str) -> list[str]:
    path = tmp_path / "ds.json"
    path.write_text(text)
    return ["--deepspeed", "--deepspeed-config", str(path)]


@pytest.mark.parametrize("flags, config, message", [
    (["--zero-stage", "3", "--tensor-model-parallel-size", "2"], None,
     "--tensor-model-parallel-size 2 needs the megatron engine"),
    (["--zero-stage", "1", "--use-distributed-optimizer"], None, "--use-distributed-optimizer belongs to the megatron"),
    (["--deepspeed"], None, "--deepspeed needs --deepspeed-config FILE or --zero-stage"),
    (["--deepspeed", "--deepspeed-config", "/nonexistent/ds.json"], None, "/nonexistent/ds.json: no such file"),
    ([], "{not json", "is not valid JSON"),
    ([], '{"zero_optimization": {"stage": 2}, "train_batch_size": 32}',
     "sets train_batch_size 32 but the flags say 16 (--global-batch-size)"),
    (["--zero-stage", "3"], '{"zero_optimization": {"stage": 2}}', "sets zero_optimization.stage 2 but --zero-stage is 3"),
    ([], '{"zero_optimization": {"stage": 0}}', "stage 0 is plain data parallelism"),
    ([], '{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}', "has a 'optimizer' section; remove it"),
    ([], '{"zero_optimization": {"stage": 2}, "fp16": {"enabled": true}}', "fp16 (loss scaling) is not supported"),
    ([], '{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}', "offload_param (cpu) is not supported"),
    ([], '{"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5}', "sets gradient_clipping 0.5 but the flags say 1.0"),
])
def test_bad_deepspeed_arguments_fail_before_work(flags, config, message, tmp_path):
    from megatron_poet.training.arguments import ArgumentError

    argv = ["--micro-batch-size", "4", "--global-batch-size", "16", *flags]
    if config is not None:
        argv += _config(tmp_path, config)
    with pytest.raises(ArgumentError, match=re.escape(message)):
        _parse(argv)


@pytest.mark.parametrize("stage", STAGES)
def test_example_configs_are_accepted(stage):
    from megatron_poet.training.engine.deepspeed_config import deepspeed_config

    args = _parse(["--deepspeed", "--deepspeed-config", os.path.join(ROOT, "examples", f"ds_zero{stage}.json")])
    assert deepspeed_config(args)["zero_optimization"]["stage"] == stage


def test_config_file_is_completed_from_the_flags(tmp_path):
    from megatron_poet.training.engine.deepspeed_config import deepspeed_config

    args = _parse(["--micro-batch-size", "4", "--global-batch-size", "16", "--clip-grad", "0.1",
                   *_config(tmp_path, '{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}')])
    config = deepspeed_config(args)
    assert args.deepspeed and config["zero_optimization"] == {"stage": 2}
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (4, 2, 16)
    assert config["gradient_clipping"] == 0.1 and config["bf16"] == {"enabled": False}


def test_resuming_with_another_engine_or_stage_is_refused(data, zero_run, megatron_run):
    from megatron_poet.checkpoint import CheckpointError
    from megatron_poet.training.checkpointing import check_checkpoint_args

    _, _, zero3_ckpt, _, _ = zero_run(3)
    _, megatron_ckpt = megatron_run
    cases = [
        (megatron_ckpt, ["--zero-stage", "2"], "was written by the megatron engine"),
        (zero3_ckpt, [], "was written by DeepSpeed ZeRO-3; resume it with --zero-stage 3"),
        (zero3_ckpt, ["--zero-stage", "2"], "it was saved at ZeRO stage 3, this run uses stage 2"),
    ]
    for ckpt, flags, message in cases:
        args = _parse(data + COMMON + ["--load", ckpt, *flags])
        args.vocab_size_unpadded = 320
        with pytest.raises(CheckpointError, match=re.escape(message)):
            check_checkpoint_args(args)
    args = _parse(data + COMMON + ["--load", zero3_ckpt, "--zero-stage", "3"], world_size=4)
    args.vocab_size_unpadded = 320
    with pytest.raises(CheckpointError, match="saved at data-parallel size 2, this run has 4"):
        check_checkpoint_args(args)


def test_bf16_merge_resets_every_deepspeed_optimizer(extensions_dir):
    """bf16 (the GPU setting): ZeRO-1's BF16_Optimizer, ZeRO-2 and ZeRO-3 keep the POET factors' fp32
    masters and Adam state where the merge's reset finds them; after a merge all of it is zero."""
    env = dict(_env(), LOCAL_RANK="0", MASTER_PORT=str(_free_port()), TORCH_EXTENSIONS_DIR=extensions_dir)
    out = subprocess.run([sys.executable, "tests/_deepspeed_bf16_reset.py"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    cases = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(c["stage"], c["wrapper"]) for c in cases] == [
        (1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer"), (3, "DeepSpeedZeroOptimizer_Stage3")]
    for case in cases:
        assert case["merges"] == 1 and case["trained"] > 0 and case["master_numel"] == 224, case  # 2 x 4 x 28
        assert case["master_max"] == case["moment_max"] == case["model_skew_max"] == 0.0 and case["steps"] == [0.0]
