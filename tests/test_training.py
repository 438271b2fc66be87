"""End-to-end tests of the pretraining program (``python -m megatron_poet.training.pretrain``) on CPU.

Every run is a real torchrun (or plain python) subprocess on a tiny Llama-style
model (hidden 64, 2 layers, seq 32, POET block 16) over tinyshakespeare,
tokenized once per session with a locally trained 320-token BPE. The runs share
one checkpoint directory in a fixed order (uninterrupted run, first half,
killed save, resume), each test asserting on its own part.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "4", "--lr", "1e-2", "--poet-lr", "1e-2", "--poet-block-size", "16",
        "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1", "--make-vocab-size-divisible-by", "64"]
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?\| lm loss: (\S+) ")

pytestmark = pytest.mark.skipif(not os.path.isfile(CORPUS), reason=f"corpus {CORPUS} not found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run(args: list[str], nproc: int = 1, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """The pretraining program under torchrun with ``nproc`` CPU processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(_free_port()), "-m", "megatron_poet.training.pretrain", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


def losses(out: subprocess.CompletedProcess) -> dict[int, str]:
    """Iteration -> printed training loss (the exact text, for bitwise comparisons)."""
    return {int(i): loss for i, loss in LOSS.findall(out.stdout)}


RESUME = ["--train-iters", "8", "--poet-merge-interval", "3", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


@pytest.fixture(scope="session")
def uninterrupted(data) -> dict[int, str]:
    """Losses of 8 POET iterations straight (merges after iterations 3 and 6, dropout on)."""
    return losses(run(data + TINY + RESUME))


@pytest.fixture(scope="session")
def first_half(data, tmp_path_factory) -> str:
    """Checkpoint directory after iterations 1-4 of the same run (stopped by --exit-interval)."""
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    out = run(data + TINY + RESUME + ["--save", ckpt, "--save-interval", "2", "--exit-interval", "4"])
    assert "stopping at iteration 4" in out.stdout
    return ckpt


def test_poet_loss_falls(uninterrupted):
    first, last = float(uninterrupted[1]), float(uninterrupted[8])
    assert len(uninterrupted) == 8
    assert last < first - 0.3, uninterrupted


def test_kill_during_save_keeps_previous_checkpoint(data, first_half, tmp_path):
    """SIGKILL while iteration 6 is being saved: the marker stays on 4 and 4 still loads."""
    from megatron_poet.checkpoint import MARKER, latest_iteration

    hung = tmp_path / "in_save"
    driver = tmp_path / "hang_in_save.py"
    driver.write_text(
        "import os, sys, time\n"
        "from megatron.core import dist_checkpointing\n"
        "original = dist_checkpointing.save\n"
        "def save(state, path, *args, **kwargs):\n"
        "    original(state, path, *args, **kwargs)  # every file of iter_0000006 written ...\n"
        f"    open({str(hung)!r}, 'w').close()\n"
        "    time.sleep(600)  # ... killed before the marker moves\n"
        "dist_checkpointing.save = save\n"
        "if __name__ == '__main__':  # dist_checkpointing spawns a helper that imports this file\n"
        "    from megatron_poet.training.pretrain import main\n"
        "    sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(_env(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    args = data + TINY + RESUME + ["--load", first_half, "--save", first_half, "--save-interval", "2"]
    proc = subprocess.Popen([sys.executable, str(driver), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not hung.exists():
            assert proc.poll() is None, "the run ended before saving iteration 6"
            assert time.time() < deadline, "the save of iteration 6 never started"
            time.sleep(0.2)
        assert latest_iteration(first_half) == 4  # the files of 6 exist, the marker is not moved yet
        children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # No helper of the killed rank keeps running (megatron's checkpoint writer used to leave a
    # spawned multiprocessing Manager, ~440 MB, behind; its children exit after writing).
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
    assert os.path.isdir(os.path.join(first_half, "iter_0000006"))
    assert open(os.path.join(first_half, MARKER)).read().strip() == "4"


def test_sigterm_saves_and_stops(data, tmp_path):
    """SIGTERM mid-run: the run finishes its iteration, saves it, moves the marker and exits 0."""
    from megatron_poet.checkpoint import latest_iteration

    ckpt = str(tmp_path / "ckpt")
    env = dict(_env(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")
    args = data + TINY + ["--train-iters", "100000", "--save", ckpt, "--save-interval", "100000"]
    proc = subprocess.Popen([sys.executable, "-m", "megatron_poet.training.pretrain", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in proc.stdout:  # wait for training to be under way
            seen.append(line)
            if LOSS.search(line) and int(LOSS.search(line).group(1)) >= 3:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout = "".join(seen) + out
    stopped = re.search(r"stopping at iteration (\d+) \(a signal\)", stdout)
    assert proc.returncode == 0 and stopped, stdout[-2000:]
    assert f"saved checkpoint at iteration {stopped.group(1)}" in stdout
    assert latest_iteration(ckpt) == int(stopped.group(1))


def test_resume_is_bitwise_identical(data, first_half, uninterrupted):
    """Iterations 5-8 after a load (following the killed save) print the uninterrupted run's losses exactly.

    Tolerance: none; the printed losses (7 significant digits) must be equal
    strings. On CPU with 1 thread the whole computation is deterministic, so any
    difference means a piece of state (optimizer, schedule, RNG, data position,
    POET permutations or merge counter) was not restored.
    """
    out = run(data + TINY + RESUME + ["--load", first_half, "--save", first_half, "--save-interval", "2"])
    assert "resumed from" in out.stdout and "at iteration 4" in out.stdout
    resumed = losses(out)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed == {i: uninterrupted[i] for i in range(5, 9)}


def test_no_poet_baseline_trains_and_logs_to_tensorboard(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run(data + TINY + ["--no-poet", "--train-iters", "6", "--tensorboard-dir", str(tmp_path / "tb")])
    got = losses(out)
    assert "AdamW baseline" in out.stdout
    assert float(got[6]) < float(got[1]) - 0.3, got
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    train_loss = {e.step: e.value for e in events.Scalars("lm loss")}
    assert sorted(train_loss) == [1, 2, 3, 4, 5, 6]
    assert abs(train_loss[6] - float(got[6])) < 1e-5 * float(got[6])  # printed with 7 significant digits
    assert any(tag.startswith("validation") for tag in events.Tags()["scalars"]), events.Tags()["scalars"]


def test_one_model_whatever_the_vocabulary_padding(data, tmp_path):
    """The 320-token vocabulary padded to 384 (TP=2 and PP=2 with --make-vocab-size-divisible-by 64 x TP
    and 128) or not at all (TP=1) trains the same model, and TP=2's iteration-3 checkpoint resumed at
    TP=1 (other padding) continues it: padded rows are zero and masked out of the softmax.

    Before issue 19 the padded logits entered the softmax and the first loss already differed.
    Tolerance 1e-5 relative: the layouts sum the same products in another order (fp32).
    """
    from megatron_poet.checkpoint import write_marker

    ckpt = str(tmp_path / "ckpt")
    common = data + TINY + ["--train-iters", "6", "--poet-merge-interval", "3"]
    out = run(common + ["--tensor-model-parallel-size", "2", "--save", ckpt, "--save-interval", "3"], nproc=2)
    assert "TP 2" in out.stdout and "merges: 2" in out.stdout and "(padded 384)" in out.stdout
    got = {i: float(v) for i, v in losses(out).items()}
    assert got[6] < got[1] - 0.3, got
    layouts = {"TP=1, padded 320": (common, 1),
               "PP=2, padded 384": (common + ["--pipeline-model-parallel-size", "2", "--make-vocab-size-divisible-by",
                                              "128"], 2)}
    for layout, (argv, nproc) in layouts.items():
        other = {i: float(v) for i, v in losses(run(argv, nproc=nproc)).items()}
        assert other.keys() == got.keys() and all(abs(other[i] / got[i] - 1) < 1e-5 for i in got), (layout, other, got)
    write_marker(ckpt, 3)
    resumed = {i: float(v) for i, v in losses(run(common + ["--load", ckpt])).items()}
    assert sorted(resumed) == [4, 5, 6]
    assert all(abs(resumed[i] / got[i] - 1) < 1e-5 for i in resumed), (resumed, got)


def test_data_parallel_2_distributed_optimizer_merge_and_resume(data, tmp_path):
    """DP=2 with the distributed optimizer: merges reset the sharded Adam state, and a run
    resumed from iteration 3 (one step after the first merge) reproduces iterations 4-6 bitwise."""
    from megatron_poet.checkpoint import write_marker

    ckpt = str(tmp_path / "ckpt")
    common = data + TINY + ["--train-iters", "6", "--global-batch-size", "8", "--poet-merge-interval", "2",
                            "--use-distributed-optimizer", "--save", ckpt, "--save-interval", "3"]
    out = run(common, nproc=2)
    straight = losses(out)
    assert "DP 2" in out.stdout and "merges: 3" in out.stdout
    assert float(straight[6]) < float(straight[1]) - 0.3, straight
    write_marker(ckpt, 3)  # resume from the first of the two checkpoints
    resumed = losses(run(common + ["--load", ckpt], nproc=2))
    assert resumed == {i: straight[i] for i in (4, 5, 6)}


def _parse(argv: list[str], world_size: int = 1):
    from megatron_poet.training.arguments import parse_args

    return parse_args(argv, world_size=world_size)


@pytest.mark.parametrize("argv, world, message", [
    (["--hidden-size", "64", "--poet-block-size", "24"], 1, "not divisible by block_size=24"),
    (["--hidden-size", "64", "--ffn-hidden-size", "96", "--poet-block-size", "32",
      "--tensor-model-parallel-size", "2"], 2, "per-rank shard is 48 per part at tensor_model_parallel_size=2"),
    # SwiGLU: fc1's per-rank output 2 x 96 / 4 = 48 is divisible by 16, but its gate and up halves (24) are not.
    (["--hidden-size", "64", "--ffn-hidden-size", "96", "--poet-block-size", "16",
      "--tensor-model-parallel-size", "4"], 4, "'linear_fc1': output_size=192: block_size=16 does not divide"),
    (["--poet-neumann-terms", "-1"], 1, "neumann_terms"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3"),
    (["--num-attention-heads", "6", "--hidden-size", "96", "--tensor-model-parallel-size", "4",
      "--poet-block-size", "8"], 4, "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--micro-batch-size", "4", "--global-batch-size", "12"], 2, "--global-batch-size 12 is not divisible"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2, "--num-layers 3"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs"),
    (["--poet-fp32-master-a0"], 1, "--poet-fp32-master-a0 keeps an fp32 copy of bf16 weights; it needs --bf16"),
    (["--poet-variant", "fs", "--poet-block-size", "96", "--tensor-model-parallel-size", "2"], 2,
     "fully stochastic block_size=96 exceeds the permutation group size 64"),
    (["--poet-neumann-terms", "0"], 1, "neumann_terms must be an integer >= 1"),
    (["--train-iters", "10", "--lr-warmup-iters", "10"], 1, "--lr-warmup-iters 10 < --lr-decay-iters 10"),
    (["--async-save", "--zero-stage", "1", "--save", "ckpt"], 1, "--async-save uses megatron-core's asynchronous"),
    (["--async-save"], 1, "--async-save needs --save DIR"),
    (["--poet-a0-storage", "int8", "--zero-stage", "1"], 1, "--poet-a0-storage int8 is implemented for the megatron"),
    (["--poet-a0-storage", "int8", "--fp8-format", "e4m3"], 1, "would hold a second (FP8) copy of every A0"),
    (["--hidden-size", "64", "--poet-block-size", "16", "--poet-a0-storage", "int8", "--poet-a0-group-size", "48"], 1,
     "input features 64 are not a multiple of the A0 quantization group size 48"),
    (["--hidden-size", "64", "--ffn-hidden-size", "128", "--poet-block-size", "16", "--tensor-model-parallel-size", "2",
      "--poet-permutation-groups", "4", "--poet-a0-storage", "int8", "--poet-a0-group-size", "32"], 2,
     "'linear_proj': input_size=64: the A0 quantization group size 32 does not divide the permutation group size 16"),
])
def test_bad_sizes_fail_before_work(argv, world, message):
    from megatron_poet.training.arguments import ArgumentError

    with pytest.raises(ArgumentError, match=re.escape(message)):
        _parse(argv, world)


def test_bad_input_exits_with_message_before_training():
    """The program itself: exit code 2 and the message, without starting any process group."""
    out = subprocess.run([sys.executable, "-m", "megatron_poet.training.pretrain", "--poet-block-size", "48"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "not divisible by block_size=48" in out.stderr and "--poet-block-size" in out.stderr


def test_load_of_another_model_shape_fails(data, first_half):
    from megatron_poet.checkpoint import MARKER, CheckpointError
    from megatron_poet.training.checkpointing import check_checkpoint_args

    args = _parse(data + TINY + ["--hidden-size", "128", "--load", first_half])
    args.vocab_size_unpadded = 320
    with pytest.raises(CheckpointError, match=r"--hidden-size: checkpoint 64, command line 128"):
        check_checkpoint_args(args)
    same = _parse(data + TINY + ["--load", first_half])
    same.vocab_size_unpadded = 320
    with open(os.path.join(first_half, MARKER)) as f:  # earlier tests may have moved it past 4
        marked = int(f.read())
    assert check_checkpoint_args(same) == marked
