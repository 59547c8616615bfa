"""Typed probe results: one record per entry of the JSON report (DESIGN §2.3), and the report.

The probes build these; the JSON, the terminal table, the figures and the HTML page read them
and never recompute. ``to_json()`` writes the report's keys exactly (plus ``schema_version``),
``from_json()`` reads a report back (older reports too: see :mod:`curvdiag.results.codec`).
A probe that does not apply is a :class:`Skipped` in place of its entry: ``{"skipped": reason}``.

Only the standard library here (no torch), so reports, figures and pages load fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from curvdiag.errors import BadInput
from curvdiag.results.codec import decode_record, encode
from curvdiag.results.json_safe import read_json

SCHEMA_VERSION = 1
# Drawing the spectral density: a Gaussian of σ = 1% of the node span (narrow enough to show
# outliers apart from the bulk, wide enough that a few tens of nodes read as a density), on
# GRID_POINTS points over [min θ − 6σ, max θ + 6σ], which holds all but ~1e-9 of the mass.
GRID_POINTS = 512
SIGMA_FRACTION = 0.01
GRID_PADDING_SIGMAS = 6.0


def _key(name: str) -> Any:
    return field(metadata={"key": name})


def _omitted_if_none() -> Any:
    return field(default=None, metadata={"omit_if_none": True})


class Entry:
    """Mixin: ``to_json()`` and ``from_json()`` of a record."""

    def to_json(self) -> Dict[str, Any]:
        return encode(self)

    @classmethod
    def from_json(cls, data: Any, where: str = ""):
        return decode_record(cls, data, where or cls.__name__)


@dataclass
class Skipped(Entry):
    """A probe that could not apply, and why (no optimizer to step from, a model not covered)."""

    reason: str = _key("skipped")


@dataclass
class LayerShare:
    name: str
    share: float  # of the top eigenvector's squared norm in this parameter tensor


@dataclass
class LambdaMax(Entry):
    """``lambda_max`` and ``preconditioned_lambda_max`` (DESIGN §3.1): the top eigenvalues of H
    (or of P^{-1/2} H P^{-1/2}) and what they cost. ``lambda_min`` is reported only when its own
    Ritz residual meets ``tol``; ``next_ritz_values`` are the unconverged values below the top k."""

    value: float
    lambda_min: Optional[float]
    lambda_min_estimate: Optional[float]
    eigenvalues: List[float]
    residuals: List[float]
    next_ritz_values: List[float]
    method: str  # "lanczos" | "power"
    tol: float
    hvps: int
    converged: bool
    seconds: float
    top_eigenvector_layers: Optional[List[LayerShare]] = _omitted_if_none()  # largest share first
    error_estimates: Optional[List[float]] = _omitted_if_none()  # absolute, of each top-k value (Lanczos)


@dataclass
class EdgeOfStability(Entry):
    """``eos`` (DESIGN §3.7): threshold = T/lr, stable_lr = T/curvature, ratio = lr·curvature/T."""

    optimizer: str
    lr: float
    momentum: Optional[float]  # momentum and nesterov only
    beta1: Optional[float]  # Adam family only
    curvature: str  # "lambda_max" | "preconditioned_lambda_max": the entry the threshold applies to
    curvature_value: float
    constant: float  # T
    threshold: float
    stable_lr: float
    ratio: float
    status: str  # "stable" | "edge" | "unstable"


@dataclass
class HessianTrace(Entry):
    """``hessian_trace`` (DESIGN §3.3): tr H ± its standard error; with the exact Gauss–Newton
    control variate its parts, otherwise ``estimator_note`` says why plain Hutchinson ran."""

    value: float
    stderr: float
    samples: int
    estimator: str
    seconds: float
    hvps: int
    estimator_note: Optional[str] = _omitted_if_none()
    ggn_trace: Optional[float] = _omitted_if_none()
    residual_trace: Optional[float] = _omitted_if_none()
    probe_sd: Optional[float] = _omitted_if_none()
    # c in tr(H) ≈ c·tr(G) + mean(zᵀHz − c·zᵀGz), fitted to the probes (1: G tracks H; 0: it does not)
    cv_coefficient: Optional[float] = _omitted_if_none()


@dataclass
class DiagLayer:
    name: str
    mean: float  # mean diagonal entry over the tensor
    stderr: float  # of that mean, over the probes
    min: float
    max: float
    sum: float
    size: Optional[int] = _omitted_if_none()  # entries in the tensor (older reports: absent)


@dataclass
class HessianDiag(Entry):
    """``hessian_diag``: Hutchinson's diag H per parameter tensor, and tr H from the same probes."""

    samples: int
    estimator: str
    trace: float
    trace_stderr: float
    seconds: float
    layers: List[DiagLayer]


