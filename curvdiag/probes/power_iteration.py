"""Power iteration with deflation and a shift, for parity with PyHessian (DESIGN §3.1).

Plain power iteration converges to the eigenvalue of largest *magnitude*. When that is
negative (|λmin| > λmax) the run is repeated on A − μI with μ the negative eigenvalue found:
its spectrum is shifted to be non-negative, its dominant eigenvalue is λmax − μ. The stop is
the Rayleigh residual ‖Ax − θx‖ ≤ tol·|θ|, which bounds the error, unlike PyHessian's
relative change of θ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from curvdiag.curvature.linear_operator import as_operator, random_vector


@dataclass
class PowerResult:
    eigenvalues: List[float]  # largest algebraic first
    residuals: List[float]
    eigenvectors: torch.Tensor  # (k, n)
    lambda_min: Optional[float]  # known when the dominant eigenvalue was negative
    matvecs: int
    converged: bool
    shifted: bool


def _dominant(op: Any, shift: float, found: List[torch.Tensor], tol: float, budget: int, seed: int,
              start: Optional[torch.Tensor] = None) -> tuple:
    """Dominant eigenpair of (A − shift·I) restricted to the complement of ``found``, from
    ``start`` when given, else from a random vector drawn from ``seed``."""
    x = random_vector(op.size, seed, op.device, op.dtype) if start is None else start.to(op.device, op.dtype).clone()
    for f in found:
        x -= torch.dot(f, x) * f
    x /= x.norm()
    theta, residual, used = 0.0, float("inf"), 0
    while used < budget:
        y = op.matvec(x) - shift * x
        used += 1
        for f in found:
            y -= torch.dot(f, y) * f
        theta = float(torch.dot(x, y))
        residual = float((y - theta * x).norm())
        if residual <= tol * abs(theta):
            break
        norm = y.norm()
        if float(norm) == 0.0:
            break
        x = y / norm
    return theta, residual, x, used


def power_iteration(operator: Any, *, top_k: int = 1, tol: float = 1e-4, max_matvecs: int = 1000, seed: int = 0,
                    start: Optional[torch.Tensor] = None) -> PowerResult:
    """Top-k algebraic eigenvalues by (shifted, deflated) power iteration. ``start`` (shape (n,)):
    where the first eigenpair's iteration starts (a warm start, e.g. the previous top
    eigenvector); without it, a random vector drawn from ``seed``."""
    op = as_operator(operator)
    used = 0
    theta, residual, x, n = _dominant(op, 0.0, [], tol, max_matvecs, seed, start)
    used += n
    lambda_min, shift = None, 0.0
    if theta < 0:
        lambda_min, shift = theta, theta
    values, residuals, vectors = [], [], []
    converged = True
    for i in range(top_k):
        if i == 0 and shift == 0.0:
            value, res, vec = theta, residual, x
            converged &= res <= tol * abs(value)
        else:
            budget = max(max_matvecs - used, 1)
            first = start if i == 0 else None
            t, res, vec, n = _dominant(op, shift, vectors, tol, budget, seed + i + 1, first)
            used += n
            if t < 0 and shift == 0.0:
                # The rest of the spectrum is dominated by a negative eigenvalue: shift by it.
                lambda_min, shift = t, t
                t, res, vec, n = _dominant(op, shift, vectors, tol, max(max_matvecs - used, 1), seed + i + 1, first)
                used += n
            value = t + shift
            converged &= res <= tol * abs(t)
        values.append(value)
        residuals.append(res)
        vectors.append(vec)
    return PowerResult(values, residuals, torch.stack(vectors), lambda_min, used, bool(converged), shift != 0.0)
