"""Run the requested probes on a Target and collect typed results (DESIGN §2.3, §4).

Which probes exist, in which order, is :mod:`curvdiag.probes.registry`; this module runs them
and holds the functions the registry names, each turning the mathematics (``sharpness``,
``hutchinson``, ``ggn_trace``, ``hesscale``, ``glass``, ``directional``, ``spectral_density``,
``stability``) into the typed entries of :mod:`curvdiag.results.probe_results`. The
presentation is :mod:`curvdiag.report` and :mod:`curvdiag.plots`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from curvdiag._version import __version__
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.errors import BadArgument, CurvdiagError, NotCovered, ProbeFailed
from curvdiag.loading.target import Target
from curvdiag.probes.directional import directional_curvature
from curvdiag.probes.ggn_trace import JZ_PRICE, ggn_control_variate_trace
from curvdiag.probes.glass import GLASS_CONSTANT, glass_probe
from curvdiag.probes.hutchinson import hutchinson_diag, hutchinson_trace
from curvdiag.probes import budget as budgets
from curvdiag.probes.budget import DEFAULT_PROBES
from curvdiag.probes.registry import COMPANIONS, PROBE_NAMES, REGISTRY
from curvdiag.probes.sharpness import METHODS, SharpnessResult, lambda_max, preconditioned_lambda_max
from curvdiag.results import probe_results as entry
from curvdiag.results.probe_results import ProbeEntry, ProbeReport, Skipped
from curvdiag.stability import stability_margin

# Three probes give a noisy s.d. (1.1% rms error at a 1% target on the tanh MLP); ten give 0.7%.
GGN_MIN_SAMPLES = 10
# Precision targets of the stochastic estimates that stop on their own (relative standard errors).
DIAG_TARGET_REL_STDERR = 0.10  # the largest layer's mean diagonal entry (hutchinson.segment_precision)
GLASS_TARGET_REL_STDERR = 0.10  # the glass density ρ
GLASS_MAX_SAMPLES = 100
STOCHASTIC_MAX_SAMPLES = 1000  # the trace's and the diagonal's cap on probes, whatever the budget
HESSCALE_PRICE = 2.0  # GE of the HesScale diagonal: a forward and one backward of second-order rules per batch
Entries = Dict[str, ProbeEntry]


@dataclass
class ProbeSettings:
    probes: List[str] = field(default_factory=lambda: list(DEFAULT_PROBES))
    method: str = "lanczos"
    tol: float = 1e-4
    top_k: int = 1
    samples: Optional[int] = None  # Hutchinson probes; None: until the precision target or the budget
    seed: int = 0
    max_hvps: int = 500
    trace_target_rel_stderr: float = 0.01
    previous: Optional[torch.Tensor] = None  # θ_{t−1}, flat, for directional_curvature
    glass_lambda: float = 1e-3
    glass_samples: Optional[int] = None  # None: until ρ's target s.e. or the budget (at most GLASS_MAX_SAMPLES)
    density_steps: int = 48  # stochastic Lanczos quadrature: Lanczos steps per probe
    density_probes: int = 2  # at most; fewer when the budget holds fewer
    # The run's budget in gradient-equivalents (one forward and backward over all the data), split
    # over the requested probes (curvdiag.probes.budget); None: the default for those probes.
    budget: Optional[float] = None

    def __post_init__(self) -> None:
        """Every setting checked here, once, for the command line and the Python API alike."""
        checks = [
            ("method", self.method in METHODS, "unknown"),
            ("tol", _positive(self.tol), "must be a positive number"),
            ("top_k", _integer(self.top_k, 1), "must be at least 1"),
            ("samples", self.samples is None or _integer(self.samples, 2), "must be at least 2 (for a standard error)"),
            ("max_hvps", _integer(self.max_hvps, 1), "must be at least 1"),
            ("glass_lambda", _positive(self.glass_lambda), "must be a positive number"),
            ("glass_samples", self.glass_samples is None or _integer(self.glass_samples, 1), "must be at least 1"),
            ("budget", self.budget is None or _positive(self.budget), "must be a positive number of gradient-equivalents"),
        ]
        for argument, holds, problem in checks:
            if not holds:
                raise BadArgument(argument, getattr(self, argument), problem,
                                  hint=f"use {' or '.join(METHODS)}" if argument == "method" else None)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def _integer(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def parse_probe_names(text: str) -> List[str]:
    """'default', 'all' or a comma-separated list of probe names → ordered, validated list."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise BadArgument("probes", text, "is empty", hint=f"use default, all or some of: {', '.join(PROBE_NAMES)}")
    if "all" in names:
        return list(PROBE_NAMES)
    if "default" in names:
        names = [n for n in names if n != "default"] + list(DEFAULT_PROBES)
    wanted = [COMPANIONS.get(name, name) for name in names]
    unknown = [name for name in wanted if name not in PROBE_NAMES]
    if unknown:
        raise BadArgument("probes", text, f"unknown probe {unknown[0]!r}",
                          hint=f"known probes: default, all, {', '.join(PROBE_NAMES + tuple(COMPANIONS))}")
    return [p for p in PROBE_NAMES if p in wanted]


