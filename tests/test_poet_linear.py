"""POETLinear against dense float64 references: forward, gradients, spectrum, merge, inits, errors."""
import pytest
import torch
import torch.nn.functional as F

from megatron_poet import POETLinear
from megatron_poet.poet.cayley import skew_from_packed
from megatron_poet.poet.functional import poet_linear, recomputed_poet_linear, rotate_output
from megatron_poet.poet.side import begin_step

VARIANTS = [("bs", 4), ("fs", 6)]  # (variant, block size) for a 12 -> 8 layer


def make_layer(variant="bs", block_size=4, mode="fast", neumann_terms=3, init="normalized",
               dtype=torch.float64, scale=0.2, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    layer = POETLinear(12, 8, bias, block_size=block_size, neumann_terms=neumann_terms, mode=mode,
                       init=init, variant=variant, dtype=dtype, generator=g)
    with torch.no_grad():  # move away from the identity so every term is exercised
        for p in layer.poet_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * scale)
        if bias:
            layer.bias.copy_(torch.randn(8, generator=g, dtype=dtype))
    return layer


def permutation_matrix(perm):
    """Dense Pi with (Pi x)[i] = x[perm[i]]."""
    return torch.eye(perm.numel(), dtype=torch.float64)[perm]


def dense_side(side, packed=None):
    """Dense float64 Pi^T BD(G) Pi, built independently of the layer's rotation code, from ``packed`` skew
    parameters (differentiable; default: the side's own, detached)."""
    packed = side.skew.detach().double() if packed is None else packed
    q = skew_from_packed(packed, side.block_size)
    eye = torch.eye(side.block_size, dtype=torch.float64)
    if side.neumann_terms is None:
        blocks = (eye + q) @ torch.linalg.inv(eye - q)
    else:
        blocks = (eye + q) @ sum(torch.linalg.matrix_power(q, j) for j in range(side.neumann_terms + 1))
    bd = torch.eye(side.dim, dtype=torch.float64)
    for k, block in enumerate(blocks):  # block k rotates the first b coordinates of segment k
        start = k * side.segment
        bd[start:start + side.block_size, start:start + side.block_size] = block
    pi = permutation_matrix(side.perm)
    return pi.T @ bd @ pi


def dense_a0(layer):
    """A0 from the pre-permuted storage (dequantized if 8-bit): A0' = Pi_out A0 Pi_in^T."""
    return permutation_matrix(layer.output_side.perm).T @ layer.dense_a0(torch.float64) @ permutation_matrix(
        layer.input_side.perm)


def dense_reference(layer):
    return dense_side(layer.output_side) @ dense_a0(layer) @ dense_side(layer.input_side)


@pytest.mark.parametrize("variant,block_size", VARIANTS)
@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_forward_matches_dense_reference(variant, block_size, mode):
    layer = make_layer(variant, block_size, mode)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    expected = F.linear(x, dense_reference(layer), layer.bias.detach())
    assert torch.allclose(layer(x), expected, atol=1e-12, rtol=0)
    assert torch.allclose(layer.effective_weight(), dense_reference(layer), atol=1e-13, rtol=0)
    assert torch.allclose(layer(x), F.linear(x, layer.effective_weight(), layer.bias), atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant,block_size", VARIANTS)
def test_gradients_fast_mem_and_dense_reference_agree(variant, block_size):
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    grad_y = torch.randn(2, 7, 8, dtype=torch.float64)
    results = {}
    for mode in ("fast", "mem"):
        layer = make_layer(variant, block_size, mode)
        xi = x.clone().requires_grad_()
        layer(xi).backward(grad_y)
        assert layer.frozen_weight.grad is None and not layer.frozen_weight.requires_grad
        results[mode] = [xi.grad] + [p.grad for p in (*layer.poet_parameters(), layer.bias)]
    # Reference: autograd through the dense float64 product of independently built factors.
    layer = make_layer(variant, block_size)
    params = [p.detach().clone().requires_grad_() for p in layer.poet_parameters()]
    with torch.no_grad():
        a0 = dense_a0(layer)
    xi = x.clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    weight = dense_side(layer.output_side, params[1]) @ a0 @ dense_side(layer.input_side, params[0])
    F.linear(xi, weight, bias).backward(grad_y)
    reference = [xi.grad, params[0].grad, params[1].grad, bias.grad]
    for mode, grads in results.items():
        for got, want in zip(grads, reference):
            assert torch.allclose(got, want, atol=1e-11, rtol=0), mode


@pytest.mark.parametrize("variant,block_size", VARIANTS)
@pytest.mark.parametrize("recompute", [False, True])
def test_gradcheck(variant, block_size, recompute):
    """Gradients of x, both packed skews and the bias, through the lean autograd functions
    (blocks rebuilt in backward, block gradients via the saved outputs and G^-T)."""
    layer = make_layer(variant, block_size)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    skews = [p.detach().clone().requires_grad_() for p in layer.poet_parameters()]
    bias = layer.bias.detach().clone().requires_grad_()

    def fn(x, s_in, s_out, bias):
        return poet_linear(x, layer.frozen_weight, layer.input_side, layer.output_side, bias,
                           recompute=recompute, input_skew=s_in, output_skew=s_out)

    assert torch.autograd.gradcheck(fn, (x, *skews, bias))


@pytest.mark.parametrize("variant,block_size", VARIANTS)
def test_gradcheck_output_side_saving_its_output(variant, block_size):
    layer = make_layer(variant, block_size)
    h = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    skew = layer.output_side.skew.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, s: rotate_output(h, layer.output_side, save_output=True, skew=s), (h, skew))


