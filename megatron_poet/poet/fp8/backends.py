"""The FP8 GEMM backends behind one switch: Transformer Engine, ``torch._scaled_mm``, the emulation.

All three compute the same thing, ``h = z A0'^T`` forward and ``dL/dz = dL/dh A0'`` backward with
FP8 operands (:mod:`.quantize`); only the weight copies they keep and the kernel differ:

- ``scaled_mm``: this package's quantizers and ``torch._scaled_mm`` (CUDA with FP8 tensor cores,
  compute capability >= 8.9, blockwise scales >= 9.0; and the CPU in torch 2.13, which takes
  tensorwise and row-wise scales, e4m3 and e5m2 x e4m3, float32/bf16 outputs, and equals the
  emulation bitwise).
- ``emulation``: the same quantizers, dequantize, float32 GEMM (:func:`.quantize.emulated_mm`):
  the reference the others are tested against, and what runs where no FP8 GEMM does.
- ``te``: Transformer Engine's quantizers (``Float8CurrentScalingQuantizer`` for tensorwise,
  ``Float8BlockQuantizer`` for blockwise, power-of-two scales like ours) and its functional linear
  (``transformer_engine.pytorch.ops.BasicLinear._functional_forward/_backward``, the documented
  functional API), with the weight-gradient GEMM switched off. TE has no per-row FP8 recipe.

Weight copies (``weight_copy(w, role, ...)``): "forward" is ``A0'`` ``(d_out, d_in)`` quantized
along ``d_in``; "input_grad" is ``A0'^T`` quantized along ``d_out``. With tensorwise or blockwise
scales the second is the first transposed: a view on CPU, a transposed contiguous copy on CUDA
(cuBLASLt wants the second operand column-major). Row-wise scales need their own copy.
"""
from __future__ import annotations

import importlib.util

import torch

from .quantize import FORWARD_DTYPE, GRANULARITIES, Quantized, emulated_mm, gradient_dtype, quantize

BACKENDS = ("auto", "te", "scaled_mm", "emulation")
TE_RECIPES = ("tensorwise", "blockwise")


def te_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def scaled_mm_unsupported(recipe: str, device: torch.device) -> str | None:
    """Why ``torch._scaled_mm`` cannot run ``recipe`` on ``device`` (``None``: it can)."""
    if device.type == "cpu":
        if recipe == "blockwise":
            return f"torch {torch.__version__} on CPU: _scaled_mm takes tensorwise and row-wise scales only"
        return None
    if device.type != "cuda":
        return f"no torch._scaled_mm FP8 GEMM on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"compute capability {capability[0]}.{capability[1]} has no FP8 tensor cores (needs 8.9+)"
    if recipe == "blockwise" and capability < (9, 0):
        return "blockwise-scaled _scaled_mm needs compute capability 9.0+"
    return None


def resolve_backend(requested: str, recipe: str, device: torch.device) -> tuple[str, str]:
    """``(backend, why)`` for ``requested`` (one of :data:`BACKENDS`); raises ValueError naming the problem.

    "auto": Transformer Engine when it is installed and the device is a GPU (for its recipes),
    else ``torch._scaled_mm`` where it takes the recipe, else the emulation.
    """
    if requested not in BACKENDS:
        raise ValueError(f"FP8 backend must be one of {BACKENDS}, got {requested!r}")
    te_ok = te_installed() and device.type == "cuda"
    if requested == "te":
        if not te_ok:
            raise ValueError("FP8 backend 'te' needs Transformer Engine installed and a CUDA GPU")
        if recipe not in TE_RECIPES:
            raise ValueError(f"Transformer Engine has no {recipe!r} FP8 recipe (it has {TE_RECIPES})")
        return "te", "requested"
    if requested == "scaled_mm":
        problem = scaled_mm_unsupported(recipe, device)
        if problem:
            raise ValueError(f"FP8 backend 'scaled_mm' cannot run {recipe!r}: {problem}")
        return "scaled_mm", "requested"
    if requested == "emulation":
        return "emulation", "requested"
    if te_ok and recipe in TE_RECIPES:
        return "te", "Transformer Engine installed on a GPU"
    problem = scaled_mm_unsupported(recipe, device)
    if problem is None:
        why = "Transformer Engine has no row-wise recipe" if te_ok else (
            "Transformer Engine not installed" if device.type == "cuda" else "no GPU")
        return "scaled_mm", why
    return "emulation", problem


