"""Figures of training runs (``curvdiag train`` run directories, DESIGN §2.4): a run directory
or a ``--compare`` directory whose runs are overlaid, one colour per run, ``baseline`` first and
drawn wide and pale underneath. Pure functions from :class:`~curvdiag.results.run_dir.RunLog`
to matplotlib Figures; a figure whose data is absent raises :class:`NotPlottable` with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from matplotlib.figure import Figure

from curvdiag.plots.canvas import (CURVATURE_UNITS, LAMBDA_LABEL, PRECONDITIONED_UNITS, T_DEFINITION, THRESHOLD_COLOUR, FigureSet,
                                   NotPlottable, constant_text, draw_all, footnote, log_if_positive, new_figure,
                                   recipe_stem)
from curvdiag.report.verdict import EDGE_BAND
from curvdiag.results.json_safe import finite
from curvdiag.results.run_dir import RunLog

BASELINE_COLOUR = "#3a3a3a"
RUN_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
MARKERS_BELOW = 40  # draw point markers when a series has at most this many points


def run_title(runs: Sequence[RunLog], path: Path) -> str:
    recipe = recipe_stem(runs[0].summary.recipe) if runs else "?"
    checkpoint = runs[0].summary.checkpoint if runs else None
    start = f" from {Path(str(checkpoint)).name}" if checkpoint else ""
    if len(runs) == 1:
        return f"{recipe}{start} · run {path.name} ({runs[0].summary.controller})"
    return f"{recipe}{start} · compare {path.name}: {', '.join(r.name for r in runs)}"


def _colours(runs: Sequence[RunLog]) -> List[str]:
    colours, k = [], 0
    for run in runs:
        if run.name in ("baseline", "none"):
            colours.append(BASELINE_COLOUR)
        else:
            colours.append(RUN_COLOURS[k % len(RUN_COLOURS)])
            k += 1
    return colours


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
    elif run.summary.interrupted:
        label += " (interrupted)"
    return label


def _stability_constant(run: RunLog) -> Optional[float]:
    """T from a record that holds both the threshold T/η and its η (DESIGN §3.7)."""
    for record in run.records:
        threshold, lr = finite(record.threshold), finite(record.lr)
        if threshold is not None and lr is not None and threshold > 0:
            return threshold * lr
    return None


def _draw_run_thresholds(ax, runs: Sequence[RunLog], colours: Sequence[str]) -> List[str]:
    """Draw each run's own threshold T/η_t, in the run's colour (red for a lone run), so each
    run's curvature is read against the threshold of the learning rate it used: a controller
    that lowered η raised its threshold, and the baseline's line says nothing about it.
    A constant η is a horizontal line labelled like "throttle: threshold 2/η = 13.2", a
    varying one a step curve "newton: threshold 2/η_t". Returns notes to write on the axes."""
    drawn = 0
    for run, colour in zip(runs, colours):
        constant = _stability_constant(run)
        if constant is None:
            continue
        steps, lrs = run.series("lr")
        points = [(s, constant / lr) for s, lr in zip(steps, lrs) if lr > 0]
        if not points:
            continue
        drawn += 1
        colour = THRESHOLD_COLOUR if len(runs) == 1 else colour
        name = f"{run.name}: threshold" if len(runs) > 1 else "stability threshold"
        if len({round(t, 12) for _, t in points}) == 1:
            ax.axhline(points[0][1], color=colour, linestyle="--", linewidth=1.3,
                       label=f"{name} {constant_text(constant)}/η = {points[0][1]:.3g}")
        else:
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=colour, linestyle="--", linewidth=1.3, drawstyle="steps-post",
                    label=f"{name} {constant_text(constant)}/η_t")
    if not drawn:
        return ["no stability threshold in the log (optimizer without a known constant, or λmax never measured)"]
    return []


def _constants_text(runs: Sequence[RunLog]) -> str:
    """"T = 2" or "T = 2 (baseline), 3.8 (throttle)": the constants the runs logged."""
    found = [(run.name, _stability_constant(run)) for run in runs]
    values = {constant_text(c) for _, c in found if c is not None}
    if len(values) <= 1:
        return f"T = {values.pop()}" if values else "T unknown"
    return "T = " + ", ".join(f"{constant_text(c)} ({name})" for name, c in found if c is not None)


def _mark_divergence(ax, run: RunLog, colour: str) -> None:
    at = run.diverged_at
    if at is not None:
        ax.axvline(at, color=colour, linestyle=":", linewidth=1.2, alpha=0.9)


def loss_figure(runs: Sequence[RunLog], title: str) -> Figure:
    """Training loss against step, one line per run; log y when every loss is positive.

    A run that diverged ends in a dotted vertical line at the step of divergence and, when the
    exploding loss was still finite, a cross at that value."""
    if not any(run.series("loss")[0] for run in runs):
        raise NotPlottable("no finite loss in metrics.jsonl")
    fig, (ax,) = new_figure(title)
    everything = []
    for run, colour in zip(runs, _colours(runs)):
        steps, losses = run.series("loss")
        everything += losses
        ax.plot(steps, losses, label=_run_label(run), **_style(run, colour, len(steps)))
        if run.diverged:
            _mark_divergence(ax, run, colour)
            for record in run.records:
                value = finite(record.loss)
                if record.diverged and value is not None:
                    ax.plot([record.step], [value], linestyle="none", marker="X", markersize=9, color=colour)
                    everything.append(value)
    log = log_if_positive(ax, everything)
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
    fig, (top, bottom) = new_figure(title, rows=2, height=6.0)
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
    log_if_positive(top, rates, min_ratio=20.0)
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
    """λmax at the steps where it was measured, each run against its own threshold T/η_t
    (top), and the ratio η_t·λmax/T to that threshold (bottom, 1 = the threshold) — the
    edge-of-stability figure: under GD λmax rises to ≈ 2/η and hovers (DESIGN §3.1, §3.7).
    The bottom panel puts every run on one scale, so no run is read against another's line."""
    if not any(run.series("lambda_max")[0] for run in runs):
        raise NotPlottable("no λmax in metrics.jsonl (train with --sharpness-every K to measure it)")
    ratios = any(run.series("eos_ratio")[0] for run in runs)
    fig, axes = new_figure(title, rows=2 if ratios else 1, height=6.4 if ratios else 4.8)
    ax = axes[0]
    colours = _colours(runs)
    for run, colour in zip(runs, colours):
        steps, values = run.series("lambda_max")
        if steps:
            ax.plot(steps, values, label=f"{_run_label(run)}: λmax", **_style(run, colour, len(steps), marker="o"))
        if run.diverged:
            _mark_divergence(ax, run, colour)
    _draw_start(ax, runs)
    notes = _draw_run_thresholds(ax, runs, colours)
    for note in notes:
        ax.text(0.01, 0.02, note, transform=ax.transAxes, fontsize=8, color="0.3")
    ax.set_title("sharpness λmax against each run's own stability threshold T/η_t "
                 "(preconditioned for Adam-family optimizers)", fontsize=10)
    ax.set_ylabel(LAMBDA_LABEL)
    # From 0 (the classic edge-of-stability picture: λmax rising towards T/η) with headroom
    # above the highest curve, so a λmax hovering at the threshold is not drawn on the frame.
    drawn = [float(y) for line in ax.get_lines() for y in line.get_ydata() if finite(float(y)) is not None]
    if drawn and min(drawn) >= 0 and max(drawn) > 0:
        ax.set_ylim(0, 1.15 * max(drawn))
    ax.legend(loc="best", fontsize=8)
    if ratios:
        bottom = axes[1]
        for run, colour in zip(runs, colours):
            steps, values = run.series("eos_ratio")
            if steps:
                bottom.plot(steps, values, label=run.name, **_style(run, colour, len(steps), marker="o"))
        bottom.axhline(1.0, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.3, label="its threshold (ratio 1)")
        bottom.axhspan(*EDGE_BAND, color="#ff9f1a", alpha=0.15,
                       label=f"edge of stability ({EDGE_BAND[0]:g} – {EDGE_BAND[1]:g})")
        top = max([1.2] + [v for run in runs for v in run.series("eos_ratio")[1]])
        bottom.set_ylim(0, 1.1 * top)
        bottom.set_title("η_t·λmax / T: each run's λmax over its own threshold", fontsize=10)
        bottom.set_ylabel("η·λmax / T (no unit)")
        bottom.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("step (λmax measured after the step's update)")
    footnote(axes[-1], f"{T_DEFINITION}; here {_constants_text(runs)}. For Adam-family optimizers λmax is that of "
                       f"P^-1/2 H P^-1/2, in {PRECONDITIONED_UNITS}." + _first_lambda_note(runs))
    return fig


