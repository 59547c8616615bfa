"""Figures for a training run or a probe report: pure functions from logs and results to
matplotlib Figures (STYLE habit 6). Nothing here saves, shows or recomputes a probe; the CLI
(``curvdiag plot``) and the HTML report (:mod:`curvdiag.plots.html`) save what these return.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never pyplot,
so no GUI backend is touched, no global figure registry grows, and a caller's backend is left
alone. Saving picks a renderer by format (Agg for PNG).

Inputs (DESIGN §2.3, §2.4):

- a run directory (``metrics.jsonl`` + ``run.json``) or a ``--compare`` directory whose
  subdirectories are run directories (overlaid, one colour per run, ``baseline`` first):
  :func:`loss_figure`, :func:`learning_rate_figure`, :func:`sharpness_figure`,
  :func:`directional_curvature_figure`;
- a probe report JSON (``curvdiag probe --json``): :func:`hessian_diag_figure`,
  :func:`power_law_figure`, :func:`glass_figure`, :func:`eigenvalues_figure`,
  :func:`spectral_density_figure`.

A figure whose data is absent raises :class:`NotPlottable` with the reason;
:func:`run_figures` and :func:`report_figures` collect the figures that can be drawn and the
reasons for the others in a :class:`FigureSet`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from matplotlib.figure import Figure

from curvdiag.errors import BadInput

LAMBDA_LABEL = "λ (curvature, 1/lr units)"
BASELINE_COLOUR = "#3a3a3a"
RUN_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
THRESHOLD_COLOUR = "#d62728"
MARKERS_BELOW = 40  # draw point markers when a series has at most this many points
# Runs in a --compare directory, in this order first (the rest alphabetically).
COMPARE_ORDER = ("baseline", "none", "throttle", "newton", "clip")


class NotPlottable(Exception):
    """This figure cannot be drawn from this input; ``str(exc)`` says why."""


# ---------------------------------------------------------------------------------- inputs
@dataclass
class RunLog:
    """One run directory: its summary (``run.json``) and per-step records (``metrics.jsonl``)."""

    name: str
    path: Path
    summary: Dict[str, Any]
    records: List[Dict[str, Any]]
    unreadable_lines: int = 0  # e.g. a line cut short by a kill; skipped

    @property
    def diverged(self) -> bool:
        return bool(self.summary.get("diverged")) or any(r.get("diverged") for r in self.records)

    @property
    def diverged_at(self) -> Optional[int]:
        for record in self.records:
            if record.get("diverged"):
                return _as_int(record.get("step"))
        return _as_int(self.summary.get("steps_completed")) if self.summary.get("diverged") else None

    def series(self, key: str, include_diverged: bool = False) -> Tuple[List[float], List[float]]:
        """(steps, values) of the records where ``key`` is a finite number."""
        steps, values = [], []
        for record in self.records:
            if record.get("diverged") and not include_diverged:
                continue
            step, value = _finite(record.get("step")), _finite(record.get(key))
            if step is not None and value is not None:
                steps.append(step)
                values.append(value)
        return steps, values


@dataclass
class PlotSource:
    """What ``curvdiag plot`` / ``report`` was pointed at: runs or a probe report."""

    kind: str  # "runs" | "report"
    path: Path
    title: str
    runs: List[RunLog] = field(default_factory=list)
    report: Optional[Dict[str, Any]] = None


@dataclass
class FigureSet:
    """Figures in display order (keys are file stems), their captions, and what was skipped."""

    title: str
    figures: Dict[str, Figure] = field(default_factory=dict)
    captions: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _as_int(value: Any) -> Optional[int]:
    value = _finite(value)
    return int(value) if value is not None else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})",
                       hint="give a run directory or a report written by curvdiag probe --json") from exc


def read_run(path: Path, name: Optional[str] = None) -> RunLog:
    """A run directory → :class:`RunLog`. Malformed lines of metrics.jsonl are skipped and counted."""
    path = Path(path)
    summary = _read_json(path / "run.json")
    if not isinstance(summary, dict):
        raise BadInput(f"{path / 'run.json'}: not a curvdiag run summary (expected a JSON object)")
    records: List[Dict[str, Any]] = []
    unreadable = 0
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        try:
            lines = metrics.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"{metrics}: cannot read ({exc})") from exc
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                unreadable += 1
    return RunLog(name=name or path.name, path=path, summary=summary, records=records, unreadable_lines=unreadable)


def _compare_key(run: RunLog) -> Tuple[int, str]:
    order = COMPARE_ORDER.index(run.name) if run.name in COMPARE_ORDER else len(COMPARE_ORDER)
    return order, run.name


def read_runs(path: Path) -> List[RunLog]:
    """A run directory → one run; a ``--compare`` directory → its runs, baseline first."""
    path = Path(path)
    if (path / "run.json").is_file():
        return [read_run(path)]
    children = sorted(p for p in path.iterdir() if p.is_dir() and (p / "run.json").is_file()) if path.is_dir() else []
    if not children:
        raise BadInput(f"{path}: not a curvdiag run directory (no run.json here or in its subdirectories)",
                       hint="give the --out directory of curvdiag train, or a report written by curvdiag probe --json")
    return sorted((read_run(child) for child in children), key=_compare_key)


def _recipe_name(recipe: Any) -> str:
    return Path(str(recipe)).stem if recipe else "?"


def run_title(runs: Sequence[RunLog], path: Path) -> str:
    recipe = _recipe_name(runs[0].summary.get("recipe")) if runs else "?"
    checkpoint = runs[0].summary.get("checkpoint") if runs else None
    start = f" from {Path(str(checkpoint)).name}" if checkpoint else ""
    if len(runs) == 1:
        return f"{recipe}{start} · run {path.name} ({runs[0].summary.get('controller', '?')})"
    return f"{recipe}{start} · compare {path.name}: {', '.join(r.name for r in runs)}"


def report_title(report: Dict[str, Any]) -> str:
    checkpoint = report.get("checkpoint")
    step = report.get("step")
    what = Path(str(checkpoint)).name if checkpoint else "initialisation (no checkpoint)"
    if step is not None:
        what += f" (step {step})"
    return f"{what} · {_recipe_name(report.get('recipe'))}"


def load_source(path: Any) -> PlotSource:
    """A run directory, a ``--compare`` directory, a run's ``run.json``/``metrics.jsonl`` or a
    probe report JSON → :class:`PlotSource`. Anything else is :class:`BadInput`."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    if path.is_file() and path.name in ("run.json", "metrics.jsonl"):
        path = path.parent
    if path.is_dir():
        runs = read_runs(path)
        return PlotSource("runs", path, run_title(runs, path), runs=runs)
    document = _read_json(path)
    if not isinstance(document, dict) or not isinstance(document.get("probes"), dict):
        raise BadInput(f"{path}: not a curvdiag probe report (no \"probes\" object)",
                       hint="give a report written by curvdiag probe --json, or a run directory")
    return PlotSource("report", path, report_title(document), report=document)