class TorchBackend:
    """This package's quantizers with ``torch._scaled_mm`` (``use_scaled_mm``) or the emulation."""

    def __init__(self, fmt: str, recipe: str, use_scaled_mm: bool):
        self.grad_dtype = gradient_dtype(fmt)
        self.a_granularity, self.b_granularity = GRANULARITIES[recipe]
        self.use_scaled_mm = use_scaled_mm
        self.name = "scaled_mm" if use_scaled_mm else "emulation"
        # Tensorwise/blockwise: A0'^T's copy is the forward copy transposed, not quantized again.
        self.derives_input_grad_copy = self.b_granularity != "row"

    def weight_copy(self, w: torch.Tensor, role: str, amax_group, forward_copy: Quantized | None) -> Quantized:
        """The FP8 ``A0'`` (role "forward") or ``A0'^T`` (role "input_grad"); ``forward_copy`` is reused
        for the latter when the scales allow."""
        if role == "forward":
            return quantize(w, FORWARD_DTYPE, self.b_granularity, amax_group)
        if self.b_granularity == "row":
            return quantize(w.t(), FORWARD_DTYPE, "row", amax_group)
        transposed = forward_copy.t()
        if w.is_cuda:  # cuBLASLt takes the second operand column-major only
            transposed.data = transposed.data.contiguous()
        return transposed

    def forward(self, z: torch.Tensor, w_copy: Quantized, amax_group, out_dtype: torch.dtype) -> torch.Tensor:
        """``z A0'^T`` for ``z`` ``(M, d_in)``."""
        return self._mm(quantize(z, FORWARD_DTYPE, self.a_granularity, amax_group), w_copy, out_dtype)

    def input_grad(self, grad: torch.Tensor, wt_copy: Quantized, amax_group, out_dtype: torch.dtype) -> torch.Tensor:
        """``grad A0'`` for ``grad`` ``(M, d_out)``."""
        return self._mm(quantize(grad, self.grad_dtype, self.a_granularity, amax_group), wt_copy, out_dtype)

    def _mm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
        if not self.use_scaled_mm:
            return emulated_mm(a, b, out_dtype)
        scale_a, scale_b = a.scale_inv, b.scale_inv
        if a.granularity == "row":
            scale_b = scale_b.t().contiguous()  # (1, N)
        elif a.granularity == "tile":  # 1x128 scales outer-dim-major, 128x128 ones as (K/128, N/128)
            scale_a, scale_b = scale_a.t().contiguous().t(), scale_b.t()
        return torch._scaled_mm(a.data, b.data.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


class TransformerEngineBackend:
    """Transformer Engine's quantizers and FP8 GEMM (CUDA only; tensorwise or blockwise)."""

    name = "te"
    derives_input_grad_copy = True

    def __init__(self, fmt: str, recipe: str):
        import transformer_engine.pytorch as te
        from transformer_engine.pytorch.ops import BasicLinear

        self.te, self.linear = te, BasicLinear
        self.recipe = recipe
        self.forward_dtype = te.DType.kFloat8E4M3
        self.grad_dtype = te.DType.kFloat8E5M2 if fmt == "hybrid" else te.DType.kFloat8E4M3

    def _quantizer(self, dtype, device, *, weight: bool, amax_group):
        # Power-of-two scales, as this package's quantizers use (the GPU tests compare the two).
        if self.recipe == "tensorwise":
            return self.te.Float8CurrentScalingQuantizer(
                dtype, device, rowwise=True, columnwise=weight, with_amax_reduction=amax_group is not None,
                amax_reduction_group=amax_group, force_pow_2_scales=True)
        return self.te.Float8BlockQuantizer(dtype, rowwise=True, columnwise=weight, force_pow_2_scales=True,
                                            block_scaling_dim=2 if weight else 1)

    def weight_copy(self, w: torch.Tensor, role: str, amax_group, forward_copy):
        """One TE tensor with row-wise and column-wise (transposed) data serves both roles."""
        if forward_copy is not None:
            return forward_copy
        return self._quantizer(self.forward_dtype, w.device, weight=True, amax_group=amax_group).quantize(w)

    def forward(self, z: torch.Tensor, w_copy, amax_group, out_dtype: torch.dtype) -> torch.Tensor:
        quantizer = self._quantizer(self.forward_dtype, z.device, weight=False, amax_group=amax_group)
        y, _, _ = self.linear._functional_forward(
            z, w_copy, dtype=out_dtype, with_quantized_compute=True, input_quantizer=quantizer,
            input_requires_grad=True, weight_requires_grad=False)
        return y

    def input_grad(self, grad: torch.Tensor, w_copy, amax_group, out_dtype: torch.dtype) -> torch.Tensor:
        quantizer = self._quantizer(self.grad_dtype, grad.device, weight=False, amax_group=amax_group)
        grad_input, _ = self.linear._functional_backward(
            grad, None, w_copy, input_requires_grad=True, weight_requires_grad=False, dtype=out_dtype,
            with_quantized_compute=True, grad_output_quantizer=quantizer)
        return grad_input


def make_backend(name: str, fmt: str, recipe: str):
    """The backend object for a resolved name (:func:`resolve_backend`)."""
    if name == "te":
        return TransformerEngineBackend(fmt, recipe)
    return TorchBackend(fmt, recipe, use_scaled_mm=name == "scaled_mm")