@pytest.mark.parametrize("variant,block_size", VARIANTS)
def test_mem_mode_saving_its_output_has_the_same_gradients_without_recomputing_the_gemm(variant, block_size):
    """``recomputed_poet_linear(save_output=True)`` (the bias-free column-parallel layers in "mem" mode): exact
    gradients (gradcheck, float64), and its backward runs the frozen GEMM's input gradient only — the forward
    GEMM runs once, in forward (twice without ``save_output``: the recomputation)."""
    layer = make_layer(variant, block_size, mode="mem")
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    skews = [p.detach().clone().requires_grad_() for p in layer.poet_parameters()]

    def fn(x, s_in, s_out, gemm=None):
        return recomputed_poet_linear(x, layer.frozen_weight, layer.input_side, layer.output_side, gemm=gemm,
                                      input_skew=s_in, output_skew=s_out, save_output=True)

    assert torch.autograd.gradcheck(fn, (x, *skews))

    class CountingGemm:
        def __init__(self):
            self.forwards = 0

        def forward(self, z, w):
            self.forwards += 1
            return F.linear(z, w)

        def input_grad(self, grad_h, w):
            return grad_h @ w

    for save_output, forwards in ((True, 1), (False, 2)):
        gemm = CountingGemm()
        recomputed_poet_linear(x, layer.frozen_weight, layer.input_side, layer.output_side, gemm=gemm,
                               input_skew=skews[0], output_skew=skews[1], save_output=save_output).sum().backward()
        assert gemm.forwards == forwards


@pytest.mark.parametrize("variant,block_size", VARIANTS)
def test_exact_cayley_preserves_spectrum_to_1e10(variant, block_size):
    layer = make_layer(variant, block_size, neumann_terms=None, scale=0.5)
    s_eff = torch.linalg.svdvals(layer.effective_weight())
    s_a0 = torch.linalg.svdvals(layer.frozen_weight)
    assert torch.allclose(s_eff, s_a0, atol=1e-10, rtol=0)


@pytest.mark.parametrize("scale", [0.01, 0.05, 0.2])
def test_cayley_neumann_spectrum_within_measured_bound(scale):
    """sigma_i(P A0 R) lies within sigma_i(A0) * [s_min(P) s_min(R), s_max(P) s_max(R)], and each
    block's singular values lie in [sqrt(1-e), sqrt(1+e)] for e = its orthogonality error."""
    layer = make_layer("bs", 4, neumann_terms=3, scale=scale)
    e = layer.orthogonality_error().item()
    s_eff = torch.linalg.svdvals(layer.effective_weight())
    s_a0 = torch.linalg.svdvals(layer.frozen_weight)
    ratio = s_eff / s_a0
    assert ((1 - e) - 1e-12 <= ratio).all() and (ratio <= (1 + e) + 1e-12).all()
    # The measured deviation for these scales (odd k=3: error ~ 2||Q||^4): at scale 0.01
    # the spectrum moves by < 1e-6 relative, far inside what training tolerates.
    if scale == 0.01:
        assert (ratio - 1).abs().max() < 1e-6


