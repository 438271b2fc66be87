"""Running it as labs run jobs: SLURM's srun, Weights & Biases, torch.profiler traces, manual GC and
timings that count training iterations only (CPU, gloo, the tiny model of test_training.py).

W&B runs offline (``WANDB_MODE=offline``: nothing is sent); the test reads the run's history back
from its ``.wandb`` file (a LevelDB-style log of protobuf records, the format ``wandb sync`` uploads).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys

import pytest

from test_training import ROOT, TINY, _env, _free_port, losses, run

SHORT = TINY + ["--train-iters", "6", "--poet-merge-interval", "3", "--global-batch-size", "8"]


def test_first_host_of_a_slurm_node_list():
    from megatron_poet.training.slurm import first_host, torchrun_env_from_slurm

    assert first_host("gpu[07-09,12],cpu1") == "gpu07" and first_host("node3,node4") == "node3"
    assert first_host("a-b[001-004]") == "a-b001"
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "n[2-3]",
             "SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert torchrun_env_from_slurm(slurm) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n2",
                                              "MASTER_PORT": "29500", "LOCAL_WORLD_SIZE": "4"}
    assert torchrun_env_from_slurm({**slurm, "RANK": "0"}) == {}  # under torchrun: torchrun's variables


def _srun(argv: list[str], env_of_task, tasks: int = 2) -> list[subprocess.CompletedProcess]:
    """Start ``tasks`` processes of the program with the variables srun gives each task."""
    procs = [subprocess.Popen([sys.executable, "-m", "megatron_poet.training.pretrain", *argv], cwd=ROOT,
                              env=env_of_task(task), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for task in range(tasks)]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        outs.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return outs


def _slurm_env(port: str, **extra):
    def env_of_task(task: int) -> dict:
        env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SLURM_PROCID=str(task), SLURM_NTASKS="2", SLURM_LOCALID=str(task), SLURM_NODELIST="localhost",
                   SLURM_NTASKS_PER_NODE="2", MASTER_PORT=port, SLURM_JOB_ID="4242", **extra)
        return env
    return env_of_task


def test_srun_tasks_train_like_the_launchers_two_ranks(data):
    """Two processes started as srun starts them (only SLURM's variables and MASTER_PORT) print the
    losses of the same run under torchrun."""
    tasks = _srun(data + SHORT, _slurm_env(str(_free_port())))
    assert [t.returncode for t in tasks] == [0, 0], tasks[0].stderr[-3000:] + tasks[1].stderr[-3000:]
    assert "world 2 (TP 1, PP 1, DP 2)" in tasks[1].stdout
    assert losses(tasks[1]) == losses(run(data + SHORT, nproc=2))


def test_half_set_slurm_variables_fail_before_work(data):
    env = _slurm_env(str(_free_port()))(0)
    del env["SLURM_NODELIST"]
    out = subprocess.run([sys.executable, "-m", "megatron_poet.training.pretrain", *data, *SHORT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: started by SLURM (SLURM_PROCID is set) but SLURM_NODELIST is not: launch with srun (one task per "
        "GPU), or with torchrun / megatron_poet.launch, which set RANK themselves"], out.stderr


def _wandb_records(path: str):
    """The protobuf records of a ``.wandb`` file: 32 KiB blocks of chunks (crc, length, kind: 1 full,
    2 first, 3 middle, 4 last) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason='wandb not installed (".[test]" has it)')
