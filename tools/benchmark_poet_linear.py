#!/usr/bin/env python
"""Time one layer's forward+backward: nn.Linear vs POETLinear (fast/mem, kernels on/off, bf16 vs FP8 GEMM).

Default shapes are Llama-8B's (4096->4096, 4096->14336, 14336->4096; 2048 and 8192
tokens; b = 256; bf16) on a GPU. Without a GPU it runs reduced shapes (every size / 8:
512->512, 512->1792, 1792->512; 256 and 1024 tokens; b = 32; float32, since CPU bf16
matmuls are not representative) and omits the kernel rows (the Triton interpreter
measures Python, not kernels). ``--shapes``/``--tokens``/``--block-size`` override.

Each measurement is one ``y = layer(x); y.backward(dy)`` step, including the
Cayley–Neumann construction of the blocks. The methods take turns step by step
(``--reps`` rounds after ``--warmup``), so a machine whose speed drifts slows all of them
alike. Reported: median ms, ratio to nn.Linear, achieved TFLOP/s, the FLOP floor (the method's
FLOPs / nn.Linear's: the time ratio at equal FLOP efficiency), peak memory above the
resident tensors (GPU only), and the layer's static memory: parameters, gradients, buffers and,
for FP8 rows, the FP8 copies of ``A0`` (held in addition to ``A0`` itself; see docs/FP8.md).
``--compare-checkout DIR`` adds the POET rows of another checkout of this repository (e.g. the
previous commit) to the same run. FP8 rows (``--fp8-recipes``, default the default recipe; format
``--fp8-format``) run the frozen GEMM through the backend chosen automatically (Transformer Engine
or ``torch._scaled_mm`` on a GPU; on CPU ``_scaled_mm`` dequantizes, so CPU times say nothing
about FP8 speed).

FLOPs counted are those each method really performs (N tokens, k Neumann order, n_s = d_s/b):
    nn.Linear:      6 N d_in d_out                      (forward, input grad, weight grad)
    POET fast:      4 N d_in d_out                      (forward, input grad; A0 has no grad)
                  + 6 N b (d_in + d_out)                (block rotations: forward, grad x, grad G)
                  + 4k 2 b^3 (n_in + n_out)             (Cayley–Neumann: k forward products; backward
                                                         rebuilds them (k) and differentiates them (2k))
    POET mem:       POET fast + 2 N d_in d_out + 2 N b d_in   (recomputed GEMM and input rotation)

Examples::

    python tools/benchmark_poet_linear.py          # GPU: Llama-8B shapes, CPU: reduced
    python tools/benchmark_poet_linear.py --cpu --threads 2 --shapes 1024x1024 --tokens 2048 --block-size 64
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch import nn

from megatron_poet import POETLinear
from megatron_poet.kernels import kernels_mode, rotation_supported
from megatron_poet.poet.fp8 import DEFAULT_RECIPE, FORMATS, RECIPES, FP8Config, enable_fp8

LLAMA_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def poet_flops(n_tokens: int, d_in: int, d_out: int, b: int, k: int, recompute: bool) -> float:
    """FLOPs of one POET forward+backward as counted in the module docstring."""
    flops = 4 * n_tokens * d_in * d_out + 6 * n_tokens * b * (d_in + d_out)
    flops += 4 * k * 2 * b**3 * (d_in // b + d_out // b)
    if recompute:
        flops += 2 * n_tokens * d_in * d_out + 2 * n_tokens * b * d_in
    return float(flops)


def other_checkout_poet_linear(directory: str) -> type:
    """``POETLinear`` of the checkout in ``directory``, imported beside this one."""
    saved = {name: mod for name, mod in sys.modules.items() if name.split(".")[0] == "megatron_poet"}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, directory)
    try:
        return importlib.import_module("megatron_poet").POETLinear
    finally:
        sys.path.remove(directory)
        for name in [n for n in sys.modules if n.split(".")[0] == "megatron_poet"]:
            del sys.modules[name]
        sys.modules.update(saved)


class Timer:
    """Median ms (and peak MiB above the resident memory on GPU) of ``layer(x).backward(dy)``."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, kmode: str | None):
        self.layer, self.x, self.dy, self.kmode = layer, x, dy, kmode
        self.times: list[float] = []
        self.peak = float("nan")

    def step(self, record: bool) -> None:
        with kernels_mode(self.kmode) if self.kmode else nullcontext():
            if self.x.is_cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self._run()
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
                self.peak = max(0.0 if self.peak != self.peak else self.peak,
                                (torch.cuda.max_memory_allocated() - base) / 2**20)
            else:
                t0 = time.perf_counter()
                self._run()
                ms = (time.perf_counter() - t0) * 1e3
        if record:
            self.times.append(ms)

    def _run(self) -> None:
        self.layer(self.x).backward(self.dy)
        self.x.grad = None
        for p in self.layer.parameters():
            p.grad = None

    def static_mib(self) -> float:
        """Parameters, buffers, gradients (one per trainable parameter) and FP8 copies of ``A0``, MiB."""
        tensors = list(self.layer.parameters()) + list(self.layer.buffers())
        total = sum(t.numel() * t.element_size() for t in tensors)
        total += sum(p.numel() * p.element_size() for p in self.layer.parameters() if p.requires_grad)
        fp8 = getattr(self.layer, "fp8", None)
        copies = fp8.copy_nbytes() if fp8 is not None else 0
        return (total + (copies or 0)) / 2**20  # TE tensors are not counted (None)


