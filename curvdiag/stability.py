"""Stability thresholds of the optimizers (DESIGN §3.7), shared by ``probe`` and ``train``, and
the ONE table of optimizer families.

On a quadratic, an optimizer with learning rate η is stable along an eigendirection of
curvature λ iff η·λ < T, with T the constant below (seed 003; Cohen et al. 2021, 2022):

| family            | curvature                    | T                    |
|-------------------|------------------------------|----------------------|
| sgd (GD)          | λmax(H)                      | 2                    |
| momentum β        | λmax(H)                      | 2 + 2β               |
| nesterov β        | λmax(H)                      | (2 + 2β) / (1 + 2β)  |
| adam, adamw (β1)  | λmax(P^{-1/2} H P^{-1/2})    | (2 + 2β1) / (1 − β1) |

:data:`OPTIMIZER_FAMILIES` holds, per family, T(β), the param-group keys its settings (β among
them) are read from, how a param group is recognised as one of its own, and the ``torch.optim``
class that takes a simulated step. A new family is one row; ``loading.optimizer`` (reading a
run's optimizer), ``probes.simulated_step`` and ``train`` read it. No torch import here: the
class is named, so ``report`` and ``plots`` can use this module without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

STABLE_BELOW = 0.9  # ratio η·curvature / T under this: stable
UNSTABLE_ABOVE = 1.1  # over this: unstable; in between: at the edge (self-stabilisation, §3.1)


@dataclass(frozen=True)
class OptimizerFamily:
    """One optimizer family: its stability threshold T(β) and where its settings live."""

    name: str
    threshold: Callable[[float], float]  # T(β): η·curvature < T is stable
    beta: Callable[[Mapping[str, Any]], float]  # β from the family's settings (momentum, or β1 = betas[0])
    group_keys: Tuple[str, ...]  # the param-group keys holding its settings, β among them
    defaults: Mapping[str, Any]  # settings assumed when a flag names the family and no source gives them
    matches: Callable[[Mapping[str, Any]], bool]  # whether a torch param group is of this family
    torch_class: str  # torch.optim.<torch_class> takes a simulated step
    torch_options: Mapping[str, Any] = field(default_factory=dict)  # fixed constructor options
    preconditioned: bool = False  # the curvature is λmax(P^{-1/2} H P^{-1/2}), P = diag(sqrt(v̂) + ε)


def _adam_threshold(beta1: float) -> float:
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1={beta1!r}: must lie in [0, 1)")
    return (2.0 + 2.0 * beta1) / (1.0 - beta1)


def _sgd_group(group: Mapping[str, Any]) -> bool:
    return "momentum" in group and "dampening" in group


def _adam_group(group: Mapping[str, Any]) -> bool:
    return "betas" in group


def _momentum(settings: Mapping[str, Any]) -> float:
    return float(settings.get("momentum") or 0.0)


def _beta1(settings: Mapping[str, Any]) -> float:
    return float(settings["betas"][0])


_SGD_KEYS, _ADAM_KEYS = ("momentum",), ("betas", "eps")
_ADAM_DEFAULTS = {"betas": (0.9, 0.999)}

OPTIMIZER_FAMILIES: Dict[str, OptimizerFamily] = {family.name: family for family in (
    OptimizerFamily("sgd", lambda beta: 2.0, _momentum, _SGD_KEYS, {},
                    lambda g: _sgd_group(g) and not g.get("momentum"), "SGD"),
    OptimizerFamily("momentum", lambda beta: 2.0 + 2.0 * beta, _momentum, _SGD_KEYS, {"momentum": 0.9},
                    lambda g: _sgd_group(g) and bool(g.get("momentum")) and not g.get("nesterov"), "SGD"),
    OptimizerFamily("nesterov", lambda beta: (2.0 + 2.0 * beta) / (1.0 + 2.0 * beta), _momentum, _SGD_KEYS,
                    {"momentum": 0.9}, lambda g: _sgd_group(g) and bool(g.get("momentum")) and bool(g.get("nesterov")),
                    "SGD", {"nesterov": True}),
    OptimizerFamily("adam", _adam_threshold, _beta1, _ADAM_KEYS, _ADAM_DEFAULTS,
                    lambda g: _adam_group(g) and not g.get("decoupled_weight_decay"), "Adam", preconditioned=True),
    OptimizerFamily("adamw", _adam_threshold, _beta1, _ADAM_KEYS, _ADAM_DEFAULTS,
                    lambda g: _adam_group(g) and bool(g.get("decoupled_weight_decay")), "AdamW", preconditioned=True),
)}


def family_of_group(group: Mapping[str, Any]) -> Optional[OptimizerFamily]:
    """The family a torch param group belongs to (read off its keys), or None when unknown."""
    return next((family for family in OPTIMIZER_FAMILIES.values() if family.matches(group)), None)


def throttle_kappa(momentum: float = 0.0) -> float:
    """The throttle's fraction κ of the edge, κ = √(1 − β) for momentum β (heavy ball, or Adam's β1).

    Measured, not derived (DESIGN §3.8; benchmarks/peers_results.md): the best fixed learning rate of a grid
    sits, after its first steps, at η·λmax ≈ T (GD at the edge of stability) without momentum and
    well below it with momentum; a throttle holding η·Ĉ ≤ κT ends within 1.5× of that tuned loss
    for κ = 1.0, 0.7, 0.3, 0.2 at β = 0, 0.5, 0.9, 0.95 and fails by 10× or more one step of that
    grid away — √(1 − β) is 1, 0.71, 0.32, 0.22. A heuristic reading: a top mode driven by noise
    or by the nonlinearity oscillates with an amplitude about 1/√(1 − β) times plain GD's, so the
    same amplitude needs η·λ lower by √(1 − β)."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum!r}: must lie in [0, 1)")
    return (1.0 - momentum) ** 0.5


def stability_constant(family: str, momentum: float = 0.0, beta1: float = 0.9) -> float:
    """T such that η·curvature < T is stable for this optimizer family."""
    if family not in OPTIMIZER_FAMILIES:
        raise ValueError(f"unknown optimizer family {family!r}")
    row = OPTIMIZER_FAMILIES[family]
    return row.threshold(row.beta({"momentum": momentum, "betas": (beta1, None)}))


@dataclass
class StabilityMargin:
    """η·curvature against T. ``threshold`` = T/η, ``stable_lr`` = T/curvature, ``ratio`` = η·curvature/T."""

    optimizer: str
    lr: float
    curvature: float
    constant: float
    threshold: float
    stable_lr: float
    ratio: float
    status: str  # "stable" | "edge" | "unstable"


def classify(ratio: float) -> str:
    if ratio < STABLE_BELOW:
        return "stable"
    if ratio <= UNSTABLE_ABOVE:
        return "edge"
    return "unstable"


def stability_margin(family: str, lr: float, curvature: float, momentum: float = 0.0, beta1: float = 0.9) -> StabilityMargin:
    """The edge-of-stability margin of a learning rate against a curvature."""
    constant = stability_constant(family, momentum, beta1)
    ratio = lr * curvature / constant
    stable_lr = constant / curvature if curvature > 0 else float("inf")
    return StabilityMargin(family, lr, curvature, constant, constant / lr, stable_lr, ratio, classify(ratio))
