"""8-bit ``A0`` storage (``--poet-a0-storage int8``, megatron_poet.poet.a0_storage).

References: the quantization against its float64 definition; the 8-bit layer against a native
layer holding the dequantized ``A0`` (same function, same gradients, same merge); the resident
bytes against their count. The tensor-parallel layout independence and resharding are in
tests/test_megatron_tp.py, exact resume in tests/test_resume_matrix.py.
"""
from __future__ import annotations

import pytest
import torch

from megatron_poet import POETLinear
from megatron_poet.poet.a0_storage import dequantize_groups, quantize_groups_


def _quantize(w: torch.Tensor, group: int):
    codes = torch.empty(w.shape, dtype=torch.uint8)
    scale = torch.empty(w.shape[0], w.shape[1] // group)
    zero = torch.empty_like(scale)
    quantize_groups_(w, codes, scale, zero)
    return codes, scale, zero


def test_quantization_is_within_half_a_step_of_float64():
    """Every entry dequantizes to within ``s/2`` of its value (float64), 0 is exact, and each group's
    range spans the codes: a group of mixed signs uses code 0 and code 255 (up to the rounding of the
    zero point), a one-signed group starts (or ends) at 0, an all-zero group is exactly zero."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g, dtype=torch.float64)
    w[1, :16] = w[1, :16].abs() + 0.5  # all positive: the range is [0, max]
    w[2, 16:32] = -w[2, 16:32].abs()  # all negative: [min, 0]
    w[3, :16] = 0  # all zero
    w[4, 5] = 0.0
    codes, scale, zero = _quantize(w, 16)
    back = dequantize_groups(codes, scale, zero, torch.float64)
    step = scale.double().repeat_interleave(16, dim=1)
    assert ((back - w).abs() <= step / 2 * (1 + 1e-6)).all()  # 1e-6: float32 scales and products
    assert back[4, 5] == 0 and (back[3, :16] == 0).all()
    lo, hi = w.view(8, 4, 16).amin(2).clamp(max=0), w.view(8, 4, 16).amax(2).clamp(min=0)
    spans = hi > lo
    assert torch.allclose(scale.double()[spans], ((hi - lo) / 255)[spans], rtol=1e-6) and (scale[~spans] == 1).all()
    assert torch.equal(zero, torch.round(-lo / torch.where(hi > lo, (hi - lo) / 255, 1)).float())
    assert int(codes[1, :16].max()) == 255 and int(zero[1, 0]) == 0
    assert int(codes[2, 16:32].min()) == 0 and int(zero[2, 1]) == 255


def test_a_non_finite_group_dequantizes_to_nan():
    """Never a silent clamp: a diverged ``A0`` stays visible to the non-finite checks."""
    w = torch.randn(2, 32)
    w[1, 3] = float("inf")
    codes, scale, zero = _quantize(w, 16)
    back = dequantize_groups(codes, scale, zero, torch.float32)
    assert back[1, :16].isnan().all() and back[0].isfinite().all() and back[1, 16:].isfinite().all()


def _pair(mode: str = "fast", **kw):
    """An 8-bit layer and a native float32 layer holding its dequantized ``A0`` and the same factors."""
    int8 = POETLinear(64, 32, block_size=8, mode=mode, generator=torch.Generator().manual_seed(1),
                      a0_storage="int8", a0_group_size=16, **kw)
    native = POETLinear(64, 32, block_size=8, mode=mode, generator=torch.Generator().manual_seed(1), **kw)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        native.frozen_weight.copy_(int8.dense_a0())
        for side in ("input_side", "output_side"):
            skew = torch.randn(getattr(int8, side).skew.shape, generator=g) * 0.05
            getattr(int8, side).skew.copy_(skew)
            getattr(native, side).skew.copy_(skew)
    return int8, native


@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_int8_layer_is_the_native_layer_of_its_dequantized_a0(mode):
    """Same forward and gradients, bitwise: the GEMM runs on the dequantized ``A0'`` in the input's dtype."""
    int8, native = _pair(mode)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    outputs = [layer(x) for layer in (int8, native)]
    assert torch.equal(*outputs)
    for out in outputs:
        out.square().sum().backward()
    for a, b in zip(int8.parameters(), native.parameters()):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad)


def test_the_a0_is_one_byte_per_entry_plus_its_group_scales():
    int8, native = _pair()
    assert int8.frozen_weight.dtype == torch.uint8 and int8.frozen_weight.numel() == 64 * 32
    resident = sum(t.numel() * t.element_size() for t in (int8.frozen_weight, int8.frozen_scale, int8.frozen_zero))
    assert resident == 64 * 32 * (1 + 8 / 16)
    assert "frozen_scale" in int8.state_dict() and "frozen_scale" not in native.state_dict()


def test_a_merge_folds_the_dequantized_a0_and_quantizes_once():
    """The merged codes are the quantization of what the native layer's merge produces from the same
    ``A0``; with exact Cayley factors the layer's function changes only by that one quantization:
    ``||W_after - W_before||_F <= sqrt(sum over groups of group * (s/2)^2)`` (orthogonal factors keep norms)."""
    int8, native = _pair(neumann_terms=None)
    before = int8.effective_weight()
    for layer in (int8, native):
        layer.merge_and_reset(torch.Generator().manual_seed(4))
    codes, scale, zero = _quantize(native.frozen_weight, 16)
    assert torch.equal(int8.frozen_weight, codes) and torch.equal(int8.frozen_scale, scale)
    assert torch.equal(int8.input_side.perm, native.input_side.perm)
    bound = (16 * (scale.double() / 2).square().sum()).sqrt()
    change = torch.linalg.matrix_norm(int8.effective_weight().double() - before.double())
    assert 0 < change <= bound * (1 + 1e-4), (change, bound)  # 1e-4: float32 rotations of the weight


def test_bad_group_sizes_are_refused_naming_the_layer():
    with pytest.raises(ValueError, match=r"'mlp': input features 64 are not a multiple of the A0 quantization group "
                                         r"size 48"):
        POETLinear(64, 32, block_size=8, a0_storage="int8", a0_group_size=48, name="mlp")
    with pytest.raises(ValueError, match="a0_storage must be one of"):
        POETLinear(64, 32, block_size=8, a0_storage="int4")


@pytest.mark.parametrize("storage", ["native", "int8"])
def test_checkpoints_take_the_a0_in_place(storage):
    """Inside ``canonical_a0`` the state dict is the one the copying hooks give (bitwise), but its
    ``base_weight`` is the layer's own storage (no copy of every ``A0`` at a save); on exit the layers
    hold what they held; a model of another seed loading that state inside the context ends holding
    exactly the saved model's ``A0`` and permutations."""
    from megatron_poet.megatron.cpu_backend import single_process
    from megatron_poet.megatron.layer_checkpoint import canonical_a0
    from megatron_poet.poet.optim import poet_modules
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.training.model_provider import build_model

    argv = ["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--poet-block-size", "16",
            "--poet-a0-storage", storage, "--poet-a0-group-size", "16"]
    with single_process():
        args = parse_args(argv)
        args.vocab_size_unpadded = 100
        model = build_model(args, 128)
        held = [(m.frozen_weight.clone(), None if m.frozen_scale is None else m.frozen_scale.clone())
                for m in poet_modules(model)]
        state = model.state_dict()
        extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}  # megatron's _extra_state
        copied = {k: v.clone() for k, v in state.items() if k not in extra}
        with canonical_a0(model):
            in_place = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
            assert copied.keys() == in_place.keys()
            for name, layer in model.named_modules():
                if layer in poet_modules(model):
                    assert in_place[f"{name}.base_weight"].data_ptr() == layer.frozen_weight.data_ptr()
            assert all(torch.equal(copied[k], in_place[k]) for k in copied)
        for layer, (weight, scale) in zip(poet_modules(model), held):
            assert torch.equal(layer.frozen_weight, weight) and (scale is None or torch.equal(layer.frozen_scale, scale))

        other = build_model(parse_args(argv + ["--seed", "7"]), 128)
        with canonical_a0(other):
            other.load_state_dict({**copied, **extra})
        for theirs, ours in zip(poet_modules(other), poet_modules(model)):
            assert torch.equal(theirs.frozen_weight, ours.frozen_weight)
            assert torch.equal(theirs.output_side.perm, ours.output_side.perm)


