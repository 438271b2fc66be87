"""The example script and its launcher as a first-time user meets them, on CPU.

Runs ``examples/pretrain_gpt_poet.sh`` both ways (``torchrun script`` and ``bash
script``) on the tiny model of ``test_training.py``, with the flags after the file
name overriding the script's defaults: first-run checkpoint directory, summary,
no library warnings, free ports for two runs at once, a two-"node" run against the
one-node run, Ctrl-C, a killed launcher, errors printed once. The remaining tests
check arguments, ``--help``, the launcher's environment and the README in-process.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import signal
import subprocess
import sys

import psutil
import pytest
from test_training import CORPUS, LOSS, TINY, _env, _free_port, losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_gpt_poet.sh")
# TINY overrides the script's model; a smaller FFN and batch keep each run to seconds.
SMALL = TINY + ["--ffn-hidden-size", "128", "--global-batch-size", "8"]
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "GPUS_PER_NODE", "DATA_PATH", "TOKENIZER",
              "CHECKPOINT_PATH", "TENSORBOARD_DIR", "RANK", "LOCAL_RANK", "WORLD_SIZE")
needs_corpus = pytest.mark.skipif(not os.path.isfile(CORPUS), reason=f"corpus {CORPUS} not found")


def script_env(**variables) -> dict:
    env = {k: v for k, v in _env().items() if k not in LAUNCH_ENV}
    env.update({k: str(v) for k, v in variables.items()})
    return env


def start(args: list[str], merge_stderr: bool = False, **variables) -> subprocess.Popen:
    """``bash examples/pretrain_gpt_poet.sh ARGS`` with the launch variables given (others unset)."""
    return subprocess.Popen(["bash", SCRIPT, *args], cwd=ROOT, env=script_env(**variables), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err or "")


def no_noise(out: subprocess.CompletedProcess) -> None:
    text = out.stdout + out.stderr
    assert "Warning" not in text and "Traceback" not in text and "ChildFailedError" not in text, text[-3000:]


def wait_for_iteration(proc: subprocess.Popen, iteration: int) -> list[str]:
    """Lines read until the log line of ``iteration`` (stdout merged with stderr)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = LOSS.search(line)
        if match and int(match.group(1)) >= iteration:
            return seen
    raise AssertionError("the run ended before training:\n" + "".join(seen)[-3000:])


@pytest.fixture(scope="module")
def data_env(data) -> dict:
    """DATA_PATH/TOKENIZER of the session's data, and its index cache as a flag."""
    flags = dict(zip(data[::2], data[1::2]))
    return {"DATA_PATH": flags["--data-path"], "TOKENIZER": flags["--tokenizer-model"],
            "cache": ["--data-cache-path", flags["--data-cache-path"]]}


@pytest.fixture(scope="module")
def torchrun_run(data_env, tmp_path_factory):
    """``torchrun examples/pretrain_gpt_poet.sh`` for 4 iterations, saving to a directory that does not exist."""
    root = tmp_path_factory.mktemp("torchrun")
    ckpt = root / "not-yet" / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
           str(_free_port()), SCRIPT, *SMALL, *data_env["cache"], "--train-iters", "4"]
    env = script_env(DATA_PATH=data_env["DATA_PATH"], TOKENIZER=data_env["TOKENIZER"], CHECKPOINT_PATH=ckpt,
                     TENSORBOARD_DIR=root / "tb")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return str(ckpt), str(root / "tb"), out


@needs_corpus
def test_torchrun_runs_the_script_itself(torchrun_run):
    """The file is each rank's program; flags override its defaults; the summary says where things are."""
    ckpt, tb, out = torchrun_run
    assert out.returncode == 0, out.stderr[-3000:]
    no_noise(out)
    assert out.stdout.startswith(" megatron_poet pretraining: POET")  # the first line is ours
    assert f"no checkpoint in {ckpt} yet: training from scratch" in out.stdout
    assert sorted(losses(out)) == [1, 2, 3, 4]  # --train-iters 4 beat the script's 300
    summary = out.stdout[out.stdout.index("run summary"):]
    assert "iterations: 4 in this run (1-4); 1,024 tokens" in summary  # 4 x global batch 8 x seq 32
    assert re.search(r"wall time: \d+:\d\d:\d\d", summary)
    assert re.search(r"final train loss: \S+ \| PPL: \S+ \(iteration 4\)", summary)
    assert re.search(r"final validation loss: \S+ \| PPL: \S+ \(iteration 4\)", summary)
    assert f"checkpoint: {os.path.join(ckpt, 'iter_0000004')}" in summary
    assert f"TensorBoard: tensorboard --logdir {tb}" in summary


