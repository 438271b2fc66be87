#!/usr/bin/env python
"""The largest Llama that trains within a memory budget, per method: AdamW, POET with bf16 ``A0``, POET
with 8-bit ``A0`` (each with this stack's best memory flags).

For each method the ladder of Llama shapes (vocabulary 32000) is climbed from the smallest: a shape
whose ledger prediction (:mod:`megatron_poet.memory_ledger`, plus this machine's process baseline,
measured with AdamW on the smallest shape of the ladder) exceeds the budget ends the method's climb; otherwise the training
program (through :mod:`megatron_poet.launch`) trains two iterations and saves, a second run resumes
from the save for one more iteration, and ``tools/convert_to_hf.py`` exports the checkpoint. Each of
the three processes' peak resident memory (``wait4``'s ``ru_maxrss``, the launcher and its ranks)
must stay within the budget, and the losses must be finite. Prints one Markdown table: shape,
parameters, method and flags, fits, measured peaks (train / resume / export), the prediction of the
training peak (a step or the save after it) and its error (against the larger of train and resume),
seconds per iteration.

Flags of every run: bf16, the distributed optimizer, SDPA attention, full recomputation of every
layer, micro-batch 1 (one micro-batch per step), ``--poet-mode mem``, POET block 256; environment:
glibc's ``MALLOC_ARENA_MAX=2 MALLOC_TRIM_THRESHOLD_=0`` unless set otherwise (freed memory goes back to
the system; a launch without them may peak higher)::

    python tools/largest_model.py --memory-budget-gib 8 --seq-length 256
    python tools/largest_model.py --dry-run                 # predictions only, this machine's memory

Not a test: the upper rungs take many minutes and most of the memory; run one at a time.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_poet.memory_ledger import LADDER, MOE, computed_ledger, parameter_count, unpack  # noqa: E402

GiB = 2**30
# (layers, hidden, ffn, heads, key/value heads, vocabulary): steps below 1B so AdamW's limit is found
# (every size a multiple of the POET block 256), then the ledger's ladder (POET-X 3B ... Llama-2-70B).
LADDER_SHAPES = {
    "L-120M": (12, 768, 2048, 12, 12, 32000), "L-350M": (24, 1024, 2816, 16, 16, 32000),
    "L-750M": (24, 1536, 4096, 16, 16, 32000), "L-1.3B": (24, 2048, 5632, 16, 16, 32000), **LADDER,
}
# Mixture-of-experts twins (every layer 8 experts of the dense MLP's width, top-2), climbed only when named.
MOE_SHAPES = {f"{name}-MoE8": (*LADDER_SHAPES[name], 8, 2) for name in ("L-120M", "L-350M")} | {
    f"{name}-MoE8": config for name, config in MOE.items()}
SHAPES = {**LADDER_SHAPES, **MOE_SHAPES}
BLOCK = 256
COMMON = ["--bf16", "--use-distributed-optimizer", "--recompute-granularity", "full", "--recompute-method", "uniform",
          "--recompute-num-layers", "1", "--micro-batch-size", "1", "--global-batch-size", "1", "--mock-data",
          "--vocab-size", "32000", "--log-interval", "1", "--eval-iters", "0", "--lr", "1e-4"]
METHODS = {  # name: (ledger method, A0 storage, program flags)
    "AdamW": ("AdamW", "native", ["--no-poet"]),
    "POET bf16 A0": ("POET mem", "native", ["--poet-mode", "mem", "--poet-block-size", str(BLOCK)]),
    "POET int8 A0": ("POET mem", "int8", ["--poet-mode", "mem", "--poet-block-size", str(BLOCK),
                                          "--poet-a0-storage", "int8"]),
}
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([\d.]+).*?\| lm loss: (\S+) ")


def shape_flags(config: tuple, seq: int) -> list[str]:
    layers, hidden, ffn, heads, kv_heads, _, experts, topk = unpack(config)
    moe = ["--num-experts", str(experts), "--moe-router-topk", str(topk)] if experts else []
    return ["--model-style", "llama", "--num-layers", str(layers), "--hidden-size", str(hidden),
            "--ffn-hidden-size", str(ffn), "--num-attention-heads", str(heads), "--num-query-groups", str(kv_heads),
            "--seq-length", str(seq), "--max-position-embeddings", str(seq), *moe]


def run_measured(argv: list[str], log: str) -> tuple[int, int, str]:
    """``(exit code, peak RSS bytes of the process tree, output)`` of ``python argv`` (output to ``log``)."""
    # glibc returns freed memory at once (no per-thread arenas holding it): see docs/DEEPSPEED.md
    env = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "0", **os.environ, "GPUS_PER_NODE": "1",
           "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the largest of the process and its waited children
        proc.returncode = os.waitstatus_to_exitcode(status)
    with open(log) as f:
        return proc.returncode, usage.ru_maxrss * 1024, f.read()


def predicted_bytes(config: tuple, method: str, seq: int, baseline: float) -> float:
    """The ledger's peak of a training step or of the checkpoint save after it (whichever is larger), plus
    the process ``baseline``. Checkpoints take every ``A0`` in place
    (``megatron_poet.megatron.layer_checkpoint.canonical_a0``), so a save adds no copy of them; megatron's
    writer copies the parameters (``Ledger.save_peak``)."""
    ledger_method, storage, _ = METHODS[method]
    ledger = computed_ledger(config, 1, 1, ledger_method, seq, 1, BLOCK, storage=storage, recompute=True,
                             microbatches=1)
    return max(ledger.peak, ledger.save_peak) + baseline


def try_shape(name: str, method: str, seq: int, work: str) -> dict:
    """Train 2 iterations + save, resume 1 more, export: peaks, losses, seconds per iteration."""
    flags = COMMON + shape_flags(SHAPES[name], seq) + METHODS[method][2]
    ckpt, hf = os.path.join(work, "ckpt"), os.path.join(work, "hf")
    program = ["-m", "megatron_poet.launch", *flags, "--save", ckpt, "--save-interval", "2"]
    result = {"peaks": [], "losses": {}, "seconds": math.nan, "error": ""}
    steps = [(program + ["--train-iters", "2"], "train"), (program + ["--train-iters", "3", "--load", ckpt], "resume"),
             (["tools/convert_to_hf.py", "--load", ckpt, "--output", hf, "--dtype", "bf16"], "export")]
    for argv, what in steps:
        code, peak, out = run_measured(argv, os.path.join(work, f"{what}.log"))
        result["peaks"].append(peak)
        for it, ms, loss in LOSS.findall(out):
            result["losses"][int(it)] = float(loss)
            if what == "train" and it == "2":
                result["seconds"] = float(ms) / 1000
        if code != 0:
            last = out.strip().splitlines()[-1][:200] if out.strip() else "no output"
            result["error"] = f"{what} exited {code}: {last}"
            break
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(hf, ignore_errors=True)
    return result


def climb(methods: list[str], names: list[str], seq: int, budget: float, dry_run: bool, work: str) -> list[dict]:
    """Rows of the table, method by method, smallest shape first."""
    baseline = 0.0
    if not dry_run:  # the process's own memory (Python, torch, megatron): measured peak minus the ledger
        smallest = next(iter(LADDER_SHAPES))
        first = try_shape(smallest, "AdamW", seq, work)
        baseline = max(0.0, first["peaks"][0] - predicted_bytes(SHAPES[smallest], "AdamW", seq, 0.0))
        print(f"process baseline: {baseline / GiB:.2f} GiB ({smallest}, AdamW)", flush=True)
    rows = []
    for method in methods:
        for name in names:
            prediction = predicted_bytes(SHAPES[name], method, seq, baseline)
            row = {"shape": name, "method": method, "params": parameter_count(SHAPES[name]),
                   "predicted": prediction, "fits": prediction <= budget, "peaks": [], "seconds": math.nan, "note": ""}
            if not row["fits"]:
                row["note"] = "predicted over budget"
                rows.append(row)
                print(_row_line(row), flush=True)
                break
            if not dry_run:
                start = time.time()
                got = try_shape(name, method, seq, work)
                finite = len(got["losses"]) == 3 and all(math.isfinite(v) for v in got["losses"].values())
                over = [what for what, peak in zip(("train", "resume", "export"), got["peaks"]) if peak > budget]
                row.update(peaks=got["peaks"], seconds=got["seconds"], fits=not got["error"] and finite and not over,
                           note=got["error"] or ("" if finite else "non-finite or missing losses")
                           or (f"{' and '.join(over)} over budget; " if over else "")
                           + f"{time.time() - start:.0f} s in all")
            rows.append(row)
            print(_row_line(row), flush=True)
            if not row["fits"]:
                break
    return rows


def _row_line(row: dict) -> str:
    flags = " ".join(METHODS[row["method"]][2])
    peaks = " / ".join(f"{p / GiB:.2f}" for p in row["peaks"]) or "-"
    # the ledger predicts training (the first two); the export's peak is shown beside it
    error = f"{max(row['peaks'][:2]) / row['predicted'] - 1:+.1%}" if row["peaks"] else "-"
    return (f"| {row['shape']} | {row['params'] / 1e9:.2f}B | {row['method']} | {flags} | "
            f"{'yes' if row['fits'] else 'no'} | {peaks} | {row['predicted'] / GiB:.2f} | {error} | "
            f"{row['seconds']:.1f} | {row['note']} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    parser.add_argument("--memory-budget-gib", type=float, default=total / GiB * 0.9,
                        help="default: 90%% of this machine's memory")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(LADDER_SHAPES),
                        help="rungs to climb, in this order (default: the dense ladder, smallest first; the "
                             "mixture-of-experts twins *-MoE8, 8 experts top-2, only when named)")
    parser.add_argument("--dry-run", action="store_true", help="the ledger's predictions only (no runs)")
    parser.add_argument("--work-dir", default=None, help="checkpoints and exports (default: a temporary directory)")
    args = parser.parse_args(argv)
    budget = args.memory_budget_gib * GiB
    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{total / GiB:.1f} GiB; budget {args.memory_budget_gib:.1f} GiB, seq {args.seq_length}, batch 1; "
          f"common flags: {' '.join(COMMON)}\n", flush=True)
    print("| shape | params | method | flags | fits | peak GiB train / resume / export | predicted GiB | error "
          "| s/iteration | note |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    work = args.work_dir or tempfile.mkdtemp(prefix="largest_model_")
    os.makedirs(work, exist_ok=True)
    rows = climb(args.methods, args.shapes, args.seq_length, budget, args.dry_run, work)
    largest = {}
    for row in rows:
        if row["fits"]:
            largest[row["method"]] = row
    print()
    for method in args.methods:
        best = largest.get(method)
        ratio = ""
        if best and method != "AdamW" and "AdamW" in largest:
            ratio = f" ({best['params'] / largest['AdamW']['params']:.1f}x AdamW's)"
        print(f"largest for {method}: " + (f"{best['shape']}, {best['params'] / 1e9:.2f}B parameters{ratio}"
                                           if best else "none"))


if __name__ == "__main__":
    main()
