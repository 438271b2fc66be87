#!/usr/bin/env python
"""First light on one H100/H200: compiled kernels, one layer, peak memory and training throughput, one table.

One command, at most 8 minutes on one GPU (the stages' timeouts in tools/gpu_report_config.py's
``GPU`` add up to 480 s; sizes come from there too).
Every stage runs in subprocesses with a timeout; a stage that fails or times out is reported as
such in the table and the next stage still runs; on a timeout the stage's process group is killed.

0. setup: megatron-core and ``megatron_poet.kernels`` importable, else installed offline from the
   wheels in ``.whl/`` (made beforehand by ``tools/prepare_gpu_wheels.sh``) and ``pip install -e .``.
1. tests: ``pytest tests/test_kernels.py`` (the kernel tests, the GPU-only ones included), compiled
   (``TRITON_INTERPRET`` unset): pass/fail/skip counts.
2. layer: ``tools/benchmark_poet_linear.py`` at Llama-8B shapes (4096->4096, 4096->14336, 14336->4096;
   2048 tokens; bf16; b = 256): nn.Linear, POET fast/mem with kernels on and off; ms, ratio to
   nn.Linear, TFLOP/s and the FLOP floor (the method's FLOPs / nn.Linear's).
3. memory: peak GPU memory (the training program's ``peak mem`` log field, ``max_memory_allocated``)
   of AdamW (``--no-poet``), POET fast and POET mem, batch 1, seq 1024, bf16 with megatron's mixed
   precision (fp32 gradients and main parameters), mock data; Llama-1B whole, Llama-8B measured at 2
   and 4 of its 32 layers and extrapolated linearly to 32 (weights, ``A0``, gradients, optimizer state
   and saved activations all grow linearly with the layers; the output layer's transients do not).
   The extrapolated rows say so; the whole 8B AdamW model (18 bytes per parameter: 145 GB) does not
   fit one H200.
   Before measuring, one run per POET method lets Triton autotune the kernels (its benchmark buffer would
   count in the peak); ``TRITON_CACHE_AUTOTUNING=1`` keeps the results for the later processes.
4. training: 20 iterations of Llama-1B (POET fast and AdamW; micro-batch 1, seq 1024 as in the POET-X
   paper's throughput figures, global batch 8) through the launcher (``python -m megatron_poet.launch``),
   mock data: tokens/s/GPU and MFU of the last log line (iterations 11-20).
5. the Markdown table to stdout and to ``--output`` (default ``$OUT/gpu_report.md`` when ``$OUT`` is
   set, else ``runs/gpu_report.md``), rewritten after every stage (a killed run leaves the finished
   stages' rows); every command's output goes to ``gpu_report.log`` beside it.

``--dry-run`` runs the same stages on CPU with ``DRY_RUN``'s sizes (tiny shapes, few iterations, gloo,
the kernel tests in the Triton interpreter); tests/test_gpu_report.py runs it. Nothing is downloaded:
stages 3-4 train on megatron's mock data.

    python tools/gpu_report.py                     # on the GPU machine (after tools/prepare_gpu_wheels.sh here)
    python tools/gpu_report.py --stages memory --timeout memory=300   # one stage again, with more time
    python tools/gpu_report.py --dry-run --output /tmp/report.md
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
from gpu_report_config import DRY_RUN, GPU, METHOD_FLAGS, STAGES, Config  # noqa: E402


# ----------------------------------------------------------------------------- running stages
@dataclass
class Result:
    """One subprocess: ``status`` is "ok", "FAILED (rc N)", "TIMEOUT (N s)" or "not run (...)"."""

    status: str
    output: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Runner:
    """Runs commands in their own process group (killed on timeout and after exit: no orphans) and
    appends every command's output to ``log``; several threads may run commands at once."""

    def __init__(self, log_path: str):
        self.log = open(log_path, "w", encoding="utf-8")
        self.lock = threading.Lock()
        self.running: set[int] = set()  # process group ids

    def run(self, cmd: list[str], timeout: float, env: dict | None = None) -> Result:
        """Run ``cmd`` from the repository root for at most ``timeout`` seconds (<= 0: not run)."""
        if timeout <= 0:
            return Result("not run (stage time used up)")
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.running.add(proc.pid)
        try:
            output, _ = proc.communicate(timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"FAILED (rc {proc.returncode})"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            output, _ = proc.communicate()
            status = f"TIMEOUT ({timeout:.0f} s)"
        finally:
            _kill_group(proc.pid)  # stray children of a finished command too
            self.running.discard(proc.pid)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        seconds = time.monotonic() - start
        with self.lock:
            self.log.write(f"\n$ {' '.join(cmd)}\n[{status}, {seconds:.1f} s]\n{output}\n")
            self.log.flush()
        return Result(status, output, seconds)

    def kill_all(self) -> None:
        """Kill every running command's process group (on SIGTERM)."""
        for pgid in list(self.running):
            _kill_group(pgid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# A rendezvous inherited from the caller (a torchrun job, a test process) is not this report's: its runs
# are single-node runs of their own, each with a free port.
_RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                   "NNODES", "NODE_RANK", "GPUS_PER_NODE")


def _env(**extra) -> dict:
    # TRITON_CACHE_AUTOTUNING: later processes reuse the kernels' autotuning results (Triton >= 3.4).
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_ENV}
    env.update(PYTHONUNBUFFERED="1", TRITON_CACHE_AUTOTUNING="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def _why(result: Result) -> str:
    """The last meaningful line of a failed command's output, for the table."""
    lines = [line.strip() for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"(error|\w*Error|E  )", line)]
    return (errors or lines or [""])[-1][:160]


