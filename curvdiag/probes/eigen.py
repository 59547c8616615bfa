"""Extreme eigenvalues of a symmetric operator: ONE Lanczos process and ONE power iteration.

Lanczos (seed 003, DESIGN §3.1). :class:`LanczosProcess` builds an orthonormal Krylov basis
Q_j = [q_1, …, q_j] (rows of shape (j, n)) and the tridiagonal T_j = Q_jᵀ A Q_j (float64,
(j, j)), with full reorthogonalisation against the whole basis after the three-term recurrence:
one pass, and a second when the first removed more than 1/√2 of the vector (DGKS; "twice is
enough"). Without it converged eigenvalues reappear as ghosts. Two consumers read it:

- :func:`lanczos`: the Ritz pairs (θ_i, s_i) of T_j; the residual of the Ritz vector
  y_i = Q_j s_i is r_i = ‖A y_i − θ_i y_i‖ = |β_j s_i[-1]|, and some eigenvalue of A lies within
  r_i of θ_i. When θ_i is separated from the rest of the spectrum by δ_i, the error is second
  order, |θ_i − λ| ≤ r_i²/δ_i (Kato–Temple), and that is what tracks the accuracy asked for:
  the residual alone (the old stop) asks ~twice the products an easy spectrum needs.
  :func:`ritz_error_estimates` takes δ_i from the Ritz values — the distance to the nearest
  other Ritz value θ_j less its residual r_j, trusted only when θ_j is settled (r_j ≤ d/4, or
  ≤ 2d/3 at tol ≤ 1e-4: :data:`SETTLED`) and the gap exceeds r_i — and falls back to r_i
  otherwise. The run stops when every top-k estimate is ≤ tol·|θ_i| on ``stability_window``
  consecutive products (two by default, one for λmax alone at tol ≤ 1e-4: :func:`stop_window`):
  a small Krylov space can look converged on an eigenvalue below a not-yet-seen larger one, and
  the product after that usually moves θ (a Ritz gap that is not the true gap shows up as a
  jump). The estimate is not a bound while the Ritz gap exceeds the true one (up to 1.4× under
  the error measured on analytic spectra). Measured against an oracle (the first product whose
  top Ritz value is within tol of λmax, benchmarks/bench_stop_variants.py): at tol 1e-4, oracle
  + 0–1 products on bn_cnn, tiny_transformer and adam_mlp, + 1 on tanh_early, + 1–2 on the
  crowded tanh_edge and a 1.86M-parameter MLP (the residual rule before: + 3–5). No a posteriori
  test sees an eigenvalue that the Krylov space has not yet separated from θ_1: an unresolved
  pair λ2/λ1 = 0.994 stopped up to 1.6·tol off at tol 1e-3–1e-4 (a few seeds in ten), and a crowded top at tol 1e-2 stopped on a lower member of
  the cluster (tanh_edge 3.3e-2 off), hence no stop looser than :data:`LOOSEST_STOP`; the residual
  still bounds the distance to *some* eigenvalue. The top Ritz value never exceeds λmax and
  rises towards it, so the answer is the largest *algebraic* eigenvalue, whatever the sign of
  the others. The basis is kept in a memory budget: past it the run restarts thick
  (:meth:`LanczosProcess.thick_restart`).
- stochastic Lanczos quadrature (:mod:`curvdiag.probes.spectral_density`): the eigenvalues of
  T_m are Gauss nodes, the squared first entries of its eigenvectors the weights.

Power iteration (:func:`power_iteration`), with deflation and a shift, for parity with PyHessian
and for cheap warm-started estimates (the training throttle's floor). It converges to the
eigenvalue of largest *magnitude*; when that is negative (|λmin| > λmax) the run is repeated on
A − μI with μ the negative eigenvalue found, whose dominant eigenvalue is λmax − μ. The stop is
the Rayleigh residual ‖Ax − θx‖ ≤ tol·|θ|, which bounds the error, unlike PyHessian's relative
change of θ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import torch

from curvdiag.curvature.linear_operator import (PARTIAL_SUM_ENTRIES, Shifted, as_operator, inner, norm,
                                                product_error, random_vector)
from curvdiag.curvature.operator import default_memory


# The loosest error estimate a stop accepts, whatever ``tol`` asks: at tol 1e-2 Lanczos stopped on
# a lower member of the crowded top of tanh_edge.pt (3.3e-2 off after 5–13 products, oracle 8–13;
# benchmarks/lanczos_stop_results.md), and the monitor's warm starts on a second eigenvalue (up to
# 12% low at 3 of 540 measurements with a 2-product window). A small Krylov space can hold a
# converged Ritz pair below a top eigenvalue it has not yet separated; asking the estimate to reach
# 1e-3 grows the space until it usually has: tanh_edge then stops within 2.9e-4.
LOOSEST_STOP = 1e-3

# The Krylov basis's memory before a thick restart, at most (and at most a quarter of what the
# device has available): 2 GiB hold 4 vectors of GPT-2 small (124M float32 entries), with which
# thick restarts reach its λmax to 7e-6 in 34 products (benchmarks/README.md, bench_large.py).
BASIS_BUDGET = 2 << 30

# When the Kato–Temple estimate trusts the gap to the nearest other Ritz value θ_j: once θ_j is
# settled to r_j ≤ SETTLED·d. A looser test stops earlier but, at tol 1e-3, stops on the unresolved
# pair λ2/λ1 = 0.994 of the analytic spectra up to 4.8·tol off (1/4: 1.6·tol). At tol ≤ 1e-4 the
# estimate must fall so low that a pair is resolved first: there SETTLED_TIGHT = 2/3 gave the same
# worst errors on every spectrum and checkpoint of benchmarks/bench_stop_variants.py and cut the
# products past the oracle from +2..+10 to +2..+3 on the 1.86M-parameter MLP (crowded analytic top:
# +7..+27 → +7..+16; tanh_edge and the small checkpoints unchanged).
SETTLED = 0.25
SETTLED_TIGHT = 2 / 3
TIGHT_STOP = 1e-4

# How many consecutive products must meet tol (``stability_window`` None). Two guard against a small
# Krylov space that looks converged on a lower eigenvalue, which only a loose estimate lets through:
# one product at tol 1e-3 stopped tanh_edge 33·tol off. For the top eigenvalue alone at tol ≤ 1e-4
# the estimate (with the SETTLED_TIGHT gate) is already so small that one product is enough:
# replayed on every spectrum and checkpoint of benchmarks/bench_stop_variants.py it stopped within
# 0.46·tol at 1e-4 and 0.64·tol at 1e-5 (the unresolved 0.994 pair: 1.13·tol, two products 1.09·tol),
# one product earlier, which puts every checkpoint within oracle + 2 at tol 1e-4 (tanh_edge +2..+4 →
# +1..+2, the 1.86M MLP +2..+3 → +1..+2). Near the product's rounding the Ritz values jitter by about
# tol and one product is not enough (bn_cnn in float32 at 1e-6: 1.12·tol, two products 0.73·tol):
# one product only while tol ≥ ONE_PRODUCT_EPS × the product's relative error: the dtype's machine
# epsilon (float32: 7.6e-6), or a finite-difference product's own error when that is larger.
ONE_PRODUCT_EPS = 64


def stop_window(stop_tol: float, top_k: int, dtype: torch.dtype, product_error: float = 0.0) -> int:
    """Consecutive products on which the estimates must meet ``stop_tol`` (see :data:`ONE_PRODUCT_EPS`);
    ``product_error``: a product's relative error beyond rounding (finite differences)."""
    noise = max(torch.finfo(dtype).eps, product_error)
    tight = ONE_PRODUCT_EPS * noise <= stop_tol <= TIGHT_STOP
    return 1 if top_k == 1 and tight else 2

