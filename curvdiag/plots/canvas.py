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

LAMBDA_LABEL = "λ (curvature, 1/lr units)"
THRESHOLD_COLOUR = "#d62728"
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


def log_if_positive(ax, values: Iterable[float], min_ratio: float = 1.0) -> bool:
    values = list(values)
    if values and min(values) > 0 and max(values) / min(values) >= min_ratio:
        ax.set_yscale("log")
        return True
    return False


def recipe_stem(recipe: Optional[str]) -> str:
    """How titles name a recipe: its file stem."""
    return Path(str(recipe)).stem if recipe else "?"
