"""Gradient glass: the locally averaged Hessian diagonal h, the glass density ρ and the power-law
exponent p, from ordinary gradients at randomly perturbed parameters (seed 004, eqs. 1–2 and
17–21, Algorithm 2; DESIGN §3.5–3.6). First-order only: no double backward, so these work on
models whose kernels have no second derivative.

With δ Rademacher (±1 entries) and a length scale λ, g± = g(θ ± λδ), g0 = g(θ):
- h ≈ E[δ ⊙ (g+ − g−)/(2λ)]: the Hessian diagonal averaged over a λ-neighbourhood (eq. 20;
  Theorem 3: δ itself is the optimal kernel). Also h_abs = E|g+ − g−|/(2λ) (Algorithm 2).
- γ = (g+ + g−)/2 − g0, the even part of the gradient change: exactly 0 for a quadratic.
  Gradient discontinuities (ReLU kinks) make gradient variations grow linearly with distance
  (Theorem 1), and ρ = c·E[γ²]/λ estimates the glass density. Seed 004's eq. (21) lost its
  constant in extraction; we use c = 2 as the Alice authors' public code does (ρ = 2γ²/λ).
- v(λ) = E[(g(θ + λδ) − g0)²] elementwise (both signs of δ are used: ±δ have the same law),
  and for a group of parameters P, p(P) = log₂ Σ_P v(2λ) − log₂ Σ_P v(λ). A smooth,
  Hessian-dominated group gives p = 2 (g − g0 = λHδ + O(λ²)); glass pulls p below 2 (eq. 2).
  The same δ serve λ and 2λ (common random numbers: independent δ leave p noisy).

λ is an absolute length in parameter space (default 1e-3): each entry moves by exactly ±λ.
Per layer, each value is the mean over the layer's entries; standard errors are over the
samples (for p, a jackknife over samples).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from curvdiag.curvature.linear_operator import random_vector
from curvdiag.probes.sample_mean import mean_and_stderr
from curvdiag.results.probe_results import GlassLayer, PowerLawLayer  # the report's per-layer records

GLASS_CONSTANT = 2.0  # c in ρ = c·E[γ²]/λ (see the module docstring)


@dataclass
class GlassResult:
    lam: float
    samples: int
    rho: float
    h: float
    layers: List[GlassLayer]
    gradients: int
    seconds: float
    h_diagonal: torch.Tensor = field(repr=False)  # flat (n,) estimate of the local diagonal
    rho_diagonal: torch.Tensor = field(repr=False)
    rho_stderr: float = float("inf")  # of ρ, over the samples


@dataclass
class PowerLawResult:
    lam: float
    samples: int
    p: float
    p_stderr: Optional[float]
    layers: List[PowerLawLayer]


def _exponent(v2: torch.Tensor, v1: torch.Tensor) -> float:
    a, b = float(v2), float(v1)
    if a <= 0.0 or b <= 0.0:
        return float("nan")  # a layer whose gradient does not move at all
    return math.log2(a) - math.log2(b)


def _jackknife(v2: torch.Tensor, v1: torch.Tensor) -> List[Optional[float]]:
    """Jackknife standard error of p per column from per-sample sums v2, v1 of shape (k, groups)."""
    k = v2.shape[0]
    if k < 2:
        return [None] * v2.shape[1]
    total2, total1 = v2.sum(0), v1.sum(0)
    estimates = torch.log2((total2 - v2).clamp_min(1e-300)) - torch.log2((total1 - v1).clamp_min(1e-300))
    spread = ((estimates - estimates.mean(0)) ** 2).sum(0) * (k - 1) / k
    return [float(x) for x in spread.sqrt()]


def glass_probe(op: Any, lam: float = 1e-3, samples: int = 10, seed: int = 0, power_law: bool = True,
                target_rel_stderr: Optional[float] = None, min_samples: int = 3,
                exhausted: Optional[Any] = None) -> tuple:
    """Run the glass (and optionally the power-law) estimates on a CurvatureOperator.

    Costs 2 gradients per sample for the glass, 2 more for p at 2λ. ``samples`` perturbations, or
    fewer with ``target_rel_stderr``: stop once the s.e. of ρ (over samples) is at most that
    fraction of |ρ| (after ``min_samples``), or when ``exhausted()`` (after two samples). Returns
    ``(GlassResult, PowerLawResult | None)``.
    """
    if not lam > 0:
        raise ValueError(f"lambda must be positive, got {lam}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    started = time.perf_counter()
    theta = op.parameters_vector()
    g0 = op.gradient().double()
    slices = op.layer_slices()
    groups = len(slices)
    h_layers = torch.zeros(samples, groups, dtype=torch.float64)
    rho_layers = torch.zeros_like(h_layers)
    h_abs_layers = torch.zeros_like(h_layers)
    v1 = torch.zeros(samples, groups + 1, dtype=torch.float64)  # last column: all parameters
    v2 = torch.zeros_like(v1)
    rho_overall: List[float] = []  # per sample: ρ averaged over all parameters
    h_sum = torch.zeros_like(g0)
    rho_sum = torch.zeros_like(g0)
    gradients = 0

    def at(offset: torch.Tensor) -> torch.Tensor:
        nonlocal gradients
        gradients += 1
        return op.gradient_at(theta + offset.to(theta.dtype))[1].double()

    for k in range(samples):
        delta = random_vector(op.num_params, seed * 1_000_003 + k, op.device, torch.float64, kind="rademacher")
        plus, minus = at(lam * delta), at(-lam * delta)
        h = delta * (plus - minus) / (2 * lam)
        h_abs = (plus - minus).abs() / (2 * lam)
        gamma = (plus + minus) / 2 - g0
        rho = GLASS_CONSTANT * gamma.pow(2) / lam
        h_sum += h
        rho_sum += rho
        variation1 = ((plus - g0).pow(2) + (minus - g0).pow(2)) / 2
        if power_law:
            plus2, minus2 = at(2 * lam * delta), at(-2 * lam * delta)
            variation2 = ((plus2 - g0).pow(2) + (minus2 - g0).pow(2)) / 2
        for j, (_, a, b) in enumerate(slices):
            h_layers[k, j] = h[a:b].mean()
            rho_layers[k, j] = rho[a:b].mean()
            h_abs_layers[k, j] = h_abs[a:b].mean()
            v1[k, j] = variation1[a:b].sum()
            if power_law:
                v2[k, j] = variation2[a:b].sum()
        v1[k, groups] = variation1.sum()
        if power_law:
            v2[k, groups] = variation2.sum()
        rho_overall.append(float(rho.mean()))
        taken = k + 1
        if taken >= 2 and exhausted is not None and exhausted():
            break
        if target_rel_stderr is not None and taken >= min_samples:
            mean, se = mean_and_stderr(rho_overall)
            if se <= target_rel_stderr * abs(mean):
                break
    samples = len(rho_overall)
    h_layers, rho_layers, h_abs_layers = h_layers[:samples], rho_layers[:samples], h_abs_layers[:samples]
    v1, v2 = v1[:samples], v2[:samples]
    h_mean, h_se = mean_and_stderr(h_layers)
    rho_mean, rho_se = mean_and_stderr(rho_layers)
    h_abs_mean = h_abs_layers.mean(0)
    layers = [GlassLayer(name, float(rho_mean[j]), float(rho_se[j]), float(h_mean[j]), float(h_se[j]),
                         float(h_abs_mean[j])) for j, (name, _, _) in enumerate(slices)]
    h_diag, rho_diag = h_sum / samples, rho_sum / samples
    glass = GlassResult(lam, samples, float(rho_diag.mean()), float(h_diag.mean()), layers, gradients,
                        time.perf_counter() - started, h_diag.to(op.dtype), rho_diag.to(op.dtype),
                        rho_stderr=mean_and_stderr(rho_overall)[1])
    if not power_law:
        return glass, None
    totals2, totals1 = v2.sum(0), v1.sum(0)
    errors = _jackknife(v2, v1)
    power = PowerLawResult(
        lam, samples, _exponent(totals2[groups], totals1[groups]), errors[groups],
        [PowerLawLayer(name, _exponent(totals2[j], totals1[j]), errors[j]) for j, (name, _, _) in enumerate(slices)],
    )
    glass.seconds = time.perf_counter() - started
    return glass, power
