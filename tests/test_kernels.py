"""Triton kernels of ``megatron_poet.kernels`` against the PyTorch reference of the core.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below before
Triton loads) at tiny shapes; on CUDA the same tests run compiled, plus large block sizes.
Every kernel output and workspace comes from ``torch.empty``/``torch.empty_like``, which
the ``poisoned`` context fills with NaN, so a kernel that skips a write fails the test.

Tolerances are relative Frobenius errors against a float64 evaluation of the core's
PyTorch reference on the same (already rounded) inputs:
- float32 1e-5: the interpreter multiplies in float32, the GPU in 3xTF32 (~fp32);
  errors are a few float32 roundings (~1e-7) times a sqrt(reduction length) growth.
- float16 3e-3: products accumulate in float32, the result is rounded once to fp16
  (unit roundoff 2^-11 = 4.9e-4) and inputs such as blocks are cast once more.
- bfloat16 1.5e-2: same, with unit roundoff 2^-8 = 3.9e-3.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
pytest.importorskip("triton", reason="Triton is not installed: the kernels cannot run")
# Without a GPU the kernels must be decorated in interpreter mode: set TRITON_INTERPRET
# while importing them, then only inside this file's tests (see `interpreter` below), so
# other test files and the processes they spawn do not inherit it.
_INTERPRET = None if ON_GPU else os.environ.get("TRITON_INTERPRET", "1")
if _INTERPRET is not None:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = _INTERPRET
    import megatron_poet.kernels.cayley_neumann  # noqa: E402,F401
    import megatron_poet.kernels.rotation_ops  # noqa: E402,F401
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]

from megatron_poet import POETLinear  # noqa: E402
from megatron_poet.kernels import ENV_VAR, current_mode, kernels_mode, rotation_supported  # noqa: E402
from megatron_poet.poet.cayley import cayley_neumann, cayley_neumann_from_skew, skew_from_packed  # noqa: E402
from megatron_poet.poet.rotation import input_rotation  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# Triton 3.6's interpreter (torch 2.11's pin) hands program-id-derived scalars to Python as
# 1-element arrays, which loop bounds and `if` conditions in the kernels cannot use; 3.9's
# interpreter passes 0-d values. Versions in between are untested.
_TRITON_VERSION = tuple(int(x) for x in __import__("triton").__version__.split(".")[:2])
runs_kernels = pytest.mark.skipif(
    not ON_GPU and _TRITON_VERSION < (3, 9),
    reason=f"the Triton {'.'.join(map(str, _TRITON_VERSION))} interpreter cannot run these kernels "
           f"(verified with 3.9; 3.6 fails); run on a GPU or with triton>=3.9",
)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
if not ON_GPU:
    print("test_kernels: no CUDA device, running the kernels in the Triton interpreter at small shapes")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if _INTERPRET is not None:
        monkeypatch.setenv("TRITON_INTERPRET", _INTERPRET)


@contextlib.contextmanager
def poisoned():
    """Every floating ``torch.empty``/``torch.empty_like`` allocation starts as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: nan_fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: nan_fill(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "kernel output has NaN/inf (a poisoned element was never written?)"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def random_packed(n: int, b: int, gen: torch.Generator) -> torch.Tensor:
    # Entry std 0.15/sqrt(b) gives ||Q||_2 ~ 0.3: the regime the merge keeps Q in.
    return torch.randn(n, b * (b - 1) // 2, generator=gen) * (0.15 / b**0.5)


def random_orthogonal(n: int, b: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, b, b, generator=gen, dtype=torch.float64))[0]


def check_cayley_neumann(b: int, k: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    packed = random_packed(n, b, gen)
    grad_g = torch.randn(n, b, b, generator=gen, dtype=torch.float64)
    ref_in = packed.double().requires_grad_()
    ref = cayley_neumann_from_skew(skew_from_packed(ref_in, b), k)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, grad_g)
    x = packed.to(DEVICE).requires_grad_()
    with kernels_mode("force"), poisoned():
        g = cayley_neumann(x, b, k)
        assert "cayley_neumann_forward" in type(g.grad_fn).__name__, "cayley_neumann did not dispatch to the kernel op"
        (grad,) = torch.autograd.grad(g, x, grad_g.float().to(DEVICE))
    assert g.dtype == torch.float32 and g.shape == (n, b, b)
    assert rel_err(g.cpu(), ref) < TOL[torch.float32]
    assert rel_err(grad.cpu(), ref_grad) < TOL[torch.float32]


@runs_kernels
@pytest.mark.parametrize("b,k", [(32, 1), (32, 2), (32, 3), (32, 4), (64, 3), (128, 2)])
def test_cayley_neumann_forward_and_packed_gradient(b, k):
    check_cayley_neumann(b, k, n=3 if b < 128 else 1, seed=b * 10 + k)


def dense_rotation(side: str, x: torch.Tensor, perm: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """float64 reference with autograd: ``BD(G) Pi x`` (input side) or ``Pi^T BD(G) h`` (output side)."""
    pi = torch.eye(perm.numel(), dtype=torch.float64)[perm]
    matrix = torch.block_diag(*blocks) @ pi if side == "input" else pi.T @ torch.block_diag(*blocks)
    return x @ matrix.T


def rotation_case(side: str, dtype: torch.dtype, b: int, n: int, lead: tuple[int, ...], seed: int) -> None:
    """One side (``input``: BD(G) Pi x, ``output``: Pi^T BD(G) h), forward and both gradients."""
    from megatron_poet.kernels.rotation_ops import rotate_input, rotate_output

    gen = torch.Generator().manual_seed(seed)
    d = n * b
    x = torch.randn(*lead, d, generator=gen).to(dtype)
    blocks = random_orthogonal(n, b, gen).to(dtype)
    perm = torch.randperm(d, generator=gen)
    grad_out = torch.randn(*lead, d, generator=gen).to(dtype)
    op = rotate_input if side == "input" else (lambda t, p, g: rotate_output(t, g, p))

    # float64 dense reference on the same rounded inputs.
    rx, rb = x.double().requires_grad_(), blocks.double().requires_grad_()
    ref = dense_rotation(side, rx, perm, rb)
    ref_gx, ref_gb = torch.autograd.grad(ref, (rx, rb), grad_out.double())

    kx, kb = x.to(DEVICE).requires_grad_(), blocks.to(DEVICE).requires_grad_()
    with kernels_mode("force"), poisoned():
        out = op(kx, perm.to(DEVICE), kb)
        assert "Rotate" in type(out.grad_fn).__name__, f"rotate_{side} did not dispatch to the kernel"
        gx, gb = torch.autograd.grad(out, (kx, kb), grad_out.to(DEVICE))
    assert out.dtype == gx.dtype == gb.dtype == dtype
    for name, got, want in (("output", out, ref), ("grad input", gx, ref_gx), ("grad blocks", gb, ref_gb)):
        err = rel_err(got.cpu(), want)
        assert err < TOL[dtype], f"{side} side {name}: rel err {err:.2e} >= {TOL[dtype]:.0e} ({dtype}, b={b})"


SMALL_CASES = [  # (dtype, b, n, leading shape): odd token counts exercise the row masks
    (torch.float32, 32, 2, (37,)),
    (torch.float16, 32, 3, (2, 11)),
    (torch.bfloat16, 32, 2, (45,)),
    (torch.float32, 64, 2, (3, 7)),
    (torch.bfloat16, 64, 2, (50,)),
    (torch.bfloat16, 128, 1, (20,)),
]


@runs_kernels
@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("dtype,b,n,lead", SMALL_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_rotation_kernels_forward_and_backward(side, dtype, b, n, lead):
    rotation_case(side, dtype, b, n, lead, seed=b + n + len(lead))


@runs_kernels
@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_poet_linear_with_kernels_matches_pytorch_path(mode, dtype):
    gen = torch.Generator().manual_seed(7)
    layer = POETLinear(64, 96, block_size=32, neumann_terms=3, mode=mode, generator=gen)
    with torch.no_grad():
        for side in (layer.input_side, layer.output_side):
            side.skew.copy_(random_packed(side.num_blocks, 32, gen))
        layer.bias.normal_(generator=gen)
    x = torch.randn(2, 13, 64, generator=gen)
    grad_y = torch.randn(2, 13, 96, generator=gen)

    def run(layer, x, ctx):
        x = x.clone().requires_grad_()
        with ctx:
            y = layer(x)
            grads = torch.autograd.grad(y, (x, *layer.poet_parameters(), layer.bias), grad_y.to(y))
        return (y, *grads)

    ref = run(layer.double(), x.double(), kernels_mode("off"))
    layer = layer.to(DEVICE, dtype)
    with kernels_mode("force"), poisoned():
        got = run(layer, x.to(DEVICE, dtype), contextlib.nullcontext())
    names = ("output", "grad x", "grad R skew", "grad P skew", "grad bias")
    for name, g, r in zip(names, got, ref):
        err = rel_err(g.cpu(), r)
        assert err < TOL[dtype], f"POETLinear {mode} {dtype} {name}: rel err {err:.2e}"


@runs_kernels
def test_output_side_keeping_its_output_with_kernels():
    """``rotate_output(save_output=True)`` (what the column-parallel layers use): the block gradient
    through the kept output, gathered in the kernel's loads, then ``G^-T``; against the PyTorch path."""
    from megatron_poet.poet.config import POETConfig
    from megatron_poet.poet.functional import rotate_output
    from megatron_poet.poet.side import OrthogonalSide

    gen = torch.Generator().manual_seed(11)
    side = OrthogonalSide(64, POETConfig(block_size=32), generator=gen).to(DEVICE)
    with torch.no_grad():
        side.skew.copy_(random_packed(2, 32, gen))
    h = torch.randn(19, 64, generator=gen)
    grad_y = torch.randn(19, 64, generator=gen)
    with kernels_mode("force"):
        assert rotation_supported(h.to(DEVICE), side.blocks())  # the forced run really takes the kernels
    results = []
    for ctx in (kernels_mode("off"), kernels_mode("force")):
        hk = h.to(DEVICE).requires_grad_()
        with ctx, poisoned():
            y = rotate_output(hk, side, save_output=True)
            results.append((y, *torch.autograd.grad(y, (hk, side.skew), grad_y.to(DEVICE))))
    for name, got, want in zip(("output", "grad h", "grad skew"), results[1], results[0]):
        err = rel_err(got.cpu(), want.cpu())
        assert err < TOL[torch.float32], f"{name}: rel err {err:.2e}"


def test_unsupported_shapes_fall_back_to_pytorch():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=gen).to(DEVICE)
    with kernels_mode("force"):
        # b = 48 (not a power of two), fully stochastic tail (n*b < d), float64 activations
        assert not rotation_supported(x, torch.zeros(2, 48, 48, device=DEVICE))
        assert not rotation_supported(x, torch.zeros(1, 64, 64, device=DEVICE))
        assert not rotation_supported(x.double(), torch.zeros(3, 32, 32, dtype=torch.float64, device=DEVICE))
        assert rotation_supported(x, torch.zeros(3, 32, 32, device=DEVICE))
        perm = torch.randperm(96, generator=gen).to(DEVICE)
        blocks = random_orthogonal(1, 64, gen).float().to(DEVICE)
        out, x_perm = input_rotation(x, perm, blocks, 96)  # fully stochastic: one block, pass-through tail
        assert x_perm is not None  # the PyTorch path (the kernels return no separate gathered copy)
        with kernels_mode("off"):
            assert torch.equal(out, input_rotation(x, perm, blocks, 96)[0])
        packed = random_packed(2, 32, gen).requires_grad_()
        for k, p in ((None, packed), (3, packed.double())):  # exact Cayley, float64 parameters
            g = cayley_neumann(p, 32, k)
            assert "cayley_neumann_forward" not in type(g.grad_fn).__name__


def test_switch_env_var_and_context(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")
    assert current_mode() == "off"
    x, blocks = torch.randn(4, 64, device=DEVICE), torch.zeros(2, 32, 32, device=DEVICE)
    assert not rotation_supported(x, blocks)
    with kernels_mode("force"):
        assert current_mode() == "force" and rotation_supported(x, blocks)
        with kernels_mode("off"):
            assert not rotation_supported(x, blocks)
    monkeypatch.setenv(ENV_VAR, "auto")
    assert current_mode() == "auto"
    assert rotation_supported(x, blocks) == x.is_cuda  # auto: CUDA tensors only
    monkeypatch.setenv(ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=ENV_VAR):
        current_mode()
    with pytest.raises(ValueError):
        with kernels_mode("maybe"):
            pass


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-only guard; on CUDA the kernels need no interpreter")
def test_force_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels_mode("force"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rotation_supported(torch.randn(4, 64), torch.zeros(2, 32, 32))


@pytest.mark.skipif(not ON_GPU, reason="no CUDA device: block sizes 256/512 are too slow for the Triton interpreter")
@pytest.mark.parametrize("b", [256, 512])
def test_large_blocks_on_gpu(b):
    check_cayley_neumann(b, 3, n=4, seed=b)
    for side in ("input", "output"):
        rotation_case(side, torch.bfloat16, b, 4096 // b, (1000,), seed=b + 1)
        rotation_case(side, torch.float32, b, 2, (300,), seed=b + 2)


def test_checkout_does_not_shadow_the_installed_kernels_package(tmp_path):
    """`python -m ...` from the checkout puts kernels/ on sys.path as top-level `kernels`; PyPI's `kernels`
    (imported by transformers >= 5.25) must still be what `import kernels` gives, and ours stays reachable."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'installed'\n")
    probe = ("import kernels, megatron_poet.kernels as ours; "
             "print(getattr(kernels, 'CUDAProperties', 'checkout'), ours.current_mode.__module__)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))  # after the checkout ('' = cwd) on sys.path
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["installed", "megatron_poet.kernels.dispatch"], out.stdout


def _agreeing_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks: benchmark three candidates whose timings differ per rank."""
    import json

    from megatron_poet.kernels import agree_autotuning_over
    from megatron_poet.kernels.autotune import agreed_do_bench

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # Rank 0 finds candidate 0 fastest, rank 1 candidate 2: alone, they would choose differently.
    own = {0: [[1.0, 0.9, 1.1], [2.0, 1.9, 2.1], [3.0, 2.9, 3.1]], 1: [[3.0, 2.9, 3.1], [2.5, 2.4, 2.6], [1.0, 0.9, 1.1]]}
    measured = iter(own[rank])
    agree_autotuning_over(torch.distributed.group.WORLD)
    agreed = [agreed_do_bench(None, (0.5, 0.2, 0.8), measure=lambda fn, quantiles: next(measured)) for _ in range(3)]
    agree_autotuning_over(None)
    alone = agreed_do_bench(None, (0.5, 0.2, 0.8), measure=lambda fn, quantiles: own[rank][0])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"agreed": agreed, "alone": alone}, f)
    torch.distributed.destroy_process_group()


def test_ranks_of_the_agreement_group_choose_one_kernel_configuration(tmp_path):
    """Every autotuned kernel benchmarks through agreed_do_bench, whose timings are the group's maximum:
    two ranks that measure opposite winners both pick candidate 1 (the best worst case)."""
    import json

    import multiprocessing

    from megatron_poet.kernels import block_rotate, cayley_neumann
    from megatron_poet.kernels.autotune import AUTOTUNE_OPTIONS, agreed_do_bench

    if AUTOTUNE_OPTIONS:  # Triton >= 3.3 (older ones have no do_bench hook; see kernels/autotune.py)
        tuned = [block_rotate.rotate_kernel, cayley_neumann.cn_step_kernel]
        assert all(kernel._do_bench is agreed_do_bench for kernel in tuned)
    fork = multiprocessing.get_context("fork")  # (spawn leaves a resource-tracker process behind)
    ranks = [fork.Process(target=_agreeing_rank, args=(r, str(tmp_path / "init"), str(tmp_path))) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    assert [p.exitcode for p in ranks] == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["agreed"] == results[1]["agreed"] == [[3.0, 2.9, 3.1], [2.5, 2.4, 2.6], [3.0, 2.9, 3.1]]
    choice = [min(range(3), key=lambda i: r["agreed"][i][0]) for r in results]
    assert choice == [1, 1]
    assert results[0]["alone"] == [1.0, 0.9, 1.1] and results[1]["alone"] == [3.0, 2.9, 3.1]
