"""What a probe run may spend, in gradient-equivalents, and how that is split over the probes.

Unit: one gradient-equivalent (GE) is one forward and backward over all the probed data. The
operator prices every pass it runs (:data:`curvdiag.curvature.operator.HVP_PRICE`: a kept-graph
Hessian-vector product 1.5 GE, a gradient 1 GE) and probes charge their own backward passes, so
the cost of a run does not depend on the machine and a rerun stops at the same product.

Each probe asks for a share (:data:`ASKS`, GE). A run's budget defaults to the sum of the asks of
the requested probes; ``budget=N`` scales them. Probes run in report order and each may spend its
share plus whatever the probes before it left unspent, so a λmax that converges early leaves the
trace more probes. A stochastic estimate stops at its precision target or when its next sample
no longer fits (:meth:`CurvatureOperator.can_afford`), whichever comes first; λmax stops at its
tolerance or at its share. The asks were chosen by measurement on the sample models and on
ResNet-18, GPT-2 and BERT shapes built from code (README, "What a probe costs").
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

#: The probes ``--probes default`` runs: λmax (with the edge-of-stability margin), the trace, the
#: HesScale diagonal (one pass where it applies) and the curvature along the next optimizer step.
DEFAULT_PROBES: Tuple[str, ...] = ("lambda_max", "hessian_trace", "hesscale_diag", "directional_curvature")

#: GE each probe asks for. λmax: Lanczos to 1e-4 takes 5–60 products on the benchmark models
#: (1.5 GE each); the trace: the Gauss–Newton set-up plus 10–40 probes of an HVP and a J z product;
#: the Hutchinson diagonal: ~60 probes; glass with p: 4 gradients per sample, ~10 samples; the
#: spectral density: two SLQ probes of 40 products. Sum over the default probes: 150; over all: 400.
ASKS: Dict[str, float] = {
    "lambda_max": 60.0,
    "hessian_trace": 80.0,
    "hesscale_diag": 5.0,
    "directional_curvature": 5.0,
    "hessian_diag": 90.0,
    "glass": 40.0,
    "power_law": 0.0,  # measured with the glass, from the same perturbations
    "spectral_density": 120.0,
}


def runs_and_budget(probes: Sequence[str], budget: Optional[float]) -> Tuple[List[str], float]:
    """The probes that run on their own, in order (``power_law`` rides with ``glass`` when both are
    asked for), and the run's budget: ``budget``, or the sum of their asks."""
    runs = [name for name in probes if not (name == "power_law" and "glass" in probes)]
    return runs, (budget if budget is not None else default_budget(runs))


def default_budget(probes: Sequence[str]) -> float:
    """GE a run of ``probes`` is given when the user sets no budget: the sum of their asks."""
    return sum(ASKS[name] for name in probes)


def share(name: str, remaining: Sequence[str], left: float) -> float:
    """GE probe ``name`` may spend when ``left`` GE remain for the probes ``remaining`` (``name``
    first among them): its ask's part of what is left. A probe that asks nothing gets nothing."""
    asked = sum(ASKS[p] for p in remaining)
    if asked <= 0.0 or left <= 0.0:
        return 0.0
    return left * ASKS[name] / asked


def scaled_asks(probes: Sequence[str], budget: float) -> Dict[str, float]:
    """The planned share of each probe before any has run: the asks scaled to ``budget``."""
    asked = sum(ASKS[p] for p in probes)
    return {p: (budget * ASKS[p] / asked if asked > 0 else 0.0) for p in probes}
