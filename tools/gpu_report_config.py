"""Sizes and time limits of tools/gpu_report.py: :data:`GPU` (one H100/H200, at most 8 minutes) and
:data:`DRY_RUN` (CPU, tiny stand-ins, the same code path; run by tests/test_gpu_report.py)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from benchmark_deepspeed_memory import LLAMA  # the Llama shapes as program flags

STAGES = ("setup", "tests", "layer", "memory", "training")
METHOD_FLAGS = {"AdamW": ["--no-poet"], "POET fast": ["--poet-mode", "fast"], "POET mem": ["--poet-mode", "mem"]}


@dataclass(frozen=True)
class MemoryModel:
    """A model of stage 3: ``flags`` give its shape; measured at each of ``measured_layers`` (the full
    ``layers`` alone: measured whole; two smaller counts: extrapolated linearly to ``layers``)."""

    name: str
    flags: list[str]
    layers: int
    measured_layers: tuple[int, ...]
    headline: bool = False  # its whole-model POET mem / AdamW ratio is checked against the memory target


@dataclass(frozen=True)
class Config:
    """Everything a run's sizes depend on (:data:`GPU` and :data:`DRY_RUN` share the code path)."""

    name: str
    pytest: list[str]
    layer: list[str]  # tools/benchmark_poet_linear.py flags
    memory_models: tuple[MemoryModel, ...]
    memory_methods: tuple[str, ...]
    memory_flags: list[str]
    memory_warmup: bool  # a run per POET method before measuring: Triton's autotuning (GPU only) done and cached
    memory_parallel: int  # measurement runs at a time (peaks are per process; 2 fit one H200 at these sizes)
    training_label: str
    training_flags: list[str]
    training_methods: tuple[str, ...]
    timeouts: dict[str, float]  # per stage, seconds
    run_timeout: float  # one training-program run of stages 3 and 4
    targets: dict[str, float] = field(default_factory=lambda: {"POET fast": 1.0, "POET mem": 1.3, "memory": 0.37})


_1B, _1B_VOCAB = LLAMA["Llama-1B"]
_8B, _ = LLAMA["Llama-8B"]
_MOCK_LLAMA_VOCAB = ["--mock-data", "--vocab-size", str(_1B_VOCAB - 1)]  # + the NullTokenizer's end-of-document id
_GPU_RUN = ["--bf16", "--use-distributed-optimizer", "--poet-block-size", "256", "--eval-iters", "0"]
GPU = Config(
    name="GPU",
    # Kernel compilation and autotuning dominate: pytest-xdist (in the GPU image) spreads them over cores.
    pytest=["tests/test_kernels.py"] + (["-n", "8"] if importlib.util.find_spec("xdist") else []),
    layer=["--shapes", "4096x4096", "4096x14336", "14336x4096", "--tokens", "2048", "--block-size", "256",
           "--dtype", "bf16", "--warmup", "5", "--reps", "20", "--fp8-recipes"],  # no FP8 rows: not in the targets
    memory_models=(MemoryModel("Llama-8B", _8B, 32, (2, 4), headline=True),
                   MemoryModel("Llama-1B", _1B, 16, (16,))),
    memory_methods=("AdamW", "POET fast", "POET mem"),
    memory_flags=_MOCK_LLAMA_VOCAB + _GPU_RUN + ["--seq-length", "1024", "--micro-batch-size", "1",
                                                 "--global-batch-size", "1", "--train-iters", "3",
                                                 "--log-interval", "3"],
    memory_warmup=True,
    memory_parallel=2,  # the largest pair, 8B AdamW at 4 layers and Llama-1B AdamW: ~36 + ~25 GB
    # The POET-X paper's throughput setting (batch 1, seq 1024); the kernels' autotuning of this token count is
    # done in stage 3 (cached on disk), and iterations 1-10 are outside the timed window anyway.
    training_label="Llama-1B, micro-batch 1 x seq 1024, global batch 8, 20 iterations (last 10 timed)",
    training_flags=_1B + _MOCK_LLAMA_VOCAB + _GPU_RUN + ["--seq-length", "1024", "--micro-batch-size", "1",
                                                         "--global-batch-size", "8", "--train-iters", "20",
                                                         "--log-interval", "10"],
    training_methods=("POET fast", "AdamW"),
    timeouts={"setup": 30, "tests": 85, "layer": 65, "memory": 210, "training": 90},
    run_timeout=60,
)
_TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--num-query-groups", "2"]
_CPU_RUN = ["--mock-data", "--vocab-size", "255", "--poet-block-size", "16", "--eval-iters", "0", "--seq-length", "32",
            "--micro-batch-size", "1"]
DRY_RUN = Config(
    name="dry run (CPU, tiny stand-ins)",
    pytest=["tests/test_kernels.py", "-k", "float32-32-2"],
    layer=["--cpu", "--threads", "1", "--shapes", "64x64", "64x128", "128x64", "--tokens", "64", "--block-size", "16",
           "--dtype", "fp32", "--warmup", "1", "--reps", "2", "--fp8-recipes"],
    memory_models=(MemoryModel("tiny 8B stand-in", _TINY, 4, (1, 2), headline=True),
                   MemoryModel("tiny 1B stand-in", _TINY, 2, (2,))),
    memory_methods=("AdamW", "POET mem"),
    memory_flags=_CPU_RUN + ["--global-batch-size", "1", "--train-iters", "2", "--log-interval", "2"],
    memory_warmup=False,  # no autotuning: the interpreter has one config, and these runs use no kernels
    memory_parallel=2,
    training_label="tiny 1B stand-in, 4 iterations (last 2 timed)",
    training_flags=_TINY + _CPU_RUN + ["--global-batch-size", "2", "--train-iters", "4", "--log-interval", "2"],
    training_methods=("POET fast", "AdamW"),
    timeouts={stage: 300 for stage in STAGES},
    run_timeout=120,
)
