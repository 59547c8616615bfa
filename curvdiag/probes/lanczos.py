"""Lanczos for the extreme eigenvalues of a symmetric operator (seed 003, DESIGN §3.1).

Unrestarted Lanczos with full reorthogonalisation, in torch on the operator's device. After
j products the tridiagonal T_j = Q_jᵀ A Q_j has Ritz pairs (θ_i, s_i); the residual of the
Ritz vector y_i = Q_j s_i is ‖A y_i − θ_i y_i‖ = |β_j s_i[-1]|, and it bounds the distance
from θ_i to *some* eigenvalue of A. A pair counts as converged when that residual is at most
tol·|θ_i|; the run stops when the top-k pairs are converged, at least ``min_iterations``
products were made, and the top Ritz value has not moved by more than tol·|θ| over the last
``stability_window`` steps (a cluster may still be resolving). The top Ritz value of a
Krylov space never exceeds λmax and rises towards it, so the answer is the largest
*algebraic* eigenvalue, whatever the sign of the others.

The basis (k vectors of n entries) is kept in a memory budget: past it the run restarts
from the current top Ritz vectors (explicit restart), and the result says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from curvdiag.curvature.linear_operator import as_operator, random_vector


@dataclass
class LanczosResult:
    eigenvalues: List[float]  # the top-k Ritz values, largest first
    residuals: List[float]  # their residual norms ‖A y − θ y‖
    eigenvectors: Optional[torch.Tensor]  # (k, n) unit Ritz vectors
    lambda_min: float  # the smallest Ritz value (an upper bound on λmin)
    lambda_min_residual: float
    matvecs: int
    converged: bool
    restarts: int = 0
    history: List[float] = field(default_factory=list)  # top Ritz value after each product
    ritz_values: List[float] = field(default_factory=list)  # all final Ritz values, largest first


def lanczos(
    operator: Any,
    *,
    top_k: int = 1,
    tol: float = 1e-4,
    max_matvecs: int = 300,
    min_iterations: int = 8,
    stability_window: int = 3,
    seed: int = 0,
    start: Optional[torch.Tensor] = None,
    basis_budget_bytes: int = 2 << 30,
    want_vectors: bool = False,
) -> LanczosResult:
    """Top-k algebraic eigenvalues (and the smallest Ritz value) of a symmetric operator.

    Args:
        operator: a linear operator (``curvdiag.curvature.linear_operator``) or a dense symmetric tensor.
        top_k: how many of the largest eigenvalues to converge.
        tol: relative Ritz-residual tolerance, ‖A y − θ y‖ ≤ tol·|θ|.
        max_matvecs: budget of operator products.
        seed: seed of the random start vector (ignored when ``start`` is given).
        basis_budget_bytes: memory for the Krylov basis before an explicit restart.
    """
    op = as_operator(operator)
    n = op.size
    q = start.to(device=op.device, dtype=op.dtype).clone() if start is not None else random_vector(n, seed, op.device, op.dtype)
    q /= q.norm()
    bytes_per_vector = n * torch.finfo(op.dtype).bits // 8
    capacity = max(top_k + 2, min(n, max_matvecs + 1, basis_budget_bytes // max(bytes_per_vector, 1)))
    basis = torch.empty((capacity, n), device=op.device, dtype=op.dtype)
    alphas: List[float] = []
    betas: List[float] = []
    history: List[float] = []
    matvecs, restarts, size = 0, 0, 0
    converged = False
    ritz = residuals = vectors_small = None
    while True:
        basis[size] = q
        w = op.matvec(q)
        matvecs += 1
        alpha = float(torch.dot(w, q))
        # Full reorthogonalisation against the whole basis, twice ("twice is enough").
        active = basis[: size + 1]
        for _ in range(2):
            w = w - active.T @ (active @ w)
        beta = float(w.norm())
        alphas.append(alpha)
        size += 1
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if size > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        ritz, vectors_small = torch.linalg.eigh(T)  # ascending
        residuals = (beta * vectors_small[-1, :]).abs()
        history.append(float(ritz[-1]))
        k = min(top_k, size)
        top = ritz[-k:]
        top_ok = bool((residuals[-k:] <= tol * top.abs()).all()) and size >= top_k
        window = history[-(stability_window + 1):]
        steady = len(window) > stability_window and max(window) - min(window) <= tol * abs(history[-1])
        invariant = beta <= 1e-10 * max(abs(float(ritz[0])), abs(float(ritz[-1])), 1e-30)
        if (invariant and size >= min(top_k, n)) or (top_ok and steady and matvecs >= min(min_iterations, n)):
            converged = True
            break
        if matvecs >= max_matvecs or size >= n:
            break
        if size == capacity:
            # Explicit restart from the sum of the current top Ritz vectors.
            q = (basis[:size].T @ vectors_small[:, -k:].to(op.dtype).to(op.device)).sum(dim=1)
            q /= q.norm()
            alphas, betas, size, restarts = [], [], 0, restarts + 1
            continue
        betas.append(beta)
        q = w / beta
    k = min(top_k, size)
    order = list(range(size - 1, size - 1 - k, -1))
    eigenvectors = None
    if want_vectors:
        coefficients = vectors_small[:, order].to(device=op.device, dtype=op.dtype)
        eigenvectors = (basis[:size].T @ coefficients).T
    return LanczosResult(
        eigenvalues=[float(ritz[i]) for i in order],
        residuals=[float(residuals[i]) for i in order],
        eigenvectors=eigenvectors,
        lambda_min=float(ritz[0]),
        lambda_min_residual=float(residuals[0]),
        matvecs=matvecs,
        converged=converged,
        restarts=restarts,
        history=history,
        ritz_values=[float(x) for x in ritz.flip(0)],
    )
