"""The command line: a thin typer layer over loading, the operator, the probes and the report.

No mathematics here. Errors the user can act on are one line plus a hint on stderr (exit 2 for
bad input, 1 for a probe that failed); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from curvdiag._version import __version__
from curvdiag.errors import BadArgument, BadInput, CurvdiagError
from curvdiag.results.json_safe import finite_or_none as _finite_or_none
from curvdiag.curvature.operator import HVP_METHODS
from curvdiag.probes.registry import PROBE_NAMES

app = typer.Typer(
    name="curvdiag",
    help="Training-stability diagnostics from the curvature of the loss.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)




def _fail(exc: CurvdiagError, debug: bool, prefix: str = "") -> None:
    """One line (plus a hint) on stderr and the error's exit status; the traceback with --debug."""
    from rich.markup import escape

    if debug:
        raise exc
    err = Console(stderr=True, highlight=False)
    message = exc.message
    if isinstance(exc, BadArgument):  # the library names the argument; say it as its flag
        message = exc.with_flag({"optimizer_family": "--optimizer"}.get(exc.argument, "--" + exc.argument.replace("_", "-")))
    err.print(f"{escape(prefix)}[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    if exc.hint:
        err.print(f"{prefix}hint: {exc.hint}", markup=False, soft_wrap=True)
    raise typer.Exit(code=exc.exit_code)


@contextlib.contextmanager
def user_errors(debug: bool, fail: Optional[Callable[[CurvdiagError, bool], None]] = None) -> Iterator[None]:
    """Every error ends as one line plus a hint (exit 2 bad input, 1 otherwise), unless --debug."""
    fail = fail or _fail
    try:
        yield
    except CurvdiagError as exc:
        fail(exc, debug)
    except (KeyboardInterrupt, typer.Exit):
        raise
    except Exception as exc:  # a bug of ours or an unforeseen input: still one line
        fail(CurvdiagError(f"unexpected {type(exc).__name__}: {exc}",
                           hint="rerun with --debug for the traceback and report it"), debug)


@contextlib.contextmanager
def across_processes(ctx: typer.Context, nproc: Optional[int], debug: bool, device: str, dist_timeout: float) -> Iterator[None]:
    """The body of a command that may run on several processes. ``--nproc N`` (N > 1) relaunches the
    command under torchrun and exits with its status; otherwise the body runs inside the process
    group torchrun describes (none in one process), with one error line per failing rank, and
    each rank leaves the group after success (a failed rank just exits; torchrun ends the others)."""
    from curvdiag.curvature import distributed

    if nproc is not None:
        try:
            code = _relaunch_under_torchrun(ctx, nproc)
        except CurvdiagError as exc:
            _fail(exc, debug)
        if code is not None:
            raise typer.Exit(code=code)
    with user_errors(debug, _fail_rank):
        distributed.init_from_env(device, dist_timeout)
        yield
    distributed.record_finished(distributed.env_rank())
    distributed.shutdown()


def _check(condition: bool, message: str, hint: Optional[str] = None) -> None:
    if not condition:
        raise BadInput(message, hint)


@app.command()
def probe(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe: a .py file or an importable module defining model(), data(), loss(model, batch)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint (.pt/.pth state_dict or dict, or .safetensors)."),
    previous: Optional[Path] = typer.Option(None, "--previous", help="Checkpoint of θ_{t−1} for directional_curvature (default: one simulated optimizer step)."),
    probes: str = typer.Option("all", "--probes", help=f"all, or a comma-separated list of: {', '.join(PROBE_NAMES)}."),
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
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write the report's figures (PNG) into this directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no table (errors still go to stderr)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Run on N processes: relaunches this command under torchrun (python -m torch.distributed.run --nproc-per-node N)."),
    dist_timeout: float = typer.Option(120.0, "--dist-timeout", help="Under several processes: seconds a rank waits for the others before the job fails."),
) -> None:
    """How close is this checkpoint to instability? λmax, edge-of-stability margin, trace, diagonal."""
    with across_processes(ctx, nproc, debug, device, dist_timeout):
        _probe(recipe, checkpoint, previous, probes, glass_lambda, glass_samples, lr, optimizer, method, tol, top_k, samples, max_batches, seed, device,
               dtype, train_mode, hvp_method, max_hvps, json_out, quiet, plots)


def _probe(recipe, checkpoint, previous, probe_names, glass_lambda, glass_samples, lr, optimizer, method, tol, top_k, samples, max_batches, seed, device,
           dtype, train_mode, hvp_method, max_hvps, json_out, quiet, plots=None) -> None:
    from curvdiag.loading.target import load_previous_parameters, load_target
    from curvdiag.curvature.operator import CurvatureOperator
    from curvdiag.probes.runner import ProbeSettings, parse_probe_names, run_probes
    from curvdiag.report.terminal import render

    names = parse_probe_names(probe_names)
    _check(method in ("lanczos", "power"), f"--method {method}: unknown", "use lanczos or power")
    _check(tol > 0 and math.isfinite(tol), f"--tol {tol}: must be a positive number")
    _check(top_k >= 1, f"--top-k {top_k}: must be at least 1")
    _check(samples is None or samples >= 2, f"--samples {samples}: must be at least 2 (for a standard error)")
    _check(max_hvps >= 1, f"--max-hvps {max_hvps}: must be at least 1")
    _check(glass_lambda > 0 and math.isfinite(glass_lambda), f"--glass-lambda {glass_lambda}: must be a positive number")
    _check(glass_samples >= 1, f"--glass-samples {glass_samples}: must be at least 1")
    _check(hvp_method in HVP_METHODS, f"--hvp-method {hvp_method}: unknown", f"choose one of {', '.join(HVP_METHODS)}")
    from curvdiag.curvature import distributed

    rank, world = distributed.rank(), distributed.world_size()
    quiet = quiet or rank != 0  # only rank 0 prints, shows progress and writes files
    to_stdout = json_out is not None and str(json_out) == "-"
    console = Console(stderr=to_stdout, quiet=quiet)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[hvps]}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=quiet) as progress:
        task = progress.add_task("loading recipe and checkpoint", hvps="")
        target = load_target(recipe, str(checkpoint) if checkpoint else None, max_batches=max_batches,
                             device=distributed.device_for(device), dtype=dtype, lr=lr, optimizer_family=optimizer,
                             rank=rank, world_size=world)
        theta_previous = load_previous_parameters(target, str(previous)) if previous else None
        progress.update(task, description=f"building the curvature operator ({len(target.batches)} batches)")
        op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes,
                               train_mode=train_mode, hvp_method=hvp_method, distributed=world > 1)
        op.on_hvp = lambda count: progress.update(task, hvps=f"{count} HVPs")
        settings = ProbeSettings(probes=names, method=method, tol=tol, top_k=top_k, samples=samples, seed=seed,
                                 max_hvps=max_hvps, previous=theta_previous, glass_lambda=glass_lambda,
                                 glass_samples=glass_samples)
        report = run_probes(target, op, settings, progress=lambda name: progress.update(task, description=f"probe {name}"))
    if rank != 0:
        return
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
    if plots is not None:
        from curvdiag.cli.plot import write_report_figures

        try:
            paths, skipped = write_report_figures(_finite_or_none(report.to_json()), plots)
        except OSError as exc:
            raise BadInput(f"--plots {plots}: cannot write ({exc.strerror or exc})") from exc
        console.print(f"figures written to {plots}: " + ", ".join(Path(p).name for p in paths), style="dim")
        for figure, reason in skipped.items():
            console.print(f"  figure {figure} not drawn: {reason}", style="dim")


