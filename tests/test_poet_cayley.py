"""Cayley / Cayley–Neumann blocks against explicit float64 formulas."""
import pytest
import torch

from megatron_poet.poet.cayley import (
    cayley_neumann,
    cayley_neumann_vjp,
    num_skew_params,
    orthogonality_error,
    packed_from_skew,
    skew_from_packed,
)


def random_packed(num_blocks, b, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, num_skew_params(b), generator=g, dtype=torch.float64) * scale


def test_packing_round_trip_and_skew_symmetry():
    packed = random_packed(3, 7, 1.0)
    q = skew_from_packed(packed, 7)
    assert q.shape == (3, 7, 7)
    assert torch.equal(q, -q.transpose(1, 2))
    assert torch.equal(packed_from_skew(q), packed)
    assert num_skew_params(256) == 256 * 255 // 2


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])  # odd k: the top coefficient folds; even k: it does not
def test_neumann_polynomial_matches_explicit_formula(k):
    q = skew_from_packed(random_packed(4, 8, 0.1), 8)
    eye = torch.eye(8, dtype=torch.float64)
    series = sum(torch.linalg.matrix_power(q, j) for j in range(k + 1))
    expected = (eye + q) @ series
    assert torch.allclose(cayley_neumann(packed_from_skew(q), 8, k), expected, atol=1e-14, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_the_polynomial_differentiates_exactly(k):
    """gradcheck (float64) through both branches of the evaluation (odd k folds the top coefficient)."""
    packed = random_packed(2, 5, 0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: cayley_neumann(p, 5, k), (packed,))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, None])
def test_the_hand_written_vjp_is_autograds(k):
    """``cayley_neumann_vjp`` (the series differentiated without its graph) against autograd, float64."""
    packed = random_packed(3, 7, 0.2)
    grad = torch.randn(3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    leaf = packed.clone().requires_grad_()
    (want,) = torch.autograd.grad(cayley_neumann(leaf, 7, k), leaf, grad)
    assert torch.allclose(cayley_neumann_vjp(packed, 7, k, grad), want, atol=1e-13, rtol=0)


def test_k3_is_the_papers_polynomial():
    q = skew_from_packed(random_packed(2, 6, 0.2), 6)
    eye = torch.eye(6, dtype=torch.float64)
    mp = torch.linalg.matrix_power
    expected = eye + 2 * q + 2 * mp(q, 2) + 2 * mp(q, 3) + mp(q, 4)
    assert torch.allclose(cayley_neumann(packed_from_skew(q), 6, 3), expected, atol=1e-14, rtol=0)


def test_exact_cayley_is_orthogonal_and_equals_textbook_formula():
    packed = random_packed(5, 16, 0.5)
    g = cayley_neumann(packed, 16, None)
    q = skew_from_packed(packed, 16)
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(g, (eye + q) @ torch.linalg.inv(eye - q), atol=1e-12, rtol=0)
    assert orthogonality_error(g) < 1e-10


def test_orthogonality_error_closed_form_and_decay_with_k():
    """(I - Q) S_k = I - Q^(k+1) gives G_k = C (I - Q^(k+1)) with C the exact Cayley block, so
    G_k^T G_k - I = (I - Q^(k+1))^T (I - Q^(k+1)) - I. For odd k, Q^(k+1) is symmetric and the
    error is 2 Q^(k+1) to first order; for even k it is skew and the first order cancels
    (error O(Q^(2k+2))). So the error is not monotone in k, but its bound
    2||Q||^(k+1) + ||Q||^(2k+2) is, and so is the error within each parity."""
    packed = random_packed(4, 16, 0.05)
    q = skew_from_packed(packed, 16)
    eye = torch.eye(16, dtype=torch.float64)
    norm_q = torch.linalg.matrix_norm(q, 2).max().item()
    errors = {}
    for k in range(1, 7):
        g = cayley_neumann(packed, 16, k)
        tail = eye - torch.linalg.matrix_power(q, k + 1)
        closed = torch.linalg.matrix_norm(tail.transpose(1, 2) @ tail - eye, "fro").max()
        errors[k] = orthogonality_error(g).item()
        assert abs(errors[k] - closed.item()) < 1e-12
        assert errors[k] <= 16 ** 0.5 * (2 * norm_q ** (k + 1) + norm_q ** (2 * k + 2))  # ||.||_F <= sqrt(b) ||.||_2
    assert errors[1] > errors[3] > errors[5]
    assert errors[2] > errors[4] > errors[6]
    assert errors[2] < errors[1] and errors[4] < errors[3]  # even orders cancel the first-order term


def test_zero_parameters_give_identity():
    g = cayley_neumann(torch.zeros(3, num_skew_params(4)), 4, 3)
    assert torch.equal(g, torch.eye(4).expand(3, 4, 4))


def test_bad_neumann_order_and_shape_raise():
    with pytest.raises(ValueError, match="neumann_terms must be >= 1"):
        cayley_neumann(torch.zeros(1, 6), 4, 0)
    with pytest.raises(ValueError, match="must have shape"):
        skew_from_packed(torch.zeros(1, 5), 4)