@pytest.fixture(scope="module")
def one_node_dp2(data, data_env, torchrun_run):
    """Two launches at once, neither with MASTER_PORT: 2 ranks from scratch, and 1 rank resuming
    the torchrun run's checkpoint (through CHECKPOINT_PATH) to iteration 6."""
    ckpt = torchrun_run[0]
    two_ranks = start(SMALL + data + ["--train-iters", "4"], GPUS_PER_NODE=2)
    resume = start(SMALL + data_env["cache"] + ["--train-iters", "6"], GPUS_PER_NODE=1, CHECKPOINT_PATH=ckpt,
                   DATA_PATH=data_env["DATA_PATH"], TOKENIZER=data_env["TOKENIZER"])
    return finish(two_ranks), finish(resume), ckpt


@needs_corpus
def test_two_runs_at_once_on_free_ports(one_node_dp2):
    two_ranks, resume, ckpt = one_node_dp2
    for out in (two_ranks, resume):
        assert out.returncode == 0, out.stderr[-3000:]
        no_noise(out)  # the resume loads a checkpoint: torch's deprecation notices are filtered too
    ports = [re.search(r"rendezvous 127\.0\.0\.1:(\d+)", out.stdout).group(1) for out in (two_ranks, resume)]
    assert ports[0] != ports[1]
    assert "DP 2" in two_ranks.stdout and sorted(losses(two_ranks)) == [1, 2, 3, 4]
    assert f"resumed from {ckpt} at iteration 4" in resume.stdout and sorted(losses(resume)) == [5, 6]


@needs_corpus
def test_two_nodes_train_like_one_node(data, one_node_dp2):
    """NNODES=2 on one machine (two launchers, one rank each, gloo) prints the one-node run's losses
    exactly: the same ranks compute the same sums in the same order."""
    port = _free_port()
    nodes = [start(SMALL + data + ["--train-iters", "4"], NNODES=2, NODE_RANK=rank, MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, GPUS_PER_NODE=1) for rank in (0, 1)]
    node0, node1 = (finish(node) for node in nodes)
    for out in (node0, node1):
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"world size 2), rendezvous 127.0.0.1:{port}" in out.stdout
    assert "node 1 of 2" in node1.stdout and "DP 2" in node1.stdout
    assert losses(node1) == losses(one_node_dp2[0])  # the last rank logs


@needs_corpus
def test_ctrl_c_saves_and_stops_every_rank(data, tmp_path):
    from megatron_poet.checkpoint import latest_iteration

    ckpt = str(tmp_path / "ckpt")
    proc = start(SMALL + data + ["--train-iters", "100000"], merge_stderr=True, GPUS_PER_NODE=2,
                 CHECKPOINT_PATH=ckpt)
    try:
        seen = wait_for_iteration(proc, 2)
        ranks = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (the ranks sit in their own process groups)
        out = "".join(seen) + finish(proc, timeout=180).stdout
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    stopped = int(re.search(r"stopping at iteration (\d+) \(a signal\)", out).group(1))
    assert f"saved checkpoint at iteration {stopped}" in out and latest_iteration(ckpt) == stopped
    assert f"stopped early at iteration {stopped} of 100000" in out
    assert out.rstrip().endswith("launcher: stopped on SIGINT; every rank has exited")
    assert "Traceback" not in out
    assert len(ranks) >= 2 and not psutil.wait_procs(ranks, timeout=10)[1]


@needs_corpus
def test_killed_launcher_leaves_no_rank(data):
    proc = start(SMALL + data + ["--train-iters", "100000"], merge_stderr=True, GPUS_PER_NODE=1)
    try:
        wait_for_iteration(proc, 1)
        ranks = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()  # SIGKILL: the launcher cannot clean up; the ranks must go by themselves
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert ranks
    _, alive = psutil.wait_procs(ranks, timeout=15)
    assert not alive, [" ".join(p.cmdline()) for p in alive]


@needs_corpus
def test_errors_print_once_before_work(data, torchrun_run, tmp_path):
    ckpt = torchrun_run[0]
    cache = tmp_path / "cache"
    # A checkpoint of another shape: reported before the sample indices are built, by rank 0 only.
    out = finish(start(SMALL + data + ["--hidden-size", "128", "--load", ckpt, "--data-cache-path", str(cache)],
                       GPUS_PER_NODE=2))
    assert out.returncode == 2
    assert out.stderr.count("holds a model of another shape") == 1, out.stderr
    assert "--hidden-size: checkpoint 64, command line 128" in out.stderr
    no_noise(out)
    assert not cache.exists() or not any(cache.rglob("*.npy"))
    # An argument error, from both ranks' point of view, printed once.
    out = finish(start(SMALL + data + ["--model-style", "gpt2", "--max-position-embeddings", "16"], GPUS_PER_NODE=2))
    assert out.returncode == 2
    assert out.stderr.count("--seq-length 32 > --max-position-embeddings 16") == 1, out.stderr
    no_noise(out)
    # A launch variable missing: no rank starts.
    out = finish(start([], DATA_PATH="some/prefix"))
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: set TOKENIZER to the tokenizer DATA_PATH was preprocessed with (a tokenizer.json or its directory)")
    assert out.stdout == ""


