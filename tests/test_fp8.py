"""FP8 frozen GEMM of POET layers on CPU: quantizers, torch._scaled_mm vs the emulation, error bounds
derived from the formats, the FP8 copy of A0 (once per merge, rebuilt after a load, never saved),
and the clear errors. Multi-process (TP) and training-program tests: test_fp8_training.py."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_poet import POETLinear
from megatron_poet.poet.fp8 import FP8Config, enable_fp8
from megatron_poet.poet.fp8.backends import resolve_backend
from megatron_poet.poet.fp8.quantize import (BLOCK, FORWARD_DTYPE, dequantize, gradient_dtype, quantize,
                                             rounding_bounds)
from megatron_poet.poet.functional import frozen_gemm, frozen_gemm_input_grad

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (7 explicit mantissa bits)


def make_layer(d_in=256, d_out=384, mode="fast", dtype=torch.bfloat16, seed=0, fp8=None):
    g = torch.Generator().manual_seed(seed)
    layer = POETLinear(d_in, d_out, bias=False, block_size=32, mode=mode, dtype=dtype, generator=g)
    with torch.no_grad():  # away from the identity: the rotations matter
        for side in (layer.input_side, layer.output_side):
            side.skew.copy_(torch.randn(side.skew.shape, generator=g) * 0.05)
    if fp8 is not None:
        enable_fp8(layer, fp8)
    return layer


def fwd_bwd(layer, x, dy):
    """``(y, dL/dx, dL/dskew_R, dL/dskew_P)`` of one forward/backward."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.input_side.skew.grad, layer.output_side.skew.grad


def inputs(d_in=256, d_out=384, tokens=(2, 32), dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*tokens, d_in, generator=g).to(dtype), torch.randn(*tokens, d_out, generator=g).to(dtype))


# ----------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("granularity", ["tensor", "row", "tile", "block"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_power_of_two_scales_and_rounding_bound(granularity, dtype):
    g = torch.Generator().manual_seed(0)
    # Rows spanning 2^+-12: some groups' small entries fall into the FP8 subnormals.
    x = torch.randn(256, 384, generator=g) * torch.exp2(torch.randint(-12, 12, (256, 1), generator=g).float())
    q = quantize(x, dtype, granularity)
    mantissa, _ = torch.frexp(q.scale_inv)
    assert torch.all(mantissa == 0.5)  # powers of two: scaling is exact
    fmax = torch.finfo(dtype).max
    assert q.data.float().abs().max() <= fmax
    # The scale is the largest power of two keeping the group's max in range: doubling it would overflow.
    amax = {"tensor": x.abs().amax(), "row": x.abs().amax(1, keepdim=True),
            "tile": x.abs().view(256, 3, BLOCK).amax(2),
            "block": x.abs().view(2, BLOCK, 3, BLOCK).amax((1, 3))}[granularity]
    assert torch.all(amax / q.scale_inv <= fmax) and torch.all(2 * amax / q.scale_inv > fmax)
    # Rounding error: at most u |x| in the normal range, s x scale below it (u, s from the format's bits).
    u, s = rounding_bounds(dtype)
    expand = dequantize(type(q)(torch.ones_like(q.data, dtype=torch.float32).to(dtype), q.scale_inv, granularity))
    err = (dequantize(q) - x).abs()
    assert torch.all(err <= torch.maximum(u * x.abs(), s * expand))


def test_quantize_keeps_non_finite_and_zero():
    x = torch.tensor([[1.0, 2.0, -2.0, 0.5]] * 16)
    x[3, 1] = float("inf")
    x[5, 2] = float("nan")
    for dtype in (E4M3, E5M2):  # torch's e4m3 cast alone would turn inf into 448
        rows = dequantize(quantize(x, dtype, "row"))
        assert torch.isnan(rows[[3, 5]]).all() and torch.isfinite(rows[[0, 1, 2, 4, 6]]).all()
        assert torch.isnan(dequantize(quantize(x, dtype, "tensor"))).all()
    zero = quantize(torch.zeros(16, 32), E4M3, "tensor")
    assert zero.scale_inv.item() == 1.0 and torch.equal(dequantize(zero), torch.zeros(16, 32))


# ----------------------------------------------------------------------------- _scaled_mm == emulation
@pytest.mark.parametrize("recipe, fmt, mode", [("tensorwise", "e4m3", "fast"), ("tensorwise", "hybrid", "mem"),
                                               ("rowwise", "e4m3", "mem"), ("rowwise", "hybrid", "fast")])
def test_scaled_mm_equals_emulation_bitwise(recipe, fmt, mode):
    """torch 2.13's CPU _scaled_mm and quantize -> dequantize -> float32 GEMM: the same bits, forward and backward."""
    x, dy = inputs()
    got = [fwd_bwd(make_layer(mode=mode, fp8=FP8Config(fmt, recipe, backend)), x, dy)
           for backend in ("scaled_mm", "emulation")]
    for a, b in zip(*got):
        assert torch.equal(a, b)