def _fail_rank(exc: CurvdiagError, debug: bool) -> None:
    """``_fail`` in one process; under torchrun one line on stderr prefixed by ``rank R:`` from every
    failing rank (torchrun's agent then ends the job), recorded for the ``--nproc`` launcher."""
    from curvdiag.curvature import distributed

    if not distributed.launched_by_torchrun():
        _fail(exc, debug)
    rank = distributed.env_rank()
    distributed.record_failure(rank, exc.exit_code, exc.message,
                               communication=isinstance(exc, distributed.CommunicationError))
    _fail(exc, debug, prefix=f"rank {rank}: ")


def _forwarded_args(ctx: typer.Context, drop: tuple = ("nproc",)) -> list:
    """The command line of this invocation rebuilt from its parsed parameters (minus ``drop``)."""
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in drop:
            continue
        if getattr(param, "param_type_name", "option") == "argument":
            if value is not None:
                args.append(str(value))
        elif value is not None and value != param.default:
            if getattr(param, "is_flag", False):
                if value or param.secondary_opts:
                    args.append(param.opts[0] if value else param.secondary_opts[0])
            else:
                args += [param.opts[0], str(value)]
    return args


def _relaunch_under_torchrun(ctx: typer.Context, nproc: int) -> Optional[int]:
    """``--nproc N``: run ``python -m torch.distributed.run --standalone --nproc-per-node N -m curvdiag
    probe|train <the same arguments>`` and return its exit status (the failing rank's own status and
    one summary line naming it when a rank failed); None for N = 1 (run here)."""
    import os
    import subprocess
    import tempfile

    from rich.markup import escape

    from curvdiag.curvature import distributed

    _check(nproc >= 1, f"--nproc {nproc}: must be at least 1")
    _check(not distributed.launched_by_torchrun(), "--nproc inside a torchrun job",
           "drop --nproc: torchrun already started the processes")
    if nproc == 1:
        return None
    command = [sys.executable, "-m", "curvdiag.cli.torchrun", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "curvdiag", ctx.command.name, *_forwarded_args(ctx)]
    with tempfile.TemporaryDirectory(prefix="curvdiag-ranks-") as status_dir:
        env = dict(os.environ, **{distributed.STATUS_DIR_ENV: status_dir})
        process = subprocess.Popen(command, env=env)
        try:
            code = process.wait()
        except KeyboardInterrupt:  # torchrun got the SIGINT too and stops its workers
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            return 130  # the user's Ctrl-C, whatever torchrun made of it
        if code == 0:
            return 0
        failure = distributed.first_failure(Path(status_dir))
        finished = distributed.all_finished(Path(status_dir), nproc)
    err = Console(stderr=True, highlight=False)
    if finished:  # every rank wrote its results, then one crashed while leaving the process group
        err.print(f"[yellow]warning:[/] every rank finished and wrote its results, but the job ended with torchrun "
                  f"exit status {code} while the processes shut down; the results are complete", markup=True,
                  soft_wrap=True)
        return 0
    if failure is None:
        err.print(f"[bold red]error:[/] the {nproc}-process job failed (torchrun exit status {code}) before any "
                  "rank reported a cause; see the output above", markup=True, soft_wrap=True)
        return 1
    err.print(f"[bold red]error:[/] rank {failure['rank']} failed: {escape(str(failure['message']))}", markup=True,
              soft_wrap=True)
    return int(failure.get("code") or 1)