@dataclass
class HesScaleLayer:
    name: str
    mean: float
    min: float
    max: float
    exact: bool  # exact up to rounding (the last layer)


@dataclass
class HesScaleDiag(Entry):
    """``hesscale_diag`` (DESIGN §3.10): HesScale's diagonal per parameter tensor."""

    seconds: float
    exact_parameters: List[str]
    layers: List[HesScaleLayer]


@dataclass
class DirectionalLayer:
    name: str
    value: float
    rayleigh: Optional[float]  # None when the layer did not move
    step_norm: float


@dataclass
class DirectionalCurvature(Entry):
    """``directional_curvature`` (DESIGN §3.4): C_t = ‖ΔG‖/‖Δθ‖ and the Rayleigh quotient
    ⟨Δθ, ΔG⟩/‖Δθ‖² along the last (or a simulated) step; ``source`` says which step."""

    value: float
    rayleigh: float
    step_norm: float
    gradient_change_norm: float
    source: str
    layers: List[DirectionalLayer]


@dataclass
class GlassLayer:
    name: str
    rho: float
    rho_stderr: float
    h: float
    h_stderr: float
    h_abs: float


@dataclass
class Glass(Entry):
    """``glass`` (DESIGN §3.5): glass density ρ = 2 E[γ²]/λ and the locally averaged diag H."""

    lam: float = _key("lambda")
    samples: int = _key("samples")
    rho: float = _key("rho")
    h: float = _key("h")
    constant: float = _key("constant")  # the 2 of ρ = 2 E[γ²]/λ
    gradients: int = _key("gradients")
    seconds: float = _key("seconds")
    layers: List[GlassLayer] = _key("layers")
    rho_stderr: Optional[float] = _omitted_if_none()  # of ρ, over the samples


@dataclass
class PowerLawLayer:
    name: str
    p: float
    p_stderr: Optional[float]


@dataclass
class PowerLaw(Entry):
    """``power_law`` (DESIGN §3.6): the exponent p (2: smooth; below 2: gradient glass)."""

    lam: float = _key("lambda")
    samples: int = _key("samples")
    p: float = _key("p")
    p_stderr: Optional[float] = _key("p_stderr")
    layers: List[PowerLawLayer] = _key("layers")


def default_sigma(nodes: List[float]) -> float:
    """σ = 1% of the node span (or of the node magnitude when all nodes coincide)."""
    low, high = min(nodes), max(nodes)
    return SIGMA_FRACTION * (high - low if high > low else max(abs(high), 1.0))


