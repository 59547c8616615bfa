"""Figures of a probe report (``curvdiag probe --json``, DESIGN §2.3): pure functions from the
typed :class:`~curvdiag.results.probe_results.ProbeReport` to matplotlib Figures. They read the
entries and never recompute a probe (the spectral density entry carries its smoothed curve).
A figure whose entry is absent or skipped raises :class:`NotPlottable` saying so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from matplotlib.figure import Figure

from curvdiag.plots.canvas import (CURVATURE_UNITS, LAMBDA_LABEL, PRECONDITIONED_UNITS, T_DEFINITION, THRESHOLD_COLOUR,
                                   FigureSet, NotPlottable, constant_text, draw_all, footnote, log_if_positive,
                                   new_figure, recipe_stem)
from curvdiag.report.verdict import probe_verdict
from curvdiag.results import probe_results as entries
from curvdiag.results.json_safe import finite
from curvdiag.results.probe_results import ProbeReport, Skipped

E = TypeVar("E")


def report_title(report: ProbeReport) -> str:
    what = Path(str(report.checkpoint)).name if report.checkpoint else "initialisation (no checkpoint)"
    if report.step is not None:
        what += f" (step {report.step})"
    return f"{what} · {recipe_stem(report.recipe)}"


def probe_entry(report: ProbeReport, name: str, kind: Type[E], need_layers: bool = True) -> E:
    """The report's entry for ``name``, or :class:`NotPlottable` saying why there is none."""
    found = report.probes.get(name)
    if found is None:
        raise NotPlottable(f"{name} not in the report (probe not run: add it to --probes)")
    if isinstance(found, Skipped):
        raise NotPlottable(f"{name} was skipped by the probe: {found.reason}")
    if need_layers and not found.layers:
        raise NotPlottable(f"{name} has no 'layers' in the report")
    return found


def _optional_entry(report: ProbeReport, name: str, kind: Type[E], need_layers: bool = True) -> Optional[E]:
    try:
        return probe_entry(report, name, kind, need_layers)
    except NotPlottable:
        return None


def _layer_axis(ax, names: Sequence[str]) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center",
                       fontsize=8)
    ax.set_xlabel("layer (parameter tensor)")
    ax.set_xlim(-0.6, len(names) - 0.4)


def _layer_names(*found) -> List[str]:
    names: List[str] = []
    for one in found:
        for layer in getattr(one, "layers", None) or []:
            if layer.name not in names:
                names.append(layer.name)
    return names


def _diag_scale(ax, values: List[float]) -> str:
    """Log when every value is positive; else symlog, linear within one decade below the
    smallest magnitude, so every mean sits in the log part. Returns the scale's name."""
    if values and min(values) > 0:
        ax.set_yscale("log")
        return "log"
    if values:
        nonzero = sorted(abs(v) for v in values if v != 0)
        linthresh = 10.0 ** math.floor(math.log10(nonzero[0])) if nonzero else 1.0
        ax.set_yscale("symlog", linthresh=linthresh, linscale=0.8)
        ax.axhline(0.0, color="0.4", linewidth=0.8)
        return "symlog"
    return "linear"


