"""Run the requested probes on a Target and collect typed results (DESIGN §2.3, §4).

This module decides which probes apply and in which order; the mathematics lives in
``sharpness``, ``hutchinson`` and ``stability``, the presentation in ``report``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from curvdiag._version import __version__
from curvdiag.errors import BadInput, CurvdiagError, ProbeFailed
from curvdiag.probes.directional import directional_curvature
from curvdiag.probes.ggn_trace import GGNNotApplicable, ggn_control_variate_trace
from curvdiag.probes.glass import glass_probe
from curvdiag.probes.hutchinson import hutchinson_diag, hutchinson_trace
from curvdiag.loading.target import Target
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.probes.sharpness import SharpnessResult, lambda_max, preconditioned_lambda_max
from curvdiag.probes.names import PROBES
from curvdiag.stability import stability_margin

# Three probes give a noisy s.d. (1.1% rms error at a 1% target on the tanh MLP); ten give 0.7%.
GGN_MIN_SAMPLES = 10
# Reported with lambda_max: the preconditioned sharpness (Adam) and the stability margin.
COMPANIONS = ("preconditioned_lambda_max", "eos")


@dataclass
class ProbeSettings:
    probes: List[str] = field(default_factory=lambda: list(PROBES))
    method: str = "lanczos"
    tol: float = 1e-4
    top_k: int = 1
    samples: Optional[int] = None  # Hutchinson probes; None: diag 100, trace until 1% s.e.
    seed: int = 0
    max_hvps: int = 500
    trace_target_rel_stderr: float = 0.01
    previous: Optional[torch.Tensor] = None  # θ_{t−1}, flat, for directional_curvature
    glass_lambda: float = 1e-3
    glass_samples: int = 10
    density_steps: int = 64  # stochastic Lanczos quadrature: Lanczos steps per probe
    density_probes: int = 2


def parse_probe_names(text: str) -> List[str]:
    """'all' or a comma-separated list of probe names → ordered, validated list."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise BadInput("--probes is empty", hint=f"use all or some of: {', '.join(PROBES)}")
    if "all" in names:
        return list(PROBES)
    wanted = []
    for name in names:
        if name in COMPANIONS:
            name = "lambda_max"
        if name not in PROBES:
            raise BadInput(f"unknown probe {name!r}", hint=f"known probes: all, {', '.join(PROBES + COMPANIONS)}")
        if name not in wanted:
            wanted.append(name)
    return [p for p in PROBES if p in wanted]


@dataclass
class ProbeReport:
    """Everything a report shows; JSON and the terminal table read it and never recompute."""

    recipe: str
    checkpoint: Optional[str]
    step: Optional[int]
    parameters: int
    layers: List[str]
    operator: Dict[str, Any]
    optimizer: Dict[str, Any]
    loss: float
    grad_norm: float
    probes: Dict[str, Dict[str, Any]]
    version: str = __version__

    def to_json(self) -> Dict[str, Any]:
        return {
            "curvdiag_version": self.version,
            "recipe": self.recipe,
            "checkpoint": self.checkpoint,
            "step": self.step,
            "model": {"parameters": self.parameters, "layers": self.layers},
            "operator": self.operator,
            "optimizer": self.optimizer,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "probes": self.probes,
        }


def _sharpness_entry(result: SharpnessResult, op: CurvatureOperator) -> Dict[str, Any]:
    entry = {
        "value": result.value,
        "lambda_min": result.lambda_min,
        "lambda_min_estimate": result.lambda_min_estimate,
        "eigenvalues": result.eigenvalues,
        "residuals": result.residuals,
        "next_ritz_values": result.ritz_values[len(result.eigenvalues):len(result.eigenvalues) + 3],
        "method": result.method,
        "tol": result.tol,
        "hvps": result.hvps,
        "converged": result.converged,
        "seconds": result.seconds,
    }
    if result.eigenvectors is not None:
        top = result.eigenvectors[0].double()
        weight = top.pow(2)
        total = float(weight.sum()) or 1.0
        shares = [{"name": name, "share": float(weight[a:b].sum()) / total} for name, a, b in op.layer_slices()]
        entry["top_eigenvector_layers"] = sorted(shares, key=lambda s: -s["share"])
    return entry


