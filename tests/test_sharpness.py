"""λmax by Lanczos and power iteration against analytic spectra and dense Hessians."""

import numpy as np
import pytest
import torch

from curvdiag.probes.eigen import LanczosProcess, lanczos
from curvdiag.curvature.linear_operator import DenseOperator
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.probes.sharpness import lambda_max, preconditioned_lambda_max
from conftest import dense_hessian, quadratic_spectrum
from models import mse, regression_batches, tanh_mlp

SPREAD = [float(x) for x in torch.linspace(-1.0, 3.0, 60)]
# Largest magnitude is negative: plain power iteration would converge to −10.
INDEFINITE = [-10.0, -4.0] + SPREAD + [5.0]
# Crowded top, as at the edge of stability (DESIGN §3.1).
CROWDED = [7.001, 6.880, 6.821, 6.812] + [float(x) for x in torch.linspace(0.0, 6.0, 196)]


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_indefinite_quadratic_gives_the_largest_algebraic_eigenvalue(method):
    A = quadratic_spectrum(INDEFINITE)
    result = lambda_max(A, method=method, tol=1e-8, max_hvps=3000)
    assert result.converged
    assert result.value == pytest.approx(5.0, rel=1e-6)
    assert result.lambda_min == pytest.approx(-10.0, rel=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_lanczos_does_not_return_the_second_eigenvalue_of_a_crowded_top_at_loose_tol(seed):
    A = quadratic_spectrum(CROWDED, seed=seed)
    result = lambda_max(A, tol=1e-3, seed=seed)
    assert result.converged
    assert 7.001 - 1e-3 * 7.001 <= result.value <= 7.001  # within tol; the second (6.880) is 1.7% off
    assert result.hvps < 100


def test_lanczos_top_k_and_residuals_bound_the_error():
    A = quadratic_spectrum(CROWDED, seed=1)
    result = lambda_max(A, tol=1e-6, top_k=4)
    torch.testing.assert_close(torch.tensor(result.eigenvalues, dtype=torch.float64), torch.tensor(CROWDED[:4], dtype=torch.float64),
                               rtol=1e-8, atol=0)
    exact = torch.tensor(CROWDED, dtype=torch.float64)
    for value, residual in zip(result.eigenvalues, result.residuals):
        assert (exact - value).abs().min() <= residual + 1e-12


def test_power_iteration_top_k_by_deflation():
    A = quadratic_spectrum([4.0, 2.0, 1.0, 0.5, 0.1, 0.0], seed=2)
    result = lambda_max(A, method="power", tol=1e-10, top_k=2, max_hvps=5000)
    assert result.eigenvalues == pytest.approx([4.0, 2.0], rel=1e-8)


def test_lanczos_restarts_within_a_small_basis_budget_and_still_converges():
    A = quadratic_spectrum(CROWDED, seed=3)
    bytes_per_vector = A.shape[0] * 8
    result = lanczos(DenseOperator(A), tol=1e-6, max_matvecs=2000, basis_budget_bytes=12 * bytes_per_vector)
    assert result.restarts > 0 and result.converged
    assert result.eigenvalues[0] == pytest.approx(7.001, rel=1e-6)  # the tol asked


def test_the_default_basis_budget_is_a_quarter_of_the_available_memory_at_most_2_gib(monkeypatch):
    """Without ``basis_budget_bytes`` the basis holds min(2 GiB, default_memory(device)) bytes: on a
    device with little memory left the run restarts (and converges) instead of filling it."""
    import curvdiag.probes.eigen as eigen

    A = quadratic_spectrum(CROWDED, seed=3)
    bytes_per_vector = A.shape[0] * 8
    asked = []
    monkeypatch.setattr(eigen, "default_memory", lambda device: asked.append(device) or 10 * bytes_per_vector)
    tight = lanczos(DenseOperator(A), tol=1e-8, max_matvecs=2000)
    assert asked == [torch.device("cpu")] and tight.restarts > 0 and tight.converged
    assert tight.eigenvalues[0] == pytest.approx(7.001, rel=1e-8)
    monkeypatch.setattr(eigen, "default_memory", lambda device: 1 << 40)
    assert lanczos(DenseOperator(A), tol=1e-8, max_matvecs=2000).restarts == 0
    assert eigen.BASIS_BUDGET == 2 << 30
    monkeypatch.setattr(eigen, "BASIS_BUDGET", 10 * bytes_per_vector)  # the cap binds however much is free
    capped = lanczos(DenseOperator(A), tol=1e-8, max_matvecs=2000)
    assert (capped.matvecs, capped.restarts) == (tight.matvecs, tight.restarts)


def test_thick_restart_keeps_the_krylov_information():
    """A thick restart keeps half the Ritz pairs: the projected matrix stays Qᵀ A Q (an arrowhead
    block, then tridiagonal) over an orthonormal basis, and the products stay near the unrestarted
    run's, where restarting from one vector (the sum of the top Ritz vectors) took twice as many."""
    A = quadratic_spectrum(CROWDED, seed=3)
    n = A.shape[0]
    unrestarted = lanczos(DenseOperator(A), tol=1e-8, max_matvecs=2000)
    restarted = lanczos(DenseOperator(A), tol=1e-8, max_matvecs=2000, basis_budget_bytes=10 * n * 8)
    assert unrestarted.restarts == 0 and restarted.restarts > 0 and restarted.converged
    assert restarted.eigenvalues[0] == pytest.approx(7.001, rel=1e-8)
    assert restarted.matvecs <= 1.5 * unrestarted.matvecs

    process = LanczosProcess(DenseOperator(A), torch.ones(n, dtype=torch.float64) / n ** 0.5, 8)
    for _ in range(8):
        process.step()
        if process.size < 8:
            process.advance()
    ritz, vectors = np.linalg.eigh(process.tridiagonal_array())
    process.thick_restart(vectors[:, -4:], ritz[-4:])
    process.step()
    process.advance()
    process.step()
    Q = process.basis[: process.size]
    assert torch.allclose(Q @ Q.T, torch.eye(process.size, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q @ A @ Q.T, process.tridiagonal(), atol=1e-10)
    assert np.allclose(np.diag(process.tridiagonal_array())[:4], ritz[-4:])


def test_lambda_max_of_a_tiny_mlp_matches_the_dense_hessian():
    model, batches = tanh_mlp(), regression_batches()
    op = CurvatureOperator(model, batches, mse, [7, 3])
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches, mse, [7, 3]))
    for method in ("lanczos", "power"):
        result = lambda_max(op, method=method, tol=1e-9, max_hvps=5000)
        assert result.value == pytest.approx(float(exact[-1]), rel=1e-7), method


