#!/usr/bin/env python
"""How far the singular values of a POET layer move over many merges (CPU, a few minutes).

Each of ``--merges`` rounds sets every skew parameter to Gaussian noise scaled so that the
layer's orthogonality error ``max ||G^T G - I||_F`` is about ``--error`` (the size of update
a training run folds at a merge), then merges. Reported per configuration, against a
float64 SVD of the dense weight before the first merge: the largest change of a singular
value relative to ``sigma_max``, the largest change relative to that singular value itself
(for bf16 weights the small singular values are dominated by the rounding of the entries,
so this column is large for any bf16 copy; the master's row shows the spectrum it keeps),
and the layer's ``A0`` norm drift (the figure the training log shows).

Rows: fp32 ``A0`` for every Neumann order, bf16 ``A0`` with and without the fp32 master, 8-bit
``A0`` (``--poet-a0-storage int8``, requantized at every merge) with two group sizes, and, for
contrast, fp32 with the blocks ``G`` themselves folded (the merge before the polar fold). A second
table gives each storage's error on the initial ``A0`` (relative Frobenius, against float64).

Example (the table in docs/POET.md)::

    python tools/spectrum_drift.py --merges 1000 --dim 512 --block-size 64 --error 1e-2
"""
from __future__ import annotations

import argparse

import torch

from megatron_poet import POETLinear
from megatron_poet.poet.a0_storage import stored_bytes_per_entry
from megatron_poet.poet.merge import permuted_copy


def noise_scale(layer: POETLinear, target: float, generator: torch.Generator) -> float:
    """Entry scale of the skew noise whose orthogonality error is ``target`` (bisection, log scale)."""
    lo, hi = 1e-5, 1.0
    shapes = [p.shape for p in layer.poet_parameters()]
    noise = [torch.randn(s, generator=generator) for s in shapes]
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        with torch.no_grad():
            for p, n in zip(layer.poet_parameters(), noise):
                p.copy_(n * mid)
        lo, hi = (mid, hi) if layer.orthogonality_error().item() < target else (lo, mid)
    return (lo * hi) ** 0.5


@torch.no_grad()
def fold_blocks_themselves(layer: POETLinear, generator: torch.Generator) -> None:
    """The previous merge: ``A0 <- P_G A0 R_G`` with the Cayley–Neumann blocks (rounded once)."""
    dense = layer.effective_weight()
    layer.input_side.restart(layer.input_side.draw_permutation(generator))
    layer.output_side.restart(layer.output_side.draw_permutation(generator))
    layer.frozen_weight.copy_(permuted_copy(dense, layer.output_side.perm, layer.input_side.perm))


def merge_rounds(layer: POETLinear, scale: float, merges: int, generator: torch.Generator, merge=None) -> float:
    """``merges`` rounds of Gaussian skew parameters (entry std ``scale``) each followed by
    ``merge(layer, generator)`` (default: the layer's own merge); returns the largest
    orthogonality error met (sampled every 50 rounds)."""
    worst = 0.0
    for i in range(merges):
        with torch.no_grad():
            for p in layer.poet_parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
        if i % 50 == 0:
            worst = max(worst, layer.orthogonality_error().item())
        (merge or POETLinear.merge_and_reset)(layer, generator)
    return worst


def _changes(start: torch.Tensor, end: torch.Tensor) -> tuple[float, float]:
    change = (end - start).abs()
    return (change / start.max()).max().item(), (change / start).max().item()


def drift(dim: int, block: int, k: int | None, dtype: torch.dtype, master: bool, fold_g: bool,
          merges: int, error: float, seed: int, group: int | None = None) -> list[tuple[str, float, float, float, float]]:
    """Rows ``(what, change / sigma_max, max change / sigma, A0 norm drift, largest orthogonality error)``
    for the layer's weight and, with ``master``, for the fp32 master itself."""
    gen = torch.Generator().manual_seed(seed)
    storage = dict(a0_storage="int8", a0_group_size=group) if group else {}
    layer = POETLinear(dim, dim, bias=False, block_size=block, neumann_terms=k, dtype=dtype,
                       fp32_master_a0=master, generator=gen, **storage)
    start = torch.linalg.svdvals(layer.effective_weight().double())
    start_master = torch.linalg.svdvals(layer.frozen_master.double()) if master else None
    scale = noise_scale(layer, error, gen) if k is not None else 0.05
    worst = merge_rounds(layer, scale, merges, gen, fold_blocks_themselves if fold_g else None)
    norm = layer.a0_norm_drift().item()
    rows = [("", *_changes(start, torch.linalg.svdvals(layer.effective_weight().double())), norm, worst)]
    if master:
        rows.append((" (the master)", *_changes(start_master, torch.linalg.svdvals(layer.frozen_master.double())),
                     float("nan"), worst))
    return rows


STORAGE_GROUPS = (64, 256)


def storage_errors(dim: int, seed: int) -> list[tuple[str, float, float]]:
    """``(storage, bytes per entry, ||A0_stored - A0||_F / ||A0||_F)`` of a ``dim x dim`` initial ``A0``."""
    exact = POETLinear(dim, dim, bias=False, dtype=torch.float64, generator=torch.Generator().manual_seed(seed),
                       block_size=2).dense_a0()
    rows = [("bf16", 2.0, exact.bfloat16().double())]
    for group in STORAGE_GROUPS:
        layer = POETLinear(dim, dim, bias=False, block_size=2, generator=torch.Generator().manual_seed(seed),
                           a0_storage="int8", a0_group_size=group)
        rows.append((f"int8, groups of {group}", stored_bytes_per_entry("int8", 1, group), layer.dense_a0().double()))
    return [(label, nbytes, (a0 - exact).norm().item() / exact.norm().item()) for label, nbytes, a0 in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--merges", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--error", type=float, default=1e-2, help="orthogonality error folded per merge")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # many tiny ops
    rows = [(f"fp32, k={k}", k, torch.float32, False, False, None) for k in (1, 2, 3, 4)]
    rows += [("fp32, exact Cayley", None, torch.float32, False, False, None),
             ("bf16, k=3", 3, torch.bfloat16, False, False, None),
             ("bf16 + fp32 master, k=3", 3, torch.bfloat16, True, False, None),
             *((f"int8 A0, groups of {g}, k=3", 3, torch.float32, False, False, g) for g in STORAGE_GROUPS),
             ("fp32, k=3, folding G itself (previous merge)", 3, torch.float32, False, True, None)]
    print(f"# {args.merges} merges, {args.dim}x{args.dim}, b={args.block_size}, orthogonality error "
          f"~{args.error:g} per merge, seed {args.seed}")
    print("| configuration | max abs change / sigma_max | max relative change of a sigma | "
          "A0 norm drift | orthogonality error folded |")
    print("|---|---|---|---|---|")
    for label, k, dtype, master, fold_g, group in rows:
        for what, rel_max, rel_each, norm, worst in drift(args.dim, args.block_size, k, dtype, master, fold_g,
                                                          args.merges, args.error, args.seed, group):
            print(f"| {label}{what} | {rel_max:.2e} | {rel_each:.2e} | {norm:.2e} | {worst:.1e} |", flush=True)
    print("\n| A0 storage | bytes per entry | relative error of the initial A0 |\n|---|---|---|")
    for label, nbytes, err in storage_errors(args.dim, args.seed):
        print(f"| {label} | {nbytes:.3f} | {err:.2e} |")


if __name__ == "__main__":
    main()
