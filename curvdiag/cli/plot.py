"""``curvdiag plot`` and ``curvdiag report``: figures and a self-contained HTML page for a run
directory or a probe report (DESIGN §1). A thin layer over :mod:`curvdiag.plots` (``sources``, ``runs``, ``probe``) and
:mod:`curvdiag.plots.html`, which draw; this module saves.

matplotlib is imported only when a command runs, so every ``--help`` starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Dict, List, Optional, Tuple

import typer

from curvdiag.cli.choices import FigureFormat
from curvdiag.cli.errors import user_errors
from curvdiag.errors import BadInput

RUN_FILES = ("run.json", "metrics.jsonl")


def _default_plot_dir(source: Path) -> Path:
    """RUN_DIR/plots for a run directory, REPORT_plots/ beside a report JSON."""
    if source.is_dir():
        return source / "plots"
    if source.name in RUN_FILES:
        return source.parent / "plots"
    return source.with_name(source.stem + "_plots")


def _default_report_path(source: Path) -> Path:
    """RUN_DIR/report.html for a run directory, REPORT.html beside a report JSON."""
    if source.is_dir():
        return source / "report.html"
    if source.name in RUN_FILES:
        return source.parent / "report.html"
    return source.with_suffix(".html")


def _check_dpi(dpi: int) -> None:
    if dpi < 10 or dpi > 1200:
        raise BadInput(f"--dpi {dpi}: must lie in [10, 1200]")


def save_figures(figures, directory: Path, fmt: FigureFormat = FigureFormat.png, dpi: int = 150) -> List[Path]:
    """Save a :class:`curvdiag.plots.canvas.FigureSet` as DIRECTORY/<name>.<fmt>; return the paths."""
    fmt = FigureFormat.parse(fmt).value
    _check_dpi(dpi)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"--out {directory}: cannot create the directory ({exc.strerror or exc})") from exc
    written: List[Path] = []
    for name, figure in figures.figures.items():
        path = directory / f"{name}.{fmt}"
        try:
            # No "Creator"/"Software" metadata: it would carry matplotlib's web address.
            figure.savefig(path, format=fmt, dpi=dpi, metadata={"Creator": None} if fmt in ("svg", "pdf") else {"Software": None})
        except OSError as exc:
            raise BadInput(f"{path}: cannot write ({exc.strerror or exc})") from exc
        finally:
            figure.clf()
        written.append(path)
    return written


def write_report_figures(report: dict, directory: Path, fmt: FigureFormat = FigureFormat.png,
                         dpi: int = 150) -> Tuple[List[Path], Dict[str, str]]:
    """Figures for a probe report held in memory (``ProbeReport.to_json()``), for ``probe --plots DIR``.
    Returns (paths written, {figure: reason skipped})."""
    from curvdiag.plots.probe import report_figures, report_title
    from curvdiag.results.probe_results import ProbeReport

    typed = ProbeReport.from_json(report)
    figures = report_figures(typed, report_title(typed))
    return save_figures(figures, Path(directory), fmt, dpi), figures.skipped


def write_figures(source: Path, out: Optional[Path], fmt: FigureFormat, dpi: int) -> Tuple[List[Path], Dict[str, str], Path]:
    """Save every figure for ``source`` as OUT/<name>.<fmt>; return (paths, skipped, out dir)."""
    from curvdiag.plots.sources import figures_for, load_source

    _check_dpi(dpi)  # before reading anything
    loaded = load_source(source)
    directory = out if out is not None else _default_plot_dir(Path(source))
    figures = figures_for(loaded)
    return save_figures(figures, directory, fmt, dpi), figures.skipped, directory


def plot(
    source: Annotated[Path, typer.Argument(help="A run directory (curvdiag train --out), a --compare directory, or a report JSON (curvdiag probe --json).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for the figures (default: RUN_DIR/plots, or REPORT_plots/ beside the JSON).")] = None,
    fmt: Annotated[FigureFormat, typer.Option("--format", "-f", parser=FigureFormat.parse, help="File format of the figures.")] = FigureFormat.png,
    dpi: Annotated[int, typer.Option(help="Resolution of PNG figures.")] = 150,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Figures for a training run or a probe report: one file per figure."""
    with user_errors(debug):
        written, skipped, directory = write_figures(source, out, fmt, dpi)
        if written:
            typer.echo(f"{len(written)} figure{'s' if len(written) != 1 else ''} written to {directory}:")
            for path in written:
                typer.echo(f"  {path}")
        else:
            typer.echo(f"no figures: nothing in {source} could be plotted")
        for name, reason in skipped.items():
            typer.echo(f"  skipped {name}: {reason}")


def report(
    source: Annotated[Path, typer.Argument(help="A run directory, a --compare directory, or a report JSON.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="HTML file to write (default: RUN_DIR/report.html, or REPORT.html beside the JSON).")] = None,
    dpi: Annotated[int, typer.Option(help="Resolution of the embedded PNG figures.")] = 110,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """One self-contained HTML page (verdict, tables, figures) that opens offline."""
    with user_errors(debug):
        from curvdiag.plots.sources import load_source
        from curvdiag.plots.html import write_html_report

        _check_dpi(dpi)
        loaded = load_source(source)
        target = out if out is not None else _default_report_path(Path(source))
        if target.exists() and target.is_dir():
            raise BadInput(f"--out {target}: is a directory", hint="give a file name such as report.html")
        path = write_html_report(loaded, target, dpi=dpi)
        typer.echo(f"report written to {path}")
