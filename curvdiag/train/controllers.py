"""Learning-rate controllers as pure state machines (DESIGN §3.8–3.9), gradient clipping among them.

Every controller has one shape, the optax pattern: a builder takes its hyperparameters, checks
them (a bad value raises :class:`~curvdiag.errors.BadArgument` naming it) and returns a
:class:`Controller` of two pure functions over an immutable NamedTuple state::

    controller = throttle(constant=2.0, momentum=0.9)
    state = controller.init(lr)                        # lr: the optimizer's learning rate
    state = controller.update(state, Observation(...))  # before each step
    state.factor                                       # multiplies every group's lr for this step

so every branch can be tested from a hand-built state. A state may also carry ``gradient_scale``
(clip: the gradient is multiplied by it before the step). ``observes`` names what the torch
adapter (:class:`curvdiag.train.adapters.ControlledOptimizer`) must measure for it. A new
controller is a builder returning its (init, update) pair plus one line in :data:`CONTROLLERS`.

Throttle (seed 000): one global factor s_t ∈ (0, 1] multiplies every group's learning rate, so
the update direction is never changed, only its length:

    Ĉ_t = max(min(C_{t−1}, cap·floor), decay·Ĉ_{t−1}, floor_t),    s_t = min(1, κ·T / (η_t·Ĉ_t))

with C_{t−1} the directional curvature of the last step (§3.4, in the optimizer's metric), T the
stability constant of the optimizer family (§3.7), η_t the scheduled learning rate and κ ≤ 1 the
fraction of the edge, by default κ = √(1 − β) for the optimizer's momentum β
(:func:`curvdiag.stability.throttle_kappa`: 1 for GD, the edge itself, 0.32 at β = 0.9). The
max with the decayed previous value reacts at once to a rise in curvature and relaxes slowly
(decay 0.95. Under full-batch GD, bench_peers' GD case, runs above 1.5× the tuned loss: 0.97 put
9 of 10 from initialisation there; over seeds 0–19, 0.9 and 0.85 took initialisation from 6 of 20
to 5 of 20 but the checkpoint start, under the catapult ramp, from 0 of 20 to 18–19 of 20, 5–8 of
them diverged);
``floor`` is an occasional λmax estimate (C_t only bounds λmax from below for a PSD Hessian: the
last step need not point along the sharpest direction), which enters Ĉ on the step it is measured
(floor_t; no floor on the other steps) and, where C_t may carry noise, caps C_t at twice the latest
one (:data:`NOISE_CAP`: above it, C_t is batch noise; `curvdiag train` takes the batch noise out of
C_t and counts it whole on the steps whose observation is ``noise_free``: a noise sample taken, no
dropout drawn). With ``engage="edge"`` (`curvdiag train`'s default, :data:`ENGAGE_MODES`) s_t = 1 until
the first step with η_t·max(Ĉ_t, floor) > T, where the optimizer's own rate reaches the edge, and
the rule above from then on: a run that is stable at its own rate is left as it is.

Newton-like learning rate (seed 001, after Retsinas et al. 2023): with the lookahead
θ' = θ_t − α_t ω_t on the same batch, c0 = ⟨∇L(θ_t), ω_t⟩, c1 = ⟨∇L(θ'), ω_t⟩,
ΔL = L(θ_t) − L(θ'):

    loss-based (default):   α_{t+1} = α_t (1 + γ α_t c1 / (2ΔL − 2α_t c1 + ε))
    gradient-difference:    α_{t+1} = α_t (1 + γ c1 / (c0 − c1 + ε))

On a quadratic both are α_t(1 + γ(α*/α_t − 1)) with α* the line minimiser along ω_t. Seed 001's
boxed γ-forms carry one extra factor α_t inside the bracket, which makes the update depend on the
units of θ; these are the unit-free forms. Safeguards as in the authors' code: skip when the
denominator is below ε or not finite, multiply α by 0.1 when the lookahead loss went up, clamp
the per-step factor to [0, 1.05] and α to [α_min, α_max]. The adapter folds a step's lookahead in
as soon as it is measured (so α_{t+1} is known after step t); an update without one only puts
``factor`` = α/η in terms of the learning rate now scheduled.

Clip: gradient-norm clipping, g ← g·min(1, c/(‖g‖ + 10⁻⁶)) (``torch.nn.utils.clip_grad_norm_``'s
rule), the baseline practitioners use; the learning rate is left alone.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, FrozenSet, NamedTuple, Optional, Tuple

from curvdiag.errors import BadArgument
from curvdiag.stability import throttle_kappa


class Lookahead(NamedTuple):
    """A step's lookahead on its own batch: L(θ), L(θ') and the gradients' projections on ω."""

    loss: float  # L(θ_t)
    lookahead_loss: float  # L(θ'), θ' = θ_t − α_t ω_t
    c0: float  # ⟨∇L(θ_t), ω_t⟩
    c1: float  # ⟨∇L(θ'), ω_t⟩