def run(args) -> None:
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = 1 if cuda else 8
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else [
        (i // scale, o // scale) for i, o in LLAMA_SHAPES]
    tokens = args.tokens or ([2048, 8192] if cuda else [256, 1024])
    b = args.block_size or (256 if cuda else 32)
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    classes = [("", POETLinear)]
    if args.compare_checkout:
        classes.append((f" [{args.compare_checkout}]", other_checkout_poet_linear(args.compare_checkout)))
    variants = [("nn.Linear", None, None, None, None)]
    path = ("kernels", "auto") if cuda else ("PyTorch", "off")
    for mode in ("fast", "mem"):
        for suffix, cls in classes:
            if cuda:
                variants.append((f"POET {mode}, kernels{suffix}", mode, "auto", cls, None))
            variants.append((f"POET {mode}, PyTorch{suffix}", mode, "off", cls, None))
        for recipe in args.fp8_recipes:
            fp8 = FP8Config(args.fp8_format, recipe)
            variants.append((f"POET {mode}, {path[0]}, FP8 {args.fp8_format} {recipe}", mode, path[1], POETLinear,
                             fp8))
    hw = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {hw}, torch {torch.__version__}, dtype {dtype}, b={b}, k={args.neumann_terms}, "
          f"median of {args.reps} interleaved rounds after {args.warmup} warmup")
    print("| d_in -> d_out | tokens | method | ms | x nn.Linear | TFLOP/s | FLOP floor x nn.Linear | peak MiB | "
          "static MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for d_in, d_out in shapes:
        for n_tokens in tokens:
            x = torch.randn(n_tokens, d_in, generator=gen).to(device, dtype).requires_grad_()
            dy = torch.randn(n_tokens, d_out, generator=gen).to(device, dtype)
            timers, flops, names = [], [], []
            for name, mode, kmode, cls, fp8 in variants:
                if mode is None:
                    layer = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
                    flops.append(6.0 * n_tokens * d_in * d_out)
                else:
                    layer = cls(d_in, d_out, bias=False, block_size=b, neumann_terms=args.neumann_terms,
                                mode=mode, device=device, dtype=dtype, generator=gen)
                    flops.append(poet_flops(n_tokens, d_in, d_out, b, args.neumann_terms, mode == "mem"))
                    if fp8 is not None:
                        enable_fp8(layer, fp8)
                        name += f" ({layer.fp8.backend.name})"
                if kmode == "auto" and not rotation_supported(x, layer.input_side.blocks(dtype)):
                    raise RuntimeError(f"{name}: the kernels do not take this shape/dtype (or Triton is "
                                       f"missing); the row would time the PyTorch path")
                timers.append(Timer(layer, x, dy, kmode))
                names.append(name)
            for round_ in range(args.warmup + args.reps):
                for timer in timers:
                    timer.step(record=round_ >= args.warmup)
            base_ms = statistics.median(timers[0].times)
            for name, timer, f in zip(names, timers, flops):
                ms = statistics.median(timer.times)
                peak = "n/a" if timer.peak != timer.peak else f"{timer.peak:.0f}"  # nan on CPU
                print(f"| {d_in} -> {d_out} | {n_tokens} | {name} | {ms:.3f} | {ms / base_ms:.2f} | "
                      f"{f / ms / 1e9:.3g} | {f / flops[0]:.2f} | {peak} | {timer.static_mib():.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", help="d_inxd_out pairs, e.g. 1024x1024 (default: Llama-8B, /8 on CPU)")
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: 2048 8192 GPU, 256 1024 CPU)")
    parser.add_argument("--block-size", type=int, help="POET block size (default: 256 GPU, 32 CPU)")
    parser.add_argument("--neumann-terms", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 GPU, fp32 CPU")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--cpu", action="store_true", help="run the reduced CPU benchmark even if a GPU exists")
    parser.add_argument("--compare-checkout", help="also time POETLinear of this checkout directory")
    parser.add_argument("--fp8-recipes", nargs="*", choices=RECIPES, default=[DEFAULT_RECIPE],
                        help=f"FP8 rows (default: {DEFAULT_RECIPE}; none: no FP8 rows)")
    parser.add_argument("--fp8-format", choices=FORMATS, default="hybrid")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