def _draw_start(ax: Any, runs: Sequence[RunLog]) -> None:
    """λmax at the starting weights (run.json's ``lambda_max_at_start``): one black star at step 0
    that runs started from the same weights share; a star per run when their starts differ."""
    starts = [(run, run.summary.lambda_max_at_start) for run in runs if run.summary.lambda_max_at_start is not None]
    if not starts:
        return
    values = [v for _, v in starts]
    if max(values) - min(values) <= 1e-9 * max(abs(v) for v in values):
        label = "λmax at the starting weights" + (f" (shared by the {len(starts)} runs)" if len(starts) > 1 else "")
        ax.plot([0], [values[0]], marker="*", markersize=13, color="black", linestyle="none", label=label, zorder=5)
        return
    for run, value in starts:
        ax.plot([0], [value], marker="*", markersize=11, linestyle="none", zorder=5,
                label=f"{_run_label(run)}: λmax at its starting weights")


def _first_lambda_note(runs: Sequence[RunLog]) -> str:
    """When compared runs log different λmax at their first measured step, say why: they
    start from the same weights, but λmax is measured after that step's update, which a
    controller may already have changed."""
    firsts = {run.name: run.series("lambda_max") for run in runs}
    firsts = {name: (steps[0], values[0]) for name, (steps, values) in firsts.items() if steps}
    if len(firsts) < 2 or len({step for step, _ in firsts.values()}) != 1:
        return ""
    values = [value for _, value in firsts.values()]
    if max(values) - min(values) <= 1e-9 * max(abs(v) for v in values):
        step = next(iter(firsts.values()))[0]
        return f" All runs share λmax = {values[0]:.4g} at step {step:g}."
    shared = "; the star is the λmax they share, at the starting weights" if any(
        run.summary.lambda_max_at_start is not None for run in runs) else ""
    return (" The runs start from the same weights; their first logged λmax differ because each is measured after "
            f"that step's update, which a controller may already have changed{shared}.")


