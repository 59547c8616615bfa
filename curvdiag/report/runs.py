"""Terminal summary of one or several training runs (``train`` and ``train --compare``).

Reads :class:`curvdiag.train.loop.RunSummary` objects; never recomputes.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from rich.console import Console
from rich.table import Table


def _g(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def render_comparison(runs: List[Tuple[str, Path, object]], console: Console) -> None:
    """A side-by-side table: final and best loss, diverged, steps, mean throttle, time per step."""
    table = Table(title="training replay" if len(runs) == 1 else "side by side (same start, data order and seed)",
                  title_justify="left", header_style="bold")
    for column in ("controller", "final loss", "best loss", "diverged", "steps", "mean throttle", "ms / step",
                   "extra HVPs / step", "run directory"):
        table.add_column(column, justify="left" if column in ("controller", "run directory") else "right")
    for name, where, s in runs:
        table.add_row(
            "none (baseline)" if name == "none" and len(runs) > 1 else name,
            _g(s.final_loss), _g(s.best_loss), "[red]yes[/]" if s.diverged else "no",
            str(s.steps_completed), f"{s.mean_throttle:.3g}", f"{1000 * s.seconds_per_step:.3g}",
            f"{s.extra_hvps_per_step:.2g}", str(where),
        )
    console.print(table)