def test_unconverged_lambda_min_is_reported_only_as_an_estimate():
    A = quadratic_spectrum(CROWDED, seed=4)
    result = lambda_max(A, tol=1e-3)
    assert result.lambda_min is None  # 0.0 at the bottom: its relative residual cannot meet tol
    assert result.lambda_min_estimate is not None and result.lambda_min_estimate < 6.0


def test_preconditioned_sharpness_matches_the_dense_operator():
    model, batches = tanh_mlp(), regression_batches()
    op = CurvatureOperator(model, batches, mse, [7, 3])
    H = dense_hessian(model, batches, mse, [7, 3])
    g = torch.Generator().manual_seed(5)
    v = torch.rand(op.num_params, generator=g, dtype=torch.float64) * 1e-6  # Adam's exp_avg_sq
    step, beta2, eps = 10, 0.999, 1e-8
    p = (v / (1 - beta2 ** step)).sqrt() + eps
    dense = torch.diag(p.rsqrt()) @ H @ torch.diag(p.rsqrt())
    exact = float(torch.linalg.eigvalsh(dense)[-1])
    result = preconditioned_lambda_max(op, p, tol=1e-9)
    assert result.value == pytest.approx(exact, rel=1e-7)
    assert result.value > 10 * float(torch.linalg.eigvalsh(H)[-1])  # small v: much sharper


def test_power_iteration_top_k_shifts_when_a_negative_eigenvalue_dominates_the_rest():
    A = quadratic_spectrum([6.0, 1.0, 0.5, -3.0, 0.1], seed=6)
    result = lambda_max(A, method="power", tol=1e-10, top_k=2, max_hvps=20000)
    assert result.eigenvalues == pytest.approx([6.0, 1.0], rel=1e-7)
    assert result.lambda_min == pytest.approx(-3.0, rel=1e-7)