@dataclass
class ProbeDone:
    """One finished probe, as :func:`run_probes` reports it to its ``finished`` callback: its
    wall time, the operator's Hessian-vector products it took, its entries, and its cost in
    gradient-equivalents where the budget priced it (None otherwise)."""

    name: str
    seconds: float
    hvps: int
    entries: Entries
    cost: Optional[entry.ProbeCost] = None


class DeadlinePassed(BaseException):
    """Raised from the operator's ``on_hvp`` hook once :func:`run_probes`'s deadline has passed.
    A BaseException (like KeyboardInterrupt), so that no probe's ``except Exception`` takes it
    for a failure of the probe."""


INTERRUPTERS = {"timeout": "the timeout", "keyboard": "Ctrl-C"}


def run_probes(
    target: Target,
    op: CurvatureOperator,
    settings: ProbeSettings,
    progress: Optional[Callable[[str], Any]] = None,
    *,
    finished: Optional[Callable[[ProbeDone], Any]] = None,
    deadline: Optional[float] = None,
    keyboard_interrupt_ends_run: bool = False,
) -> ProbeReport:
    """Run ``settings.probes`` on ``op``, in registry order, each within its share of the budget
    (:mod:`curvdiag.probes.budget`); a probe that fails raises ProbeFailed naming it.
    ``progress(name)`` is called as a probe starts, ``finished(done)`` as it ends.

    Interruptions end the run with a report of the probes that finished (``interrupted`` and
    ``interrupted_by`` set; the probe that was running is Skipped "interrupted after N s", its
    cost stopped "interrupted", the others "not run: interrupted by ..."):

    - ``deadline`` (a ``time.monotonic()`` value): checked before each probe and, in one process,
      after each Hessian-vector product. Under several processes only before each probe, with
      one collective so that every rank stops at the same probe (a rank never leaves the others
      waiting in a product); a probe that runs past the deadline finishes there.
    - Ctrl-C (KeyboardInterrupt) when ``keyboard_interrupt_ends_run``; otherwise it propagates
      (a library call is stopped the Python way, the model's state restored on the way out).
    """
    announce = progress or (lambda name: None)
    probes: Entries = {}
    todo, total = budgets.runs_and_budget(settings.probes, settings.budget)
    left, costs, started = total, [], time.perf_counter()
    interrupted_by: Optional[str] = None
    caller_hook = op.on_hvp
    if deadline is not None and op.world_size == 1:
        op.on_hvp = _deadline_hook(caller_hook, deadline)
    running, allowed, spent_before, probe_started, hvps = None, 0.0, op.spent, started, op.hvp_count
    try:
        for index, name in enumerate(todo):
            if _deadline_agreed(op, deadline):
                raise DeadlinePassed
            allowed = budgets.share(name, todo[index:], left)
            running, spent_before, probe_started, hvps = name, op.spent, time.perf_counter(), op.hvp_count
            op.spend_limit = op.spent + allowed
            announce(name)
            try:
                done = _run_one(name, target, op, settings)
            finally:
                op.spend_limit = None
            running = None
            probes.update(done)
            spent = op.spent - spent_before
            left -= spent
            costs.append(_probe_cost(name, probes, settings, allowed, spent, time.perf_counter() - probe_started))
            if finished is not None:
                finished(ProbeDone(name, time.perf_counter() - probe_started, op.hvp_count - hvps, done, costs[-1]))
    except (DeadlinePassed, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt) and not keyboard_interrupt_ends_run:
            raise
        interrupted_by = "timeout" if isinstance(exc, DeadlinePassed) else "keyboard"
        seconds = time.perf_counter() - probe_started
        if running is not None:
            costs.append(entry.ProbeCost(name=running, planned=allowed, spent=op.spent - spent_before,
                                         seconds=seconds, stop="interrupted"))
        probes.update(_unfinished(settings, probes, running, seconds, interrupted_by))
    finally:
        op.on_hvp = caller_hook
    budget = entry.BudgetSummary(total=total, spent=sum(c.spent for c in costs), seconds=time.perf_counter() - started,
                                 gradient_seconds=op.gradient_seconds, hvp_cost=op.hvp_price, probes=costs)
    return ProbeReport(
        curvdiag_version=__version__,
        recipe=target.recipe.name,
        checkpoint=target.checkpoint.path if target.checkpoint else None,
        step=target.checkpoint.step if target.checkpoint else None,
        model=entry.ModelSummary(parameters=op.num_params, layers=list(op.names)),
        operator=_operator_summary(target, op),
        optimizer=_optimizer_summary(target),
        loss=op.loss(),
        grad_norm=float(op.gradient().norm()),
        probes=probes,
        budget=budget,
        interrupted=interrupted_by is not None,
        interrupted_by=interrupted_by,
    )