class Observation(NamedTuple):
    """What a controller sees, numbers only, measured by the adapter: before each step ``lr``,
    ``grad_norm``, ``curvature`` and ``floor``; right after a step, that step's ``lookahead``."""

    lr: float  # η_t, the scheduled learning rate (the largest group's)
    grad_norm: Optional[float] = None  # ‖∇L_t(θ_t)‖ of this step's batch
    curvature: Optional[float] = None  # the last directional curvature C in the optimizer's metric
    floor: Optional[float] = None  # a λmax estimate for the throttle (the latest one)
    lookahead: Optional[Lookahead] = None  # the step's lookahead, once measured
    noise_free: bool = False  # the curvature carries no unmeasured noise: the throttle counts it whole


class Controller(NamedTuple):
    """A pure controller: ``init(lr) -> state``, ``update(state, observation) -> state``."""

    init: Callable[[float], Any]
    update: Callable[[Any, Observation], Any]
    observes: FrozenSet[str] = frozenset()  # of "grad_norm", "curvature", "floor", "lookahead"


def _check_range(argument: str, value: float, low: float, high: float, closed_low: bool = False) -> None:
    ok = (low <= value if closed_low else low < value) and value <= high and math.isfinite(value)
    if not ok:
        raise BadArgument(argument, value, f"must lie in {'[' if closed_low else '('}{low}, {high}]")


# ---------------------------------------------------------------------------- none
class ConstantRateState(NamedTuple):
    factor: float = 1.0


def constant_rate() -> Controller:
    """No control: every step at the optimizer's (scheduled) learning rate."""
    return Controller(init=lambda lr: ConstantRateState(), update=lambda state, observation: state)


# ---------------------------------------------------------------------------- clip
class ClipState(NamedTuple):
    factor: float  # always 1.0: clipping leaves the learning rate alone
    gradient_scale: float  # min(1, c/(‖g‖ + 1e-6)) for this step
    clipped: int  # steps whose gradient was shortened


def clip(max_norm: float = 1.0) -> Controller:
    """Gradient-norm clipping at ``max_norm``."""
    _check_range("max_norm", max_norm, 0.0, math.inf)

    def update(state: ClipState, observation: Observation) -> ClipState:
        # min(coefficient, 1.0), coefficient first: a NaN norm gives NaN, as clip_grad_norm_ does.
        scale = min(max_norm / (observation.grad_norm + 1e-6), 1.0)
        return ClipState(1.0, scale, state.clipped + int(scale < 1.0))

    return Controller(init=lambda lr: ClipState(1.0, 1.0, 0), update=update, observes=frozenset({"grad_norm"}))


# ---------------------------------------------------------------------------- throttle
# C_t from consecutive mini-batches is ‖ΔG‖/‖Δθ‖ with ΔG = HΔθ + (ξ_{t+1} − ξ_t): the batch noise ξ does
# not shrink with the step, so late in training, or from a trained checkpoint, C_t grows without bound
# and the factor collapses (to 0.01–0.02 on the momentum and schedule cases from a checkpoint). A
# directional curvature cannot exceed the spectral radius, which the floor (a 2-product power
# estimate, from below) approximates: C_t counts up to NOISE_CAP floors. Measured
# (benchmarks/peers_results.md): cap 2 kept every from-initialisation case within 1.5× of the tuned
# loss and halved the from-checkpoint losses of momentum and the schedule; 1.5 lost momentum (2.0×).
# The Trainer takes the noise out of C_t instead (train/loop.py _BatchNoise) and, on the steps where it
# has (a sample taken, no dropout drawn), marks C_t noise_free, counted whole: there the cap bound only
# where the 2-product floor had missed a rise in λmax, and then it hid it
# (bench_peers' transformer from initialisation, seed 9: after a loss spike the floor read 35, C_t read
# 308 and 568 but counted 70, the factor kept climbing and the run blew up to 8,473× the tuned loss;
# without the cap 0.95×). 10 seeds of every bench_peers case from both starts, cap 2 → none (with
# adapters.NOISE_KEEPS 1/2 → 1/4): the MLP cases 2 → 3 of 80 above 1.5 (the one more is full-batch GD
# from initialisation, 1.60 against 1.27, where the runs are chaotic: 5 seeds moved each way); the
# transformer 2 of 20 → 0 of 20, worst 8,473 → 0.95 (from the checkpoint 1.08 → 0.76). Where the noise
# is not measured the cap stays: it is what bounds the loop in which unmeasured noise, which does not
# shrink with the step, lowers the factor, shortens the step and so raises C_t (a recipe that refills
# one batch tensor in place, unseen as another batch: without the cap the factor fell to 0; dropout,
# whose masks the sample does not draw: the factor down to 0.30 where the cap held 0.91).
NOISE_CAP = 2.0


