"""tools/gpu_report.py: its CPU dry run end to end (the GPU run's code path at tiny shapes), and the
stage machinery: a timed-out stage's processes are killed, a failing stage does not stop the next.

The dry run (~90 s on a shared 2-core machine: eight starts of the training program) checks that the
table has every stage's rows with numbers that parse, and that the extrapolated peak memory is the
straight line through the two measured layer counts.
"""
import dataclasses
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
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_report  # noqa: E402
import gpu_report_config  # noqa: E402


def _rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| stage ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _number(text: str) -> float:
    return float(re.match(r"[\d.]+(e[-+]\d+)?", text).group(0))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.md"
    # A caller's rendezvous (here: a port in use, as a test process or torchrun job leaves it) must not leak
    # into the report's own runs.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(busy.getsockname()[1]), RANK="0")
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_report.py"), "--dry-run", "--output",
                               str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, out


def test_dry_run_reports_every_stage_with_numbers(dry_run):
    stdout, out = dry_run
    assert out.read_text() in stdout  # the same table on stdout and in the file
    assert (out.parent / "gpu_report.log").stat().st_size > 0
    rows = _rows(out.read_text())
    by_stage = {}
    for stage, case, status, result, vs, target in rows:
        assert status == "ok", (case, status, result)
        by_stage.setdefault(stage, []).append((case, result, vs, target))
    assert list(by_stage) == list(gpu_report.STAGES)
    ((_, tests, _, _),) = by_stage["tests"]
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (\w+)", tests))
    assert counts["passed"] >= 1 and counts["failed"] == counts["error"] == 0, tests

    layer = by_stage["layer"]
    assert len(layer) == 3 * 3  # three shapes x (nn.Linear, POET fast, POET mem); no kernel rows on CPU
    for case, result, vs, _ in layer:
        assert _number(result) > 0 and _number(result.split(", ")[1]) > 0, result
        ratio, floor = re.fullmatch(r"([\d.]+)x nn.Linear \(FLOP floor ([\d.]+)x\)", vs).groups()
        assert float(ratio) > 0 and (float(floor) == 1.0) == ("nn.Linear" in case), (case, vs)

    memory = {case: _number(result) for case, result, _, _ in by_stage["memory"]}
    for method in ("AdamW", "POET mem"):
        one, two = (memory[f"tiny 8B stand-in, {n} of 4 layers, {method}"] for n in (1, 2))
        extrapolated = memory[f"tiny 8B stand-in, 4 layers extrapolated from 1 and 2, {method}"]
        assert one > 0 and abs(extrapolated - (two + 2 * (two - one))) < 0.011, (one, two, extrapolated)
        assert memory[f"tiny 1B stand-in, {method}"] == two  # the same command line: measured once
    headline = [t for c, _, _, t in by_stage["memory"] if c.endswith("extrapolated from 1 and 2, POET mem")]
    assert re.fullmatch(r"<= 0\.37x: (met|missed)", headline[0])

    training = {case.rsplit(", ", 1)[1]: (result, vs) for case, result, vs, _ in by_stage["training"]}
    assert set(training) == {"POET fast", "AdamW"}
    for result, _ in training.values():
        assert _number(result) > 0 and "MFU n/a" in result  # no MFU on CPUs
    assert _number(training["POET fast"][1]) > 0


def test_gpu_config_fits_eight_minutes():
    assert sum(gpu_report.GPU.timeouts.values()) <= 8 * 60
    assert set(gpu_report.GPU.timeouts) == set(gpu_report.STAGES) == set(gpu_report.DRY_RUN.timeouts)


def test_memory_stage_warms_up_then_measures_and_extrapolates(tmp_path, monkeypatch):
    """With fake runs whose peak is 2 + 3 x layers GiB (AdamW) or 1 + 1 x layers (POET mem): the warm-up
    runs first and is not a measurement; 32 layers extrapolate from 2 and 4 to 98 and 33 GiB."""
    calls = []

    def fake_run(runner, flags, timeout):
        calls.append(flags)
        layers = int([value for flag, value in zip(flags, flags[1:]) if flag == "--num-layers"][-1])
        peak = 1 + layers if "--poet-mode" in flags else 2 + 3 * layers
        return gpu_report.Result("ok", f" iteration 3/ 3 | peak mem (GPU): {peak:.2f} GiB | ETA 0:00:00")

    monkeypatch.setattr(gpu_report, "_program_run", fake_run)
    model = gpu_report_config.MemoryModel("8B", [], 32, (2, 4), headline=True)
    config = dataclasses.replace(gpu_report.DRY_RUN, memory_models=(model,), memory_warmup=True)
    rows = gpu_report.stage_memory(gpu_report.Runner(str(tmp_path / "log")), config, 60)
    assert "--train-iters" in calls[0] and "--poet-mode" in calls[0] and len(calls) == 1 + 4
    assert rows[0][1] == "warm-up: POET mem kernels autotuned (not measured)" and rows[0][2] == "ok"
    results = {case: (result, vs, target) for _, case, _, result, vs, target in rows[1:]}
    assert results["8B, 2 of 32 layers, POET mem"] == ("3.00 GiB", "0.38x AdamW", "-")
    assert results["8B, 32 layers extrapolated from 2 and 4, AdamW"] == ("98.00 GiB", "-", "-")
    assert results["8B, 32 layers extrapolated from 2 and 4, POET mem"] == ("33.00 GiB", "0.34x AdamW",
                                                                            "<= 0.37x: met")


def test_timed_out_command_is_killed_with_its_children(tmp_path):
    runner = gpu_report.Runner(str(tmp_path / "log"))
    start = time.monotonic()
    result = runner.run(["sh", "-c", "sleep 60 & echo child $!; wait"], timeout=2)
    assert result.status == "TIMEOUT (2 s)" and time.monotonic() - start < 10, result
    child = int(re.search(r"child (\d+)", result.output).group(1))
    for _ in range(50):  # SIGKILL is delivered asynchronously; the orphan is reaped by the test's subreaper
        try:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child, os.WNOHANG)
                break
        except (psutil.NoSuchProcess, ChildProcessError):
            break
        time.sleep(0.1)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert runner.run(["true"], timeout=0).status.startswith("not run")


def test_a_failing_stage_is_reported_and_the_next_one_runs(tmp_path, monkeypatch, capsys):
    def broken(runner, config, timeout):
        raise RuntimeError("unparsable output")

    def layer(runner, config, timeout):
        return [runner_row] if runner.run([sys.executable, "-c", "pass"], timeout).ok else []

    runner_row = ("layer", "case", "ok", "1 ms", "-", "-")
    monkeypatch.setattr(gpu_report, "RUNNERS", {"tests": broken, "layer": layer})
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's handlers
    code = gpu_report.main(["--dry-run", "--stages", "tests,layer", "--output", str(tmp_path / "r.md")])
    rows = _rows((tmp_path / "r.md").read_text())
    assert code == 1 and rows == [["tests", "-", "FAILED (RuntimeError)", "unparsable output", "-", "-"],
                                  list(runner_row)]
    assert "unparsable output" in capsys.readouterr().out
