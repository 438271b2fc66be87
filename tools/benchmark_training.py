#!/usr/bin/env python
"""Training-step time of POET fast, POET mem and AdamW through the training program, side by side.

Each method runs the real program (``megatron_poet.launch``: data, model, engine, optimizer, the log
line) at the same shape, for each micro-batch count, ``--repeats`` times; the runs alternate
(method by method, repeat by repeat), so a machine whose speed drifts slows all of them alike. Read
from each run: the median ms/iteration after ``--warmup`` iterations, tokens/s, and the set-up
before the first iteration; one extra profiled iteration per method and micro-batch count splits the
step into phases (``torch.profiler``, the program's ``--profile``): the frozen/dense GEMMs, POET's
rotations (permutations included), Cayley–Neumann (forward and its once-per-step differentiation),
mem mode's recomputing linears, the optimizer, communication, and the rest (attention, norms,
embeddings, loss). Prints Markdown tables::

    python tools/benchmark_training.py                                  # the shape of issue 20, CPU
    python tools/benchmark_training.py --micro-batches 1 4 8 --repeats 3
    python tools/benchmark_training.py --methods fast adamw -- --bf16   # flags after -- go to every run
    python tools/benchmark_training.py --methods fast fast-batched adamw -- --num-experts 8 --moe-ffn-hidden-size 1536
    python tools/benchmark_training.py --methods fast fast-compiled adamw adamw-compiled   # eager vs --compile

Defaults: Llama-style hidden 2048, 4 layers, ffn 5632, 16 heads, seq 512, vocabulary 8192 (mock
data), micro-batch 1, POET block 256, fp32, 1 rank. Not a test: minutes per run at these shapes.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
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
         "--num-attention-heads", "16", "--seq-length", "512", "--max-position-embeddings", "512",
         "--micro-batch-size", "1", "--mock-data", "--vocab-size", "8192", "--poet-block-size", "256",
         "--lr", "1e-4", "--poet-merge-interval", "100000", "--log-interval", "1", "--eval-iters", "0"]
METHODS = {"adamw": ["--no-poet"], "fast": ["--poet-mode", "fast"], "mem": ["--poet-mode", "mem"],
           # mixture of experts (with -- --num-experts N ...): POET experts computed batched, not one by one
           "fast-batched": ["--poet-mode", "fast", "--moe-grouped-gemm"],
           "mem-batched": ["--poet-mode", "mem", "--moe-grouped-gemm"]}
METHODS.update({f"{name}-compiled": [*METHODS[name], "--compile"] for name in ("adamw", "fast", "mem")})  # (not MoE)
ITERATION_MS = re.compile(r"elapsed time per iteration \(ms\): ([\d.]+)")
TOKENS = re.compile(r"tokens/s/GPU: ([\d.]+)")
SETUP = re.compile(r"^ set-up ([\d.]+) s: (.*)$", re.M)
# Profiler event -> phase; only the outermost matching event counts (nested ones are inside it).
PHASES = [
    ("Cayley–Neumann", ("poet::cayley_neumann",)),
    ("POET rotations", ("poet::rotate_input", "poet::rotate_output", "_RotateInputBackward", "_RotateOutputBackward")),
    ("POET mem linear (rotations + GEMM, recomputed)", ("poet::recomputed_linear", "_RecomputedPOETLinearBackward")),
    ("frozen A0 GEMM", ("poet::frozen_gemm", "_FrozenLinearBackward")),
    ("dense GEMMs (Megatron linears, attention)", ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm",
                                                   "aten::bmm", "aten::baddbmm", "LinearWithGradAccumulation",
                                                   "MmBackward", "AddmmBackward", "BmmBackward", "BaddbmmBackward")),
    ("optimizer", ("Optimizer.step", "Optimizer.zero_grad")),
    ("communication", ("gloo:", "nccl:", "c10d::", "record_param_comms")),
]


def _phase(name: str) -> str | None:
    for phase, patterns in PHASES:
        if any(p in name for p in patterns):
            return phase
    return None


def profile_phases(trace_file: str) -> dict[str, float]:
    """ms per phase of the one profiled iteration in a Chrome trace (outermost matching events)."""
    with open(trace_file) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    step = [e for e in events if e["name"].startswith("ProfilerStep#")]
    totals = collections.Counter()
    for thread in {e.get("tid") for e in events}:
        open_until = -1.0  # end of the outermost counted event on this thread
        for e in sorted((e for e in events if e.get("tid") == thread), key=lambda e: (e["ts"], -e["dur"])):
            phase = _phase(e["name"])
            if phase and e["ts"] >= open_until:
                totals[phase] += e["dur"] / 1000
                open_until = e["ts"] + e["dur"]
    step_ms = sum(e["dur"] for e in step) / 1000
    totals["rest (attention, norms, embeddings, loss, ...)"] = max(0.0, step_ms - sum(totals.values()))
    totals["step"] = step_ms
    return dict(totals)


def run(method: str, micro_batches: int, iterations: int, extra: list[str], work: str, profile: bool) -> dict:
    """One training run; the iteration times, tokens/s, set-up and (``profile``) the phases."""
    argv = SHAPE + ["--global-batch-size", str(micro_batches), "--train-iters", str(iterations)] + METHODS[method] + extra
    trace_dir = os.path.join(work, f"trace_{method}_{micro_batches}")
    if profile:
        argv += ["--profile", "--profile-step-start", str(iterations), "--profile-step-end", str(iterations + 1),
                 "--profile-dir", trace_dir]
    env = dict(os.environ, GPUS_PER_NODE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "megatron_poet.launch", *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{method} x{micro_batches} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    ms = [float(x) for x in ITERATION_MS.findall(out.stdout)]
    tokens = [float(x) for x in TOKENS.findall(out.stdout)]
    setup = SETUP.search(out.stdout)
    result = {"ms": ms, "tokens": tokens, "setup": float(setup.group(1)), "setup_phases": setup.group(2)}
    if profile:
        (trace,) = glob.glob(os.path.join(trace_dir, "*.json"))
        result["phases"] = profile_phases(trace)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["fast", "mem", "adamw"])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4], help="micro-batches per step")
    parser.add_argument("--iterations", type=int, default=4, help="iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="iterations left out of the median")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method and micro-batch count")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-phase profile")
    parser.add_argument("extra", nargs="*", help="flags for every run (after --)")
    args = parser.parse_args(argv)
    results: dict = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as work:
        for mb in args.micro_batches:
            for repeat in range(args.repeats + args.profile):
                profiling = args.profile and repeat == args.repeats
                order = args.methods if repeat % 2 == 0 else list(reversed(args.methods))
                for method in order:
                    r = run(method, mb, args.iterations if not profiling else args.warmup + 1, args.extra, work,
                            profiling)
                    results[method, mb].append(r)
                    print(f" {method} x{mb} run {repeat + 1}{' (profiled)' if profiling else ''}: ms/iteration "
                          f"{r['ms']}, set-up {r['setup']:.1f} s", file=sys.stderr, flush=True)
    print(f"\nTraining step ({platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; flags: "
          f"{' '.join(SHAPE + args.extra)}; median after {args.warmup} warm-up iteration(s), {args.repeats} "
          f"alternating runs)\n")
    base = "adamw" if "adamw" in args.methods else None
    print("| micro-batches | method | ms/iteration | tokens/s | vs AdamW | set-up (s) | set-up vs AdamW |")
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for (method, mb), runs in results.items():
        timed = [r for r in runs if "phases" not in r]
        medians[method, mb] = (statistics.median(ms for r in timed for ms in r["ms"][args.warmup:]),
                               statistics.median(t for r in timed for t in r["tokens"][args.warmup:]),
                               statistics.median(r["setup"] for r in runs))
    for mb in args.micro_batches:
        for method in args.methods:
            ms, tokens, setup = medians[method, mb]
            ratio = f"{ms / medians[base, mb][0]:.2f}×" if base else "n/a"
            setup_ratio = f"{setup / medians[base, mb][2]:.2f}×" if base else "n/a"
            print(f"| {mb} | {method} | {ms:.0f} | {tokens:.0f} | {ratio} | {setup:.1f} | {setup_ratio} |")
    if args.profile:
        print("\nOne profiled iteration per run (ms; the profiler's overhead included, so the step is slower "
              "than above):\n")
        phases = [p for p, _ in PHASES] + ["rest (attention, norms, embeddings, loss, ...)", "step"]
        print("| micro-batches | method | " + " | ".join(phases) + " |")
        print("|---|---|" + "---|" * len(phases))
        for mb in args.micro_batches:
            for method in args.methods:
                got = next(r["phases"] for r in results[method, mb] if "phases" in r)
                print(f"| {mb} | {method} | " + " | ".join(f"{got.get(p, 0.0):.0f}" for p in phases) + " |")
        print("\nSet-up phases (last run of each method):\n")
        for mb in args.micro_batches[:1]:
            for method in args.methods:
                print(f"- {method}: {results[method, mb][-1]['setup_phases']}")


if __name__ == "__main__":
    main()