def hessian_diag_figure(report: ProbeReport, title: str) -> Figure:
    """Per-layer Hessian diagonal: the mean entry ± its standard error over the probes
    (Hutchinson, DESIGN §3.3), and HesScale's mean (§3.10, deterministic) beside it. Not the
    min–max of the entries: for Hutchinson that range is mostly the estimator's noise (each
    entry is one noisy product), and it dwarfs the means the figure is about."""
    hutchinson = _optional_entry(report, "hessian_diag", entries.HessianDiag)
    hesscale = _optional_entry(report, "hesscale_diag", entries.HesScaleDiag)
    if hutchinson is None and hesscale is None:
        reasons = []
        for name, kind in (("hessian_diag", entries.HessianDiag), ("hesscale_diag", entries.HesScaleDiag)):
            try:
                probe_entry(report, name, kind)
            except NotPlottable as exc:
                reasons.append(str(exc))
        raise NotPlottable("; ".join(reasons))
    names = _layer_names(hutchinson, hesscale)
    series = [(e, label, colour, offset) for e, label, colour, offset in (
        (hutchinson, "Hutchinson (Rademacher)", "#1f77b4", -0.15 if hesscale else 0.0),
        (hesscale, "HesScale", "#ff7f0e", 0.15 if hutchinson else 0.0)) if e is not None]
    fig, (ax,) = new_figure(title)
    values = []
    for found, label, colour, offset in series:
        by_name = {layer.name: layer for layer in found.layers}
        xs, means, errors = [], [], []
        for i, name in enumerate(names):
            layer = by_name.get(name)
            mean = finite(layer.mean) if layer else None
            if mean is None:
                continue
            xs.append(i + offset)
            means.append(mean)
            errors.append(finite(getattr(layer, "stderr", None)) or 0.0)
        values += means + [m - e for m, e in zip(means, errors)] + [m + e for m, e in zip(means, errors)]
        samples = getattr(found, "samples", None)
        what = (f"mean ± s.e. ({samples} samples)" if samples else "mean ± s.e.") if hasattr(found, "samples") \
            else "mean (deterministic)"
        ax.errorbar(xs, means, yerr=errors if any(errors) else None, fmt="o", color=colour, capsize=4, markersize=6,
                    label=f"{label}: {what}")
    _layer_axis(ax, names)
    scale = _diag_scale(ax, values)
    ax.margins(y=0.08)  # the outermost error bars inside the frame
    ax.set_title("Hessian diagonal per layer: mean entry of diag H", fontsize=10)
    ax.set_ylabel(f"mean diag H entry ({CURVATURE_UNITS}; {scale} scale)")
    ax.legend(loc="best", fontsize=8)
    return fig


def power_law_figure(report: ProbeReport, title: str) -> Figure:
    """Per-layer power-law exponent p (DESIGN §3.6) with the p = 2 reference of a smooth,
    Hessian-dominated layer; p < 2 means gradient discontinuities (glass)."""
    found = probe_entry(report, "power_law", entries.PowerLaw)
    layers = [l for l in found.layers if finite(l.p) is not None]
    if not layers:
        raise NotPlottable("power_law has no finite per-layer p")
    fig, (ax,) = new_figure(title)
    ps = [l.p for l in layers]
    errors = [finite(l.p_stderr) or 0.0 for l in layers]
    ax.errorbar(range(len(ps)), ps, yerr=errors, fmt="o", color="#1f77b4", capsize=4, markersize=7,
                label=f"p per layer ± s.e. ({found.samples} samples)")
    ax.axhline(2.0, color="#2ca02c", linestyle="--", linewidth=1.3, label="p = 2: smooth (Hessian-dominated)")
    if finite(found.p) is not None:
        ax.axhline(found.p, color="0.4", linestyle=":", linewidth=1.0, label=f"all layers: p = {found.p:.3f}")
    # At least [1, 2.25]: the smooth value and the glassy range (ReLU layers reach p ≈ 1–1.5,
    # seed 004 Fig. 1) are always on the axis, so "all smooth" reads as such.
    spread = max(errors + [0.0])
    bottom = min(1.0, min(ps) - spread - 0.1)
    top = max(2.25, max(ps) + spread + 0.1)
    ax.set_ylim(bottom, top)
    ax.axhspan(bottom, 1.9, color="#ff7f0e", alpha=0.08, label="p < 1.9: gradient glass (non-smooth)")
    _layer_axis(ax, [l.name for l in layers])
    ax.set_title(f"power-law exponent p at λ = {found.lam} and 2λ", fontsize=10)
    ax.set_ylabel("exponent p (dimensionless)")
    ax.legend(loc="best", fontsize=8)
    return fig