def test_state_dict_round_trip_restores_permutations():
    a, b = make_layer(seed=1), make_layer(seed=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 12, dtype=torch.float64)
    assert torch.equal(a(x), b(x))
    assert torch.equal(b.output_side.inv_perm[b.output_side.perm], torch.arange(8))


@pytest.mark.parametrize("init", ["normalized", "standard", "xavier", "uniform_spectrum"])
def test_init_schemes(init):
    g = torch.Generator().manual_seed(0)
    layer = POETLinear(64, 128, block_size=32, init=init, dtype=torch.float64, generator=g)
    a0 = layer.effective_weight()  # equals A0 at step 0 (R = P = I)
    if init == "normalized":
        assert torch.allclose(a0.norm(dim=1), torch.ones(128, dtype=torch.float64), atol=1e-6)
    elif init == "uniform_spectrum":
        assert torch.allclose(torch.linalg.svdvals(a0), torch.ones(64, dtype=torch.float64), atol=1e-5)
    elif init == "standard":
        assert abs(a0.std().item() - 0.02) < 0.002  # 8192 samples: std error ~ 0.02/sqrt(2*8192)
    else:
        target = (2 / (64 + 128)) ** 0.5
        assert abs(a0.std().item() / target - 1) < 0.05


def test_step_zero_is_the_base_network():
    layer = make_layer(scale=0.0)
    x = torch.randn(3, 12, dtype=torch.float64)
    assert torch.allclose(layer(x), F.linear(x, dense_a0(layer), layer.bias), atol=1e-13, rtol=0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"'blk\.fc'.*in_features=100 is not divisible by block_size=32.*96 or 128"):
        POETLinear(100, 64, block_size=32, name="blk.fc")
    with pytest.raises(ValueError, match="out_features=48 is not divisible by block_size=32"):
        POETLinear(64, 48, block_size=32)
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        POETLinear(0, 64, block_size=32)
    with pytest.raises(ValueError, match="block_size must be an integer >= 2"):
        POETLinear(64, 64, block_size=0)
    with pytest.raises(ValueError, match="neumann_terms must be an integer >= 1"):
        POETLinear(64, 64, block_size=32, neumann_terms=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        POETLinear(64, 64, block_size=32, mode="slow")
    with pytest.raises(ValueError, match="smaller than the fully stochastic block_size"):
        POETLinear(16, 64, block_size=32, variant="fs")
    layer = POETLinear(64, 32, block_size=32)
    with pytest.raises(ValueError, match="input has 48 features, expected 64"):
        layer(torch.randn(2, 48))


@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("variant,block_size", VARIANTS)
def test_saved_for_backward_is_lean(mode, variant, block_size):
    """What autograd keeps within an optimizer step, besides the layer's own parameters and buffers and
    the step's blocks (one tensor per side, shared by every micro-batch): "mem" the input only, "fast"
    the gathered input and the GEMM output; never Cayley–Neumann intermediates, nothing per micro-batch
    for the blocks."""
    layer = make_layer(variant, block_size, mode, bias=False)
    begin_step(layer, 1)
    step_blocks = [side.forward_blocks() for side in (layer.input_side, layer.output_side)]
    own = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers(), *step_blocks)}
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == ([(5, 12)] if mode == "mem" else [(5, 8), (5, 12)]), shapes
    if mode == "mem":
        assert saved[0] is x
    y.sum().backward()  # and the layer still trains
    assert all(p.grad is not None for p in layer.poet_parameters())


