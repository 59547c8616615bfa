"""What ``curvdiag plot`` and ``curvdiag report`` are pointed at: a run directory, a
``--compare`` directory, a run's ``run.json``/``metrics.jsonl``, or a probe report JSON; read
once into typed results (:mod:`curvdiag.results`) and drawn by :mod:`curvdiag.plots.runs` or
:mod:`curvdiag.plots.probe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from curvdiag.errors import BadInput
from curvdiag.plots.canvas import FigureSet
from curvdiag.plots.probe import report_figures, report_title
from curvdiag.plots.runs import run_figures, run_title
from curvdiag.results.probe_results import ProbeReport, read_report
from curvdiag.results.run_dir import METRICS_FILE, SUMMARY_FILE, RunLog, read_runs


@dataclass
class PlotSource:
    """Runs or a probe report, with the path given and a title for figures and pages."""

    kind: str  # "runs" | "report"
    path: Path
    title: str
    runs: List[RunLog] = field(default_factory=list)
    report: Optional[ProbeReport] = None


def load_source(path: Any) -> PlotSource:
    """A run directory, a ``--compare`` directory, a run's ``run.json``/``metrics.jsonl`` or a
    probe report JSON → :class:`PlotSource`. Anything else is :class:`BadInput`."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    if path.is_file() and path.name in (SUMMARY_FILE, METRICS_FILE):
        path = path.parent
    if path.is_dir():
        runs = read_runs(path)
        return PlotSource("runs", path, run_title(runs, path), runs=runs)
    report = read_report(path)
    return PlotSource("report", path, report_title(report), report=report)


def figures_for(source: PlotSource) -> FigureSet:
    """All figures for what :func:`load_source` read."""
    if source.kind == "runs":
        return run_figures(source.runs, source.title)
    return report_figures(source.report, source.title)
