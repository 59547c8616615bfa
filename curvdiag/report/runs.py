"""Terminal summary of one or several training runs (``train`` and ``train --compare``).

Reads :class:`curvdiag.results.run_dir.RunSummary` records; never recomputes.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from rich.console import Console
from rich.table import Table
from rich.text import Text

from curvdiag.results.run_dir import RunSummary


def _g(value: Optional[float], digits: int = 4, scale: float = 1.0) -> str:
    return "–" if value is None else f"{scale * value:.{digits}g}"


def render_comparison(runs: List[Tuple[str, Path, RunSummary]], console: Console) -> None:
    """A side-by-side table: final and best loss, diverged, steps, mean throttle, time per step."""
    table = Table(title="training replay" if len(runs) == 1 else "side by side (same start, data order and seed)",
                  title_justify="left", header_style="bold")
    for column in ("controller", "final loss", "best loss", "diverged", "steps", "mean throttle", "ms / step",
                   "extra HVPs / step", "run directory"):
        table.add_column(column, justify="left" if column in ("controller", "run directory") else "right")
    for name, where, s in runs:
        table.add_row(
            "none (baseline)" if name == "none" and len(runs) > 1 else Text(name),
            _g(s.final_loss), _g(s.best_loss), "[red]yes[/]" if s.diverged else "no",
            str(s.steps_completed), _g(s.mean_throttle, 3), _g(s.seconds_per_step, 3, scale=1000),
            _g(s.extra_hvps_per_step, 2), Text(str(where)),  # a user's path is text, never markup
        )
    console.print(table)