# The projections Q w sum in float64 per PARTIAL_SUM_ENTRIES columns, as inner() does: one float32
# matrix-vector product over 5M entries is off by ~3e-5·‖q‖‖w‖ on this CPU (the error of one long
# accumulation), enough to leave the basis 1e-4 from orthonormal and Lanczos' λmax 1.5e-4 low at 5M
# entries with an error estimate of 6e-9; per chunk of 65,536 entries, the error is ~4e-8.
_CHUNK = PARTIAL_SUM_ENTRIES


def _coefficients(basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Q w, shape (j,), for a basis Q of shape (j, n), summed chunk by chunk (:data:`_CHUNK`)."""
    n = w.shape[0]
    if n <= _CHUNK:
        return basis @ w
    total = torch.zeros(basis.shape[0], dtype=torch.float64, device=w.device)
    for start in range(0, n, _CHUNK):
        total += (basis[:, start:start + _CHUNK] @ w[start:start + _CHUNK]).double()
    return total.to(w.dtype)


class LanczosProcess:
    """The Lanczos recurrence on ``op`` from a unit start vector ``q`` (shape (n,)), with room for
    ``capacity`` basis vectors.

    :meth:`step` makes one product A q_j, orthogonalises it against the basis and returns
    β_j = ‖w‖; :meth:`advance` then takes q_{j+1} = w / β_j. ``tridiagonal()`` is the projected
    matrix Q_jᵀ A Q_j: tridiagonal until :meth:`thick_restart`, which keeps k Ritz pairs and makes
    it an arrowhead (diag(θ_1 … θ_k) coupled to the next vector).
    """

    def __init__(self, op: Any, q: torch.Tensor, capacity: int):
        self.op = op
        self.basis = torch.empty((capacity, op.size), device=op.device, dtype=op.dtype)
        self.projected = np.zeros((capacity, capacity), dtype=np.float64)  # Q_jᵀ A Q_j in its top-left j×j
        self.size = 0
        self.products = 0
        self._q = q
        self._w: Optional[torch.Tensor] = None
        self.beta = 0.0

    def step(self) -> float:
        """One product; appends α_j = q_jᵀ A q_j and returns β_j (the new residual's norm)."""
        j = self.size
        q = self._q
        self.basis[j] = q
        w = self.op.matvec(q)
        self.products += 1
        alpha = inner(w, q)
        # The recurrence first (w − α q_j − Σ_i T_ji q_i over the known couplings: β_{j−1} q_{j−1}, or
        # after a thick restart the kept Ritz vectors), then one projection against the whole basis,
        # and a second only when it removed more than 1/√2 of w's length (Daniel–Gragg–Kaufman–
        # Stewart: then w was nearly in the basis and one pass may not suffice). One new vector (the
        # operator's product is left as it is), then in place: every pass over n entries counts at
        # 10M parameters and up.
        w = torch.add(w, q, alpha=-alpha)
        coupled = np.flatnonzero(self.projected[j, :j])
        if coupled.size == 1:
            w.add_(self.basis[int(coupled[0])], alpha=-float(self.projected[j, coupled[0]]))
        elif coupled.size > 1:
            weights = torch.from_numpy(self.projected[j, :j].copy()).to(device=w.device, dtype=w.dtype)
            w.addmv_(self.basis[:j].T, weights, alpha=-1.0)
        active = self.basis[: j + 1]
        length = norm(w)
        for _ in range(2):
            w.addmv_(active.T, _coefficients(active, w), alpha=-1.0)
            before, length = length, norm(w)
            if length > before / math.sqrt(2.0):
                break
        self.size += 1
        self.projected[j, j] = alpha
        self._w, self.beta = w, length
        if not (math.isfinite(alpha) and math.isfinite(self.beta)):
            raise ValueError(f"the operator returned a non-finite product at Lanczos step {self.size}")
        return self.beta

    def advance(self) -> None:
        """q_{j+1} = w / β_j (call only when β_j > 0 and there is room)."""
        j = self.size
        self.projected[j, j - 1] = self.projected[j - 1, j] = self.beta
        self._q = self._w.div_(self.beta)

    def thick_restart(self, coefficients: np.ndarray, values: np.ndarray) -> None:
        """Keep k Ritz pairs and go on from the residual (Wu & Simon's thick restart).

        ``coefficients`` (j, k) are eigenvectors s_i of the projected matrix T_j (j = ``size``),
        ``values`` (k,) their Ritz values θ_i. From A Q_j = Q_j T_j + β_j q_{j+1} e_jᵀ, the Ritz
        vectors Y = Q_j S satisfy A Y = Y diag(θ) + q_{j+1} bᵀ with b_i = β_j s_i[j]: the basis becomes
        [Y, q_{j+1}] and the projected matrix the arrowhead [[diag(θ), b], [bᵀ, ·]], so the Krylov
        information along the kept pairs survives (an explicit restart from one vector loses it:
        111 products instead of 46 for the 1M MLP with 4 basis vectors, benchmarks/large_results.json).
        Y is written over the first k rows chunk by chunk: no second basis in memory."""
        k = int(values.shape[0])
        j = self.size
        if not 0 < k < j or self.beta <= 0.0:
            raise ValueError(f"a thick restart keeps 1 to {j - 1} of {j} Ritz pairs and needs β > 0")
        mix = torch.from_numpy(np.ascontiguousarray(coefficients.T)).to(device=self.basis.device, dtype=self.basis.dtype)
        for start in range(0, self.basis.shape[1], _CHUNK):
            columns = slice(start, start + _CHUNK)
            self.basis[:k, columns] = mix @ self.basis[:j, columns]
        couplings = self.beta * np.asarray(coefficients[-1, :], dtype=np.float64)
        self.projected[:] = 0.0
        self.projected[np.arange(k), np.arange(k)] = values
        self.projected[k, :k] = self.projected[:k, k] = couplings
        self.size = k
        self._q = self._w.div_(self.beta)

    def tridiagonal(self) -> torch.Tensor:
        """T_j = Q_jᵀ A Q_j, float64 of shape (j, j): α on the diagonal, β_1 … β_{j−1} beside it
        (an arrowhead block after a thick restart)."""
        return torch.from_numpy(self.tridiagonal_array())

    def tridiagonal_array(self) -> np.ndarray:
        """T_j as a NumPy float64 array (j, j). The Ritz problem is a few dozen entries: NumPy's
        eigh on it takes ~10 µs where each torch call costs about as much again in dispatch."""
        return self.projected[: self.size, : self.size].copy()

    def ritz_vectors(self, coefficients: Any) -> torch.Tensor:
        """Q_jᵀ S for coefficient columns S of shape (j, k) (a tensor or NumPy array): returns (k, n)."""
        coefficients = torch.as_tensor(np.ascontiguousarray(coefficients) if isinstance(coefficients, np.ndarray) else coefficients)
        # (k, j) @ (j, n): the transposed product (n, j) @ (j, k) took 0.66 ms for n = 26k, j = 8 on one
        # CPU thread, this one 0.03 ms.
        return coefficients.to(device=self.op.device, dtype=self.op.dtype).T @ self.basis[: self.size]


def ritz_error_estimates(ritz: Any, residuals: Any, k: int, settled: float = SETTLED) -> np.ndarray:
    """Error estimates of the top-k Ritz values (float64, shape (k,), largest Ritz value first).

    ``ritz`` (m,) ascending and ``residuals`` (m,) are the Ritz values of T_j and their residual
    norms r_i (tensors or arrays). For θ_i with nearest other Ritz value θ_j at distance d, the gap
    to the rest of the spectrum is estimated as δ = d − r_j; when θ_j is settled (r_j ≤
    ``settled``·d) and δ > r_i the estimate is the Kato–Temple bound r_i²/δ, else the residual r_i
    itself (a rigorous bound on the distance from θ_i to *some* eigenvalue).
    """
    ritz = np.asarray(ritz, dtype=np.float64)
    residuals = np.asarray(residuals, dtype=np.float64)
    m = ritz.size
    out = np.empty(k, dtype=np.float64)
    for slot, i in enumerate(range(m - 1, m - 1 - k, -1)):
        r = float(residuals[i])
        if m < 2:
            out[slot] = r
            continue
        distance = np.abs(ritz - ritz[i])
        distance[i] = np.inf
        j = int(distance.argmin())
        d, rj = float(distance[j]), float(residuals[j])
        gap = d - rj
        out[slot] = r * r / gap if rj <= settled * d and gap > r else r
    return out


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
    error_estimates: List[float] = field(default_factory=list)  # of the top-k (ritz_error_estimates)


def lanczos(
    operator: Any,
    *,
    top_k: int = 1,
    tol: float = 1e-4,
    max_matvecs: int = 300,
    min_iterations: int = 3,
    stability_window: Optional[int] = None,
    seed: int = 0,
    start: Optional[torch.Tensor] = None,
    basis_budget_bytes: Optional[int] = None,
    want_vectors: Union[bool, int] = False,
) -> LanczosResult:
    """Top-k algebraic eigenvalues (and the smallest Ritz value) of a symmetric operator.

    Args:
        operator: a linear operator (``curvdiag.curvature.linear_operator``) or a dense symmetric tensor.
        top_k: how many of the largest eigenvalues to converge.
        tol: relative accuracy of each top-k eigenvalue, |θ_i − λ_i| ≤ tol·|θ_i|, as estimated by
            :func:`ritz_error_estimates`; a looser tol than :data:`LOOSEST_STOP` stops at that.
        max_matvecs: budget of operator products.
        min_iterations: products made before any stop (a floor; the estimate decides).
        stability_window: consecutive products on which every estimate must meet ``tol``; None: one
            for the top eigenvalue alone at 64·eps ≤ tol ≤ 1e-4, else two (:func:`stop_window`).
        seed: seed of the random start vector (ignored when ``start`` is given).
        basis_budget_bytes: memory for the Krylov basis before a thick restart; default
            :data:`BASIS_BUDGET` or a quarter of the memory available on the operator's device,
            whichever is less (:func:`~curvdiag.curvature.operator.default_memory`, read at the call).
        want_vectors: return the top-k Ritz vectors (True), or the top m (an int m ≥ 1; fewer when
            the basis is smaller), e.g. to warm-start a later run from several of them.
    """
    op = as_operator(operator)
    n = op.size
    q = start.to(device=op.device, dtype=op.dtype).clone() if start is not None else random_vector(n, seed, op.device, op.dtype)
    bytes_per_vector = n * torch.finfo(op.dtype).bits // 8
    if basis_budget_bytes is None:
        basis_budget_bytes = min(BASIS_BUDGET, default_memory(torch.device(op.device)))
    capacity = max(top_k + 2, min(n, max_matvecs + 1, basis_budget_bytes // max(bytes_per_vector, 1)))
    process = LanczosProcess(op, q / norm(q), capacity)
    stop_tol = min(tol, LOOSEST_STOP)
    window = stop_window(stop_tol, top_k, op.dtype, product_error(op)) if stability_window is None else stability_window
    history: List[float] = []
    matvecs = restarts = met = 0
    converged = False
    while True:
        beta = process.step()
        matvecs += 1
        ritz, vectors_small = np.linalg.eigh(process.tridiagonal_array())  # ascending
        residuals = np.abs(beta * vectors_small[-1, :])
        history.append(float(ritz[-1]))
        size = process.size
        k = min(top_k, size)
        estimates = ritz_error_estimates(ritz, residuals, k, SETTLED_TIGHT if stop_tol <= TIGHT_STOP else SETTLED)
        top = ritz[::-1][:k]
        met = met + 1 if size >= top_k and bool((estimates <= stop_tol * np.abs(top)).all()) else 0
        invariant = beta <= 1e-10 * max(abs(float(ritz[0])), abs(float(ritz[-1])), 1e-30)
        if (invariant and size >= min(top_k, n)) or (met >= window and matvecs >= min(min_iterations, n)):
            converged = True
            break
        if matvecs >= max_matvecs or size >= n:
            break
        if size == capacity:  # thick restart: keep the top half of the Ritz pairs, go on from the residual
            keep = min(capacity - 2, max(k + 1, capacity // 2))
            process.thick_restart(vectors_small[:, -keep:], ritz[-keep:])
            restarts += 1
            continue
        process.advance()
    size = process.size
    k = min(top_k, size)
    order = list(range(size - 1, size - 1 - k, -1))
    if want_vectors is not True and want_vectors:
        vector_order = list(range(size - 1, size - 1 - min(int(want_vectors), size), -1))
    else:
        vector_order = order
    return LanczosResult(
        eigenvalues=[float(ritz[i]) for i in order],
        residuals=[float(residuals[i]) for i in order],
        eigenvectors=process.ritz_vectors(vectors_small[:, vector_order]) if want_vectors else None,
        lambda_min=float(ritz[0]),
        lambda_min_residual=float(residuals[0]),
        matvecs=matvecs,
        converged=converged,
        restarts=restarts,
        history=history,
        ritz_values=[float(x) for x in ritz[::-1]],
        error_estimates=[float(e) for e in estimates],
    )


def gauss_quadrature(operator: Any, q: torch.Tensor, steps: int) -> Tuple[torch.Tensor, torch.Tensor, int, bool]:
    """m = ``steps`` Lanczos steps from unit q (shape (n,)): the Gauss quadrature of the spectral
    measure μ_q = Σ_i (qᵀu_i)² δ_{λ_i}. Returns (nodes (m',), weights (m',) summing to 1, products,
    broke_down); a breakdown (β ≈ 0) means the Krylov space is invariant: the quadrature is then
    exact and the run stops early (m' < m)."""
    op = as_operator(operator)
    process = LanczosProcess(op, q, steps)
    scale, broke_down = 0.0, False
    for j in range(steps):
        beta = process.step()
        scale = max(scale, abs(float(process.projected[j, j])), beta)
        if j == steps - 1:
            break
        if beta <= 1e-10 * max(scale, 1e-30):
            broke_down = True
            break
        process.advance()
    nodes, vectors = torch.linalg.eigh(process.tridiagonal())
    weights = vectors[0, :].pow(2)
    return nodes, weights / weights.sum(), process.products, broke_down


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
    """Dominant eigenpair of (A − shift·I) (:class:`Shifted`) restricted to the complement of ``found``."""
    op = Shifted(op, shift) if shift else op
    x = start.to(device=op.device, dtype=op.dtype).clone() if start is not None else random_vector(op.size, seed, op.device, op.dtype)
    for f in found:
        x -= inner(f, x) * f
    x /= norm(x)
    theta, residual, used = 0.0, float("inf"), 0
    while used < budget:
        y = op.matvec(x)
        used += 1
        for f in found:
            y -= inner(f, y) * f
        theta = inner(x, y)
        residual = norm(y - theta * x)
        if residual <= tol * abs(theta):
            break
        length = norm(y)
        if length == 0.0:
            break
        x = y / length
    return theta, residual, x, used


def power_iteration(operator: Any, *, top_k: int = 1, tol: float = 1e-4, max_matvecs: int = 1000, seed: int = 0,
                    start: Optional[torch.Tensor] = None, shift_negative: bool = True) -> PowerResult:
    """Top-k algebraic eigenvalues by (shifted, deflated) power iteration.

    ``start`` (shape (n,)) replaces the random start of the first eigenpair (a warm start);
    ``shift_negative=False`` returns the dominant (largest-magnitude) eigenvalue as found, without
    the extra shifted run when it is negative (for a fixed product budget)."""
    op = as_operator(operator)
    used = 0
    theta, residual, x, n = _dominant(op, 0.0, [], tol, max_matvecs, seed, start)
    used += n
    lambda_min, shift = None, 0.0
    if theta < 0 and shift_negative:
        lambda_min, shift = theta, theta
    values, residuals, vectors = [], [], []
    converged = True
    for i in range(top_k):
        if i == 0 and shift == 0.0:
            value, res, vec = theta, residual, x
            converged &= res <= tol * abs(value)
        else:
            budget = max(max_matvecs - used, 1)
            t, res, vec, n = _dominant(op, shift, vectors, tol, budget, seed + i + 1)
            used += n
            if t < 0 and shift == 0.0 and shift_negative:
                # The rest of the spectrum is dominated by a negative eigenvalue: shift by it.
                lambda_min, shift = t, t
                t, res, vec, n = _dominant(op, shift, vectors, tol, max(max_matvecs - used, 1), seed + i + 1)
                used += n
            value = t + shift
            converged &= res <= tol * abs(t)
        values.append(value)
        residuals.append(res)
        vectors.append(vec)
    return PowerResult(values, residuals, torch.stack(vectors), lambda_min, used, bool(converged), shift != 0.0)