def smoothed_density(nodes: List[List[float]], weights: List[List[float]], points: int = GRID_POINTS,
                     sigma: Optional[float] = None) -> tuple:
    """The Gaussian-smoothed spectral density φ(t) = (1/p) Σ_l Σ_k τ_k^l N(t; θ_k^l, σ²) of the
    quadrature nodes θ^l and weights τ^l of p probes, on ``points`` equally spaced t over
    [min θ − 6σ, max θ + 6σ]. Returns (grid, density, σ); ∫ φ ≈ 1 on that grid.
    Cost: points × (number of nodes) exponentials."""
    flat = [(t, w / len(nodes)) for ts, ws in zip(nodes, weights) for t, w in zip(ts, ws)]
    if not nodes or any(not ts for ts in nodes):
        raise ValueError("no quadrature nodes to smooth")
    width = float(sigma) if sigma is not None else default_sigma([t for t, _ in flat])
    if not width > 0:
        raise ValueError(f"sigma must be positive, got {width}")
    low = min(t for t, _ in flat) - GRID_PADDING_SIGMAS * width
    high = max(t for t, _ in flat) + GRID_PADDING_SIGMAS * width
    grid = [low + (high - low) * i / (points - 1) for i in range(points)]
    norm = width * math.sqrt(2 * math.pi)
    density = [sum(w * math.exp(-0.5 * ((x - t) / width) ** 2) for t, w in flat) / norm for x in grid]
    return grid, density, width


@dataclass
class SpectralDensity(Entry):
    """``spectral_density``: stochastic Lanczos quadrature (nodes and weights per probe vector)
    and the smoothed density drawn from them (``grid``, ``density``, width ``sigma``). A report
    that holds only the nodes gets its grid here, when read, so figures only read."""

    method: str
    size: int
    steps: int
    probes: int
    seed: int
    hvps: int
    seconds: float
    nodes: List[List[float]]
    weights: List[List[float]]
    lambda_min: float
    lambda_max: float
    trace_estimate: float  # n · ∫ λ dμ
    sigma: Optional[float] = None
    grid: List[float] = field(default_factory=list)
    density: List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (not self.grid or not self.density) and self.nodes and all(self.nodes):
            self.grid, self.density, self.sigma = smoothed_density(self.nodes, self.weights, sigma=self.sigma)


ProbeEntry = Union[LambdaMax, EdgeOfStability, HessianTrace, HessianDiag, HesScaleDiag, DirectionalCurvature, Glass,
                   PowerLaw, SpectralDensity, Skipped]
# The report's vocabulary: entry name → its record (a Skipped may stand in for any of them).
ENTRY_TYPES: Dict[str, type] = {
    "lambda_max": LambdaMax,
    "preconditioned_lambda_max": LambdaMax,
    "eos": EdgeOfStability,
    "hessian_trace": HessianTrace,
    "hessian_diag": HessianDiag,
    "hesscale_diag": HesScaleDiag,
    "directional_curvature": DirectionalCurvature,
    "glass": Glass,
    "power_law": PowerLaw,
    "spectral_density": SpectralDensity,
}


def decode_entry(name: str, data: Any) -> ProbeEntry:
    """One entry of ``probes`` → its record, or :class:`Skipped`."""
    if name not in ENTRY_TYPES:
        raise BadInput(f"probes.{name}: not an entry curvdiag writes", hint=f"known: {', '.join(ENTRY_TYPES)}")
    if isinstance(data, dict) and "skipped" in data:
        return Skipped.from_json(data, f"probes.{name}")
    return ENTRY_TYPES[name].from_json(data, f"probes.{name}")


@dataclass
class ModelSummary:
    parameters: int
    layers: List[str]  # parameter tensors as in model.named_parameters() (weight-tied ones once)


@dataclass
class OperatorSummary:
    """How the curvature operator computed its products, over which data."""

    hvp_method: str
    fallback: Optional[str]
    fallback_reason: Optional[str]
    description: Optional[str]
    finite_difference_step: Optional[float]
    finite_difference_error_estimate: Optional[float]
    mode: str  # "eval" | "train"
    batches: int  # the recipe's batches over all ranks (split ones count once)
    samples: int  # over all ranks
    world_size: Optional[int]
    sharding: Optional[str]
    device: str
    dtype: str
    hvps: Optional[int]


