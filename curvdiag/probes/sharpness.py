"""λmax, the sharpness: the largest algebraic Hessian eigenvalue (DESIGN §3.1, §3.2).

GD is stable along eigendirection i iff η·λ_i < 2, so the number that limits the learning
rate is the largest *algebraic* eigenvalue (not the largest in magnitude). Lanczos is the
default; power iteration (shifted when a negative eigenvalue dominates) is there for parity
with PyHessian. For Adam the relevant curvature is λmax(P^{-1/2} H P^{-1/2}) with
P = diag(sqrt(v̂) + ε), the preconditioned sharpness.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from curvdiag.probes.eigen import lanczos, power_iteration
from curvdiag.curvature.linear_operator import SymmetricScaling, as_operator, product_error

METHODS = ("lanczos", "power")


@dataclass
class SharpnessResult:
    """λmax and what it cost. ``eigenvalues`` are the top-k, largest first (``value`` is the first)."""

    value: float
    eigenvalues: List[float]
    residuals: List[float]
    lambda_min: Optional[float]  # reported only when its own residual meets tol
    lambda_min_estimate: Optional[float]  # the smallest Ritz value, converged or not
    method: str
    hvps: int
    converged: bool
    seconds: float
    tol: float
    restarts: int = 0
    ritz_values: List[float] = field(default_factory=list)  # Lanczos: every Ritz value, largest first
    error_estimates: List[float] = field(default_factory=list)  # Lanczos: of each top-k value (absolute)
    eigenvectors: Optional[torch.Tensor] = field(default=None, repr=False)


class _Counting:
    """Counts the products made on an operator."""

    def __init__(self, operator: Any):
        self.operator = operator
        self.size, self.device, self.dtype = operator.size, operator.device, operator.dtype
        self.product_error = product_error(operator)
        self.count = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.operator.matvec(v)


def lambda_max(
    operator: Any,
    method: str = "lanczos",
    tol: float = 1e-4,
    top_k: int = 1,
    seed: int = 0,
    max_hvps: int = 500,
    want_vectors: bool = False,
) -> SharpnessResult:
    """Top-k largest algebraic eigenvalues of a symmetric operator (a CurvatureOperator, any
    ``curvdiag.curvature.linear_operator`` operator, or a dense symmetric tensor).

    ``tol`` is the relative accuracy asked of each eigenvalue: Lanczos stops on its error
    estimate (:func:`curvdiag.probes.eigen.ritz_error_estimates`), power iteration on the Rayleigh
    residual. ``lambda_min`` is reported only when its own residual is within tol."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    counting = _Counting(as_operator(operator))
    started = time.perf_counter()
    if method == "lanczos":
        seeded = getattr(operator, "seeded_start", None)  # a CurvatureOperator's check drew seed 0's already
        start = seeded(seed) if callable(seeded) else None
        r = lanczos(counting, top_k=top_k, tol=tol, max_matvecs=max_hvps, seed=seed, start=start,
                    want_vectors=want_vectors)
        lam_min = r.lambda_min if r.lambda_min_residual <= tol * abs(r.lambda_min) else None
        result = SharpnessResult(
            value=r.eigenvalues[0], eigenvalues=r.eigenvalues, residuals=r.residuals, lambda_min=lam_min,
            lambda_min_estimate=r.lambda_min, method="lanczos", hvps=counting.count, converged=r.converged,
            seconds=0.0, tol=tol, restarts=r.restarts, eigenvectors=r.eigenvectors, ritz_values=r.ritz_values,
            error_estimates=r.error_estimates,
        )
    else:
        r = power_iteration(counting, top_k=top_k, tol=tol, max_matvecs=max_hvps, seed=seed)
        result = SharpnessResult(
            value=r.eigenvalues[0], eigenvalues=r.eigenvalues, residuals=r.residuals, lambda_min=r.lambda_min,
            lambda_min_estimate=r.lambda_min, method="power", hvps=counting.count, converged=r.converged,
            seconds=0.0, tol=tol, eigenvectors=r.eigenvectors if want_vectors else None,
        )
    result.seconds = time.perf_counter() - started
    return result


def preconditioned_operator(operator: Any, preconditioner_diagonal: torch.Tensor) -> SymmetricScaling:
    """P^{-1/2} H P^{-1/2} for a flat diagonal P (shape (n,), entries sqrt(v̂) + ε > 0)."""
    return SymmetricScaling(as_operator(operator), preconditioner_diagonal.rsqrt())


def preconditioned_lambda_max(operator: Any, preconditioner_diagonal: torch.Tensor, **kwargs: Any) -> SharpnessResult:
    """λmax(P^{-1/2} H P^{-1/2}), Adam's preconditioned sharpness (DESIGN §3.2)."""
    return lambda_max(preconditioned_operator(operator, preconditioner_diagonal), **kwargs)