def test_wandb_gets_the_tensorboard_scalars_and_the_config(data, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tb, wb = tmp_path / "tb", tmp_path / "wandb"
    out = run(data + SHORT + ["--eval-interval", "3", "--tensorboard-dir", str(tb), "--wandb-project", "poet-tests",
                              "--wandb-exp-name", "tiny", "--wandb-save-dir", str(wb)], nproc=2)
    assert "Weights & Biases: project poet-tests, run tiny" in out.stdout
    (path,) = glob.glob(str(wb / "wandb" / "offline-run-*" / "run-*.wandb"))  # one run: one rank logs
    history, config = {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    events = EventAccumulator(str(tb))
    events.Reload()
    for tag in ("lm loss", "grad-norm", "learning-rate", "validation/lm loss"):
        board = {e.step: e.value for e in events.Scalars(tag)}
        assert board and {step: history[step][tag] for step in board} == pytest.approx(board, rel=1e-6), tag
    assert config["wandb_exp_name"] == {"value": "tiny"} or config["wandb_exp_name"] == "tiny", config.get("wandb_exp_name")
    assert config["hidden_size"] in (64, {"value": 64})


def test_wandb_flags_without_a_project_fail_before_work():
    from megatron_poet.training.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError, match="--wandb-exp-name needs --wandb-project"):
        parse_args(["--wandb-exp-name", "x"], world_size=1)


def test_profile_traces_exactly_the_chosen_steps_with_the_poet_ops(data, tmp_path):
    out = run(data + SHORT + ["--profile", "--profile-step-start", "3", "--profile-step-end", "5", "--profile-ranks",
                              "1", "--profile-dir", str(tmp_path), "--manual-gc", "--manual-gc-interval", "2"], nproc=2)
    assert [os.path.basename(p) for p in glob.glob(str(tmp_path / "*.json"))] == ["rank1.iter3-4.pt.trace.json"]
    trace = json.load(open(tmp_path / "rank1.iter3-4.pt.trace.json"))
    names = {event.get("name", "") for event in trace["traceEvents"]}
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert len(steps) == 2, steps  # iterations 3 and 4, nothing else
    for op in ("poet::rotate_input", "poet::frozen_gemm", "poet::rotate_output"):
        assert op in names, op
    assert any("_RotateInputBackward" in n for n in names)
    assert len(losses(out)) == 6


def test_log_line_times_count_training_iterations_only(data, tmp_path):
    """A save and an evaluation after every iteration take far longer than the iterations; they are
    reported on their own lines and kept out of ms/iteration, and the summary splits the wall time."""
    out = run(data + SHORT + ["--eval-interval", "1", "--eval-iters", "20", "--save", str(tmp_path / "ckpt"),
                              "--save-interval", "1"])
    per_iteration = [float(ms) for ms in re.findall(r"elapsed time per iteration \(ms\): (\S+) ", out.stdout)]
    evaluate = [float(hi) for hi in re.findall(r"evaluate \.+: \(\S+, (\S+)\)", out.stdout)]
    save = [float(hi) for hi in re.findall(r"save-checkpoint \.+: \(\S+, (\S+)\)", out.stdout)]
    assert len(per_iteration) == len(evaluate) == len(save) == 6
    # 20 forward-only eval batches cost several training iterations: left in, they would dominate.
    assert sorted(per_iteration)[3] < 0.5 * sorted(evaluate)[3], (per_iteration, evaluate)
    assert re.search(r"wall time: \S+ \(set-up \S+, training \S+, evaluation \S+, checkpointing \S+\)", out.stdout)
    # the set-up line reports how fast A0 was drawn: this run's A0 elements (4 POET linears per layer)
    from megatron_poet.training.arguments import linear_shapes, parse_args

    args = parse_args(data + SHORT)
    a0 = args.num_layers * sum(d_in * d_out for _, d_in, d_out, _, _ in linear_shapes(args))
    made = re.search(r" model \(([\d,]+) A0 elements of this rank, ([\d.e+-]+)M/s\) ([\d.]+) s", out.stdout)
    assert made and int(made[1].replace(",", "")) == a0 and float(made[2]) > 0, out.stdout


def test_sbatch_example_flags_are_valid_for_its_job(tmp_path):
    """The sbatch example's flags parse for its 2 x 8 tasks (world size 16), with the data it names."""
    from megatron_poet.training.arguments import parse_args

    script = os.path.join(ROOT, "examples", "sbatch_pretrain_gpt_poet.sh")
    for suffix in (".bin", ".idx"):
        (tmp_path / f"corpus{suffix}").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    shell = (f'SLURM_JOB_NAME=job DATA_PATH={tmp_path}/corpus TOKENIZER={tmp_path}/tokenizer.json; '
             f'CHECKPOINT_PATH={tmp_path}/ckpt; eval "$(sed -n "/^FLAGS=(/,/^)/p" {script})"; printf "%s\\n" "${{FLAGS[@]}}"')
    flags = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True).stdout.splitlines()
    args = parse_args(flags, world_size=16)
    assert (args.tensor_model_parallel_size, args.data_parallel_size) == (2, 8) and args.poet_mode == "mem"