@pytest.mark.parametrize("older_halves", [False, True])
def test_a_gated_a0_is_saved_from_its_own_storage_and_older_halves_still_load(tmp_path, older_halves):
    """megatron's writer clones, before it writes anything, every tensor that views part of a larger storage:
    a SwiGLU ``linear_fc1``'s ``A0`` cut into gate and up halves was copied for every layer at once at a save.
    Saved whole (global ``(2, ffn, ...)``), ``A0``, its 8-bit scales and the other gated buffers are the layers'
    own storage.
    Either layout (halves: checkpoints written before) loads into a model of another seed bitwise."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_poet.checkpoint import DistFormat
    from megatron_poet.megatron.cpu_backend import single_process
    from megatron_poet.megatron.layer_checkpoint import GATED_KEYS_AS_HALVES, canonical_a0
    from megatron_poet.poet.optim import poet_modules
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.training.model_provider import build_model
    from megatron_poet.training.process import prepare_checkpoint_results_queue

    prepare_checkpoint_results_queue(background_saves=False)  # as the program does (no writer process)
    argv = ["--model-style", "llama", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96",
            "--num-attention-heads", "4", "--poet-block-size", "16", "--poet-a0-storage", "int8",
            "--poet-a0-group-size", "16"]
    with single_process():
        args = parse_args(argv)
        args.vocab_size_unpadded = 100
        model = build_model(args, 128)
        with canonical_a0(model):
            sharded = model.sharded_state_dict(metadata={GATED_KEYS_AS_HALVES: True} if older_halves else {})
            apply_factories(sharded)
            fc1 = [t for t in nested_values(sharded) if isinstance(t, ShardedTensor) and ".linear_fc1." in t.key]
            views = {t.key.split(".linear_fc1.")[1] for t in fc1 if t.data.untyped_storage().nbytes() != t.data.nbytes}
            gated = {"base_weight", "frozen_scale", "frozen_zero", "output_side.perm", "frozen_init_sq_norms"}
            # (the skews stay in halves either way, see sharded_poet_state_dict)
            assert views == {"output_side.skew"} | (gated if older_halves else set())
            sharded = model.sharded_state_dict(metadata={GATED_KEYS_AS_HALVES: True} if older_halves else {})
            dist_checkpointing.save({"model": sharded}, str(tmp_path))
        other = build_model(parse_args(argv + ["--seed", "7"]), 128)
        DistFormat().load_model_weights(other, str(tmp_path))
        for theirs, ours in zip(poet_modules(other), poet_modules(model)):
            for name in ("frozen_weight", "frozen_scale", "frozen_zero"):
                assert torch.equal(getattr(theirs, name), getattr(ours, name)), name
            assert torch.equal(theirs.output_side.perm, ours.output_side.perm)


def test_the_gemm_dequantizes_into_its_dtype_without_a_float32_copy():
    """A bf16 GEMM on an 8-bit ``A0'`` allocates the bf16 ``A0'`` (2 bytes per entry), float32 temporaries of
    one row chunk and its output, nothing more: a float32 ``A0'`` beside the bf16 one (6 bytes per entry, as
    the ledger counted before) would exceed the bound by ~7 MiB here. Measured from the CPU allocator's events."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_poet.poet import a0_storage

    d_out, d_in, tokens = 1024, 2048, 4
    codes = torch.randint(0, 256, (d_out, d_in), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scale, zero = torch.rand(d_out, d_in // 256) / 100, torch.full((d_out, d_in // 256), 128.0)
    gemm = a0_storage.DequantizedGemm(scale, zero)
    z = torch.randn(tokens, d_in).to(torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = gemm.forward(z, codes)
    allowed = 2 * d_out * d_in + 4 * a0_storage._ROWS_ELEMENTS + out.numel() * out.element_size()
    assert _memory_report().profiled_peak(prof) <= allowed + 64 * 1024  # 64 KiB: small index/view tensors
    reference = (codes.double() - zero.repeat_interleave(256, 1)) * scale.repeat_interleave(256, 1)
    # (q - z) s is exact in float32 here (8-bit q, z; one product), so both round the same value to bf16
    assert torch.equal(gemm.dense(codes, torch.bfloat16), reference.to(torch.bfloat16))


def _memory_report():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "memory_report.py")
    spec = importlib.util.spec_from_file_location("memory_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