@app.command()
def train(
    ctx: typer.Context,
    recipe: Optional[str] = typer.Argument(None, help="Recipe file or module (not needed with --resume)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Start from this checkpoint (model and optimizer state); default: model() initialisation."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total optimizer steps (default 200; with --resume: the stopped run's)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Override the learning rate of the recipe's optimizer."),
    controller: str = typer.Option("none", "--controller", help="none, throttle, newton or clip (comma-separated with --compare)."),
    compare: bool = typer.Option(False, "--compare", help="Also run without a controller, same start, data order and seed; print a side-by-side table."),
    sharpness_every: int = typer.Option(0, "--sharpness-every", help="Measure λmax (all batches) every K steps; 0 never."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Write checkpoints/step_N.pt every K steps; 0 only final.pt."),
    kappa: float = typer.Option(0.5, "--kappa", help="Throttle safety factor κ in (0, 1]."),
    seed: int = typer.Option(0, "--seed", help="Seed (model init, data order of shuffling loaders, probes)."),
    max_batches: Optional[int] = typer.Option(None, "--max-batches", help="Use only the first N batches of data() per epoch."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<recipe name>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the stopped run in this directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no table."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Train data-parallel on N processes: relaunches this command under torchrun (each step's batch is split over the ranks)."),
    dist_timeout: float = typer.Option(120.0, "--dist-timeout", help="Under several processes: seconds a rank waits for the others before the job fails."),
) -> None:
    """Replay training with a curvature controller (and, with --compare, without) and log it."""
    from curvdiag.curvature import distributed

    with across_processes(ctx, nproc, debug, "cpu", dist_timeout):
        _train(recipe, checkpoint, steps, lr, controller, compare, sharpness_every, checkpoint_every, kappa, seed,
               max_batches, out, resume, quiet or distributed.rank() != 0)


def _train(recipe, checkpoint, steps, lr, controller, compare, sharpness_every, checkpoint_every, kappa, seed,
           max_batches, out, resume, quiet) -> None:
    from curvdiag.report.runs import render_comparison
    from curvdiag.results.run_dir import read_run
    from curvdiag.train.loop import Trainer, TrainSettings

    console = Console(quiet=quiet)
    _check(0 < kappa <= 1, f"--kappa {kappa}: must lie in (0, 1]")
    _check(sharpness_every >= 0 and checkpoint_every >= 0, "--sharpness-every and --checkpoint-every must be ≥ 0")
    if resume is not None:
        previous = read_run(resume).summary
        settings = TrainSettings(**previous.settings)
        settings.steps = steps if steps is not None else settings.steps
        _check(settings.steps >= previous.steps_completed,
               f"--steps {settings.steps}: the run in {resume} already completed {previous.steps_completed} steps",
               "give a larger --steps to continue it")
        final = torch_load_final(resume)
        runs = [(previous.controller, resume, previous.recipe, previous.checkpoint, settings, final)]
    else:
        _check(recipe is not None, "train needs a RECIPE (or --resume RUN_DIR)")
        steps = 200 if steps is None else steps
        names = [c.strip() for c in controller.split(",") if c.strip()]
        _check(bool(names), "--controller is empty")
        _check(compare or len(names) == 1, "several controllers need --compare")
        base = out or Path("runs") / Path(recipe).stem
        if compare:
            names = ["none"] + [n for n in names if n != "none"]
        runs = []
        for name in names:
            settings = TrainSettings(steps=steps, lr=lr, controller=name, seed=seed, sharpness_every=sharpness_every,
                                     checkpoint_every=checkpoint_every, kappa=kappa, max_batches=max_batches)
            where = (base / ("baseline" if name == "none" else name)) if compare else base
            runs.append((name, where, recipe, str(checkpoint) if checkpoint else None, settings, None))
    summaries = []
    for name, where, recipe_spec, ckpt, settings, state in runs:
        trainer = Trainer(recipe_spec, ckpt, where, settings, resume_state=state)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=True,
                      disable=quiet) as progress:
            task = progress.add_task(f"train [{name}]", total=settings.steps, completed=trainer.start_step, info="")

            def on_step(record, task=task, progress=progress):
                progress.update(task, completed=record["step"] + 1,
                                info=f"loss {record['loss']:.4g} · lr {record['lr']:.3g} · throttle {record['throttle']:.3g}")

            summary = trainer.run(on_step=on_step, append=state is not None)
        summaries.append((name, where, summary))
        if summary.interrupted:
            console.print(f"interrupted at step {summary.steps_completed}: log and final.pt kept in {where}")
            raise typer.Exit(code=130)
    render_comparison(summaries, console)


def torch_load_final(run_dir: Path) -> dict:
    """The state a stopped run left in RUN_DIR/final.pt, read safely."""
    from curvdiag.loading.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(Path(run_dir) / "final.pt")
    return {"path": checkpoint.path, "model_state": checkpoint.model_state,
            "optimizer_state": checkpoint.optimizer_state, "step": checkpoint.step, "resume": True}


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
from curvdiag.cli import plot as _cli_plot  # noqa: E402
_cli_plot.register(app)
