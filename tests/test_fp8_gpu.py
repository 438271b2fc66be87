"""FP8 on a GPU: torch._scaled_mm and Transformer Engine against the emulation (skipped without one).

The three backends quantize identically (power-of-two scales from the same maxima), so their
operands agree; the GEMMs differ in the order of the float32 sums and round the output to bf16
once each. Tolerance: relative Frobenius difference at most one bf16 unit roundoff (2^-8) and no
entry off by more than 2^-6 of the largest one (a rounding flip of a near-cancelling sum).
"""
import pytest
import torch

from megatron_poet import POETLinear
from megatron_poet.poet.fp8 import FP8Config, enable_fp8
from megatron_poet.poet.fp8.quantize import FORWARD_DTYPE, dequantize, quantize

U_BF16 = 2.0 ** -8


def _need_fp8_gpu(recipe: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+); none on this machine")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        pytest.skip(f"compute capability {capability} has no FP8 tensor cores (needs 8.9+)")
    if recipe == "blockwise" and capability < (9, 0):
        pytest.skip("blockwise-scaled FP8 GEMMs need compute capability 9.0+")


def _layer_run(backend: str, fmt: str, recipe: str):
    g = torch.Generator().manual_seed(0)
    layer = POETLinear(1024, 1536, bias=False, block_size=64, dtype=torch.bfloat16, generator=g).cuda()
    with torch.no_grad():
        for side in (layer.input_side, layer.output_side):
            side.skew.copy_(torch.randn(side.skew.shape, generator=g).cuda() * 0.05)
    enable_fp8(layer, FP8Config(fmt, recipe, backend))
    x = torch.randn(4, 256, 1024, generator=g).bfloat16().cuda().requires_grad_()
    dy = torch.randn(4, 256, 1536, generator=g).bfloat16().cuda()
    y = layer(x)
    y.backward(dy)
    return layer, y.detach().float(), x.grad.float()


def _assert_same_up_to_accumulation(got: torch.Tensor, want: torch.Tensor) -> None:
    assert ((got - want).norm() / want.norm()).item() <= U_BF16
    assert (got - want).abs().max().item() <= 2.0 ** -6 * want.abs().max().item()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "blockwise"])
@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
def test_scaled_mm_matches_emulation_on_gpu(recipe, fmt):
    _need_fp8_gpu(recipe)
    _, y_e, gx_e = _layer_run("emulation", fmt, recipe)
    layer, y_s, gx_s = _layer_run("scaled_mm", fmt, recipe)
    assert layer.fp8.backend.name == "scaled_mm"
    _assert_same_up_to_accumulation(y_s, y_e)
    _assert_same_up_to_accumulation(gx_s, gx_e)


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
def test_transformer_engine_matches_emulation(recipe, fmt):
    _need_fp8_gpu(recipe)
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    _, y_e, gx_e = _layer_run("emulation", fmt, recipe)
    layer, y_t, gx_t = _layer_run("te", fmt, recipe)
    _assert_same_up_to_accumulation(y_t, y_e)
    _assert_same_up_to_accumulation(gx_t, gx_e)
    # TE's FP8 A0' (power-of-two scales) is this package's, up to maxima on a rounding boundary.
    w = layer.frozen_weight
    ours = dequantize(quantize(w, FORWARD_DTYPE, "tensor" if recipe == "tensorwise" else "block"))
    theirs = layer.fp8.weight(w, "forward").dequantize(dtype=torch.float32)
    assert (ours != theirs).float().mean().item() < 1e-3


def test_auto_backend_on_gpu():
    _need_fp8_gpu("rowwise")
    layer, _, _ = _layer_run("auto", "hybrid", "rowwise")
    assert layer.fp8.backend.name == "scaled_mm"  # Transformer Engine has no row-wise recipe