# A run restarted from trained weights at a higher rate: the sharpness there is the one the old rate
# left, and the best fixed rate's first steps cross the edge and flatten it (a catapult), which a
# throttle held at or below the edge cannot: under full-batch GD it then only creeps down the
# sharpness at the edge (diverge_gd from its checkpoint: λmax 2.24 → 0.52 and the rate 0.9 → 3.8 over
# 300 steps, where the tuned fixed rates 3–5 start at η·λmax/T = 3.4–5.6 and train at 3–5 from the
# first steps). So the fraction starts at CATAPULT_START·κ and falls to κ over the first
# CATAPULT_STEPS updates. Measured on bench_peers' checkpoint starts (bench_throttle_seeds.py, 10 seeds,
# final loss ÷ the tuned fixed lr, median / worst): GD 1.63 / 2.22 with the ramp from 1 → 0.95 / 1.19
# from 3κ (2: 1.28 worst of 3 seeds; 4: 1.01); momentum 1.96 / 9.7 → 1.11 / 3.97, Adam 0.52 / 1.31 →
# 0.30 / 1.66, schedule 0.63 / 0.88 → 0.59 / 0.97 (for β = 0.9 the start 3κ = 0.95 is the former
# 1.0, so those moves are the runs' chaos, not the rule). The same start for every optimizer instead
# (2 or 3, i.e. 6–9κ at β = 0.9) took momentum to 9–212× and Adam to 61–279×. Over 25 steps instead
# of 50 GD's median was 1.22, momentum's 1.65; over 100 steps 3 of 10 GD runs diverged (none in 160
# runs at 50 steps, every lr of the grids included). From initialisation, where the sharpness is still
# rising, any ramp was harmful (GD, 3κ: one seed of 10 at 289×; momentum / Adam / schedule from 1:
# 7.8 / 15.8 / 1.89), so `curvdiag train` uses it only with --checkpoint.
CATAPULT_START = 3.0
CATAPULT_STEPS = 50


# When the throttle takes over (``engage``): "edge", the first step on which the optimizer's own rate
# reaches the edge, η_t·max(Ĉ_t, floor) > T, then for the rest of the run; "always", from the first
# step (a stable run's rate is held to κ of the edge too). With momentum or Adam κ is well below 1, so
# "always" slows runs that train well at their own rate (benchmarks/bench_user_models.py): a user's
# ResNet (BatchNorm, SGD momentum 0.9 at lr 0.1, its λmax floors up to 0.87·T/η) ended at 14× the
# untouched run's loss (its own chaos, lr × 1.001: 2.0×), a user's cross-entropy MLP at lrs 0.25 /
# 0.5 / 1 (η·λmax/T up to 0.53) 1.04 / 1.43 / 1.77×, the transformer at lr 0.002 1.17× (geometric
# mean of seeds 0–4); with "edge" all of them 1.00 but the transformer, 1.05. A run that starts above
# the edge (every failing-lr case of bench_peers) is engaged within its first steps, so those runs are
# unchanged but the schedule case's, whose warm-up reaches the edge a few steps in and whose runs moved
# within their chaos (seeds 0–19, both starts: MLP cases 2 of 80 and 8 of 80 above 1.5× the tuned
# loss, as before). The trigger takes the latest floor undecayed: with the decayed Ĉ alone the
# schedule case's warm-up (η_t rising between floors) crossed the edge unthrottled, from its
# checkpoint to 82× the tuned loss; and Ĉ too, whose C_t sees every step: with the floor alone the
# schedule at peak lr 10 from initialisation ended 77× the tuned loss (0.60 with Ĉ; the fixed lr
# diverges), momentum at lr 3 2.03× (1.68). What "edge" gives up: a run whose own rate
# sits below the edge at first and crosses it later, as its sharpness rises, is caught at the crossing
# instead of held below it from the start (bench_throttle_seeds.py's lr grids, worst of seeds 0–2 ÷
# the tuned loss, "always" → "edge", the fixed lr's own beside: momentum at lr 3 / 5 from
# initialisation 1.26 / 1.17 → 1.68 / 1.68 (fixed 2.03 / diverged), from the checkpoint at lr 5 1.12
# → 1.70 (280); the schedule at peak lr 5 from initialisation 0.84 → 77 (89; 38 with the floor's 2
# products also while it only watches, loop.WATCH_PRODUCTS): never worse than the
# untouched run there, but no longer a tuner).
ENGAGE_MODES = ("edge", "always")