def directional_curvature_figure(runs: Sequence[RunLog], title: str) -> Figure:
    """C_t = ‖ΔG‖/‖Δθ‖ along each step (DESIGN §3.4) with the stability threshold T/η."""
    if not any(run.series("directional_curvature")[0] for run in runs):
        raise NotPlottable("no directional curvature C_t in metrics.jsonl")
    fig, (ax,) = new_figure(title)
    colours = _colours(runs)
    values_all = []
    for run, colour in zip(runs, colours):
        steps, values = run.series("directional_curvature")
        values_all += values
        ax.plot(steps, values, label=f"{_run_label(run)}: C_t", **_style(run, colour, len(steps)))
        if run.diverged:
            _mark_divergence(ax, run, colour)
    _draw_run_thresholds(ax, runs, colours)
    footnote(ax, f"{T_DEFINITION}; here {_constants_text(runs)}.")
    log = log_if_positive(ax, values_all, min_ratio=50.0)
    ax.set_title("directional curvature C_t = ‖G_t − G_{t−1}‖ / ‖θ_t − θ_{t−1}‖" + (" (log scale)" if log else ""),
                 fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(f"C_t, curvature along the step ({CURVATURE_UNITS})")
    ax.legend(loc="best", fontsize=8)
    return fig


RUN_FIGURES: Dict[str, Tuple[Callable[[Sequence[RunLog], str], Figure], str]] = {
    "loss": (loss_figure, "Training loss per step."),
    "learning_rate": (learning_rate_figure, "Learning rate in use and the controller's factor on it."),
    "sharpness": (sharpness_figure, "λmax where measured, each run against its own stability threshold T/η_t."),
    "directional_curvature": (directional_curvature_figure, "Directional curvature C_t along each step."),
}


def run_figures(runs: Sequence[RunLog], title: str) -> FigureSet:
    """Every run figure that the logs support; the others in ``skipped`` with the reason."""
    return draw_all(RUN_FIGURES, runs, title)
