"""Stability thresholds of the optimizers (DESIGN §3.7), shared by ``probe`` and ``train``.

On a quadratic, an optimizer with learning rate η is stable along an eigendirection of
curvature λ iff η·λ < T, with T the constant below (seed 003; Cohen et al. 2021, 2022):

| family            | curvature                    | T                    |
|-------------------|------------------------------|----------------------|
| sgd (GD)          | λmax(H)                      | 2                    |
| momentum β        | λmax(H)                      | 2 + 2β               |
| nesterov β        | λmax(H)                      | (2 + 2β) / (1 + 2β)  |
| adam, adamw (β1)  | λmax(P^{-1/2} H P^{-1/2})    | (2 + 2β1) / (1 − β1) |
"""

from __future__ import annotations

from dataclasses import dataclass

STABLE_BELOW = 0.9  # ratio η·curvature / T under this: stable
UNSTABLE_ABOVE = 1.1  # over this: unstable; in between: at the edge (self-stabilisation, §3.1)


def stability_constant(family: str, momentum: float = 0.0, beta1: float = 0.9) -> float:
    """T such that η·curvature < T is stable for this optimizer family."""
    if family == "sgd":
        return 2.0
    if family == "momentum":
        return 2.0 + 2.0 * momentum
    if family == "nesterov":
        return (2.0 + 2.0 * momentum) / (1.0 + 2.0 * momentum)
    if family in ("adam", "adamw"):
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
        return (2.0 + 2.0 * beta1) / (1.0 - beta1)
    raise ValueError(f"unknown optimizer family {family!r}")


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
