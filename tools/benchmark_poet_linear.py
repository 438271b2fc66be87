#!/usr/bin/env python
"""Time one layer's forward+backward: nn.Linear vs POETLinear (fast/mem, kernels on/off).

Default shapes are Llama-8B's (4096->4096, 4096->14336, 14336->4096; 2048 and 8192
tokens; b = 256; bf16) on a GPU. Without a GPU it runs reduced shapes (every size / 8:
512->512, 512->1792, 1792->512; 256 and 1024 tokens; b = 32; float32, since CPU bf16
matmuls are not representative) and omits the kernel rows (the Triton interpreter
measures Python, not kernels).

Each measurement is one ``y = layer(x); y.backward(dy)`` step, including the
Cayley–Neumann construction of the blocks. Reported: median ms over ``--reps`` steps
after ``--warmup`` (CUDA events on GPU, ``time.perf_counter`` on CPU), ratio to
nn.Linear, achieved TFLOP/s and peak memory above the resident tensors (GPU only).

FLOPs counted are those each method really performs (N tokens, k Neumann order, n_s = d_s/b):
    nn.Linear:      6 N d_in d_out                      (forward, input grad, weight grad)
    POET fast:      4 N d_in d_out                      (forward, input grad; A0 has no grad)
                  + 6 N b (d_in + d_out)                (block rotations: forward, grad x, grad G)
                  + (4k - 1) 2 b^3 (n_in + n_out)       (Cayley–Neumann: k forward products,
                                                         k-1 recomputed + k chain + k pair products backward)
    POET mem:       POET fast + 2 N d_in d_out + 2 N b d_in   (recomputed GEMM and input rotation)

Example: ``python tools/benchmark_poet_linear.py`` (GPU: Llama-8B shapes, CPU: reduced).
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn

from megatron_poet import POETLinear
from megatron_poet.kernels import kernels_mode, rotation_supported

LLAMA_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def poet_flops(n_tokens: int, d_in: int, d_out: int, b: int, k: int, recompute: bool) -> float:
    """FLOPs of one POET forward+backward as counted in the module docstring."""
    flops = 4 * n_tokens * d_in * d_out + 6 * n_tokens * b * (d_in + d_out)
    flops += (4 * k - 1) * 2 * b**3 * (d_in // b + d_out // b)
    if recompute:
        flops += 2 * n_tokens * d_in * d_out + 2 * n_tokens * b * d_in
    return float(flops)


def time_step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, warmup: int, reps: int) -> tuple[float, float]:
    """(median ms, peak MiB above the memory held before the step; nan on CPU)."""
    cuda = x.is_cuda

    def step():
        layer(x).backward(dy)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    for _ in range(warmup):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = float("nan")
    return statistics.median(times), peak


def run(args) -> None:
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    scale = 1 if cuda else 8
    shapes = [(i // scale, o // scale) for i, o in LLAMA_SHAPES]
    tokens = args.tokens or ([2048, 8192] if cuda else [256, 1024])
    b = args.block_size or (256 if cuda else 32)
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    variants = [("nn.Linear", None, None)]
    for mode in ("fast", "mem"):
        if cuda:
            variants.append((f"POET {mode}, kernels", mode, "auto"))
        variants.append((f"POET {mode}, PyTorch", mode, "off"))
    hw = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"# {hw}, torch {torch.__version__}, dtype {dtype}, b={b}, k={args.neumann_terms}, "
          f"median of {args.reps} after {args.warmup} warmup")
    print("| d_in -> d_out | tokens | method | ms | x nn.Linear | TFLOP/s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for d_in, d_out in shapes:
        for n_tokens in tokens:
            x = torch.randn(n_tokens, d_in, generator=gen).to(device, dtype).requires_grad_()
            dy = torch.randn(n_tokens, d_out, generator=gen).to(device, dtype)
            base_ms = None
            for name, mode, kmode in variants:
                if mode is None:
                    layer = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
                    flops = 6.0 * n_tokens * d_in * d_out
                else:
                    layer = POETLinear(d_in, d_out, bias=False, block_size=b, neumann_terms=args.neumann_terms,
                                       mode=mode, device=device, dtype=dtype, generator=gen)
                    flops = poet_flops(n_tokens, d_in, d_out, b, args.neumann_terms, mode == "mem")
                with kernels_mode(kmode) if kmode else nullcontext():
                    if kmode == "auto" and not rotation_supported(x, layer.input_side.blocks(dtype)):
                        raise RuntimeError(f"{name}: the kernels do not take this shape/dtype (or Triton is "
                                           f"missing); the row would time the PyTorch path")
                    ms, peak = time_step(layer, x, dy, args.warmup, args.reps)
                base_ms = base_ms or ms
                peak_txt = "n/a" if peak != peak else f"{peak:.0f}"  # nan on CPU
                print(f"| {d_in} -> {d_out} | {n_tokens} | {name} | {ms:.3f} | {ms / base_ms:.2f} | "
                      f"{flops / ms / 1e9:.3g} | {peak_txt} |", flush=True)
                del layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", help="token counts (default: 2048 8192 GPU, 256 1024 CPU)")
    parser.add_argument("--block-size", type=int, help="POET block size (default: 256 GPU, 32 CPU)")
    parser.add_argument("--neumann-terms", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 GPU, fp32 CPU")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--cpu", action="store_true", help="run the reduced CPU benchmark even if a GPU exists")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
