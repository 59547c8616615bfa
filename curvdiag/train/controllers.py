"""Learning-rate controllers as pure state machines (DESIGN §3.8–3.9), plus gradient clipping.

Each controller is an ``init``/``update`` pair over an immutable state (the optax pattern), so
every branch can be tested from a hand-built state. The torch adapter that applies them to an
optimizer is :class:`curvdiag.throttle.ControlledOptimizer`.

Throttle (seed 000): one global factor s_t ∈ (0, 1] multiplies every group's learning rate, so
the update direction is never changed, only its length:

    Ĉ_t = max(C_t, decay·Ĉ_{t−1}, floor),    s_t = min(1, κ·T / (η_t·Ĉ_t))

with C_t the directional curvature of the last step (§3.4, in the optimizer's metric), T the
stability constant of the optimizer family (§3.7), η_t the scheduled learning rate and κ < 1 a
safety factor. The max with the decayed previous value reacts at once to a rise in curvature and
relaxes slowly; ``floor`` is an occasional λmax estimate (C_t only bounds λmax from below for a
PSD Hessian: the last step need not point along the sharpest direction).

Newton-like learning rate (seed 001, after Retsinas et al. 2023): with the lookahead
θ' = θ_t − α_t ω_t on the same batch, c0 = ⟨∇L(θ_t), ω_t⟩, c1 = ⟨∇L(θ'), ω_t⟩,
ΔL = L(θ_t) − L(θ'):

    loss-based (default):   α_{t+1} = α_t (1 + γ α_t c1 / (2ΔL − 2α_t c1 + ε))
    gradient-difference:    α_{t+1} = α_t (1 + γ c1 / (c0 − c1 + ε))

On a quadratic both are α_t(1 + γ(α*/α_t − 1)) with α* the line minimiser along ω_t. Seed 001's
boxed γ-forms carry one extra factor α_t inside the bracket, which makes the update depend on the
units of θ; these are the unit-free forms. Safeguards as in the authors' code: skip when the
denominator is below ε or not finite, multiply α by 0.1 when the lookahead loss went up, clamp
the per-step factor to [0, 1.05] and α to [α_min, α_max].
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

CONTROLLERS = ("none", "throttle", "newton", "clip")


def _check(name: str, value: float, low: float, high: float, closed_low: bool = False) -> None:
    ok = (low <= value if closed_low else low < value) and value <= high and math.isfinite(value)
    if not ok:
        raise ValueError(f"{name}={value!r} must lie in {'[' if closed_low else '('}{low}, {high}]")


class ThrottleState(NamedTuple):
    curvature: float  # Ĉ, the smoothed curvature (0 before any measurement)
    factor: float  # s, the factor applied at the last step
    steps: int


def throttle_init() -> ThrottleState:
    return ThrottleState(curvature=0.0, factor=1.0, steps=0)


def throttle_update(
    state: ThrottleState,
    curvature: Optional[float],
    lr: float,
    constant: float,
    kappa: float = 0.5,
    decay: float = 0.95,
    floor: Optional[float] = None,
) -> ThrottleState:
    """Fold one curvature measurement (None: none this step) into the state; returns the new
    state whose ``factor`` is s_t = min(1, κT/(η Ĉ))."""
    _check("kappa", kappa, 0.0, 1.0)
    _check("decay", decay, 0.0, 1.0, closed_low=True)
    smoothed = decay * state.curvature
    if curvature is not None and math.isfinite(curvature):
        smoothed = max(smoothed, abs(curvature))
    if floor is not None and math.isfinite(floor):
        smoothed = max(smoothed, floor)
    factor = 1.0 if smoothed <= 0.0 or lr <= 0.0 else min(1.0, kappa * constant / (lr * smoothed))
    return ThrottleState(curvature=smoothed, factor=factor, steps=state.steps + 1)


class NewtonState(NamedTuple):
    alpha: float  # the learning rate α_t
    skipped: int  # updates skipped by the safeguards
    backtracked: int  # times α was cut by 10 after the lookahead loss went up


def newton_init(alpha: float) -> NewtonState:
    _check("alpha", alpha, 0.0, math.inf)
    return NewtonState(alpha=float(alpha), skipped=0, backtracked=0)


def newton_update(
    state: NewtonState,
    loss: float,
    lookahead_loss: float,
    c0: float,
    c1: float,
    gamma: float = 1e-3,
    eps: float = 1e-9,
    alpha_min: float = 1e-8,
    alpha_max: float = 10.0,
    form: str = "loss",
    max_growth: float = 1.05,
) -> NewtonState:
    """One α iteration from the lookahead at θ' = θ − α ω (same batch)."""
    alpha = state.alpha
    if not (math.isfinite(lookahead_loss) and math.isfinite(loss)) or lookahead_loss > loss:
        new = min(max(alpha * 0.1, alpha_min), alpha_max)
        return NewtonState(new, state.skipped, state.backtracked + 1)
    if form == "loss":
        numerator, curvature_term = alpha * c1, 2.0 * (loss - lookahead_loss) - 2.0 * alpha * c1
    elif form == "gradient":
        numerator, curvature_term = c1, c0 - c1
    else:
        raise ValueError(f"form must be 'loss' or 'gradient', got {form!r}")
    if not math.isfinite(curvature_term) or abs(curvature_term) <= eps or not math.isfinite(numerator):
        return NewtonState(alpha, state.skipped + 1, state.backtracked)
    factor = min(max(1.0 + gamma * numerator / (curvature_term + eps), 0.0), max_growth)
    new = min(max(alpha * factor, alpha_min), alpha_max)
    return NewtonState(new, state.skipped, state.backtracked)