def _flat_preconditioner(target: Target, op: CurvatureOperator) -> Optional[torch.Tensor]:
    diagonal = target.optimizer.preconditioner_diagonal()
    if diagonal is None:
        return None
    return op.flatten([d.to(device=op.device, dtype=op.dtype) for d in diagonal])


def _eos_entry(target: Target, curvature: float, curvature_name: str) -> Dict[str, Any]:
    info = target.optimizer
    beta1 = info.betas[0] if info.betas else 0.9
    margin = stability_margin(info.family, info.lr, curvature, momentum=info.momentum, beta1=beta1)
    return {
        "optimizer": info.family,
        "lr": info.lr,
        "momentum": info.momentum if info.family in ("momentum", "nesterov") else None,
        "beta1": beta1 if info.is_adaptive else None,
        "curvature": curvature_name,
        "curvature_value": curvature,
        "constant": margin.constant,
        "threshold": margin.threshold,
        "stable_lr": margin.stable_lr,
        "ratio": margin.ratio,
        "status": margin.status,
    }


def _eos_skip_reason(target: Target) -> Optional[str]:
    info = target.optimizer
    if info.family is None:
        what = f"optimizer {info.name}" if info.name else "no optimizer"
        return f"{what}: no known stability threshold (pass --optimizer sgd|momentum|nesterov|adam|adamw and --lr)"
    if info.lr is None:
        return "no learning rate known (pass --lr)"
    return None


def run_probes(
    target: Target,
    op: CurvatureOperator,
    settings: ProbeSettings,
    progress: Optional[Callable[[str], Any]] = None,
) -> ProbeReport:
    """Run ``settings.probes`` on ``op``; a probe that fails raises ProbeFailed naming it."""
    announce = progress or (lambda name: None)
    probes: Dict[str, Dict[str, Any]] = {}
    for name in settings.probes:
        announce(name)
        try:
            if name == "lambda_max":
                _run_sharpness(target, op, settings, probes)
            elif name == "hessian_trace":
                _run_trace(op, settings, probes)
            elif name == "hessian_diag":
                _run_diag(op, settings, probes)
            elif name == "spectral_density":
                from curvdiag.probes.spectral_density import spectral_density

                probes["spectral_density"] = spectral_density(op, steps=settings.density_steps, probes=settings.density_probes,
                                                              seed=settings.seed + 4).to_json()
            elif name == "hesscale_diag":
                _run_hesscale(op, probes)
            elif name == "directional_curvature":
                _run_directional(target, op, settings, probes)
            elif name in ("glass", "power_law"):
                if name not in probes:
                    _run_glass(op, settings, probes)
        except ProbeFailed:
            raise
        except CurvdiagError as exc:  # the recipe's code failed while a probe ran
            raise ProbeFailed(name, exc.message, exc.hint) from exc
        except Exception as exc:
            raise ProbeFailed(name, f"{type(exc).__name__}: {exc}", hint="rerun with --debug for the traceback") from exc
    return ProbeReport(
        recipe=target.recipe.name,
        checkpoint=target.checkpoint.path if target.checkpoint else None,
        step=target.checkpoint.step if target.checkpoint else None,
        parameters=op.num_params,
        layers=list(op.names),
        operator={
            "hvp_method": op.hvp_method,
            "fallback": op.fallback,
            "fallback_reason": op.fallback_reason,
            "description": op.describe_method(),
            "finite_difference_step": op.finite_difference.step if op.finite_difference else None,
            "finite_difference_error_estimate": op.finite_difference.relative_error_estimate if op.finite_difference else None,
            "mode": "train" if op.train_mode else "eval",
            # Over all ranks: the recipe's batches (split ones count once), and all samples.
            "batches": target.total_batches if target.total_batches is not None else op.num_batches,
            "samples": op.num_samples,  # over all ranks
            "world_size": op.world_size,
            "sharding": target.sharding,
            "device": str(op.device),
            "dtype": str(op.dtype).replace("torch.", ""),
            "hvps": op.hvp_count,
        },
        optimizer={
            "name": target.optimizer.name,
            "family": target.optimizer.family,
            "lr": target.optimizer.lr,
            "momentum": target.optimizer.momentum,
            "betas": list(target.optimizer.betas) if target.optimizer.betas else None,
            "source": target.optimizer.source,
            "note": target.optimizer.note,
        },
        loss=op.loss(),
        grad_norm=float(op.gradient().norm()),
        probes=probes,
    )