# ----------------------------------------------------------------------------- stages
Row = tuple[str, str, str, str, str, str]  # stage, case, status, result, vs. reference, target


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def stage_setup(runner: Runner, config: Config, timeout: float) -> list[Row]:
    """megatron-core and the kernels importable; otherwise the offline install from ``.whl/``."""
    case = "megatron-core, megatron_poet.kernels"
    if all(_importable(name) for name in ("megatron.core", "megatron_poet.kernels")):
        return [("setup", case, "ok", "already installed", "-", "-")]
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    check = [sys.executable, "-c", "import megatron.core, megatron_poet.kernels"]  # a fresh process sees the install
    deadline = time.monotonic() + timeout
    for cmd in ([pip + wheels] if wheels else []) + [pip + ["--no-build-isolation", "-e", "."], check]:
        result = runner.run(cmd, deadline - time.monotonic(), _env())
        if not result.ok:
            break
    return [("setup", f"{case}: offline install of {len(wheels)} wheel(s) from .whl/ and -e .", result.status,
             "installed" if result.ok else _why(result), "-", "-")]


def stage_tests(runner: Runner, config: Config, timeout: float) -> list[Row]:
    """pytest on the kernel tests; compiled on a GPU (TRITON_INTERPRET removed from the environment)."""
    env = _env()
    env.pop("TRITON_INTERPRET", None)  # tests/test_kernels.py sets it itself when there is no GPU
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *config.pytest]
    result = runner.run(cmd, timeout, env)
    counts = {kind: 0 for kind in ("passed", "failed", "skipped", "error")}
    summary = [line for line in result.output.splitlines() if re.search(r" in [\d.]+s", line)]
    for number, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary[-1] if summary else ""):
        counts[kind.rstrip("s") if kind.startswith("error") else kind] += int(number)
    text = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    status = result.status if summary or not result.ok else "FAILED (no pytest summary)"
    return [("tests", "pytest " + " ".join(config.pytest), status, text, "-", "all pass")]


def stage_layer(runner: Runner, config: Config, timeout: float) -> list[Row]:
    """One layer fwd+bwd (tools/benchmark_poet_linear.py); its table's rows become ours."""
    cmd = [sys.executable, os.path.join("tools", "benchmark_poet_linear.py"), *config.layer]
    result = runner.run(cmd, timeout, _env())
    rows, names = [], None
    for line in result.output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "d_in -> d_out":
            names = cells  # the header: columns are found by name
        elif names and len(cells) == len(names) and re.fullmatch(r"[\d.]+", cells[names.index("ms")]):
            row = dict(zip(names, cells))
            ratio, method = row["x nn.Linear"], row["method"]
            target = config.targets.get(method.split(",")[0]) if "kernels" in method else None
            verdict = "-" if target is None else f"<= {target}x: {'met' if float(ratio) <= target else 'missed'}"
            rows.append(("layer", f"{row['d_in -> d_out']}, {row['tokens']} tokens, {method}", "ok",
                         f"{row['ms']} ms, {row['TFLOP/s']} TFLOP/s",
                         f"{ratio}x nn.Linear (FLOP floor {row['FLOP floor x nn.Linear']}x)", verdict))
    if not result.ok or not rows:
        rows.append(("layer", "tools/benchmark_poet_linear.py " + " ".join(config.layer),
                     result.status if not result.ok else "FAILED (no table)", _why(result), "-", "-"))
    return rows