def _run_one(name: str, target: Target, op: CurvatureOperator, settings: ProbeSettings) -> Entries:
    """The entries of probe ``name``; its failure as ProbeFailed naming it."""
    try:
        return REGISTRY[name].load()(target, op, settings)
    except ProbeFailed:
        raise
    except CurvdiagError as exc:  # the recipe's code failed while a probe ran
        raise ProbeFailed(name, exc.message, exc.hint) from exc
    except Exception as exc:
        raise ProbeFailed(name, f"{type(exc).__name__}: {exc}", hint="rerun with --debug for the traceback") from exc


def _deadline_hook(caller_hook: Optional[Callable[[int], None]], deadline: float) -> Callable[[int], None]:
    """The operator's ``on_hvp``: the caller's hook, then DeadlinePassed once the deadline passed."""

    def hook(count: int) -> None:
        if caller_hook is not None:
            caller_hook(count)
        if time.monotonic() >= deadline:
            raise DeadlinePassed
    return hook


def _deadline_agreed(op: CurvatureOperator, deadline: Optional[float]) -> bool:
    """Whether the deadline has passed; under several processes whether it has on any rank (one
    collective, taken by every rank at the same point since all run the same probes)."""
    if deadline is None:
        return False
    passed = time.monotonic() >= deadline
    if op.world_size == 1:
        return passed
    flag = torch.tensor([1.0 if passed else 0.0], device=op.device, dtype=op.dtype)
    return float(op.sum_over_ranks(flag)[0]) > 0


def _unfinished(settings: ProbeSettings, probes: Entries, running: Optional[str], seconds: float,
                interrupted_by: str) -> Entries:
    """Skipped entries for every requested probe without one: the one that was running (and the
    entries its function would have written) "interrupted after N s", the rest "not run"."""
    out: Entries = {}
    cut = [] if running is None else [running] + [
        n for n in settings.probes if n != running and REGISTRY[n].function == REGISTRY[running].function]
    for name in cut:
        for written in (name, *REGISTRY[name].companions):
            out[written] = Skipped(f"interrupted after {seconds:.1f} s")
    for name in settings.probes:
        if name not in probes and name not in out:
            for written in (name, *REGISTRY[name].companions):
                out.setdefault(written, Skipped(f"not run: interrupted by {INTERRUPTERS[interrupted_by]}"))
    return out