def _run_sharpness(target: Target, op: CurvatureOperator, s: ProbeSettings, probes: Dict[str, Dict[str, Any]]) -> None:
    kwargs = dict(method=s.method, tol=s.tol, top_k=s.top_k, seed=s.seed, max_hvps=s.max_hvps)
    result = lambda_max(op, want_vectors=True, **kwargs)
    probes["lambda_max"] = _sharpness_entry(result, op)
    curvature, curvature_name = result.value, "lambda_max"
    if target.optimizer.is_adaptive:
        diagonal = _flat_preconditioner(target, op)
        if diagonal is None:
            probes["preconditioned_lambda_max"] = {
                "skipped": "Adam-family optimizer without second moments: give a checkpoint with its optimizer state"}
            probes["eos"] = {"skipped": "Adam's threshold applies to the preconditioned sharpness, which needs "
                                        "the optimizer's second moments (exp_avg_sq) from a checkpoint"}
            return
        pre = preconditioned_lambda_max(op, diagonal, want_vectors=True, **kwargs)
        probes["preconditioned_lambda_max"] = _sharpness_entry(pre, op)
        curvature, curvature_name = pre.value, "preconditioned_lambda_max"
    else:
        probes["preconditioned_lambda_max"] = {"skipped": "not an Adam-family optimizer"}
    reason = _eos_skip_reason(target)
    probes["eos"] = {"skipped": reason} if reason else _eos_entry(target, curvature, curvature_name)


def _run_trace(op: CurvatureOperator, s: ProbeSettings, probes: Dict[str, Dict[str, Any]]) -> None:
    """The exact Gauss-Newton control variate where the model is covered (DESIGN §3.3), else
    plain Hutchinson; the entry names the estimator and, for the fallback, why."""
    kwargs = dict(samples=s.samples, target_rel_stderr=s.trace_target_rel_stderr, seed=s.seed + 1)
    fallback_reason = None
    try:
        if op.world_size > 1:
            raise GGNNotApplicable(f"not supported across {op.world_size} processes yet (it evaluates each batch "
                                   "outside the curvature operator, which is what sums over ranks)")
        result = ggn_control_variate_trace(op, min_samples=GGN_MIN_SAMPLES, **kwargs)
    except GGNNotApplicable as exc:
        fallback_reason = f"Gauss-Newton control variate not applicable: {exc}"
        result = hutchinson_trace(op, **kwargs)
    entry = {"value": result.value, "stderr": result.stderr, "samples": result.samples,
             "estimator": result.estimator, "seconds": result.seconds, "hvps": result.samples}
    if fallback_reason:
        entry["estimator_note"] = fallback_reason
    else:
        entry.update(ggn_trace=result.ggn_trace, residual_trace=result.residual_trace, probe_sd=result.probe_sd)
    probes["hessian_trace"] = entry