def iteration_fields(output: str) -> dict[str, str]:
    """``{name: value}`` of the last Megatron iteration line in ``output`` (empty if none)."""
    lines = [line for line in output.splitlines() if re.search(r"\biteration\s+\d+/\s*\d+ \|", line)]
    if not lines:
        return {}
    return dict(part.split(": ", 1) for part in lines[-1].split(" | ") if ": " in part)


def _peak_gib(fields: dict[str, str]) -> float | None:
    value = next((v for k, v in fields.items() if k.startswith("peak mem")), None)
    return float(value.split()[0]) if value else None


def _program_run(runner: Runner, flags: list[str], timeout: float) -> Result:
    """The training program as one rank, started as torchrun would start it (no launcher)."""
    from megatron_poet.launch import free_port

    env = _env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    return runner.run([sys.executable, "-m", "megatron_poet.training.pretrain", *flags], timeout, env)


def stage_memory(runner: Runner, config: Config, timeout: float) -> list[Row]:
    """Peak memory of each model x method x measured layer count, then the extrapolated rows. AdamW
    comes first in ``memory_methods`` (the ratios' reference). The runs go ``memory_parallel`` at a time
    (each process's peak is its own), a command line once; the warm-ups first, one at a time."""
    deadline = time.monotonic() + timeout

    def run(flags) -> Result:
        return _program_run(runner, list(flags), min(config.run_timeout, deadline - time.monotonic()))

    rows = []
    first = config.memory_models[0]
    for method in config.memory_methods if config.memory_warmup else ():
        if method != "AdamW":  # autotuning allocates a benchmark buffer: keep it out of the measured peaks
            result = run(first.flags + config.memory_flags + ["--num-layers", str(min(first.measured_layers)),
                                                              "--train-iters", "1", "--log-interval", "1"]
                         + METHOD_FLAGS[method])
            rows.append(("memory", f"warm-up: {method} kernels autotuned (not measured)", result.status,
                         "-" if result.ok else _why(result), "-", "-"))
    plan = [(model, layers, method, tuple(model.flags + config.memory_flags + ["--num-layers", str(layers)]
                                          + METHOD_FLAGS[method]))
            for model in config.memory_models for layers in model.measured_layers for method in config.memory_methods]
    commands = list(dict.fromkeys(flags for *_, flags in plan))
    with ThreadPoolExecutor(config.memory_parallel) as pool:
        results = dict(zip(commands, pool.map(run, commands)))
    for model in config.memory_models:
        peaks: dict[tuple[str, int], float | None] = {}
        for _, layers, method, flags in (p for p in plan if p[0] is model):
            result = results[flags]
            peaks[method, layers] = _peak_gib(iteration_fields(result.output)) if result.ok else None
            status = "FAILED (no peak mem field)" if result.ok and peaks[method, layers] is None else result.status
            case = model.name + (f", {layers} of {model.layers} layers" if layers != model.layers else "")
            rows.append(_memory_row(f"{case}, {method}", status, peaks, method, layers, config, _why(result),
                                    model.headline and layers == model.layers))
        if len(model.measured_layers) == 2:
            small, large = model.measured_layers
            for method in config.memory_methods:
                known = [peaks.get((method, n)) for n in (small, large)]
                peaks[method, model.layers] = None if None in known else \
                    known[1] + (known[1] - known[0]) / (large - small) * (model.layers - large)
                rows.append(_memory_row(f"{model.name}, {model.layers} layers extrapolated from {small} and {large}, "
                                        f"{method}", "ok" if None not in known else "not run (a measurement failed)",
                                        peaks, method, model.layers, config, "", model.headline))
    return rows


def _memory_row(case: str, status: str, peaks: dict, method: str, layers: int, config: Config, why: str,
                headline: bool) -> Row:
    peak, adamw = peaks.get((method, layers)), peaks.get(("AdamW", layers))
    if peak is None:
        return ("memory", case, status, why or "-", "-", "-")
    ratio = peak / adamw if adamw and method != "AdamW" else None
    goal = config.targets["memory"]
    target = f"<= {goal}x: {'met' if ratio <= goal else 'missed'}" if (
        headline and ratio is not None and method == "POET mem") else "-"
    return ("memory", case, status, f"{peak:.2f} GiB", "-" if ratio is None else f"{ratio:.2f}x AdamW", target)


