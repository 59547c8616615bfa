"""Hutchinson trace and diagonal against their expectation, with tolerances from their exact
variance: Var(zᵀAz) = 2 Σ_{i≠j} A_ij², Var(z_i (Az)_i) = Σ_{j≠i} A_ij² for Rademacher z."""

import math

import pytest
import torch

from curvdiag.probes.hutchinson import hutchinson_diag, hutchinson_trace
from curvdiag.curvature.operator import CurvatureOperator
from conftest import dense_hessian, quadratic_spectrum
from models import mse, regression_batches, tanh_mlp


def _off_diagonal_squares(A):
    off = A - torch.diag(torch.diagonal(A))
    return off.pow(2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trace_is_within_four_standard_deviations_of_the_exact_trace(seed):
    A = quadratic_spectrum([float(x) for x in torch.linspace(-2, 5, 40)], seed=seed)
    n = 200
    result = hutchinson_trace(A, samples=n, seed=seed)
    sigma = math.sqrt(2 * float(_off_diagonal_squares(A).sum()) / n)
    assert abs(result.value - float(torch.trace(A))) <= 4 * sigma
    # The reported standard error estimates sigma (its own relative s.d. is about 1/sqrt(2n) = 5%).
    assert result.stderr == pytest.approx(sigma, rel=0.25)


def test_trace_adds_probes_until_the_target_relative_standard_error():
    A = quadratic_spectrum([1.0 + 0.1 * i for i in range(50)], seed=3)
    result = hutchinson_trace(A, target_rel_stderr=0.01, seed=0)
    assert result.stderr <= 0.01 * abs(result.value)
    assert 10 <= result.samples < 1000


def test_diagonal_entries_are_within_their_standard_deviations():
    A = quadratic_spectrum([float(x) for x in torch.linspace(-3, 3, 50)], seed=4)
    n = 400
    result = hutchinson_diag(A, samples=n, seed=1)
    sigma = (_off_diagonal_squares(A).sum(dim=1) / n).sqrt()
    z = (result.diagonal - torch.diagonal(A)) / sigma
    # 50 nearly normal z-scores: their mean square is 1 ± 0.2 (one s.d.); allow 3 s.d.
    assert 0.4 <= float(z.pow(2).mean()) <= 1.6
    assert float(z.abs().max()) < 4.5
    torch.testing.assert_close(result.stderr, sigma, rtol=0.35, atol=0)


def test_diagonal_per_layer_summaries_and_shared_trace_on_a_tiny_mlp():
    model, batches = tanh_mlp(), regression_batches()
    op = CurvatureOperator(model, batches, mse, [7, 3])
    H = dense_hessian(model, batches, mse, [7, 3])
    n = 300
    result = hutchinson_diag(op, samples=n, seed=0, segments=op.layer_slices())
    exact_diag = torch.diagonal(H)
    sigma_trace = math.sqrt(2 * float(_off_diagonal_squares(H).sum()) / n)
    assert abs(result.trace.value - float(exact_diag.sum())) <= 4 * sigma_trace
    off = _off_diagonal_squares(H)
    for (name, a, b), mean in zip(op.layer_slices(), result.segment_means):
        # Var of the layer mean of z_i (Hz)_i: (1/m²) Σ_{i,j∈layer} Cov, bounded by the mean of s.d.s squared.
        sigma = float(off[a:b].sum(dim=1).sqrt().mean()) / math.sqrt(n)
        assert abs(mean - float(exact_diag[a:b].mean())) <= 4 * sigma + 1e-12, name


def test_same_seed_same_estimate():
    A = quadratic_spectrum([1.0, 2.0, 3.0, 4.0], seed=5)
    assert hutchinson_trace(A, samples=20, seed=7).value == hutchinson_trace(A, samples=20, seed=7).value