def _probe_cost(name: str, probes: Entries, s: ProbeSettings, allowed: float, spent: float,
                seconds: float) -> entry.ProbeCost:
    """Why probe ``name`` stopped and the precision it reached, read from its entry."""
    cost = entry.ProbeCost(name=name, planned=allowed, spent=spent, seconds=seconds, stop="exact")
    result = probes.get(name)
    if isinstance(result, Skipped):
        cost.stop = "skipped"
    elif isinstance(result, entry.LambdaMax):
        cost.stop = "converged" if result.converged else "budget"
        bounds = result.error_estimates or result.residuals  # Lanczos: r²/gap or r; power: the residual
        cost.precision_name = "relative error estimate" if result.error_estimates else "relative Ritz residual"
        cost.precision_target = result.tol
        cost.precision_reached = bounds[0] / abs(result.value) if result.value else None
    elif isinstance(result, entry.HessianTrace):
        _stochastic(cost, "relative s.e. of tr H", s.trace_target_rel_stderr, result.stderr, result.value, s.samples,
                    at_cap=result.samples >= STOCHASTIC_MAX_SAMPLES)
    elif isinstance(result, entry.HessianDiag):
        from curvdiag.probes.hutchinson import segment_precision

        reached = segment_precision([l.mean for l in result.layers], [l.stderr for l in result.layers],
                                    [l.size for l in result.layers])
        _stochastic(cost, "largest relative s.e. of a layer's mean", DIAG_TARGET_REL_STDERR, reached, 1.0, s.samples,
                    at_cap=result.samples >= STOCHASTIC_MAX_SAMPLES)
    elif isinstance(result, entry.Glass):
        _stochastic(cost, "relative s.e. of rho", GLASS_TARGET_REL_STDERR, result.rho_stderr, result.rho,
                    s.glass_samples, at_cap=result.samples >= GLASS_MAX_SAMPLES)
    elif isinstance(result, entry.SpectralDensity):
        cost.stop = "fixed" if result.probes >= s.density_probes else "budget"
    return cost


def _stochastic(cost: entry.ProbeCost, what: str, target: Optional[float], stderr: Optional[float], value: float,
                fixed: Optional[int], at_cap: bool = False) -> None:
    """Fill a stochastic estimate's stop and precision: ``fixed`` when the user set the count,
    ``limit`` when it took its cap of samples before its target or its share."""
    reached = stderr / abs(value) if stderr is not None and value else None
    cost.precision_name, cost.precision_reached = what, reached
    if fixed is not None:
        cost.stop = "fixed"
        return
    cost.precision_target = target
    met = reached is not None and target is not None and reached <= target
    cost.stop = "precision" if met else ("limit" if at_cap else "budget")


def _operator_summary(target: Target, op: CurvatureOperator) -> entry.OperatorSummary:
    return entry.OperatorSummary(
        hvp_method=op.hvp_method,
        fallback=op.fallback,
        fallback_reason=op.fallback_reason,
        description=op.describe_method(),
        finite_difference_step=op.finite_difference.step if op.finite_difference else None,
        finite_difference_error_estimate=op.finite_difference.relative_error_estimate if op.finite_difference else None,
        mode="train" if op.train_mode else "eval",
        # Over all ranks: the recipe's batches (split ones count once), and all samples.
        batches=target.total_batches if target.total_batches is not None else op.num_batches,
        samples=op.num_samples,
        world_size=op.world_size,
        sharding=target.sharding,
        device=str(op.device),
        dtype=str(op.dtype).replace("torch.", ""),
        hvps=op.hvp_count,
    )