def stage_training(runner: Runner, config: Config, timeout: float) -> list[Row]:
    """~20 iterations per method through the launcher; tokens/s/GPU and MFU of the last log line."""
    deadline = time.monotonic() + timeout
    measured: dict[str, tuple[Result, dict[str, str]]] = {}
    for method in config.training_methods:
        cmd = [sys.executable, "-m", "megatron_poet.launch", *config.training_flags, *METHOD_FLAGS[method]]
        result = runner.run(cmd, min(config.run_timeout, deadline - time.monotonic()), _env(GPUS_PER_NODE="1"))
        measured[method] = result, iteration_fields(result.output)
    adamw = measured.get("AdamW", (None, {}))[1].get("tokens/s/GPU")
    rows = []
    for method, (result, fields) in measured.items():
        case = f"{config.training_label}, {method}"
        if not result.ok or "tokens/s/GPU" not in fields:
            rows.append(("training", case, result.status if not result.ok else "FAILED (no iteration line)",
                         _why(result), "-", "-"))
            continue
        tokens = float(fields["tokens/s/GPU"])
        vs = f"{tokens / float(adamw):.2f}x AdamW tokens/s" if adamw and method != "AdamW" else "-"
        rows.append(("training", case, "ok", f"{tokens:.0f} tokens/s/GPU, {fields['TFLOP/s/GPU']} TFLOP/s/GPU, "
                     f"MFU {fields['MFU']}", vs, "-"))
    return rows


RUNNERS = {"setup": stage_setup, "tests": stage_tests, "layer": stage_layer, "memory": stage_memory,
           "training": stage_training}


# ----------------------------------------------------------------------------- report
def header(config: Config, argv: list[str], seconds: float) -> str:
    """What ran where: device, versions, date, the command and the total time."""
    import torch

    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"GPU report ({config.name}): {device}, torch {torch.__version__}, triton {ver('triton')}, "
            f"megatron-core {ver('megatron-core')}, Python {sys.version.split()[0]}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"`python tools/gpu_report.py {' '.join(argv)}`; {seconds:.0f} s in all")


def table(rows: list[Row]) -> str:
    """``rows`` as one Markdown table."""
    lines = ["| stage | case | status | result | vs. reference | target |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few iterations (the test's run)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--output", help="Markdown file (default: $OUT/gpu_report.md, else runs/gpu_report.md)")
    parser.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                        help="override a stage's time limit (repeatable), e.g. --timeout layer=120")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f"unknown or no stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or --dry-run for the CPU rehearsal")
    config = DRY_RUN if args.dry_run else GPU
    try:
        overrides = {stage: float(seconds) for stage, seconds in (t.split("=") for t in args.timeout)}
    except ValueError:
        parser.error(f"--timeout takes STAGE=SECONDS, got {args.timeout}")
    if set(overrides) - set(STAGES):
        parser.error(f"--timeout: unknown stage(s) {', '.join(sorted(set(overrides) - set(STAGES)))}")
    config = dataclasses.replace(config, timeouts={**config.timeouts, **overrides})
    output = args.output or os.path.join(os.environ["OUT"] if os.environ.get("OUT") else os.path.join(ROOT, "runs"),
                                         "gpu_report.md")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    runner = Runner(os.path.join(os.path.dirname(os.path.abspath(output)), "gpu_report.log"))

    def stop(*_):
        runner.kill_all()
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    start, rows = time.monotonic(), []
    for stage in (s for s in STAGES if s in stages):
        print(f"gpu_report: stage {stage} (timeout {config.timeouts[stage]:.0f} s)", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            rows += RUNNERS[stage](runner, config, config.timeouts[stage])
        except Exception as e:  # a bug or an unparsable output: reported, the next stage runs
            rows.append((stage, "-", f"FAILED ({type(e).__name__})", str(e)[:160], "-", "-"))
        print(f"gpu_report: stage {stage} done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        report = header(config, argv, time.monotonic() - start) + "\n\n" + table(rows) + "\n"
        with open(output, "w", encoding="utf-8") as f:
            f.write(report)
    print(report)
    print(f"gpu_report: written to {output} (stage outputs: {runner.log.name})", file=sys.stderr)
    return 0 if all(row[2] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
