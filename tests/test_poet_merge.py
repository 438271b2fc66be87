"""Spectrum-exact merges of POETLinear against float64 references (SVD, dense products).

The merge folds the polar factor U of every Cayley–Neumann block G into A0
(megatron_poet/poet/merge.py, docs/POET.md). Checked here: the folded weight equals the
float64 dense product P_U A0 R_U; the function changes by at most the truncation error
bound; 1000 merges keep every singular value within 1e-5 sigma_max (fp32 A0) for every
Neumann order; bf16 A0 merges round once from float64, and the fp32 master keeps the
spectrum of bf16 runs.
"""
import importlib.util
import os

import pytest
import torch

from megatron_poet import POETLinear
from megatron_poet.poet.cayley import skew_from_packed

from test_poet_linear import dense_a0, make_layer, permutation_matrix

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "spectrum_drift.py")
_spec = importlib.util.spec_from_file_location("spectrum_drift", _TOOL)
spectrum_drift = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(spectrum_drift)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny ops: one thread avoids OpenMP's hand-off cost (30x on a loaded 2-core VM)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_side_of(blocks: torch.Tensor, side) -> torch.Tensor:
    """Dense float64 Pi^T BD(blocks) Pi (blocks on each segment's first b coordinates)."""
    bd = torch.eye(side.dim, dtype=torch.float64)
    b = side.block_size
    for k, block in enumerate(blocks):
        s = k * side.segment
        bd[s:s + b, s:s + b] = block.double()
    pi = permutation_matrix(side.perm)
    return pi.T @ bd @ pi