# --------------------------------------------------------------------------------- helpers
def _colours(runs: Sequence[RunLog]) -> List[str]:
    colours, k = [], 0
    for run in runs:
        if run.name in ("baseline", "none"):
            colours.append(BASELINE_COLOUR)
        else:
            colours.append(RUN_COLOURS[k % len(RUN_COLOURS)])
            k += 1
    return colours


def _new_figure(title: str, rows: int = 1, height: float = 4.8, sharex: bool = True):
    fig = Figure(figsize=(8.0, height), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=sharex, squeeze=False)[:, 0]
    fig.suptitle(title, fontsize=11)
    for ax in axes:
        ax.grid(True, alpha=0.3, which="major")
    return fig, list(axes)


def _marker(count: int) -> Optional[str]:
    return "o" if count <= MARKERS_BELOW else None


def _style(run: RunLog, colour: str, count: int, marker: Optional[str] = None) -> Dict[str, Any]:
    """Line style of a run's series. The baseline is drawn wide, pale and underneath, so a
    controller that never intervened (its line identical to the baseline's) stays visible."""
    style: Dict[str, Any] = dict(color=colour, marker=marker or _marker(count), markersize=3)
    if run.name in ("baseline", "none"):
        style.update(linewidth=3.2, alpha=0.45, zorder=1.5)
    else:
        style.update(linewidth=1.4, zorder=2.5)
    return style


