"""Stochastic Lanczos quadrature against dense matrices with known spectra."""

import math

import pytest
import torch

from curvdiag.curvature.linear_operator import DenseOperator
from curvdiag.probes.spectral_density import smoothed_density, spectral_density
from conftest import quadratic_spectrum

# 60 eigenvalues: a bulk near zero, a few negative ones and two outliers (a Hessian's shape).
SPECTRUM = ([-0.8, -0.3, -0.05] + [0.02 * i for i in range(53)] + [2.5, 3.0, 6.5, 7.0])


def _matrix(seed=0):
    return quadratic_spectrum(SPECTRUM, seed=seed)


def test_weights_are_a_probability_per_probe_and_nodes_lie_in_the_spectrum():
    r = spectral_density(_matrix(), steps=20, probes=3, seed=1)
    assert r.probes == 3 and r.steps == 20 and r.hvps == 60 and r.size == len(SPECTRUM)
    for nodes, weights in zip(r.nodes, r.weights):
        assert nodes.shape == weights.shape == (20,)
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
        assert bool((weights >= 0).all())
        # Ritz values of a symmetric matrix lie inside [λmin, λmax].
        assert float(nodes.min()) >= min(SPECTRUM) - 1e-9 and float(nodes.max()) <= max(SPECTRUM) + 1e-9


def test_quadrature_is_exact_for_each_probe_up_to_degree_2m_minus_1():
    """Σ τ θ^j = qᵀ A^j q for j ≤ 2m − 1: rebuild the same probe vectors and compare."""
    a = _matrix()
    m = 6
    r = spectral_density(a, steps=m, probes=2, seed=5)
    g = torch.Generator().manual_seed(5)
    n = a.shape[0]
    for index in range(2):
        z = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8).to(torch.float64) * 2 - 1
        q = z / math.sqrt(n)
        power = q.clone()
        for j in range(1, 2 * m):
            power = a @ power
            exact = float(q @ power)
            assert float(r.probe_moments(j)[index]) == pytest.approx(exact, rel=1e-8, abs=1e-10), j
        # Degree 2m is not integrated exactly any more (the quadrature's error term).
        power = a @ power
        assert abs(float(r.probe_moments(2 * m)[index]) - float(q @ power)) > 1e-6


@pytest.mark.parametrize("power", [1, 2, 3, 4])
def test_moments_match_the_trace_within_the_hutchinson_standard_error(power):
    """The averaged moments estimate tr(A^k)/n; the tolerance is 5 standard errors of the
    Rademacher estimator, s.d.² = 2(‖B‖_F² − Σ B_ii²)/n² per probe for B = A^k."""
    a = _matrix(seed=2)
    n = a.shape[0]
    probes = 30
    r = spectral_density(a, steps=12, probes=probes, seed=0)
    b = torch.linalg.matrix_power(a, power)
    exact = float(torch.trace(b)) / n
    sd = math.sqrt(2 * (float(b.pow(2).sum()) - float(torch.diagonal(b).pow(2).sum()))) / n
    stderr = sd / math.sqrt(probes)
    assert abs(r.moment(power) - exact) <= 5 * stderr, (r.moment(power), exact, stderr)
    # and the moment is a real estimate, not exact by construction: a one-probe run differs.
    single = spectral_density(a, steps=12, probes=1, seed=0)
    assert single.moment(power) != pytest.approx(exact, rel=1e-9)


def test_full_krylov_space_recovers_the_spectrum_exactly():
    eigenvalues = [-1.0, 0.5, 2.0, 3.0, 10.0]
    r = spectral_density(quadratic_spectrum(eigenvalues, seed=3), steps=50, probes=1)
    assert r.steps == 5  # capped at n
    assert r.nodes[0].tolist() == pytest.approx(eigenvalues, abs=1e-9)
    assert r.lambda_min == pytest.approx(-1.0, abs=1e-9) and r.lambda_max == pytest.approx(10.0, abs=1e-9)


def test_smoothed_density_integrates_to_one_and_covers_the_spectrum():
    r = spectral_density(_matrix(), steps=24, probes=2, seed=3)
    grid, density, sigma = smoothed_density(r)
    assert grid.shape == density.shape == (512,)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-3)
    assert float(grid[0]) <= min(SPECTRUM) and float(grid[-1]) >= max(SPECTRUM)
    # Mass sits at both extremes: the outlier at 7.0 and the negative edge at -0.8 are found.
    near = lambda x: float(density[(grid - x).abs().argmin()])
    assert near(7.0) > 1e-3 and near(-0.8) > 1e-3
    assert near(5.0) < 1e-6  # a gap in the spectrum stays empty
    assert sigma == pytest.approx(0.01 * (r.lambda_max - r.lambda_min))


def test_json_form_round_trips_into_the_same_density():
    r = spectral_density(_matrix(), steps=10, probes=2, seed=4)
    doc = r.to_json(points=200)
    assert {"method", "size", "steps", "probes", "seed", "hvps", "nodes", "weights", "grid", "density", "sigma",
            "lambda_min", "lambda_max", "trace_estimate"} <= set(doc)
    assert len(doc["nodes"]) == len(doc["weights"]) == 2 and len(doc["grid"]) == len(doc["density"]) == 200
    assert doc["trace_estimate"] == pytest.approx(len(SPECTRUM) * r.moment(1))
    grid, density, _ = smoothed_density(doc, points=200)
    assert density.tolist() == pytest.approx(doc["density"], rel=1e-12)
    import json
    json.dumps(doc)  # plain floats and lists only


def test_same_seed_same_result_and_works_on_an_operator():
    a = _matrix()
    one = spectral_density(DenseOperator(a), steps=8, probes=2, seed=9)
    two = spectral_density(a, steps=8, probes=2, seed=9)
    other = spectral_density(a, steps=8, probes=2, seed=10)
    assert all(torch.equal(x, y) for x, y in zip(one.nodes, two.nodes))
    assert not torch.equal(one.nodes[0], other.nodes[0])


def test_float32_operator():
    r = spectral_density(_matrix().float(), steps=20, probes=1, seed=0)
    assert float(r.weights[0].sum()) == pytest.approx(1.0)
    assert r.lambda_max == pytest.approx(7.0, rel=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(probes=0), "probes must be a positive integer"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spectral_density(_matrix(), **kwargs)


def test_smoothing_rejects_bad_sigma_and_empty_nodes():
    r = spectral_density(_matrix(), steps=4, probes=1)
    with pytest.raises(ValueError, match="sigma must be positive"):
        smoothed_density(r, sigma=0.0)
    with pytest.raises(ValueError, match="no quadrature nodes"):
        smoothed_density({"nodes": [], "weights": []})


def test_non_finite_product_is_reported():
    a = _matrix()
    a[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite product"):
        spectral_density(a, steps=5, probes=1)