def test_scaled_mm_equals_emulation_bitwise_fp32_output():
    x, dy = inputs(dtype=torch.float32)
    got = [fwd_bwd(make_layer(dtype=torch.float32, fp8=FP8Config("hybrid", "rowwise", backend)), x, dy)
           for backend in ("scaled_mm", "emulation")]
    for a, b in zip(*got):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- error bounds from the formats
def _gemm_bound(a, b, a_dtype, granularity_a, granularity_b):
    """Rigorous elementwise bound on ``|fp8(a) fp8(b)^T - a b^T|`` (float64), from the formats' bits.

    Each quantized entry errs by at most ``e = max(u|x|, s * scale)`` (:func:`rounding_bounds`), so
    ``|a'b' - ab| <= |a| e_b^T + e_a |b|^T + e_a e_b^T``; the float32 accumulation adds at most
    ``K 2^-24 |a'| |b'|^T`` and the rounding of the output to bf16 ``u_bf16 |result|``.
    """
    def entry_error(x, dtype, granularity):
        q = quantize(x, dtype, granularity)
        u, s = rounding_bounds(dtype)
        ones = type(q)(torch.ones_like(q.data, dtype=torch.float32).to(dtype), q.scale_inv, granularity)
        return torch.maximum(u * x.abs(), s * dequantize(ones)).double()

    ea, eb = entry_error(a, a_dtype, granularity_a), entry_error(b, FORWARD_DTYPE, granularity_b)
    aa, bb = a.abs().double(), b.abs().double()
    quant = aa @ eb.T + ea @ bb.T + ea @ eb.T
    accumulate = a.shape[1] * 2.0 ** -24 * ((aa + ea) @ (bb + eb).T)
    exact = a.double() @ b.double().T
    return quant + accumulate + U_BF16 * (exact.abs() + quant + accumulate)


@pytest.mark.parametrize("recipe,granularities", [("tensorwise", ("tensor", "tensor")),
                                                  ("rowwise", ("row", "row")), ("blockwise", ("tile", "block"))])
def test_fp8_gemm_error_within_the_bound_of_its_formats(recipe, granularities):
    """The FP8 GEMM (forward and input gradient, hybrid: e5m2 gradients) against the exact product of
    its bf16 operands, entry by entry; and the bf16 GEMM is within the bf16 part of the same bound."""
    layer = make_layer(fp8=FP8Config("hybrid", recipe))
    w = layer.frozen_weight
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(96, 256, generator=g) * torch.exp2(torch.randint(-6, 6, (96, 1), generator=g))).bfloat16()
    gh = (torch.randn(96, 384, generator=g) * torch.exp2(torch.randint(-6, 6, (96, 1), generator=g))).bfloat16()
    # Backward's B is A0'^T (quantized by its own rows, or tensorwise/blockwise: the same scales transposed).
    for got, a, b, a_dtype in ((frozen_gemm(z, w, layer.fp8), z, w, FORWARD_DTYPE),
                               (frozen_gemm_input_grad(gh, w, layer.fp8), gh, w.t().contiguous(),
                                gradient_dtype("hybrid"))):
        bound = _gemm_bound(a, b, a_dtype, *granularities)
        exact = a.double() @ b.double().T
        assert torch.all((got.double() - exact).abs() <= bound)


@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
def test_fp8_layer_error_vs_bf16_layer(fmt):
    """Relative error of the FP8 layer against the bf16 layer, forward and backward.

    Bound from the formats: each operand entry is rounded with a relative error of RMS at most
    ``u/sqrt(3)`` (``u = 2^-(m+1)``; uniform within half a unit in the last place), independent
    over the ``K`` terms of each output, so the product's relative error has RMS at most
    ``sqrt((u_a^2 + u_b^2) / 3)``; the rotations around the GEMM are near-orthogonal (they keep
    relative errors). Both layers also carry the bf16 rounding of everything else, measured here as
    the bf16 layer's error against the float64 layer (the triangle inequality adds it twice).
    A lower bound shows FP8 ran.
    """
    x, dy = inputs()
    exact = fwd_bwd(make_layer().double(), x.double(), dy.double())
    bf16 = fwd_bwd(make_layer(), x, dy)
    fp8 = fwd_bwd(make_layer(fp8=FP8Config(fmt, "rowwise")), x, dy)
    u4 = rounding_bounds(E4M3)[0]
    ug = rounding_bounds(gradient_dtype(fmt))[0]

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for i, u_a in ((0, u4), (1, ug)):  # forward: e4m3 x e4m3; input gradient: e4m3 or e5m2 x e4m3
        model = math.sqrt((u_a ** 2 + u4 ** 2) / 3)
        got = rel(fp8[i], bf16[i])
        assert 0.25 * model < got <= model + 2 * rel(bf16[i], exact[i]), (i, got, model)