def _optimizer_summary(target: Target) -> entry.OptimizerSummary:
    info = target.optimizer
    return entry.OptimizerSummary(name=info.name, family=info.family, lr=info.lr, momentum=info.momentum,
                                  betas=list(info.betas) if info.betas else None, source=info.source, note=info.note)


# ------------------------------------------------------------------ the registry's functions
def _sharpness_entry(result: SharpnessResult, op: CurvatureOperator) -> entry.LambdaMax:
    shares = None
    if result.eigenvectors is not None:
        weight = result.eigenvectors[0].double().pow(2)
        total = float(weight.sum()) or 1.0
        shares = sorted((entry.LayerShare(name, float(weight[a:b].sum()) / total) for name, a, b in op.layer_slices()),
                        key=lambda s: -s.share)
    k = len(result.eigenvalues)
    return entry.LambdaMax(
        value=result.value, lambda_min=result.lambda_min, lambda_min_estimate=result.lambda_min_estimate,
        eigenvalues=result.eigenvalues, residuals=result.residuals, next_ritz_values=result.ritz_values[k:k + 3],
        method=result.method, tol=result.tol, hvps=result.hvps, converged=result.converged, seconds=result.seconds,
        top_eigenvector_layers=shares, error_estimates=list(result.error_estimates) or None,
    )


def _flat_preconditioner(target: Target, op: CurvatureOperator) -> Optional[torch.Tensor]:
    diagonal = target.optimizer.preconditioner_diagonal()
    if diagonal is None:
        return None
    return op.flatten([d.to(device=op.device, dtype=op.dtype) for d in diagonal])


def _edge_of_stability(target: Target, curvature: float, curvature_name: str) -> ProbeEntry:
    """The margin of the optimizer's learning rate against ``curvature`` (DESIGN §3.7), or why
    there is none."""
    info = target.optimizer
    if info.family is None:
        what = f"optimizer {info.name}" if info.name else "no optimizer"
        return Skipped(f"{what}: no known stability threshold (pass --optimizer sgd|momentum|nesterov|adam|adamw and --lr)")
    if info.lr is None:
        return Skipped("no learning rate known (pass --lr)")
    beta1 = info.betas[0] if info.betas else 0.9
    margin = stability_margin(info.family, info.lr, curvature, momentum=info.momentum, beta1=beta1)
    return entry.EdgeOfStability(
        optimizer=info.family, lr=info.lr,
        momentum=info.momentum if info.family in ("momentum", "nesterov") else None,
        beta1=beta1 if info.is_adaptive else None, curvature=curvature_name, curvature_value=curvature,
        constant=margin.constant, threshold=margin.threshold, stable_lr=margin.stable_lr, ratio=margin.ratio,
        status=margin.status,
    )


