"""The spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

The empirical spectral measure of a symmetric n×n operator A is μ = (1/n) Σ_i δ(λ − λ_i), so
∫ f dμ = tr f(A) / n. SLQ (Ubaru, Chen & Saad 2017, "Fast estimation of tr(f(A)) via stochastic
Lanczos quadrature"; Ghorbani et al. 2019 and PyHessian's ``density``) estimates it with a few
random probe vectors: for a Rademacher z (‖z‖² = n, E[z zᵀ] = I) and q = z/‖z‖,

    zᵀ f(A) z / n = qᵀ f(A) q ≈ Σ_k τ_k f(θ_k),

where m Lanczos steps from q give the tridiagonal T_m = S diag(θ) Sᵀ, the nodes θ_k are its
eigenvalues and the weights τ_k = S[0, k]² its eigenvectors' squared first entries (Golub–Welsch:
the m-point Gauss quadrature of the measure Σ_i (q·u_i)² δ(λ − λ_i), exact for polynomials
of degree ≤ 2m − 1). Per probe the weights are non-negative and sum to 1. Averaging over
``probes`` vectors gives μ ≈ (1/probes) Σ_l Σ_k τ_k^l δ(λ − θ_k^l), unbiased for every moment
of degree ≤ 2m − 1 (Hutchinson's estimator of tr(A^j)/n, seed 004 Theorem 2), with per-probe
variance 2(‖A^j‖_F² − Σ_i (A^j)_ii²)/n² for Rademacher probes.

For display the discrete measure is smoothed by a Gaussian of width σ (:func:`smoothed_density`):
φ(t) = (1/probes) Σ_l Σ_k τ_k^l N(t; θ_k^l, σ²), a probability density on the real line.

Cost: ``steps × probes`` operator products and a basis of ``steps`` vectors of n entries.
The extreme nodes converge fastest (Lanczos resolves the edges of the spectrum first), so
the support of the estimate covers [λmin, λmax] after a few tens of steps; the bulk's shape
is resolved to about (λmax − λmin)/m.

JSON form (:meth:`SpectralDensityResult.to_json`, the ``spectral_density`` entry of a probe report)::

    {"method": "slq", "size": n, "steps": m, "probes": p, "seed": int, "hvps": int, "seconds": float,
     "nodes":   [[θ_1, ..., θ_m'], ...],   # one list per probe (m' ≤ m if Lanczos broke down early)
     "weights": [[τ_1, ..., τ_m'], ...],   # one list per probe, each sums to 1
     "lambda_min": float, "lambda_max": float,   # the extreme nodes over all probes
     "trace_estimate": float,              # n · ∫ λ dμ, the SLQ (= Hutchinson) estimate of tr(A)
     "sigma": float,                       # width of the Gaussian used for "density"
     "grid": [t_1, ..., t_G], "density": [φ(t_1), ..., φ(t_G)]}   # ∫ φ ≈ 1
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from curvdiag.curvature.linear_operator import as_operator
from curvdiag.probes.eigen import gauss_quadrature
from curvdiag.results.probe_results import GRID_POINTS
from curvdiag.results.probe_results import smoothed_density as smoothed_density_of_nodes

DEFAULT_STEPS = 64
DEFAULT_PROBES = 2


@dataclass
class SpectralDensityResult:
    """Gauss quadrature nodes and weights of the spectral measure, one set per probe vector.

    ``nodes[l]`` and ``weights[l]`` are float64 tensors of shape (m_l,), m_l ≤ ``steps``;
    ``weights[l]`` sums to 1.
    """

    nodes: List[torch.Tensor]
    weights: List[torch.Tensor]
    size: int
    steps: int
    probes: int
    seed: int
    hvps: int
    seconds: float
    breakdowns: List[int] = field(default_factory=list)  # probes whose Krylov space closed early

    @property
    def lambda_min(self) -> float:
        return min(float(n.min()) for n in self.nodes)

    @property
    def lambda_max(self) -> float:
        return max(float(n.max()) for n in self.nodes)

    def moment(self, power: int) -> float:
        """∫ λ^power dμ ≈ tr(A^power)/n, averaged over probes (exact per probe for power ≤ 2m − 1)."""
        return float(sum((w * t.pow(power)).sum() for t, w in zip(self.nodes, self.weights)) / len(self.nodes))

    def probe_moments(self, power: int) -> torch.Tensor:
        """The per-probe estimates qᵀ A^power q, shape (probes,)."""
        return torch.stack([(w * t.pow(power)).sum() for t, w in zip(self.nodes, self.weights)])

    def to_json(self, points: int = GRID_POINTS, sigma: Optional[float] = None) -> Dict[str, Any]:
        grid, density, width = smoothed_density(self, points=points, sigma=sigma)
        return {
            "method": "slq",
            "size": self.size,
            "steps": self.steps,
            "probes": self.probes,
            "seed": self.seed,
            "hvps": self.hvps,
            "seconds": self.seconds,
            "nodes": [t.tolist() for t in self.nodes],
            "weights": [w.tolist() for w in self.weights],
            "lambda_min": self.lambda_min,
            "lambda_max": self.lambda_max,
            "trace_estimate": self.size * self.moment(1),
            "sigma": width,
            "grid": grid.tolist(),
            "density": density.tolist(),
        }


def _rademacher(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (size,), generator=generator, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)


def spectral_density(
    operator: Any,
    steps: int = DEFAULT_STEPS,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
) -> SpectralDensityResult:
    """Stochastic Lanczos quadrature of the spectral measure of a symmetric operator.

    Args:
        operator: a linear operator (``size``, ``device``, ``dtype``, ``matvec``; see
            :mod:`curvdiag.curvature.linear_operator`) or a dense symmetric (n, n) tensor.
        steps: Lanczos steps per probe, m (capped at n). The quadrature integrates polynomials
            of degree ≤ 2m − 1 exactly for each probe vector.
        probes: number of Rademacher probe vectors; the estimate of tr(f(A))/n averages them.
        seed: seed of the probe vectors (drawn on the CPU, so every device gets the same ones).

    Returns:
        :class:`SpectralDensityResult` with per-probe nodes and weights and the product count.

    Raises:
        ValueError: ``steps`` or ``probes`` below 1, or a non-finite product.

    Example (a matrix with spectrum {1, 2, 3, 4}: 4 steps resolve it exactly):

    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    >>> r = spectral_density(A, steps=4, probes=1)
    >>> [round(x, 6) for x in r.nodes[0].tolist()], [round(x, 6) for x in r.weights[0].tolist()]
    ([1.0, 2.0, 3.0, 4.0], [0.25, 0.25, 0.25, 0.25])
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    op = as_operator(operator)
    started = time.perf_counter()
    m = min(steps, op.size)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    all_nodes: List[torch.Tensor] = []
    all_weights: List[torch.Tensor] = []
    breakdowns: List[int] = []
    hvps = 0
    for index in range(probes):
        z = _rademacher(op.size, generator)
        q = (z / math.sqrt(op.size)).to(device=op.device, dtype=op.dtype)
        nodes, weights, products, broke_down = gauss_quadrature(op, q, m)
        all_nodes.append(nodes)
        all_weights.append(weights)
        hvps += products
        if broke_down:
            breakdowns.append(index)
    return SpectralDensityResult(nodes=all_nodes, weights=all_weights, size=op.size, steps=m, probes=probes,
                                 seed=int(seed), hvps=hvps, seconds=time.perf_counter() - started,
                                 breakdowns=breakdowns)


def smoothed_density(result: Any, points: int = GRID_POINTS,
                     sigma: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The Gaussian-smoothed density of :func:`curvdiag.results.probe_results.smoothed_density`
    (the one definition, which reports and figures read) for a :class:`SpectralDensityResult` or its
    JSON form, as float64 tensors (grid (G,), density (G,)) and the width σ used."""
    if isinstance(result, dict):
        nodes, weights = result["nodes"], result["weights"]
    else:
        nodes, weights = [t.tolist() for t in result.nodes], [w.tolist() for w in result.weights]
    grid, density, width = smoothed_density_of_nodes(nodes, weights, points=points, sigma=sigma)
    return torch.tensor(grid, dtype=torch.float64), torch.tensor(density, dtype=torch.float64), width