def _run_label(run: RunLog) -> str:
    label = run.name
    if run.diverged:
        at = run.diverged_at
        label += f" (diverged at step {at})" if at is not None else " (diverged)"
    elif run.summary.get("interrupted"):
        label += " (interrupted)"
    return label


def _stability_constant(run: RunLog) -> Optional[float]:
    """T from a record that holds both the threshold T/η and its η (DESIGN §3.7)."""
    for record in run.records:
        threshold, lr = _finite(record.get("threshold")), _finite(record.get("lr"))
        if threshold is not None and lr is not None and threshold > 0:
            return threshold * lr
    return None


def _constant_text(constant: float) -> str:
    return f"{constant:.3g}"


def _draw_run_thresholds(ax, runs: Sequence[RunLog], colours: Sequence[str]) -> List[str]:
    """Draw T/η_t for every run that logged a threshold; returns notes to write on the axes.

    When every run has the same T and one constant η, that is one horizontal line labelled
    like "2/η = 6.67"; otherwise each run gets its own dashed T/η_t curve in its colour."""
    per_run = []
    for run, colour in zip(runs, colours):
        constant = _stability_constant(run)
        if constant is None:
            continue
        steps, lrs = run.series("lr")
        points = [(s, constant / lr) for s, lr in zip(steps, lrs) if lr > 0]
        if points:
            per_run.append((run, colour, constant, points))
    if not per_run:
        return ["no stability threshold in the log (optimizer without a known constant, or λmax never measured)"]
    # Runs at one constant η share a horizontal line; the others get their own T/η_t curve.
    constant_lines: Dict[Tuple[float, float], List[str]] = {}
    for run, colour, constant, points in per_run:
        values = {round(t, 12) for _, t in points}
        if len(values) == 1:
            constant_lines.setdefault((points[0][1], constant), []).append(run.name)
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, color=colour, linestyle="--", linewidth=1.0, alpha=0.8, drawstyle="steps-post",
                label=f"{run.name}: threshold {_constant_text(constant)}/η_t")
    for (value, constant), names in constant_lines.items():
        which = f" ({', '.join(names)})" if len(runs) > 1 else ""
        ax.axhline(value, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.3,
                   label=f"stability threshold {_constant_text(constant)}/η = {value:.3g}{which}")
    return []


def _mark_divergence(ax, run: RunLog, colour: str) -> None:
    at = run.diverged_at
    if at is not None:
        ax.axvline(at, color=colour, linestyle=":", linewidth=1.2, alpha=0.9)


def _log_if_positive(ax, values: Iterable[float], min_ratio: float = 1.0) -> bool:
    values = list(values)
    if values and min(values) > 0 and max(values) / min(values) >= min_ratio:
        ax.set_yscale("log")
        return True
    return False


# ----------------------------------------------------------------------------- run figures
def loss_figure(runs: Sequence[RunLog], title: str) -> Figure:
    """Training loss against step, one line per run; log y when every loss is positive.

    A run that diverged ends in a dotted vertical line at the step of divergence and, when the
    exploding loss was still finite, a cross at that value."""
    if not any(run.series("loss")[0] for run in runs):
        raise NotPlottable("no finite loss in metrics.jsonl")
    fig, (ax,) = _new_figure(title)
    everything = []
    for run, colour in zip(runs, _colours(runs)):
        steps, losses = run.series("loss")
        everything += losses
        ax.plot(steps, losses, label=_run_label(run), **_style(run, colour, len(steps)))
        if run.diverged:
            _mark_divergence(ax, run, colour)
            for record in run.records:
                value, step = _finite(record.get("loss")), _finite(record.get("step"))
                if record.get("diverged") and value is not None and step is not None:
                    ax.plot([step], [value], linestyle="none", marker="X", markersize=9, color=colour)
                    everything.append(value)
    log = _log_if_positive(ax, everything)
    ax.set_title("training loss" + (" (log scale)" if log else ""), fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="best", fontsize=8)
    return fig


