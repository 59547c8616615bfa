"""The command line: a thin typer layer over loading, the operator, the probes and the report.

No mathematics here. Errors the user can act on are one line plus a hint on stderr (exit 2 for
bad input, 1 for a probe that failed); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from curvdiag import __version__
from curvdiag.errors import BadInput, CurvdiagError
from curvdiag.operator import HVP_METHODS

app = typer.Typer(
    name="curvdiag",
    help="Training-stability diagnostics from the curvature of the loss.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _finite_or_none(value: Any) -> Any:
    """JSON has no inf/nan: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _fail(exc: CurvdiagError, debug: bool) -> None:
    if debug:
        raise exc
    err = Console(stderr=True, highlight=False)
    err.print(f"[bold red]error:[/] {exc.message}", markup=True, soft_wrap=True)
    if exc.hint:
        err.print(f"hint: {exc.hint}", markup=False, soft_wrap=True)
    raise typer.Exit(code=exc.exit_code)


def _check(condition: bool, message: str, hint: Optional[str] = None) -> None:
    if not condition:
        raise BadInput(message, hint)


@app.command()
def probe(
    recipe: str = typer.Argument(..., help="Recipe: a .py file or an importable module defining model(), data(), loss(model, batch)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint (.pt/.pth state_dict or dict, or .safetensors)."),
    previous: Optional[Path] = typer.Option(None, "--previous", help="Checkpoint of θ_{t−1} for directional_curvature (default: one simulated optimizer step)."),
    probes: str = typer.Option("all", "--probes", help="all, or a comma-separated list of: lambda_max, hessian_trace, hessian_diag, directional_curvature, glass, power_law."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (overrides the checkpoint's optimizer state and the recipe)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd|momentum|nesterov|adam|adamw (overrides the checkpoint and recipe)."),
    method: str = typer.Option("lanczos", "--method", help="lanczos (default) or power."),
    tol: float = typer.Option(1e-4, "--tol", help="Relative Ritz-residual tolerance for λmax."),
    top_k: int = typer.Option(1, "--top-k", help="How many of the largest eigenvalues to converge."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Hutchinson probes (default: diag 100; trace until 1% s.e.)."),
    glass_lambda: float = typer.Option(1e-3, "--glass-lambda", help="Length scale λ of the glass and power-law perturbations (absolute, per entry)."),
    glass_samples: int = typer.Option(10, "--glass-samples", help="Rademacher perturbations for glass and power_law."),
    max_batches: Optional[int] = typer.Option(None, "--max-batches", help="Use only the first N batches of data() (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random vector."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 or float64 (default: the model's)."),
    train_mode: bool = typer.Option(False, "--train-mode", help="Use batch statistics (BatchNorm) instead of eval mode; dropout stays off."),
    hvp_method: str = typer.Option("auto", "--hvp-method", help="auto, kept-graph, double-backward or finite-difference."),
    max_hvps: int = typer.Option(500, "--max-hvps", help="Budget of products for λmax."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the JSON report here ('-' for stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no table (errors still go to stderr)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """How close is this checkpoint to instability? λmax, edge-of-stability margin, trace, diagonal."""
    try:
        _probe(recipe, checkpoint, previous, probes, glass_lambda, glass_samples, lr, optimizer, method, tol, top_k, samples, max_batches, seed, device,
               dtype, train_mode, hvp_method, max_hvps, json_out, quiet)
    except CurvdiagError as exc:
        _fail(exc, debug)
    except (KeyboardInterrupt, typer.Exit):
        raise
    except Exception as exc:  # a bug of ours or an unforeseen input: still one line
        _fail(CurvdiagError(f"unexpected {type(exc).__name__}: {exc}",
                            hint="rerun with --debug for the traceback and report it"), debug)


def _probe(recipe, checkpoint, previous, probe_names, glass_lambda, glass_samples, lr, optimizer, method, tol, top_k, samples, max_batches, seed, device,
           dtype, train_mode, hvp_method, max_hvps, json_out, quiet) -> None:
    from curvdiag.loading import load_previous_parameters, load_target
    from curvdiag.operator import CurvatureOperator
    from curvdiag.probes import ProbeSettings, parse_probe_names, run_probes
    from curvdiag.report import render

    names = parse_probe_names(probe_names)
    _check(method in ("lanczos", "power"), f"--method {method}: unknown", "use lanczos or power")
    _check(tol > 0 and math.isfinite(tol), f"--tol {tol}: must be a positive number")
    _check(top_k >= 1, f"--top-k {top_k}: must be at least 1")
    _check(samples is None or samples >= 2, f"--samples {samples}: must be at least 2 (for a standard error)")
    _check(max_hvps >= 1, f"--max-hvps {max_hvps}: must be at least 1")
    _check(glass_lambda > 0 and math.isfinite(glass_lambda), f"--glass-lambda {glass_lambda}: must be a positive number")
    _check(glass_samples >= 1, f"--glass-samples {glass_samples}: must be at least 1")
    _check(hvp_method in HVP_METHODS, f"--hvp-method {hvp_method}: unknown", f"choose one of {', '.join(HVP_METHODS)}")
    to_stdout = json_out is not None and str(json_out) == "-"
    console = Console(stderr=to_stdout, quiet=quiet)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[hvps]}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=quiet) as progress:
        task = progress.add_task("loading recipe and checkpoint", hvps="")
        target = load_target(recipe, str(checkpoint) if checkpoint else None, max_batches=max_batches,
                             device=device, dtype=dtype, lr=lr, optimizer_family=optimizer)
        theta_previous = load_previous_parameters(target, str(previous)) if previous else None
        progress.update(task, description=f"building the curvature operator ({len(target.batches)} batches)")
        op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes,
                               train_mode=train_mode, hvp_method=hvp_method)
        op.on_hvp = lambda count: progress.update(task, hvps=f"{count} HVPs")
        settings = ProbeSettings(probes=names, method=method, tol=tol, top_k=top_k, samples=samples, seed=seed,
                                 max_hvps=max_hvps, previous=theta_previous, glass_lambda=glass_lambda,
                                 glass_samples=glass_samples)
        report = run_probes(target, op, settings, progress=lambda name: progress.update(task, description=f"probe {name}"))
    document = json.dumps(_finite_or_none(report.to_json()), indent=2)
    if to_stdout:
        sys.stdout.write(document + "\n")
    elif json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(document + "\n")
        except OSError as exc:
            raise BadInput(f"--json {json_out}: cannot write ({exc.strerror or exc})") from exc
    render(report, console)
    if json_out is not None and not to_stdout:
        console.print(f"JSON report written to {json_out}", style="dim")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"curvdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """curvdiag: what the curvature says about a training run."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