def float64_blocks(side) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cayley–Neumann blocks G, exact Cayley blocks C) from the packed parameters, float64."""
    q = skew_from_packed(side.skew.detach().double(), side.block_size)
    eye = torch.eye(side.block_size, dtype=torch.float64)
    exact = torch.linalg.solve(eye - q, eye + q)
    if side.neumann_terms is None:
        return exact, exact
    series = sum(torch.linalg.matrix_power(q, j) for j in range(side.neumann_terms + 1))
    return (eye + q) @ series, exact


def polar(blocks: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(blocks)
    return u @ vh


@pytest.mark.parametrize("k", [1, 2, 3, 4, None])
@pytest.mark.parametrize("variant,block_size", [("bs", 4), ("fs", 6)])
def test_merge_folds_nearest_orthogonal_factor_within_truncation_error(k, variant, block_size):
    layer = make_layer(variant, block_size, neumann_terms=k, scale=0.15)
    w_before = layer.effective_weight()
    a0 = dense_a0(layer)
    g_in, c_in = float64_blocks(layer.input_side)
    g_out, c_out = float64_blocks(layer.output_side)
    expected = dense_side_of(polar(g_out), layer.output_side) @ a0 @ dense_side_of(polar(g_in), layer.input_side)
    # Per block, the polar factor is at least as close to G as the exact Cayley block is (Weyl).
    for g, c in ((g_in, c_in), (g_out, c_out)):
        gap_u = torch.linalg.matrix_norm(g - polar(g), ord=2)
        gap_c = torch.linalg.matrix_norm(g - c, ord=2)
        assert (gap_u <= gap_c + 1e-12).all()
    e_in = torch.linalg.matrix_norm(g_in - c_in, ord=2).max()
    e_out = torch.linalg.matrix_norm(g_out - c_out, ord=2).max()
    perms = (layer.input_side.perm.clone(), layer.output_side.perm.clone())

    layer.merge_and_reset(torch.Generator().manual_seed(5))
    assert torch.allclose(layer.effective_weight(), expected, atol=1e-12, rtol=0)
    change = torch.linalg.matrix_norm(layer.effective_weight() - w_before, ord=2)
    bound = ((1 + e_out) * (1 + e_in) - 1) * torch.linalg.matrix_norm(a0, ord=2)
    assert change <= bound + 1e-12, (change, bound)
    assert all(torch.count_nonzero(p) == 0 for p in layer.poet_parameters())
    assert not torch.equal(layer.input_side.perm, perms[0]) and not torch.equal(layer.output_side.perm, perms[1])
    assert torch.equal(layer.output_side.inv_perm[layer.output_side.perm], torch.arange(8))


# Skew entry scales giving a per-merge orthogonality error of ~0.5-1e-2 for each Neumann order
# (the error is ~||Q||^(k+1) for odd k, ~||Q||^(2k+2) for even k; exact Cayley has none).
SCALES = {1: 0.0065, 2: 0.05, 3: 0.03, 4: 0.07, None: 0.1}


def run_merges(layer: POETLinear, scale: float, merges: int, seed: int = 0) -> float:
    """``merges`` rounds of random skews then a merge (tools/spectrum_drift.py); the largest orthogonality error met."""
    return spectrum_drift.merge_rounds(layer, scale, merges, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 2, 3, 4, None])
def test_1000_merges_keep_every_singular_value_fp32(k):
    """fp32 A0, 128 -> 96, b = 16: sigma_i after 1000 merges within 1e-5 sigma_max of the start.

    Reference: float64 SVD of the dense weight before and after. Each merge rounds A0 to fp32
    once (relative 6e-8), so the singular values random-walk by ~sqrt(1000) x 6e-8 ~ 2e-6;
    folding the Cayley–Neumann blocks themselves (the previous merge) moved sigma_max by ~1e-2
    at these error levels.
    """
    layer = POETLinear(128, 96, bias=False, block_size=16, neumann_terms=k,
                       generator=torch.Generator().manual_seed(1))
    start = torch.linalg.svdvals(layer.effective_weight().double())
    worst = run_merges(layer, SCALES[k], 1000)
    if k is not None:
        assert 3e-3 < worst < 1.5e-2, worst  # the merges really folded errors of the stated size
    end = torch.linalg.svdvals(layer.effective_weight().double())
    assert (end - start).abs().max() <= 1e-5 * start.max()
    assert layer.a0_norm_drift() < 1e-6


def test_fs_variant_1000_merges_keep_spectrum():
    layer = POETLinear(96, 128, bias=False, block_size=24, variant="fs", generator=torch.Generator().manual_seed(2))
    start = torch.linalg.svdvals(layer.effective_weight().double())
    run_merges(layer, 0.05, 1000)
    end = torch.linalg.svdvals(layer.effective_weight().double())
    assert (end - start).abs().max() <= 1e-5 * start.max()


def test_bf16_merge_rounds_once_from_float64():
    layer = make_layer("bs", 4, dtype=torch.bfloat16, scale=0.1)
    # G as the layer builds it (float32), then its polar factor in float64.
    g_in, g_out = (polar(s.blocks().double()) for s in (layer.input_side, layer.output_side))
    expected = dense_side_of(g_out, layer.output_side) @ dense_a0(layer) @ dense_side_of(g_in, layer.input_side)
    layer.merge_and_reset()
    got = dense_a0(layer)  # the stored bf16 A0 (R = P = I after the merge)
    # One rounding of the float64 result to bf16 (unit roundoff 2^-8) per entry, nothing more.
    assert torch.all((got - expected).abs() <= 2 ** -8 * expected.abs())


@pytest.mark.parametrize("master", [False, True])
def test_bf16_spectrum_with_and_without_fp32_master(master):
    """200 merges of a bf16 layer. With the fp32 master, merges fold the master (its spectrum
    stays within 1e-5 sigma_max, like an fp32 layer) and the stored A0 is the master rounded
    once; without it every merge rounds to bf16 again and the singular values random-walk
    (measured sizes: docs/POET.md)."""
    layer = POETLinear(64, 64, bias=False, block_size=16, dtype=torch.bfloat16, fp32_master_a0=master,
                       generator=torch.Generator().manual_seed(3))
    start = torch.linalg.svdvals(layer.effective_weight().double())
    master_start = torch.linalg.svdvals(layer.frozen_master.double()) if master else None
    run_merges(layer, SCALES[3], 200)
    end = torch.linalg.svdvals(layer.effective_weight().double())
    change = ((end - start).abs() / start.max()).max().item()
    if master:
        stored = permutation_matrix(layer.output_side.perm) @ layer.frozen_master.double() @ permutation_matrix(
            layer.input_side.perm).T
        assert torch.equal(layer.frozen_weight, stored.to(torch.bfloat16))
        master_end = torch.linalg.svdvals(layer.frozen_master.double())
        assert (master_end - master_start).abs().max() <= 1e-5 * master_start.max()
        assert change < 1e-3  # one bf16 rounding of the master (measured 3.7e-4)
    else:
        assert change > 2e-3  # every merge rounds to bf16 again and the errors accumulate (measured 4.1e-3)


def test_fp32_master_state_dict_round_trip():
    a = POETLinear(32, 32, block_size=8, dtype=torch.bfloat16, fp32_master_a0=True,
                   generator=torch.Generator().manual_seed(4))
    run_merges(a, 0.05, 3)
    b = POETLinear(32, 32, block_size=8, dtype=torch.bfloat16, fp32_master_a0=True,
                   generator=torch.Generator().manual_seed(5))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.frozen_master, b.frozen_master) and torch.equal(a.frozen_weight, b.frozen_weight)


def test_a0_norm_drift_diagnostic():
    layer = POETLinear(64, 32, block_size=8, generator=torch.Generator().manual_seed(6))
    assert layer.a0_norm_drift() == 0
    run_merges(layer, 0.05, 20)
    assert layer.a0_norm_drift() < 1e-6
    with torch.no_grad():
        layer.frozen_weight.mul_(1.01)
    assert abs(layer.a0_norm_drift().item() - 0.01) < 1e-6