def learning_rate_figure(runs: Sequence[RunLog], title: str) -> Figure:
    """The learning rate in use (and the scheduled base rate when it differs) and the
    controller's factor η/η_base (the throttle s_t; 1 when nothing scales the rate)."""
    if not any(run.series("lr")[0] for run in runs):
        raise NotPlottable("no learning rate in metrics.jsonl")
    fig, (top, bottom) = _new_figure(title, rows=2, height=6.0)
    rates = []
    for run, colour in zip(runs, _colours(runs)):
        steps, lrs = run.series("lr")
        rates += lrs
        top.plot(steps, lrs, label=_run_label(run), **_style(run, colour, len(steps)))
        base_steps, base = run.series("base_lr")
        if base and any(abs(b - l) > 1e-12 * max(abs(b), 1e-30) for b, l in zip(base, lrs)):
            top.plot(base_steps, base, color=colour, linestyle=":", linewidth=1.0, label=f"{run.name}: base (scheduled) η")
        factor_steps, factors = run.series("throttle")
        bottom.plot(factor_steps, factors, label=run.name, **_style(run, colour, len(factor_steps)))
        if run.diverged:
            _mark_divergence(top, run, colour)
            _mark_divergence(bottom, run, colour)
    _log_if_positive(top, rates, min_ratio=20.0)
    top.set_title("learning rate in use", fontsize=10)
    top.set_ylabel("learning rate η")
    top.legend(loc="best", fontsize=8)
    bottom.axhline(1.0, color="0.5", linewidth=0.8, linestyle="--", label="factor 1 (unthrottled)")
    bottom.set_title("controller factor on the learning rate (throttle s_t)", fontsize=10)
    bottom.set_ylabel("η / η_base")
    bottom.set_xlabel("step")
    bottom.legend(loc="best", fontsize=8)
    return fig


