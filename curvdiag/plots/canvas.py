"""What every curvdiag figure shares: the object-oriented matplotlib API (never pyplot, so no
GUI backend is touched, no global figure registry grows and a caller's backend is left alone),
one look, and how a figure that cannot be drawn says why.

Plots are pure functions from results and logs to a :class:`matplotlib.figure.Figure`
(STYLE habit 6): :mod:`curvdiag.plots.runs` for training runs, :mod:`curvdiag.plots.probe` for
probe reports. Nothing here saves, shows or recomputes; the CLI and the HTML page save them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple, TypeVar

from matplotlib.figure import Figure

# Units: L is a loss, θ the parameters, so H = ∇²L is in loss / parameter², and so is every
# curvature along a direction (λ, C_t = ‖ΔG‖/‖Δθ‖, diag H); GD's η is then in parameter² / loss
# and η·λ has no unit. Adam's P = diag(√v̂ + ε) is a gradient (loss / parameter), so
# λ(P^-1/2 H P^-1/2) is in 1 / parameter and Adam's η in parameter.
CURVATURE_UNITS = "loss / parameter²"
PRECONDITIONED_UNITS = "1 / parameter"
LAMBDA_LABEL = f"curvature λ ({CURVATURE_UNITS})"
THRESHOLD_COLOUR = "#d62728"
T_DEFINITION = ("T/η is the stability threshold: along an eigendirection of curvature λ, a step of learning rate η "
                "is stable iff η·λ < T, T the optimizer's constant (2 for gradient descent)")
S = TypeVar("S")


class NotPlottable(Exception):
    """This figure cannot be drawn from this input; ``str(exc)`` says why."""


@dataclass
class FigureSet:
    """Figures in display order (keys are file stems), their captions, and what was skipped."""

    title: str
    figures: Dict[str, Figure] = field(default_factory=dict)
    captions: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)


def draw_all(table: Dict[str, Tuple[Callable[[S, str], Figure], str]], source: S, title: str) -> FigureSet:
    """Every figure of ``table`` (name → (function, caption)) that ``source`` supports; the
    others in ``skipped`` with the reason."""
    result = FigureSet(title=title)
    for name, (make, caption) in table.items():
        try:
            result.figures[name] = make(source, title)
            result.captions[name] = caption
        except NotPlottable as exc:
            result.skipped[name] = str(exc)
    return result


def new_figure(title: str, rows: int = 1, height: float = 4.8, sharex: bool = True):
    fig = Figure(figsize=(8.0, height), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=sharex, squeeze=False)[:, 0]
    fig.suptitle(title, fontsize=11)
    for ax in axes:
        ax.grid(True, alpha=0.3, which="major")
    return fig, list(axes)


def constant_text(constant: float) -> str:
    return f"{constant:.3g}"


def footnote(ax, text: str) -> None:
    """A note under the axes (below the x label), part of the figure's layout, so it is saved
    with it and never overlaps the axes."""
    ax.annotate(text, xy=(0.0, 0.0), xycoords="axes fraction", xytext=(0, -34), textcoords="offset points",
                ha="left", va="top", fontsize=7.5, color="0.25", wrap=True)


def log_if_positive(ax, values: Iterable[float], min_ratio: float = 1.0) -> bool:
    values = list(values)
    if values and min(values) > 0 and max(values) / min(values) >= min_ratio:
        ax.set_yscale("log")
        return True
    return False


def recipe_stem(recipe: Optional[str]) -> str:
    """How titles name a recipe: its file stem."""
    return Path(str(recipe)).stem if recipe else "?"