@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("variant,block_size", VARIANTS)
def test_blocks_once_per_step_give_the_per_micro_batch_gradients(mode, variant, block_size):
    """Gradient accumulation over 3 micro-batches: with the step's shared blocks (the series
    differentiated once, on the summed block gradient) the parameters' gradients equal those of
    blocks built and differentiated per micro-batch (the same linear map, summed in another order:
    float64 here, so equal to 1e-12), and the series runs once per step, not per micro-batch."""
    import megatron_poet.poet.side as side_module

    layer = make_layer(variant, block_size, mode)
    xs = [torch.randn(4, 12, dtype=torch.float64) for _ in range(3)]

    def grads(per_step: bool):
        layer.zero_grad()
        if per_step:
            begin_step(layer, len(xs))
        for x in xs:
            (layer(x) ** 2).sum().backward()
        return [p.grad.clone() for p in layer.parameters() if p.requires_grad]

    calls = []  # ("build" or "differentiate") per call of the series
    cls = side_module.OrthogonalSide
    build, differentiate = cls.build_blocks, cls.skew_gradient
    cls.build_blocks = lambda self, *a, **k: calls.append("build") or build(self, *a, **k)
    cls.skew_gradient = lambda self, *a, **k: calls.append("differentiate") or differentiate(self, *a, **k)
    try:
        per_micro_batch = grads(False)
        per_micro_batch_calls, calls[:] = sorted(calls), []
        per_step = grads(True)
    finally:
        cls.build_blocks, cls.skew_gradient = build, differentiate
    for got, want in zip(per_step, per_micro_batch):
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
    # each side: built and differentiated in every micro-batch; once per step (no rebuild to differentiate)
    assert per_micro_batch_calls == ["build"] * 2 * len(xs) + ["differentiate"] * 2 * len(xs)
    assert sorted(calls) == ["build", "build", "differentiate", "differentiate"]
    assert layer.input_side._step_blocks is None  # the step closed after its last backward pass


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_a_side_taking_its_gradient_from_outputs_solves_once_per_step(mode, dtype):
    """The bias-free column-parallel layers save ``y`` and mark ``P`` ``gradient_from_output``: in a step each
    micro-batch hands ``P`` ``dL/dG G^T`` and the side applies ``G^-T`` once, to the sum, after the last pass.
    The gradients equal those of blocks built and differentiated per micro-batch (each solving its own; float64,
    the same linear maps summed in another order: 1e-12), with one solve per step instead of one per micro-batch.
    In bf16 both solve with the blocks rounded as the forward used them; what differs is where the gradients are
    rounded to bf16 (per micro-batch there, once per step here): a few bf16 steps of the largest entry.
    Rotating such a side without saving ``y`` inside a step is refused (it would mix the two kinds of gradient)."""
    from megatron_poet.poet.functional import frozen_linear, rotate_input

    layer = make_layer(mode=mode, bias=False, dtype=dtype)
    layer.output_side.gradient_from_output = True
    xs = [torch.randn(4, 12, dtype=torch.float64).to(dtype) for _ in range(3)]

    def forward(x, save_output=True):
        if mode == "mem":
            return recomputed_poet_linear(x, layer.frozen_weight, layer.input_side, layer.output_side,
                                          save_output=save_output)
        h = frozen_linear(rotate_input(x, layer.input_side), layer.frozen_weight)
        return rotate_output(h, layer.output_side, save_output=save_output)

    solves = []
    solve = torch.linalg.solve_ex

    def grads(per_step: bool):
        layer.zero_grad()
        if per_step:
            begin_step(layer, len(xs))
        solves.clear()
        torch.linalg.solve_ex = lambda *a, **k: solves.append(1) or solve(*a, **k)
        try:
            for x in xs:
                (forward(x) ** 2).sum().backward()
        finally:
            torch.linalg.solve_ex = solve
        return [p.grad.clone() for p in layer.parameters() if p.requires_grad], len(solves)

    (per_micro_batch, micro_batch_solves), (per_step, step_solves) = grads(False), grads(True)
    for got, want in zip(per_step, per_micro_batch):
        atol = 1e-12 if dtype == torch.float64 else 2 ** -6 * want.abs().max().item()
        assert torch.allclose(got.double(), want.double(), atol=atol, rtol=0)
    assert (micro_batch_solves, step_solves) == (len(xs), 1)
    begin_step(layer, 1)
    with pytest.raises(RuntimeError, match="gradient_from_output"):
        forward(xs[0], save_output=False)