def sharpness_figure(runs: Sequence[RunLog], title: str) -> Figure:
    """λmax at the steps where it was measured against the stability threshold T/η — the
    edge-of-stability figure: under GD λmax rises to ≈ 2/η and hovers (DESIGN §3.1, §3.7)."""
    if not any(run.series("lambda_max")[0] for run in runs):
        raise NotPlottable("no λmax in metrics.jsonl (train with --sharpness-every K to measure it)")
    fig, (ax,) = _new_figure(title)
    colours = _colours(runs)
    for run, colour in zip(runs, colours):
        steps, values = run.series("lambda_max")
        if steps:
            ax.plot(steps, values, label=f"{_run_label(run)}: λmax", **_style(run, colour, len(steps), marker="o"))
        if run.diverged:
            _mark_divergence(ax, run, colour)
    notes = _draw_run_thresholds(ax, runs, colours)
    for note in notes:
        ax.text(0.01, 0.02, note, transform=ax.transAxes, fontsize=8, color="0.3")
    ax.set_title("sharpness λmax against the stability threshold T/η "
                 "(preconditioned for Adam-family optimizers)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(LAMBDA_LABEL)
    # From 0 (the classic edge-of-stability picture: λmax rising towards T/η) with headroom
    # above the highest curve, so a λmax hovering at the threshold is not drawn on the frame.
    drawn = [float(y) for line in ax.get_lines() for y in line.get_ydata() if _finite(float(y)) is not None]
    if drawn and min(drawn) >= 0 and max(drawn) > 0:
        ax.set_ylim(0, 1.15 * max(drawn))
    ax.legend(loc="best", fontsize=8)
    return fig


def directional_curvature_figure(runs: Sequence[RunLog], title: str) -> Figure:
    """C_t = ‖ΔG‖/‖Δθ‖ along each step (DESIGN §3.4) with the stability threshold T/η."""
    if not any(run.series("directional_curvature")[0] for run in runs):
        raise NotPlottable("no directional curvature C_t in metrics.jsonl")
    fig, (ax,) = _new_figure(title)
    colours = _colours(runs)
    values_all = []
    for run, colour in zip(runs, colours):
        steps, values = run.series("directional_curvature")
        values_all += values
        ax.plot(steps, values, label=f"{_run_label(run)}: C_t", **_style(run, colour, len(steps)))
        if run.diverged:
            _mark_divergence(ax, run, colour)
    _draw_run_thresholds(ax, runs, colours)
    log = _log_if_positive(ax, values_all, min_ratio=50.0)
    ax.set_title("directional curvature C_t = ‖G_t − G_{t−1}‖ / ‖θ_t − θ_{t−1}‖" + (" (log scale)" if log else ""),
                 fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(LAMBDA_LABEL)
    ax.legend(loc="best", fontsize=8)
    return fig


RUN_FIGURES: Dict[str, Tuple[Callable[[Sequence[RunLog], str], Figure], str]] = {
    "loss": (loss_figure, "Training loss per step."),
    "learning_rate": (learning_rate_figure, "Learning rate in use and the controller's factor on it."),
    "sharpness": (sharpness_figure, "λmax where measured, against the stability threshold T/η."),
    "directional_curvature": (directional_curvature_figure, "Directional curvature C_t along each step."),
}


def run_figures(runs: Sequence[RunLog], title: str) -> FigureSet:
    """Every run figure that the logs support; the others in ``skipped`` with the reason."""
    result = FigureSet(title=title)
    for name, (make, caption) in RUN_FIGURES.items():
        try:
            result.figures[name] = make(runs, title)
            result.captions[name] = caption
        except NotPlottable as exc:
            result.skipped[name] = str(exc)
    return result


# -------------------------------------------------------------------------- report figures
def probe_entry(report: Dict[str, Any], name: str, need: str = "layers") -> Dict[str, Any]:
    """The report's entry for ``name``, or :class:`NotPlottable` saying why there is none."""
    entry = (report.get("probes") or {}).get(name)
    if entry is None:
        raise NotPlottable(f"{name} not in the report (probe not run: add it to --probes)")
    if not isinstance(entry, dict):
        raise NotPlottable(f"{name}: unexpected entry {entry!r}")
    if "skipped" in entry:
        raise NotPlottable(f"{name} was skipped by the probe: {entry['skipped']}")
    if need and not entry.get(need):
        raise NotPlottable(f"{name} has no {need!r} in the report")
    return entry


def _optional_entry(report: Dict[str, Any], name: str, need: str = "layers") -> Optional[Dict[str, Any]]:
    try:
        return probe_entry(report, name, need)
    except NotPlottable:
        return None


def _layer_axis(ax, names: Sequence[str]) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center",
                       fontsize=8)
    ax.set_xlabel("layer (parameter tensor)")
    ax.set_xlim(-0.6, len(names) - 0.4)


def _layer_names(*entries: Optional[Dict[str, Any]]) -> List[str]:
    names: List[str] = []
    for entry in entries:
        for layer in (entry or {}).get("layers", []):
            if layer.get("name") not in names:
                names.append(layer.get("name"))
    return names


def hessian_diag_figure(report: Dict[str, Any], title: str) -> Figure:
    """Per-layer Hessian diagonal: mean ± standard error (Hutchinson, DESIGN §3.3) with the
    min–max range of the entries, and HesScale's (§3.10) beside it when present."""
    hutchinson = _optional_entry(report, "hessian_diag")
    hesscale = _optional_entry(report, "hesscale_diag")
    if hutchinson is None and hesscale is None:
        reasons = []
        for name in ("hessian_diag", "hesscale_diag"):
            try:
                probe_entry(report, name)
            except NotPlottable as exc:
                reasons.append(str(exc))
        raise NotPlottable("; ".join(reasons))
    names = _layer_names(hutchinson, hesscale)
    series = [(e, label, colour, offset) for e, label, colour, offset in (
        (hutchinson, "Hutchinson (Rademacher)", "#1f77b4", -0.15 if hesscale else 0.0),
        (hesscale, "HesScale", "#ff7f0e", 0.15 if hutchinson else 0.0)) if e is not None]
    fig, (ax,) = _new_figure(title)
    values = []
    for entry, label, colour, offset in series:
        by_name = {layer.get("name"): layer for layer in entry["layers"]}
        xs, means, errors, lows, highs = [], [], [], [], []
        for i, name in enumerate(names):
            layer = by_name.get(name)
            mean = _finite(layer.get("mean")) if layer else None
            if mean is None:
                continue
            xs.append(i + offset)
            means.append(mean)
            errors.append(_finite(layer.get("stderr")) or 0.0)
            lows.append(_finite(layer.get("min")))
            highs.append(_finite(layer.get("max")))
        values += means + [v for v in lows + highs if v is not None]
        samples = entry.get("samples")
        ax.errorbar(xs, means, yerr=errors, fmt="o", color=colour, capsize=4, markersize=6,
                    label=f"{label}: mean ± s.e." + (f" ({samples} samples)" if samples else ""))
        ranged = [(x, lo, hi) for x, lo, hi in zip(xs, lows, highs) if lo is not None and hi is not None]
        if ranged:
            rx, rlo, rhi = zip(*ranged)
            ax.vlines(rx, rlo, rhi, color=colour, alpha=0.35, linewidth=6, label=f"{label}: min – max entry")
    _layer_axis(ax, names)
    if values and min(values) > 0:
        ax.set_yscale("log")
    elif values:
        nonzero = sorted(abs(v) for v in values if v != 0)
        # Linear within one decade below the smallest magnitude, so every mean sits in the log part.
        linthresh = 10.0 ** math.floor(math.log10(nonzero[0])) if nonzero else 1.0
        ax.set_yscale("symlog", linthresh=linthresh, linscale=0.8)
        ax.axhline(0.0, color="0.4", linewidth=0.8)
    ax.set_title("Hessian diagonal per layer (entries of diag H)", fontsize=10)
    ax.set_ylabel("diag H entry (1/lr units, symlog scale)" if values and min(values) <= 0 else "diag H entry (log scale)")
    ax.legend(loc="best", fontsize=8)
    return fig


def power_law_figure(report: Dict[str, Any], title: str) -> Figure:
    """Per-layer power-law exponent p (DESIGN §3.6) with the p = 2 reference of a smooth,
    Hessian-dominated layer; p < 2 means gradient discontinuities (glass)."""
    entry = probe_entry(report, "power_law")
    layers = [l for l in entry["layers"] if _finite(l.get("p")) is not None]
    if not layers:
        raise NotPlottable("power_law has no finite per-layer p")
    fig, (ax,) = _new_figure(title)
    names = [l.get("name") for l in layers]
    ps = [float(l["p"]) for l in layers]
    errors = [_finite(l.get("p_stderr")) or 0.0 for l in layers]
    ax.errorbar(range(len(ps)), ps, yerr=errors, fmt="o", color="#1f77b4", capsize=4, markersize=7,
                label=f"p per layer ± s.e. ({entry.get('samples', '?')} samples)")
    ax.axhline(2.0, color="#2ca02c", linestyle="--", linewidth=1.3, label="p = 2: smooth (Hessian-dominated)")
    overall = _finite(entry.get("p"))
    if overall is not None:
        ax.axhline(overall, color="0.4", linestyle=":", linewidth=1.0, label=f"all layers: p = {overall:.3f}")
    # At least [1, 2.25]: the smooth value and the glassy range (ReLU layers reach p ≈ 1–1.5,
    # seed 004 Fig. 1) are always on the axis, so "all smooth" reads as such.
    spread = max(errors + [0.0])
    bottom = min(1.0, min(ps) - spread - 0.1)
    top = max(2.25, max(ps) + spread + 0.1)
    ax.set_ylim(bottom, top)
    ax.axhspan(bottom, 1.9, color="#ff7f0e", alpha=0.08, label="p < 1.9: gradient glass (non-smooth)")
    _layer_axis(ax, names)
    ax.set_title(f"power-law exponent p at λ = {entry.get('lambda', '?')} and 2λ", fontsize=10)
    ax.set_ylabel("exponent p (dimensionless)")
    ax.legend(loc="best", fontsize=8)
    return fig


def glass_figure(report: Dict[str, Any], title: str) -> Figure:
    """Per-layer glass density ρ = 2 E[γ²]/λ (DESIGN §3.5) ± its standard error."""
    entry = probe_entry(report, "glass")
    layers = [l for l in entry["layers"] if _finite(l.get("rho")) is not None]
    if not layers:
        raise NotPlottable("glass has no finite per-layer ρ")
    fig, (ax,) = _new_figure(title)
    names = [l.get("name") for l in layers]
    rhos = [float(l["rho"]) for l in layers]
    errors = [_finite(l.get("rho_stderr")) or 0.0 for l in layers]
    ax.bar(range(len(rhos)), rhos, yerr=errors, color="#9467bd", alpha=0.8, capsize=4,
           label=f"ρ per layer ± s.e. ({entry.get('samples', '?')} samples)")
    overall = _finite(entry.get("rho"))
    if overall is not None:
        ax.axhline(overall, color="0.3", linestyle=":", linewidth=1.0, label=f"all layers: ρ = {overall:.3g}")
    _log_if_positive(ax, rhos)
    _layer_axis(ax, names)
    ax.set_title(f"glass density per layer (λ = {entry.get('lambda', '?')}; 0 for a pure quadratic)", fontsize=10)
    ax.set_ylabel("glass density ρ (per entry)")
    ax.legend(loc="best", fontsize=8)
    return fig


def _eigen_series(entry: Dict[str, Any]) -> Tuple[List[float], List[float]]:
    converged = [v for v in (_finite(x) for x in entry.get("eigenvalues") or []) if v is not None]
    if not converged and _finite(entry.get("value")) is not None:
        converged = [float(entry["value"])]
    following = [v for v in (_finite(x) for x in entry.get("next_ritz_values") or []) if v is not None]
    return converged, following


def eigenvalues_figure(report: Dict[str, Any], title: str) -> Figure:
    """The top eigenvalues (converged, then the next unconverged Ritz values) against the
    stability threshold ``eos.threshold`` = T/η; with Adam the threshold applies to the
    preconditioned sharpness, which is then drawn too."""
    plain = probe_entry(report, "lambda_max", need="")
    pre = _optional_entry(report, "preconditioned_lambda_max", need="")
    eos = _optional_entry(report, "eos", need="")
    series = [("Hessian H", plain, "#1f77b4", -0.08 if pre else 0.0)]
    if pre is not None:
        series.append(("preconditioned P^-1/2 H P^-1/2", pre, "#ff7f0e", 0.08))
    if not any(_eigen_series(e)[0] for _, e, _, _ in series):
        raise NotPlottable("lambda_max has no finite eigenvalue")
    fig, (ax,) = _new_figure(title)
    count, verdict = 1, ""
    for label, entry, colour, offset in series:
        converged, following = _eigen_series(entry)
        ranks = list(range(1, len(converged) + 1))
        ax.plot([r + offset for r in ranks], converged, "o", color=colour, markersize=8,
                label=f"{label}: converged ({entry.get('method', '?')}, {entry.get('hvps', '?')} HVPs)")
        if following:
            nxt = list(range(len(converged) + 1, len(converged) + 1 + len(following)))
            ax.plot([r + offset for r in nxt], following, "o", mfc="none", color=colour, markersize=8,
                    label=f"{label}: next Ritz values (not converged)")
        count = max(count, len(converged) + len(following))
        lam_min = _finite(entry.get("lambda_min"))
        if lam_min is not None:
            ax.axhline(lam_min, color=colour, linestyle=":", linewidth=1.0, label=f"{label}: λmin = {lam_min:.3g}")
    if eos is not None and _finite(eos.get("threshold")) is not None:
        threshold = float(eos["threshold"])
        constant = _finite(eos.get("constant"))
        applies = "preconditioned sharpness" if eos.get("curvature") == "preconditioned_lambda_max" else "λmax"
        name = f"{_constant_text(constant)}/η" if constant is not None else "T/η"
        ax.axhline(threshold, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.3,
                   label=f"stability threshold {name} = {threshold:.3g} (on the {applies})")
        status, ratio = eos.get("status"), _finite(eos.get("ratio"))
        if status is not None:
            verdict = f" — {status}: η·curvature / T = {ratio:.3f}" if ratio is not None else f" — {status}"
    else:
        reason = (report.get("probes") or {}).get("eos", {})
        reason = reason.get("skipped") if isinstance(reason, dict) else None
        ax.text(0.01, 0.03, f"no stability threshold: {reason or 'eos not in the report'}", transform=ax.transAxes,
                fontsize=8, color="0.3", wrap=True)
    ax.set_xticks(range(1, count + 1))
    ax.set_xlim(0.5, count + 0.5)
    ax.set_xlabel("eigenvalue rank (1 = largest)")
    ax.set_ylabel(LAMBDA_LABEL)
    ax.set_title("top eigenvalues of the curvature" + verdict, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    return fig


def spectral_density_figure(report: Dict[str, Any], title: str) -> Figure:
    """The smoothed spectral density (SLQ, :mod:`curvdiag.probes.spectral_density`) on a log scale,
    the quadrature nodes as a rug, and the stability threshold."""
    entry = probe_entry(report, "spectral_density", need="")
    grid, density = entry.get("grid"), entry.get("density")
    if not grid or not density:
        if not entry.get("nodes"):
            raise NotPlottable("spectral_density has neither a grid/density nor quadrature nodes")
        from curvdiag.probes.spectral_density import smoothed_density  # the documented smoothing

        g, d, _ = smoothed_density(entry)
        grid, density = g.tolist(), d.tolist()
    pairs = [(x, y) for x, y in zip(grid, density) if _finite(x) is not None and _finite(y) is not None]
    if not pairs:
        raise NotPlottable("spectral_density has no finite density values")
    xs, ys = zip(*pairs)
    peak = max(ys)
    floor = peak * 1e-7 if peak > 0 else 1e-12
    fig, (ax,) = _new_figure(title)
    ax.plot(xs, [max(y, floor) for y in ys], color="#1f77b4", linewidth=1.3,
            label=f"density (Gaussian σ = {entry.get('sigma', float('nan')):.2g})" if _finite(entry.get("sigma")) else "density")
    ax.set_yscale("log")
    ax.set_ylim(floor, peak * 3 if peak > 0 else 1.0)
    nodes = [v for probe in entry.get("nodes") or [] for v in probe if _finite(v) is not None]
    if nodes:
        ax.plot(nodes, [floor * 1.6] * len(nodes), "|", color="0.25", markersize=10,
                label=f"quadrature nodes ({entry.get('probes', '?')} probes × {entry.get('steps', '?')} steps)")
    eos = _optional_entry(report, "eos", need="")
    if eos is not None and _finite(eos.get("threshold")) is not None and eos.get("curvature") != "preconditioned_lambda_max":
        constant = _finite(eos.get("constant"))
        name = f"{_constant_text(constant)}/η" if constant is not None else "T/η"
        ax.axvline(float(eos["threshold"]), color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.3,
                   label=f"stability threshold {name} = {float(eos['threshold']):.3g}")
    ax.set_xlabel("eigenvalue λ of H (1/lr units)")
    ax.set_ylabel("spectral density (log scale)")
    ax.set_title(f"Hessian spectral density (stochastic Lanczos quadrature, {entry.get('hvps', '?')} HVPs)", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    return fig


REPORT_FIGURES: Dict[str, Tuple[Callable[[Dict[str, Any], str], Figure], str]] = {
    "eigenvalues": (eigenvalues_figure, "Top eigenvalues against the stability threshold."),
    "spectral_density": (spectral_density_figure, "Spectral density of the Hessian (stochastic Lanczos quadrature)."),
    "hessian_diag": (hessian_diag_figure, "Per-layer Hessian diagonal: mean ± s.e. and the range of the entries."),
    "power_law": (power_law_figure, "Per-layer power-law exponent p; p = 2 is smooth."),
    "glass": (glass_figure, "Per-layer glass density ρ."),
}


def report_figures(report: Dict[str, Any], title: str) -> FigureSet:
    """Every report figure that the JSON supports; the others in ``skipped`` with the reason."""
    result = FigureSet(title=title)
    for name, (make, caption) in REPORT_FIGURES.items():
        try:
            result.figures[name] = make(report, title)
            result.captions[name] = caption
        except NotPlottable as exc:
            result.skipped[name] = str(exc)
    return result


def figures_for(source: PlotSource) -> FigureSet:
    """All figures for what :func:`load_source` read."""
    if source.kind == "runs":
        return run_figures(source.runs, source.title)
    return report_figures(source.report or {}, source.title)