class ThrottleState(NamedTuple):
    curvature: float  # Ĉ, the smoothed curvature (0 before any measurement)
    factor: float  # s, the factor for this step
    steps: int
    floor: float = math.inf  # the latest positive floor (a λmax estimate); C_t counts up to NOISE_CAP × it
    engaged: bool = True  # the rule holds; False: factor 1 until η·max(Ĉ, floor) first exceeds T (ENGAGE_MODES)


def known_curvature(curvature: float, floor: float) -> float:
    """max(Ĉ, latest floor), what the throttle knows of the curvature: ``engage="edge"`` takes over
    once η times it exceeds T. A floor counts once positive (ThrottleState.floor is inf before)."""
    return max(curvature, floor if math.isfinite(floor) else 0.0)


def throttle(constant: Optional[float], kappa: Optional[float] = None, decay: float = 0.95,
             momentum: float = 0.0, catapult_steps: int = 0, engage: str = "always") -> Controller:
    """The curvature throttle with stability constant T = ``constant`` (§3.7); ``kappa`` None takes
    κ = √(1 − ``momentum``); C_t counts up to :data:`NOISE_CAP` × the latest floor, and whole on a
    step whose observation says it is ``noise_free``. With ``catapult_steps`` = K > 0 the fraction starts at
    :data:`CATAPULT_START`·κ, across the edge, and falls linearly to κ over the first K updates:
    κ_t = κ·(1 + (CATAPULT_START − 1)·max(0, 1 − t/K)) (a run restarted from trained weights).
    ``engage`` (:data:`ENGAGE_MODES`): "always" applies the rule from the first step (the builder's
    default: the rule as DESIGN §3.8 states it); "edge" (the default of `curvdiag train` and of
    :class:`~curvdiag.train.adapters.CurvatureThrottle`) keeps the factor at 1 until the first step
    with η_t·max(Ĉ_t, floor) > T, and applies the rule from there on."""
    if constant is None or not (math.isfinite(constant) and constant > 0):
        raise BadArgument("constant", constant, "the throttle needs a known, positive stability threshold T",
                          hint="use an SGD or Adam-family optimizer, or another controller (newton, clip)")
    if not 0.0 <= momentum < 1.0:  # NaN fails too
        raise BadArgument("momentum", momentum, "must lie in [0, 1)")
    kappa = throttle_kappa(momentum) if kappa is None else kappa
    _check_range("kappa", kappa, 0.0, 1.0)
    _check_range("decay", decay, 0.0, 1.0, closed_low=True)
    if not isinstance(catapult_steps, int) or catapult_steps < 0:
        raise BadArgument("catapult_steps", catapult_steps, "must be an integer ≥ 0")
    if engage not in ENGAGE_MODES:
        raise BadArgument("engage", engage, f"must be one of {', '.join(ENGAGE_MODES)}")

    def update(state: ThrottleState, observation: Observation) -> ThrottleState:
        smoothed, floor = decay * state.curvature, state.floor
        if observation.floor is not None and math.isfinite(observation.floor):
            floor = observation.floor if observation.floor > 0 else math.inf
            smoothed = max(smoothed, observation.floor)
        if observation.curvature is not None and math.isfinite(observation.curvature):
            cap = math.inf if observation.noise_free else NOISE_CAP * floor
            smoothed = max(smoothed, min(abs(observation.curvature), cap))
        lr = observation.lr
        fraction = kappa
        if catapult_steps:
            fraction *= 1.0 + (CATAPULT_START - 1.0) * max(0.0, 1.0 - state.steps / catapult_steps)
        engaged = state.engaged or lr * known_curvature(smoothed, floor) > constant
        factor = 1.0 if not engaged or smoothed <= 0.0 or lr <= 0.0 else min(1.0, fraction * constant / (lr * smoothed))
        return ThrottleState(curvature=smoothed, factor=factor, steps=state.steps + 1, floor=floor, engaged=engaged)

    def init(lr: float) -> ThrottleState:
        return ThrottleState(curvature=0.0, factor=1.0, steps=0, engaged=engage == "always")

    return Controller(init=init, update=update,
                      observes=frozenset({"curvature", "floor"}))