def glass_figure(report: ProbeReport, title: str) -> Figure:
    """Per-layer glass density ρ = 2 E[γ²]/λ (DESIGN §3.5) ± its standard error."""
    found = probe_entry(report, "glass", entries.Glass)
    layers = [l for l in found.layers if finite(l.rho) is not None]
    if not layers:
        raise NotPlottable("glass has no finite per-layer ρ")
    fig, (ax,) = new_figure(title)
    rhos = [l.rho for l in layers]
    errors = [finite(l.rho_stderr) or 0.0 for l in layers]
    # Points, not bars: a bar's length means nothing on the log axis that spans the layers' ρ.
    ax.errorbar(range(len(rhos)), rhos, yerr=errors, fmt="o", color="#9467bd", capsize=4, markersize=7,
                label=f"ρ per layer ± s.e. ({found.samples} samples)")
    if finite(found.rho) is not None:
        ax.axhline(found.rho, color="0.3", linestyle=":", linewidth=1.0, label=f"all layers: ρ = {found.rho:.3g}")
    # Log only when every error bar stays above 0 (a bar through 0 cannot be drawn on it).
    log_if_positive(ax, [r - e for r, e in zip(rhos, errors)] + [r + e for r, e in zip(rhos, errors)])
    _layer_axis(ax, [l.name for l in layers])
    ax.set_title(f"glass density per layer (λ = {found.lam}; 0 for a pure quadratic)", fontsize=10)
    ax.set_ylabel("glass density ρ (per entry)")
    ax.legend(loc="best", fontsize=8)
    return fig


def _eigen_series(found: entries.LambdaMax) -> Tuple[List[float], List[float]]:
    converged = [v for v in map(finite, found.eigenvalues) if v is not None]
    if not converged and finite(found.value) is not None:
        converged = [found.value]
    following = [v for v in map(finite, found.next_ritz_values) if v is not None]
    return converged, following


def _threshold_name(eos: entries.EdgeOfStability) -> str:
    return f"{constant_text(eos.constant)}/η" if finite(eos.constant) is not None else "T/η"


OPTIMIZER_NAMES = {"sgd": "gradient descent", "momentum": "heavy-ball momentum", "nesterov": "Nesterov momentum",
                   "adam": "Adam", "adamw": "AdamW"}


def threshold_note(eos: entries.EdgeOfStability, preconditioned: bool) -> str:
    """T defined, and which T this report's optimizer has."""
    which = OPTIMIZER_NAMES.get(eos.optimizer, eos.optimizer)
    if eos.momentum is not None:
        which += f", β = {eos.momentum:g}"
    if eos.beta1 is not None:
        which += f", β1 = {eos.beta1:g}"
    note = f"{T_DEFINITION}; here T = {constant_text(eos.constant)} ({which})"
    if preconditioned:
        note += f", on the preconditioned curvature λ(P^-1/2 H P^-1/2), in {PRECONDITIONED_UNITS}"
    return note + "."