def _affordable_hvps(op: CurvatureOperator, s: ProbeSettings) -> int:
    """``--max-hvps``, or fewer when the probe's share of the budget holds fewer (at least 3)."""
    left = op.budget_left()
    return s.max_hvps if math.isinf(left) else max(3, min(s.max_hvps, int(left // op.hvp_price)))


def _exhausted(op: CurvatureOperator, price: float) -> Callable[[], bool]:
    """Whether the next sample, priced ``price`` GE, no longer fits the probe's share."""
    return lambda: not op.can_afford(price)


def run_lambda_max(target: Target, op: CurvatureOperator, s: ProbeSettings) -> Entries:
    """λmax; for Adam-family optimizers the preconditioned sharpness too; and the margin of the
    learning rate against whichever of the two limits it."""
    kwargs = dict(method=s.method, tol=s.tol, top_k=s.top_k, seed=s.seed)
    plain = _sharpness_entry(lambda_max(op, want_vectors=True, max_hvps=_affordable_hvps(op, s), **kwargs), op)
    out: Entries = {"lambda_max": plain}
    if not target.optimizer.is_adaptive:
        out["preconditioned_lambda_max"] = Skipped("not an Adam-family optimizer")
        out["eos"] = _edge_of_stability(target, plain.value, "lambda_max")
        return out
    diagonal = _flat_preconditioner(target, op)
    if diagonal is None:
        out["preconditioned_lambda_max"] = Skipped(
            "Adam-family optimizer without second moments: give a checkpoint with its optimizer state")
        out["eos"] = Skipped("Adam's threshold applies to the preconditioned sharpness, which needs "
                             "the optimizer's second moments (exp_avg_sq) from a checkpoint")
        return out
    pre = _sharpness_entry(preconditioned_lambda_max(op, diagonal, want_vectors=True,
                                                     max_hvps=_affordable_hvps(op, s), **kwargs), op)
    out["preconditioned_lambda_max"] = pre
    out["eos"] = _edge_of_stability(target, pre.value, "preconditioned_lambda_max")
    return out


def run_hessian_trace(target: Target, op: CurvatureOperator, s: ProbeSettings) -> Entries:
    """The exact Gauss-Newton control variate where the model is covered (DESIGN §3.3), else
    plain Hutchinson; the entry names the estimator and, for the fallback, why."""
    kwargs = dict(samples=s.samples, target_rel_stderr=s.trace_target_rel_stderr, seed=s.seed + 1,
                  max_samples=STOCHASTIC_MAX_SAMPLES)
    fallback_reason = None
    try:
        result = ggn_control_variate_trace(op, min_samples=GGN_MIN_SAMPLES,
                                           exhausted=_exhausted(op, op.hvp_price + JZ_PRICE), **kwargs)
    except NotCovered as exc:
        fallback_reason = f"Gauss-Newton control variate not applicable: {exc.reason}"
        result = hutchinson_trace(op, exhausted=_exhausted(op, op.hvp_price), **kwargs)
    trace = entry.HessianTrace(value=result.value, stderr=result.stderr, samples=result.samples,
                               estimator=result.estimator, seconds=result.seconds, hvps=result.samples,
                               estimator_note=fallback_reason)
    if not fallback_reason:
        trace.ggn_trace, trace.residual_trace, trace.probe_sd = result.ggn_trace, result.residual_trace, result.probe_sd
        trace.cv_coefficient = result.coefficient
    return {"hessian_trace": trace}


def run_hessian_diag(target: Target, op: CurvatureOperator, s: ProbeSettings) -> Entries:
    started = time.perf_counter()
    if s.samples is not None:
        result = hutchinson_diag(op, samples=s.samples, seed=s.seed + 2, segments=op.layer_slices())
    else:
        result = hutchinson_diag(op, samples=STOCHASTIC_MAX_SAMPLES, seed=s.seed + 2, segments=op.layer_slices(),
                                 target_rel_stderr=DIAG_TARGET_REL_STDERR, exhausted=_exhausted(op, op.hvp_price))
    layers = []
    for (name, a, b), mean, se in zip(op.layer_slices(), result.segment_means, result.segment_stderr):
        piece = result.diagonal[a:b]
        layers.append(entry.DiagLayer(name=name, mean=mean, stderr=se, min=float(piece.min()), max=float(piece.max()),
                                      sum=float(piece.double().sum()), size=b - a))
    return {"hessian_diag": entry.HessianDiag(
        samples=result.samples, estimator="hutchinson (Rademacher)", trace=result.trace.value,
        trace_stderr=result.trace.stderr, seconds=time.perf_counter() - started, layers=layers)}


def run_hesscale_diag(target: Target, op: CurvatureOperator, s: ProbeSettings) -> Entries:
    """HesScale's diagonal (DESIGN §3.10) where the model is a covered Sequential; otherwise the
    entry says why it does not apply, never a wrong number."""
    from curvdiag.probes.hesscale import hesscale_diag

    try:
        result = hesscale_diag(op)
        op.charge(HESSCALE_PRICE)
    except NotCovered as exc:
        return {"hesscale_diag": Skipped(str(exc))}
    layers = []
    for name, a, b in op.layer_slices():
        piece = result.diagonal[a:b].double()
        layers.append(entry.HesScaleLayer(name=name, mean=float(piece.mean()), min=float(piece.min()),
                                          max=float(piece.max()), exact=name in result.exact_parameters))
    return {"hesscale_diag": entry.HesScaleDiag(seconds=result.seconds, exact_parameters=list(result.exact_parameters),
                                                layers=layers)}


def run_directional_curvature(target: Target, op: CurvatureOperator, s: ProbeSettings) -> Entries:
    """C_t along θ_{t−1} → θ_t (``--previous``), else along one simulated optimizer step."""
    from curvdiag.probes.simulated_step import simulate_step

    theta, grad = op.parameters_vector(), op.gradient()
    if s.previous is not None:
        _, grad_prev = op.gradient_at(s.previous)
        result = directional_curvature(s.previous, theta, grad_prev, grad, op.layer_slices())
        source = "previous checkpoint (--previous)"
    else:
        theta_next, source = simulate_step(target, op)
        if theta_next is None:
            return {"directional_curvature": Skipped(source)}
        _, grad_next = op.gradient_at(theta_next)
        result = directional_curvature(theta, theta_next, grad, grad_next, op.layer_slices())
    return {"directional_curvature": entry.DirectionalCurvature(
        value=result.value, rayleigh=result.rayleigh, step_norm=result.step_norm,
        gradient_change_norm=result.gradient_change_norm, source=source,
        layers=[entry.DirectionalLayer(name=l.name, value=l.value, rayleigh=l.rayleigh, step_norm=l.step_norm)
                for l in result.layers])}


def run_glass_and_power_law(target: Target, op: CurvatureOperator, s: ProbeSettings) -> Entries:
    """The glass density and the power-law exponent from one set of perturbations; each entry
    only when asked for."""
    want_power = "power_law" in s.probes
    if s.glass_samples is not None:
        glass, power = glass_probe(op, lam=s.glass_lambda, samples=s.glass_samples, seed=s.seed + 3, power_law=want_power)
    else:
        glass, power = glass_probe(op, lam=s.glass_lambda, samples=GLASS_MAX_SAMPLES, seed=s.seed + 3,
                                   power_law=want_power, target_rel_stderr=GLASS_TARGET_REL_STDERR,
                                   exhausted=_exhausted(op, 4.0 if want_power else 2.0))
    out: Entries = {}
    if "glass" in s.probes:
        out["glass"] = entry.Glass(
            lam=glass.lam, samples=glass.samples, rho=glass.rho, h=glass.h, constant=GLASS_CONSTANT, gradients=glass.gradients,
            seconds=glass.seconds, layers=list(glass.layers), rho_stderr=glass.rho_stderr)
    if power is not None:
        out["power_law"] = entry.PowerLaw(
            lam=power.lam, samples=power.samples, p=power.p, p_stderr=power.p_stderr,
            layers=list(power.layers))
    return out


def run_spectral_density(target: Target, op: CurvatureOperator, s: ProbeSettings) -> Entries:
    """Stochastic Lanczos quadrature; the entry carries the smoothed density it is drawn as."""
    from curvdiag.probes.spectral_density import spectral_density

    per_probe = min(s.density_steps, op.num_params) * op.hvp_price
    left = op.budget_left()
    fits = s.density_probes if math.isinf(left) else int(left // per_probe)
    result = spectral_density(op, steps=s.density_steps, probes=max(1, min(s.density_probes, fits)), seed=s.seed + 4)
    return {"spectral_density": entry.SpectralDensity(
        method="slq", size=result.size, steps=result.steps, probes=result.probes, seed=result.seed,
        hvps=result.hvps, seconds=result.seconds, nodes=[t.tolist() for t in result.nodes],
        weights=[w.tolist() for w in result.weights], lambda_min=result.lambda_min, lambda_max=result.lambda_max,
        trace_estimate=result.size * result.moment(1))}