@dataclass
class OptimizerSummary:
    """What the stability threshold was computed for, and where that came from."""

    name: Optional[str]
    family: Optional[str]  # sgd | momentum | nesterov | adam | adamw, or None when unknown
    lr: Optional[float]
    momentum: Optional[float]
    betas: Optional[List[float]]
    source: Optional[str]
    note: Optional[str]


@dataclass
class ProbeCost:
    """What one probe was allowed and what it spent, in gradient-equivalents (GE: one forward
    and backward over all the data; :mod:`curvdiag.probes.budget` prices every pass), and why
    it stopped: ``converged`` (λmax at its tolerance), ``precision`` (a stochastic estimate at
    its target), ``budget`` (its share of the budget spent first), ``fixed`` (a count the user
    set), ``exact`` (a closed-form computation), ``limit`` (the estimator's cap on samples: 1,000
    probes, 100 glass samples), ``interrupted`` (timeout or Ctrl-C)."""

    name: str
    planned: float  # GE: this probe's share of the budget
    spent: float  # GE, as priced by the operator's passes
    seconds: float
    stop: str
    precision_name: Optional[str] = _omitted_if_none()  # what the precision is, e.g. "relative s.e. of tr H"
    precision_target: Optional[float] = _omitted_if_none()
    precision_reached: Optional[float] = _omitted_if_none()

    @property
    def missed_target(self) -> bool:
        """A stochastic estimate that stopped above its precision target."""
        return (self.precision_target is not None and self.precision_reached is not None
                and not self.precision_reached <= self.precision_target)


@dataclass
class BudgetSummary:
    """The run's cost: the budget in gradient-equivalents, what was spent, and the seconds one
    gradient-equivalent took here (to read GE as time)."""

    total: float  # GE planned over the requested probes
    spent: float  # GE spent by the probes (the operator's set-up not included)
    seconds: float  # the probes' wall time
    gradient_seconds: float  # measured seconds of one gradient-equivalent
    hvp_cost: float  # GE one Hessian-vector product is priced at, for the method that ran
    probes: List[ProbeCost]


@dataclass
class ProbeReport:
    """Everything a report shows; JSON, the terminal, the figures and the page read it."""

    curvdiag_version: str
    recipe: str
    checkpoint: Optional[str]
    step: Optional[int]
    model: ModelSummary
    operator: OperatorSummary
    optimizer: OptimizerSummary
    loss: float
    grad_norm: float
    probes: Dict[str, ProbeEntry]  # in the order the probes ran
    schema_version: int = SCHEMA_VERSION
    budget: Optional[BudgetSummary] = _omitted_if_none()
    # True when a timeout (--timeout) or Ctrl-C ended the run early: the report holds the probes
    # that finished, the others are Skipped; ``interrupted_by`` is "timeout" or "keyboard".
    interrupted: bool = False
    interrupted_by: Optional[str] = _omitted_if_none()

    def entry(self, name: str, kind: type) -> Optional[Any]:
        """The entry ``name`` when it is a ``kind`` (not skipped, not absent), else None."""
        value = self.probes.get(name)
        return value if isinstance(value, kind) else None

    def to_json(self) -> Dict[str, Any]:
        document = encode(self)
        return {"schema_version": document.pop("schema_version"), **document}

    @classmethod
    def from_json(cls, data: Any, where: str = "report") -> "ProbeReport":
        """A report as ``to_json`` (or an older curvdiag) wrote it; BadInput when it is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("probes"), dict):
            raise BadInput(f"{where}: not a curvdiag probe report (no \"probes\" object)",
                           hint="give a report written by curvdiag probe --json, or a run directory")
        header = decode_record(cls, {**data, "probes": {}}, where)
        header.probes = {name: decode_entry(name, entry) for name, entry in data["probes"].items()}
        return header


def read_report(path: Path) -> ProbeReport:
    """The probe report in a JSON file (``curvdiag probe --json``); BadInput when it is not one."""
    return ProbeReport.from_json(read_json(path), where=str(path))
