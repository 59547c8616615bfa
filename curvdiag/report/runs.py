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
    """A side-by-side table, one row per run (named by its controller; "baseline" for ``none``
    beside others): final and best loss, steps done and whether it diverged, mean throttle, time
    per step, extra HVPs. Then each run's directory, below: with the paths out of the table and
    no cell word longer than 8 characters, it fits 80 columns without rich cutting words ("contr…")."""
    table = Table(title="training replay" if len(runs) == 1 else "side by side (same start, data order and seed)",
                  title_justify="left", header_style="bold")
    for column in ("run", "final loss", "best loss", "steps", "mean throttle", "ms / step", "extra HVPs / step"):
        table.add_column(column, justify="left" if column == "run" else "right")
    names = ["baseline" if name == "none" and len(runs) > 1 else name for name, _, _ in runs]
    for name, (_, _, s) in zip(names, runs):
        table.add_row(
            Text(name), _g(s.final_loss), _g(s.best_loss),
            f"[red]{s.steps_completed} diverged[/]" if s.diverged else str(s.steps_completed), _g(s.mean_throttle, 3),
            _g(s.seconds_per_step, 3, scale=1000), _g(s.extra_hvps_per_step, 2),
        )
    console.print(table)
    for name, (_, _, s) in zip(names, runs):
        if s.controller == "throttle":
            console.print(Text(f"{name}: {_held(s)}"), soft_wrap=True)
    for name, (_, where, _) in zip(names, runs):  # a user's path is text, never markup
        console.print(Text(f"{name}: {where}"), soft_wrap=True)


def _held(summary: RunSummary) -> str:
    """When the throttle first held the learning rate, or that it never did (and why, at --engage edge)."""
    if summary.first_held_step is not None:
        return f"held the learning rate from step {summary.first_held_step}"
    if summary.settings.get("engage") == "edge":
        return "never held the learning rate: the run's own rate stayed below the edge (η·λmax ≤ T)"
    return "never held the learning rate"
