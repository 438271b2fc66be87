#!/usr/bin/env python
"""Accuracy of the FP8 frozen GEMM on a POET layer: every recipe and format against bf16.

One bf16 ``POETLinear`` (trained-looking factors: skew parameters ~ N(0, 0.05^2)) runs forward
and backward on inputs and output gradients of several distributions; every variant is compared
with the same layer computed in float64 (the exact function of its bf16 parameters). Printed for
the output ``y`` and the input gradient ``dL/dx``: the relative Frobenius error of the whole
tensor, and the worst relative error of one token's row (``max_t ||e_t|| / ||ref_t||``: a scale
shared by many tokens fails small tokens first, which the Frobenius norm hides), median over
``--trials`` draws. The bf16 row is the layer without FP8 (bf16 GEMM, float32 accumulation).

Distributions (tokens x features), chosen to span what a transformer's linears see:
- gaussian: N(0, 1) everywhere;
- outlier channels: gaussian, 1% of the features x100 (LayerNorm/RMSNorm outlier dimensions);
- token scales: gaussian rows scaled by exp(N(0, 3^2)) (tokens of very different norms, ~2^+-13
  apart at 3 sigma; output gradients are concentrated on few tokens like this);
- heavy tails: Student-t with 1.5 degrees of freedom (infinite variance).
The same distribution is used for the input and the output gradient. FP8 runs the emulation backend:
the reference numerics (``torch._scaled_mm`` equals it bitwise on CPU, GPU backends to float32 rounding).

Example::

    python tools/fp8_accuracy.py                     # d_in=1024 -> d_out=1024, 2048 tokens, b=64
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch

from megatron_poet import POETLinear
from megatron_poet.poet.fp8 import FORMATS, RECIPES, FP8Config, enable_fp8


def sample(kind: str, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "outlier channels":
        x[:, torch.randperm(shape[1], generator=gen)[: max(1, shape[1] // 100)]] *= 100
    elif kind == "token scales":
        x *= torch.exp(3 * torch.randn(shape[0], 1, generator=gen, dtype=torch.float64))
    elif kind == "heavy tails":
        x = torch.distributions.StudentT(torch.tensor(1.5, dtype=torch.float64)).sample(shape)
    return x


DISTRIBUTIONS = ("gaussian", "outlier channels", "token scales", "heavy tails")


def run(layer: POETLinear, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach().double(), x.grad.double()


def errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, worst relative error of a row)."""
    return float((a - b).norm() / b.norm()), float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=1024)
    p.add_argument("--d-out", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = POETLinear(args.d_in, args.d_out, bias=False, block_size=args.block_size, dtype=torch.bfloat16,
                      generator=gen)
    with torch.no_grad():
        for side in (base.input_side, base.output_side):
            side.skew.copy_(torch.randn(side.skew.shape, generator=gen) * 0.05)
    exact = copy.deepcopy(base).double()
    variants = [("bf16 (no FP8)", None)] + [(f"{fmt}, {recipe}", FP8Config(fmt, recipe, "emulation"))
                                            for recipe in RECIPES for fmt in FORMATS]
    layers = []
    for name, config in variants:
        layer = copy.deepcopy(base)
        if config is not None:
            enable_fp8(layer, config)
        layers.append(layer)
    print(f"# POETLinear {args.d_in}->{args.d_out}, b={args.block_size}, {args.tokens} tokens, bf16; relative "
          f"Frobenius error vs float64, median of {args.trials}")
    print("| distribution | variant | y | y, worst token | dL/dx | dL/dx, worst token |")
    print("|---|---|---|---|---|---|")
    for kind in DISTRIBUTIONS:
        found = [[] for _ in variants]
        for _ in range(args.trials):
            x = sample(kind, (args.tokens, args.d_in), gen)
            dy = sample(kind, (args.tokens, args.d_out), gen)
            y_ref, gx_ref = run(exact, x, dy)
            for errs, layer in zip(found, layers):
                y, gx = run(layer, x.bfloat16(), dy.bfloat16())
                errs.append(errors(y, y_ref) + errors(gx, gx_ref))
        for (name, _), errs in zip(variants, found):
            cells = " | ".join(f"{statistics.median(e[i] for e in errs):.2e}" for i in range(4))
            print(f"| {kind} | {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