def _run_diag(op: CurvatureOperator, s: ProbeSettings, probes: Dict[str, Dict[str, Any]]) -> None:
    started = time.perf_counter()
    result = hutchinson_diag(op, samples=s.samples or 100, seed=s.seed + 2, segments=op.layer_slices())
    layers = []
    for (name, a, b), mean, se in zip(op.layer_slices(), result.segment_means, result.segment_stderr):
        piece = result.diagonal[a:b]
        layers.append({"name": name, "mean": mean, "stderr": se, "min": float(piece.min()), "max": float(piece.max()),
                       "sum": float(piece.double().sum())})
    probes["hessian_diag"] = {"samples": result.samples, "estimator": "hutchinson (Rademacher)",
                              "trace": result.trace.value, "trace_stderr": result.trace.stderr,
                              "seconds": time.perf_counter() - started, "layers": layers}


def _run_hesscale(op: CurvatureOperator, probes: Dict[str, Dict[str, Any]]) -> None:
    """HesScale's diagonal (DESIGN §3.10) where the model is a covered Sequential; otherwise the
    entry says why it does not apply, never a wrong number."""
    from curvdiag.probes.hesscale import HesScaleNotApplicable, hesscale_diag

    if op.world_size > 1:
        probes["hesscale_diag"] = {"skipped": f"HesScale is not supported across {op.world_size} processes yet "
                                              "(its recursion evaluates each batch outside the curvature operator, "
                                              "which is what sums over ranks): run it in one process"}
        return
    try:
        result = hesscale_diag(op)
    except HesScaleNotApplicable as exc:
        probes["hesscale_diag"] = {"skipped": str(exc)}
        return
    layers = []
    for name, a, b in op.layer_slices():
        piece = result.diagonal[a:b].double()
        layers.append({"name": name, "mean": float(piece.mean()), "min": float(piece.min()), "max": float(piece.max()),
                       "exact": name in result.exact_parameters})
    probes["hesscale_diag"] = {"seconds": result.seconds, "exact_parameters": list(result.exact_parameters),
                               "layers": layers}


def _run_directional(target: Target, op: CurvatureOperator, s: ProbeSettings, probes: Dict[str, Dict[str, Any]]) -> None:
    from curvdiag.probes.simulated_step import simulate_step

    theta, grad = op.parameters_vector(), op.gradient()
    if s.previous is not None:
        _, grad_prev = op.gradient_at(s.previous)
        result = directional_curvature(s.previous, theta, grad_prev, grad, op.layer_slices())
        source = "previous checkpoint (--previous)"
    else:
        theta_next, source = simulate_step(target, op)
        if theta_next is None:
            probes["directional_curvature"] = {"skipped": source}
            return
        _, grad_next = op.gradient_at(theta_next)
        result = directional_curvature(theta, theta_next, grad, grad_next, op.layer_slices())
    probes["directional_curvature"] = {
        "value": result.value, "rayleigh": result.rayleigh, "step_norm": result.step_norm,
        "gradient_change_norm": result.gradient_change_norm, "source": source,
        "layers": [{"name": l.name, "value": l.value, "rayleigh": l.rayleigh, "step_norm": l.step_norm}
                   for l in result.layers],
    }


def _run_glass(op: CurvatureOperator, s: ProbeSettings, probes: Dict[str, Dict[str, Any]]) -> None:
    want_power = "power_law" in s.probes
    glass, power = glass_probe(op, lam=s.glass_lambda, samples=s.glass_samples, seed=s.seed + 3, power_law=want_power)
    if "glass" in s.probes:
        probes["glass"] = {
            "lambda": glass.lam, "samples": glass.samples, "rho": glass.rho, "h": glass.h,
            "constant": 2.0, "gradients": glass.gradients, "seconds": glass.seconds,
            "layers": [{"name": l.name, "rho": l.rho, "rho_stderr": l.rho_stderr, "h": l.h, "h_stderr": l.h_stderr,
                        "h_abs": l.h_abs} for l in glass.layers],
        }
    if power is not None:
        probes["power_law"] = {
            "lambda": power.lam, "samples": power.samples, "p": power.p, "p_stderr": power.p_stderr,
            "layers": [{"name": l.name, "p": l.p, "p_stderr": l.p_stderr} for l in power.layers],
        }