# ----------------------------------------------------------------------------- A0 and its FP8 copy
def test_no_gradient_reaches_a0_even_if_requested():
    layer = make_layer(fp8=FP8Config("hybrid", "rowwise"))
    layer.frozen_weight.requires_grad_(True)
    x, dy = inputs()
    fwd_bwd(layer, x, dy)
    assert layer.frozen_weight.grad is None
    assert layer.input_side.skew.grad is not None


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_copy_once_per_merge_rebuilt_after_load_never_saved(recipe):
    layer = make_layer(fp8=FP8Config("hybrid", recipe, "scaled_mm"))
    plain_keys = set(make_layer().state_dict())
    x, dy = inputs()
    for _ in range(2):
        fwd_bwd(layer, x, dy)
    assert layer.fp8.builds == 2  # the forward copy and A0'^T's, once for both steps

    def forward_copy_is_current():
        want = quantize(layer.frozen_weight, FORWARD_DTYPE, "tensor" if recipe == "tensorwise" else "row")
        have = layer.fp8.weight(layer.frozen_weight, "forward")
        return torch.equal(have.data.view(torch.uint8), want.data.view(torch.uint8)) and torch.equal(
            have.scale_inv, want.scale_inv)

    layer.merge_and_reset(torch.Generator().manual_seed(5))
    assert layer.fp8.copy_nbytes() == 0  # dropped by the merge itself
    fwd_bwd(layer, x, dy)
    assert layer.fp8.builds == 4 and forward_copy_is_current()

    other = make_layer(seed=7)
    layer.load_state_dict(other.state_dict())
    assert layer.fp8.copy_nbytes() == 0  # dropped by the load hook
    assert torch.equal(fwd_bwd(layer, x, dy)[0],
                       fwd_bwd(make_layer(seed=7, fp8=FP8Config("hybrid", recipe, "scaled_mm")), x, dy)[0])
    with torch.no_grad():
        layer.frozen_weight.mul_(0.5)  # any other in-place write: the version counter notices
    fwd_bwd(layer, x, dy)
    assert forward_copy_is_current()

    state = layer.state_dict()
    assert set(state) == plain_keys
    assert not any(t.dtype in (E4M3, E5M2) for t in state.values())


# ----------------------------------------------------------------------------- backends and errors
def test_backend_choice_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", "rowwise", cpu)[0] == "scaled_mm"
    backend, why = resolve_backend("auto", "blockwise", cpu)
    assert backend == "emulation" and "tensorwise and row-wise scales only" in why
    with pytest.raises(ValueError, match="'scaled_mm' cannot run 'blockwise'"):
        resolve_backend("scaled_mm", "blockwise", cpu)
    with pytest.raises(ValueError, match="needs Transformer Engine installed and a CUDA GPU"):
        resolve_backend("te", "tensorwise", cpu)
    with pytest.raises(ValueError, match="recipe must be one of"):
        FP8Config("hybrid", "delayed")


@pytest.mark.parametrize("d_in, d_out, recipe, dtype, message", [
    (256, 264, "rowwise", torch.bfloat16, "output features=264 is not a multiple of 16"),
    (192, 256, "blockwise", torch.bfloat16, "input features=192 is not a multiple of 128"),
    (256, 256, "rowwise", torch.float16, "outputs bf16 or fp32"),
])
def test_layers_the_fp8_gemm_cannot_take_fail_clearly(d_in, d_out, recipe, dtype, message):
    g = torch.Generator().manual_seed(0)
    layer = POETLinear(d_in, d_out, bias=False, block_size=8, dtype=dtype, generator=g)
    with pytest.raises(ValueError, match=message):
        enable_fp8(torch.nn.Sequential(layer), FP8Config("hybrid", recipe))
    assert layer.fp8 is None  # nothing changed


def test_blockwise_emulation_matches_dequantized_reference():
    """Blockwise runs the emulation on CPU: its GEMM is exactly dequantize(1x128 tiles) @ dequantize(128x128)^T."""
    layer = make_layer(fp8=FP8Config("e4m3", "blockwise"))
    z = torch.randn(64, 256).bfloat16()
    want = (dequantize(quantize(z, E4M3, "tile")) @ dequantize(quantize(layer.frozen_weight, E4M3, "block")).T)
    assert torch.equal(frozen_gemm(z, layer.frozen_weight, layer.fp8), want.bfloat16())
    assert torch.equal(F.linear(z, layer.frozen_weight), frozen_gemm(z, layer.frozen_weight))
