"""``--async-save``: checkpoints written in the background by megatron-core's asynchronous
dist_checkpointing while training goes on (DP=2, the distributed optimizer, the tiny model of
test_training.py).

One run trains 8 iterations with saves after 3 and 6. The save of iteration 3 completes in the
background; the writers of iteration 6 never finish (:mod:`_stalled_save_driver`), so the run waits for
them at its end, where the test kills it with SIGKILL. The marker must still name iteration 3, and a run
resumed from it must print the killed run's losses of iterations 4-8 exactly (CPU, 1 thread: the whole
computation is deterministic, so anything but equal strings is lost or misplaced state).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from test_training import ROOT, TINY, _env, _free_port, losses, run

FLAGS = TINY + ["--train-iters", "8", "--poet-merge-interval", "3", "--global-batch-size", "8",
                "--use-distributed-optimizer", "--save-interval", "3", "--async-save"]


def _run_until_killed(argv: list[str], env: dict, until: str) -> str:
    """Start 2 ranks of the stalled-save driver, SIGKILL the launcher once ``until`` is printed
    (the ranks die with it, their writers with them); returns what it printed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           os.path.join(ROOT, "tests", "_stalled_save_driver.py"), *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = []
    try:
        for line in proc.stdout:
            printed.append(line)
            if until in line:
                break
        else:
            raise AssertionError("the run ended before " + repr(until) + ":\n" + "".join(printed)[-4000:])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    return "".join(printed)


def test_background_save_resumes_bitwise_and_survives_a_kill_mid_write(data, tmp_path):
    from megatron_poet.checkpoint import latest_iteration

    ckpt = str(tmp_path / "ckpt")
    argv = data + FLAGS + ["--save", ckpt]
    killed = _run_until_killed(argv, dict(_env(), STALL_SAVE_FROM="6"), until="iteration        8/")
    assert "saving checkpoint at iteration 3" in killed and "iter_0000003 (background write complete)" in killed
    assert "saving checkpoint at iteration 6" in killed and "iter_0000006 (background write complete)" not in killed
    straight = losses(type("Out", (), {"stdout": killed}))
    assert sorted(straight) == list(range(1, 9)), straight
    assert latest_iteration(ckpt) == 3  # the interrupted write never moved the marker
    assert not os.path.exists(os.path.join(ckpt, "iter_0000006", "manifest.json"))

    resumed = run(argv + ["--load", ckpt], nproc=2)
    assert "resumed from" in resumed.stdout and "at iteration 3" in resumed.stdout
    assert losses(resumed) == {i: straight[i] for i in range(4, 9)}
    # The partial iteration-6 directory was written again, and the run waited for its last save.
    assert "iter_0000006 (background write complete)" in resumed.stdout
    assert "wait-for-background-save" in resumed.stdout and latest_iteration(ckpt) == 8