def eigenvalues_figure(report: ProbeReport, title: str) -> Figure:
    """The top eigenvalues (converged, then the next unconverged Ritz values) against the
    stability threshold ``eos.threshold`` = T/η; with Adam the threshold applies to the
    preconditioned sharpness, which is then drawn too."""
    plain = probe_entry(report, "lambda_max", entries.LambdaMax, need_layers=False)
    pre = _optional_entry(report, "preconditioned_lambda_max", entries.LambdaMax, need_layers=False)
    verdict = probe_verdict(report)
    series = [("Hessian H", plain, "#1f77b4", -0.08 if pre else 0.0)]
    if pre is not None:
        series.append(("preconditioned P^-1/2 H P^-1/2", pre, "#ff7f0e", 0.08))
    if not any(_eigen_series(e)[0] for _, e, _, _ in series):
        raise NotPlottable("lambda_max has no finite eigenvalue")
    fig, (ax,) = new_figure(title)
    count, status = 1, ""
    for label, found, colour, offset in series:
        converged, following = _eigen_series(found)
        ranks = list(range(1, len(converged) + 1))
        ax.plot([r + offset for r in ranks], converged, "o", color=colour, markersize=8,
                label=f"{label}: converged ({found.method}, {found.hvps} HVPs)")
        if following:
            nxt = list(range(len(converged) + 1, len(converged) + 1 + len(following)))
            ax.plot([r + offset for r in nxt], following, "o", mfc="none", color=colour, markersize=8,
                    label=f"{label}: next Ritz values (not converged)")
        count = max(count, len(converged) + len(following))
        if finite(found.lambda_min) is not None:
            ax.axhline(found.lambda_min, color=colour, linestyle=":", linewidth=1.0,
                       label=f"{label}: λmin = {found.lambda_min:.3g}")
    eos = verdict.eos
    if eos is not None and finite(eos.threshold) is not None:
        applies = "preconditioned sharpness" if verdict.preconditioned else "λmax"
        ax.axhline(eos.threshold, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.3,
                   label=f"stability threshold {_threshold_name(eos)} = {eos.threshold:.3g} (on the {applies})")
        ratio = finite(eos.ratio)
        status = f" — {eos.status}: η·curvature / T = {ratio:.3f}" if ratio is not None else f" — {eos.status}"
        footnote(ax, threshold_note(eos, verdict.preconditioned))
    else:
        skipped = report.probes.get("eos")
        reason = skipped.reason if isinstance(skipped, Skipped) else "eos not in the report"
        ax.text(0.01, 0.03, f"no stability threshold: {reason}", transform=ax.transAxes, fontsize=8, color="0.3",
                wrap=True)
    ax.set_xticks(range(1, count + 1))
    ax.set_xlim(0.5, count + 0.5)
    ax.set_xlabel("eigenvalue rank (1 = largest)")
    ax.set_ylabel(LAMBDA_LABEL if pre is None else f"eigenvalue λ (H: {CURVATURE_UNITS}; preconditioned: "
                  f"{PRECONDITIONED_UNITS})")
    ax.set_title("top eigenvalues of the curvature" + status, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    return fig


def spectral_density_figure(report: ProbeReport, title: str) -> Figure:
    """The smoothed spectral density (SLQ) on a log scale, the quadrature nodes as a rug, and
    the stability threshold when it applies to H (not to Adam's preconditioned matrix)."""
    found = probe_entry(report, "spectral_density", entries.SpectralDensity, need_layers=False)
    if not found.grid:
        raise NotPlottable("spectral_density has neither a grid/density nor quadrature nodes")
    pairs = [(x, y) for x, y in zip(found.grid, found.density) if finite(x) is not None and finite(y) is not None]
    if not pairs:
        raise NotPlottable("spectral_density has no finite density values")
    xs, ys = zip(*pairs)
    peak = max(ys)
    floor = peak * 1e-7 if peak > 0 else 1e-12
    fig, (ax,) = new_figure(title)
    sigma = finite(found.sigma)
    ax.plot(xs, [max(y, floor) for y in ys], color="#1f77b4", linewidth=1.3,
            label=f"density (Gaussian σ = {sigma:.2g})" if sigma is not None else "density")
    ax.set_yscale("log")
    ax.set_ylim(floor, peak * 3 if peak > 0 else 1.0)
    nodes = [v for probe in found.nodes for v in probe if finite(v) is not None]
    if nodes:
        ax.plot(nodes, [floor * 1.6] * len(nodes), "|", color="0.25", markersize=10,
                label=f"quadrature nodes ({found.probes} probes × {found.steps} steps)")
    verdict = probe_verdict(report)
    eos = verdict.eos
    if eos is not None and finite(eos.threshold) is not None and not verdict.preconditioned:
        ax.axvline(eos.threshold, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.3,
                   label=f"stability threshold {_threshold_name(eos)} = {eos.threshold:.3g}")
        footnote(ax, threshold_note(eos, False))
    ax.set_xlabel(f"eigenvalue λ of H ({CURVATURE_UNITS})")
    ax.set_ylabel("spectral density (log scale)")
    ax.set_title(f"Hessian spectral density (stochastic Lanczos quadrature, {found.hvps} HVPs)", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    return fig


REPORT_FIGURES: Dict[str, Tuple[Callable[[ProbeReport, str], Figure], str]] = {
    "eigenvalues": (eigenvalues_figure, "Top eigenvalues against the stability threshold."),
    "spectral_density": (spectral_density_figure, "Spectral density of the Hessian (stochastic Lanczos quadrature)."),
    "hessian_diag": (hessian_diag_figure, "Per-layer Hessian diagonal: the mean entry ± its standard error."),
    "power_law": (power_law_figure, "Per-layer power-law exponent p; p = 2 is smooth."),
    "glass": (glass_figure, "Per-layer glass density ρ."),
}


def report_figures(report: ProbeReport, title: str) -> FigureSet:
    """Every report figure that the report supports; the others in ``skipped`` with the reason."""
    return draw_all(REPORT_FIGURES, report, title)
