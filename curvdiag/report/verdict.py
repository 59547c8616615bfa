"""The verdict of a probe report, as data: how close the learning rate is to the edge of
stability (DESIGN §2.3, §3.7) and what to do about it. The terminal and the HTML page render
this one record; neither decides anything of its own.

With ``eos`` = (T, η, curvature, ratio = η·curvature/T, stable_lr = T/curvature): the status is
the probe's (ratio < 0.9 stable, ≤ 1.1 edge, above unstable: :mod:`curvdiag.stability`), and
the advice is a learning rate with a margin, ``safe_lr`` = κ·stable_lr with κ = :data:`SAFETY`.
The verdict also carries what qualifies every number of the report: an interrupted run (the
report holds only the probes that finished) and the estimates that stopped above their
precision target (``ProbeCost.missed_target``: the budget ran out first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from curvdiag.results.probe_results import EdgeOfStability, LambdaMax, ProbeCost, ProbeReport, Skipped
from curvdiag.stability import STABLE_BELOW, UNSTABLE_ABOVE, classify

SAFETY = 0.95  # κ: a learning rate with a 5% margin below the threshold


@dataclass(frozen=True)
class StatusWords:
    word: str  # the terminal's first word
    headline: str  # the page's heading
    expectation: str  # what the loss will do
    advice: str  # one line, formatted with {safe} (κ·stable_lr) and {kappa}


STATUS_WORDS = {
    "stable": StatusWords(
        "STABLE", "STABLE", "",
        "Room to spare: the learning rate could grow to about {safe} (κ = {kappa}) before the edge."),
    "edge": StatusWords(
        "AT THE EDGE", "AT THE EDGE OF STABILITY",
        "Expect the loss to oscillate along the top eigenvector; at the edge, training often self-stabilises "
        "rather than diverging.",
        "Expect the loss to oscillate along the top eigenvector (edge of stability: often harmless); "
        "lr ≤ {safe} (κ = {kappa}) would be stable."),
    "unstable": StatusWords(
        "UNSTABLE", "UNSTABLE", "Expect oscillation or divergence along the top eigenvector.",
        "Unstable: expect oscillation or divergence along the top eigenvector; lr ≤ {safe} (κ = {kappa}) would be stable."),
}
NO_VERDICT = "NO VERDICT"
EDGE_BAND = (STABLE_BELOW, UNSTABLE_ABOVE)  # η·curvature/T in this band: at the edge of stability
INTERRUPTED_BY = {"timeout": "the --timeout", "keyboard": "Ctrl-C"}
STOPPED_BECAUSE = {"budget": "its share of the budget was spent first", "interrupted": "the run was interrupted",
                   "fixed": "it ran the fixed count it was given"}


def _number(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2g}"


def missed_target_words(cost: ProbeCost) -> str:
    """One sentence: which estimate stopped above its precision target, where, and why."""
    what = cost.precision_name or "precision"
    why = STOPPED_BECAUSE.get(cost.stop, f"it stopped ({cost.stop})")
    return (f"{cost.name} stopped at {what} {_number(cost.precision_reached)}, above its target "
            f"{_number(cost.precision_target)}: {why}; read it as less precise than asked.")


def interruption_words(interrupted_by: Optional[str]) -> str:
    """One sentence: what an interrupted report holds."""
    by = INTERRUPTED_BY.get(interrupted_by or "", interrupted_by or "an interruption")
    return (f"Interrupted by {by}: this report holds only the probes that finished before it; "
            "the others are marked skipped.")


@dataclass(frozen=True)
class ProbeVerdict:
    """The verdict of one report. ``eos`` is None when there is none, and ``reason`` says why."""

    eos: Optional[EdgeOfStability]
    curvature: Optional[LambdaMax]  # the sharpness the threshold applies to (preconditioned for Adam)
    plain: Optional[LambdaMax]  # λmax of H, whichever the threshold applies to
    preconditioned: bool  # the threshold applies to λmax(P^{-1/2} H P^{-1/2})
    reason: Optional[str]
    kappa: float = SAFETY
    interrupted_by: Optional[str] = None  # "timeout" | "keyboard" when the run was interrupted, else None
    interrupted: bool = False
    missed: List[ProbeCost] = field(default_factory=list)  # estimates that stopped above their precision target

    @property
    def cautions(self) -> List[str]:
        """The sentences that qualify the report: the interruption first, then each missed target."""
        return ([interruption_words(self.interrupted_by)] if self.interrupted else []) + [
            missed_target_words(cost) for cost in self.missed]

    @property
    def status(self) -> str:
        return self.eos.status if self.eos is not None else "unknown"

    @property
    def words(self) -> Optional[StatusWords]:
        return STATUS_WORDS.get(self.status)

    @property
    def headline(self) -> str:
        return self.words.headline if self.words else NO_VERDICT

    @property
    def safe_lr(self) -> Optional[float]:
        """κ · T / curvature."""
        return self.kappa * self.eos.stable_lr if self.eos is not None else None

    def advice(self, number: str) -> str:
        """The advice line, with the safe learning rate written as ``number``."""
        return self.words.advice.format(safe=number, kappa=self.kappa) if self.words else ""


def probe_verdict(report: ProbeReport) -> ProbeVerdict:
    """The verdict of ``report``: from its ``eos`` entry and the sharpness that entry used."""
    plain = report.entry("lambda_max", LambdaMax)
    pre = report.entry("preconditioned_lambda_max", LambdaMax)
    eos = report.probes.get("eos")
    qualifiers = dict(interrupted=report.interrupted, interrupted_by=report.interrupted_by,
                      missed=[c for c in (report.budget.probes if report.budget else []) if c.missed_target])
    if isinstance(eos, EdgeOfStability) and eos.status in STATUS_WORDS:
        preconditioned = eos.curvature == "preconditioned_lambda_max"
        return ProbeVerdict(eos, pre if preconditioned else plain, plain, preconditioned, None, **qualifiers)
    if isinstance(eos, Skipped):
        reason = eos.reason
    else:
        reason = "the report has no eos entry (run the lambda_max probe)"
    return ProbeVerdict(None, pre or plain, plain, pre is not None, reason, **qualifiers)


def peak_ratio_words(peak: float, step: float, diverged: bool) -> str:
    """What a training run's highest η_t·λmax/T (at ``step``) means, in one sentence: 1 is the
    run's own threshold T/η_t; above it a quadratic model of the loss predicts oscillation or
    divergence along the top eigenvector, which a run that did not diverge contradicts."""
    at = f"η·λmax/T peaked at {peak:.3g} at step {step:g}"
    status = classify(peak)
    if diverged:
        return f"Before it diverged, {at} (1 is its stability threshold T/η)."
    if status == "stable":
        return f"λmax stayed below the run's stability threshold T/η: {at} (1 is the threshold)."
    if status == "edge":
        return f"λmax reached the run's stability threshold T/η: {at}, at the edge of stability."
    return (f"λmax rose above the run's stability threshold T/η ({at}; 1 is the threshold) and yet the run did "
            "not diverge: the quadratic model behind T holds only locally, and at the edge of stability training "
            "often self-stabilises.")