def _example_flags(name: str) -> list[str]:
    """``FLAGS`` of an example script, read as the Python program it also is."""
    path = os.path.join(ROOT, "examples", name)
    loader = importlib.machinery.SourceFileLoader(name.replace(".sh", ""), path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module.FLAGS


@pytest.mark.parametrize("name, world, extra", [
    ("pretrain_gpt_poet.sh", 1, ["--train-iters", "10"]),  # a short run fits the default warmup
    ("pretrain_llama_1b_h100.sh", 1, ["--data-path", "d", "--tokenizer-model", "t"]),
    ("pretrain_llama_8b_multinode.sh", 32, ["--data-path", "d", "--tokenizer-model", "t"]),
])
def test_example_defaults_are_valid(name, world, extra):
    from megatron_poet.training.arguments import parse_args

    args = parse_args(_example_flags(name) + extra, world_size=world)
    assert args.lr_warmup_iters < args.lr_decay_iters


def test_positions_and_first_run_directories():
    from megatron_poet.training.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError, match=r"--seq-length 64 > --max-position-embeddings 32: the gpt2 style"):
        parse_args(["--model-style", "gpt2", "--seq-length", "64", "--max-position-embeddings", "32"], world_size=1)
    parse_args(["--seq-length", "64", "--max-position-embeddings", "32"], world_size=1)  # RoPE has no table
    parse_args(["--save", "no/such/dir", "--load", "no/such/dir"], world_size=1)  # created by the first save
    with pytest.raises(ArgumentError, match="--load no/such/dir: no such directory"):
        parse_args(["--load", "no/such/dir"], world_size=1)


def test_help_documents_every_flag():
    from megatron_poet.training.arguments import build_parser

    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = formatter._expand_help(action)
        assert text.count("default:") == 1, (action.option_strings, text)  # shown, and not twice
        assert not text.startswith("(default"), (action.option_strings, "no explanation")
    helps = {a.dest: a for a in parser._actions}
    for dest in ("poet_init", "poet_mode", "poet_variant"):
        assert helps[dest].choices and all(f"{c}" in helps[dest].help for c in helps[dest].choices)
    out = subprocess.run(["bash", SCRIPT, "--help"], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("examples/pretrain_gpt_poet.sh runs the program with these flags before yours")
    assert "--poet-init {normalized,standard,xavier,uniform_spectrum}" in out.stdout
    launch_help = out.stdout[out.stdout.index("how to launch"):]
    assert "torchrun --nproc-per-node N examples/pretrain_gpt_poet.sh" in launch_help and "MASTER_PORT" in launch_help


def test_launch_environment():
    from megatron_poet.launch import LaunchError, Topology, topology_from_env

    one = topology_from_env({"GPUS_PER_NODE": "2"})
    assert (one.nproc_per_node, one.nnodes, one.world_size) == (2, 1, 2) and one.master_port > 0
    assert topology_from_env({"GPUS_PER_NODE": "1", "MASTER_PORT": "1234"}).master_port == 1234
    assert topology_from_env({"GPUS_PER_NODE": "8", "NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "n0"}) == \
        Topology(8, 4, 3, "n0", 29500)
    with pytest.raises(LaunchError, match="NNODES=2: set NODE_RANK and MASTER_ADDR on every node"):
        topology_from_env({"GPUS_PER_NODE": "1", "NNODES": "2"})
    with pytest.raises(LaunchError, match=r"NODE_RANK=2 is not in 0\.\.1"):
        topology_from_env({"GPUS_PER_NODE": "1", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "n0"})


def test_readme_is_self_contained_and_ci_runs_its_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    quick_start = readme[readme.index("## Quick start"):readme.index("\n## ", readme.index("## Quick start") + 1)]
    commands = re.findall(r"^    (pip install .*)$", quick_start, flags=re.M)
    assert len(commands) == 2 and "-rs" in commands[1]  # the main job; the tests, printing skip reasons
    assert commands[1] in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    for target in re.findall(r"\]\(([^)#]+)\)", readme) + re.findall(r"`((?:docs|examples|tools)/[\w./]+)`", readme):
        assert os.path.exists(os.path.join(ROOT, target)), target
    assert "../" not in readme