# ---------------------------------------------------------------------------- newton
class NewtonState(NamedTuple):
    alpha: float  # the learning rate α_t
    factor: float  # α_t / η_t, the factor on the scheduled learning rate
    skipped: int  # updates skipped by the safeguards
    backtracked: int  # times α was cut by 10 after the lookahead loss went up


# (numerator, curvature term) of the α iteration: α_{t+1} = α_t (1 + γ·numerator / (term + ε)).
_NEWTON_FORMS: Dict[str, Callable[[float, Lookahead], Tuple[float, float]]] = {
    "loss": lambda alpha, look: (alpha * look.c1, 2.0 * (look.loss - look.lookahead_loss) - 2.0 * alpha * look.c1),
    "gradient": lambda alpha, look: (look.c1, look.c0 - look.c1),
}


def _newton_alpha(alpha: float, look: Lookahead, gamma: float, eps: float, max_growth: float,
                  form: str) -> Tuple[Optional[float], bool]:
    """(α_{t+1} before the [α_min, α_max] clamp, or None when the safeguards skip; backtracked)."""
    if not (math.isfinite(look.lookahead_loss) and math.isfinite(look.loss)) or look.lookahead_loss > look.loss:
        return alpha * 0.1, True
    numerator, curvature_term = _NEWTON_FORMS[form](alpha, look)
    if not math.isfinite(curvature_term) or abs(curvature_term) <= eps or not math.isfinite(numerator):
        return None, False
    return alpha * min(max(1.0 + gamma * numerator / (curvature_term + eps), 0.0), max_growth), False


def newton(gamma: float = 1e-3, eps: float = 1e-9, alpha_min: float = 1e-8, alpha_max: float = 10.0,
           form: str = "loss", max_growth: float = 1.05) -> Controller:
    """The Newton-like learning rate of seed 001 (DESIGN §3.9)."""
    _check_range("gamma", gamma, 0.0, math.inf)
    _check_range("eps", eps, 0.0, math.inf, closed_low=True)
    _check_range("alpha_min", alpha_min, 0.0, math.inf)
    _check_range("alpha_max", alpha_max, alpha_min, math.inf, closed_low=True)
    _check_range("max_growth", max_growth, 0.0, math.inf)
    if form not in _NEWTON_FORMS:
        raise BadArgument("form", form, f"must be one of {', '.join(_NEWTON_FORMS)}")

    def init(lr: float) -> NewtonState:
        _check_range("lr", lr, 0.0, math.inf)
        return NewtonState(alpha=float(lr), factor=1.0, skipped=0, backtracked=0)

    def update(state: NewtonState, observation: Observation) -> NewtonState:
        alpha, skipped, backtracked = state.alpha, state.skipped, state.backtracked
        if observation.lookahead is not None:
            new, went_up = _newton_alpha(alpha, observation.lookahead, gamma, eps, max_growth, form)
            skipped += new is None
            backtracked += went_up
            alpha = alpha if new is None else min(max(new, alpha_min), alpha_max)
        factor = alpha / observation.lr if observation.lr > 0 else 1.0
        return NewtonState(alpha, factor, skipped, backtracked)

    return Controller(init=init, update=update, observes=frozenset({"lookahead"}))


# ---------------------------------------------------------------------------- the table
CONTROLLERS: Dict[str, Callable[..., Controller]] = {
    "none": constant_rate,
    "clip": clip,
    "throttle": throttle,
    "newton": newton,
}


def builder_of(name: str) -> Callable[..., Controller]:
    """The builder of the controller ``name`` in :data:`CONTROLLERS`."""
    if name not in CONTROLLERS:
        raise BadArgument("controller", name, "unknown", hint=f"choose from {', '.join(CONTROLLERS)}")
    return CONTROLLERS[name]


def hyperparameters_of(builder: Callable[..., Controller]) -> FrozenSet[str]:
    """The names of the hyperparameters a controller's builder takes."""
    return frozenset(inspect.signature(builder).parameters)


def configured(builder: Callable[..., Controller], **offered: Any) -> Controller:
    """The controller built with those of the ``offered`` hyperparameters its builder takes (a
    run offers all it has: ``constant``, ``momentum``, ``kappa``, ``catapult_steps``, ``engage``,
    ``decay``, ``max_norm``, ``gamma``)."""
    taken = hyperparameters_of(builder)
    return builder(**{key: value for key, value in offered.items() if key in taken})
