#!/usr/bin/env python
"""How long the training loop is blocked per checkpoint save: synchronous vs ``--async-save``.

Runs the pretraining program (through :mod:`megatron_poet.launch`) at a shape whose checkpoint is
over 1 GB, once per mode and ``--repeats`` times, alternating the modes, and reads Megatron's timer
lines it prints: ``save-checkpoint`` (the loop is blocked for this long at every save: the non-finite
check and the whole write when synchronous; the check, staging and forking the writer when
asynchronous), ``finalize-background-save`` (the iteration that learns every rank's write is done
finalizes it; the manifest's reading happens in a thread) and ``wait-for-background-save`` (the end
of an asynchronous run waits for its last write). Prints one Markdown table::

    python tools/benchmark_checkpoint.py                       # Llama h2048 x 4 layers, vocab 32000: ~1.4 GB
    python tools/benchmark_checkpoint.py --nproc 2 -- --use-distributed-optimizer

Flags after ``--`` go to the training program (they override the shape below). Not a test: it
takes minutes and several GB of memory and disk (``--work-dir``, default a temporary directory).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["--model-style", "llama", "--num-layers", "4", "--hidden-size", "2048", "--ffn-hidden-size", "5632",
         "--num-attention-heads", "16", "--seq-length", "128", "--max-position-embeddings", "128",
         "--micro-batch-size", "1", "--global-batch-size", "1", "--mock-data", "--vocab-size", "32000",
         "--poet-block-size", "256", "--lr", "1e-4", "--train-iters", "9", "--save-interval", "3", "--log-interval", "1",
         "--eval-iters", "0"]
TIMER = re.compile(r"^\s+(save-checkpoint|finalize-background-save|wait-for-background-save) \.+: "
                   r"\(([\d.]+), ([\d.]+)\)", re.M)
ITERATION_MS = re.compile(r"elapsed time per iteration \(ms\): ([\d.]+)")


def _directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def run_once(mode: str, nproc: int, work_dir: str, extra: list[str]) -> dict:
    """One training run; returns the blocked times (ms, max over ranks) and the checkpoint size."""
    ckpt = os.path.join(work_dir, f"ckpt_{mode}")
    subprocess.run(["rm", "-rf", ckpt], check=True)
    argv = SHAPE + ["--save", ckpt] + (["--async-save"] if mode == "async" else []) + extra
    env = dict(os.environ, GPUS_PER_NODE=str(nproc), PYTHONPATH=ROOT)
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "megatron_poet.launch", *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall = time.time() - start
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    timers = TIMER.findall(out.stdout)
    saves = [float(hi) for name, _, hi in timers if name == "save-checkpoint"]
    finalize = [float(hi) for name, _, hi in timers if name == "finalize-background-save"]
    waits = [float(hi) for name, _, hi in timers if name == "wait-for-background-save"]
    latest = sorted(d for d in os.listdir(ckpt) if d.startswith("iter_"))[-1]
    iteration_ms = [float(ms) for ms in ITERATION_MS.findall(out.stdout)]
    return {"saves": saves, "finalize": finalize, "wait": sum(waits), "bytes": _directory_bytes(os.path.join(ckpt, latest)),
            "iteration_ms": statistics.median(iteration_ms[1:] or iteration_ms), "wall": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=1, help="ranks (GPUS_PER_NODE of the launcher)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    parser.add_argument("--work-dir", default=None, help="where checkpoints are written (default: a temporary dir)")
    parser.add_argument("extra", nargs="*", help="flags for the training program (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work_dir:
        results = {"sync": [], "async": []}
        for repeat in range(args.repeats):
            for mode in ("sync", "async") if repeat % 2 == 0 else ("async", "sync"):
                results[mode].append(run_once(mode, args.nproc, work_dir, args.extra))
                print(f" {mode} run {repeat + 1}: saves (ms) {results[mode][-1]['saves']}", file=sys.stderr, flush=True)
    print(f"\nCheckpoint save: training loop blocked per save ({platform.node()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}, {args.nproc} rank(s), flags: {' '.join(SHAPE + args.extra)})\n")
    print("| mode | checkpoint | saves | save call, median (ms) | max (ms) | finalize, median (ms) "
          "| end-of-run wait (ms) | median iteration (ms) | run wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, runs in results.items():
        saves = [s for r in runs for s in r["saves"]]
        finalize = [s for r in runs for s in r["finalize"]]
        print(f"| {mode} | {runs[0]['bytes'] / 2**30:.2f} GiB | {len(saves)} | {statistics.median(saves):.0f} | "
              f"{max(saves):.0f} | {statistics.median(finalize) if finalize else 0:.0f} | "
              f"{statistics.median(r['wait'] for r in runs):.0f} | "
              f"{statistics.median(r['iteration_ms'] for r in runs):.0f} | {statistics.median(r['wall'] for r in runs):.1f} |")


if __name__ == "__main__":
    main()
