"""``curvdiag probe RECIPE``: how close is this checkpoint to instability (DESIGN §2.3)?

A thin layer: the flags become a :class:`ProbeRequest`; loading, the curvature operator, the
probes and the report are the library's (imported when the command runs, so ``--help``
starts without torch). Only rank 0 prints and writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from curvdiag.cli.choices import DType, EigenMethod, HvpMethod, OptimizerFamily, parse_bytes
from curvdiag.cli.launch import across_processes
from curvdiag.errors import BadArgument, BadInput
from curvdiag.probes.registry import PROBE_NAMES


@dataclass(frozen=True)
class ProbeRequest:
    """What one ``curvdiag probe`` asks for, as its flags say it (see ``curvdiag probe --help``)."""

    recipe: str
    checkpoint: Optional[Path]
    previous: Optional[Path]
    probes: str
    lr: Optional[float]
    optimizer: Optional[OptimizerFamily]
    method: EigenMethod
    tol: float
    top_k: int
    samples: Optional[int]
    glass_lambda: float
    glass_samples: Optional[int]
    max_batches: Optional[int]
    seed: int
    device: str
    dtype: Optional[DType]
    train_mode: bool
    hvp_method: HvpMethod
    max_hvps: int
    json_out: Optional[Path]
    plots: Optional[Path]
    quiet: bool
    timeout: Optional[float] = None
    threads: Optional[int] = None  # None: the default (curvdiag.curvature.threads)
    budget: Optional[float] = None
    memory: Optional[int] = None

    @property
    def json_to_stdout(self) -> bool:
        return self.json_out is not None and str(self.json_out) == "-"


# Exit statuses of an interrupted run (after its partial report is written): 124 as timeout(1)
# uses for a command it stopped, 130 (128 + SIGINT) for Ctrl-C, as the shell and `train` use.
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


def run_probe(request: ProbeRequest) -> int:
    """Load the target, run the probes, and (on rank 0) print, write the JSON and the figures.
    Returns the exit status: 0, or :data:`EXIT_TIMEOUT` / :data:`EXIT_INTERRUPTED` when
    ``--timeout`` or Ctrl-C cut the run short (its report holds the probes that finished)."""
    import math
    import time

    from rich.console import Console

    from curvdiag.cli.progress import progress_for
    from curvdiag.curvature import distributed
    from curvdiag.curvature.threads import torch_threads

    started = time.monotonic()
    if not -2**63 <= request.seed < 2**64:
        raise BadArgument("seed", request.seed, "must fit in 64 bits (−2^63 ≤ seed < 2^64)")
    if request.timeout is not None and not (math.isfinite(request.timeout) and request.timeout > 0):
        raise BadInput(f"--timeout {request.timeout}: must be a positive number of seconds")
    settings = _settings(request)  # every setting checked before anything is loaded
    rank = distributed.rank()
    quiet = request.quiet or rank != 0  # only rank 0 prints, shows progress and writes files
    console = Console(stderr=request.json_to_stdout, quiet=quiet)
    deadline = started + request.timeout if request.timeout is not None else None
    with torch_threads("default" if request.threads is None else request.threads):
        try:
            with progress_for(quiet, started) as progress:
                report = _measure(request, settings, progress, deadline)
        except KeyboardInterrupt:  # before the probes began: nothing to report
            if rank == 0:
                _say(f"interrupted (Ctrl-C) after {time.monotonic() - started:.1f} s, before any probe ran: no report")
            return EXIT_INTERRUPTED
    try:
        if rank == 0:
            _write_outputs(request, report, console)
    except KeyboardInterrupt:
        _say("interrupted (Ctrl-C) while writing the report: its files may be incomplete")
        return EXIT_INTERRUPTED
    if not report.interrupted:
        return 0
    if rank == 0:
        finished = sum(1 for name in settings.probes if not _skipped_by_interruption(report, name))
        by = f"--timeout {request.timeout:g}" if report.interrupted_by == "timeout" else "Ctrl-C"
        _say(f"interrupted by {by} after {time.monotonic() - started:.1f} s: the report holds "
             f"{finished} of {len(settings.probes)} probes" + (f", written to {request.json_out}"
                                                                if request.json_out and not request.json_to_stdout else ""))
    return EXIT_TIMEOUT if report.interrupted_by == "timeout" else EXIT_INTERRUPTED


def _skipped_by_interruption(report, name: str) -> bool:
    from curvdiag.results.probe_results import Skipped

    entry = report.probes.get(name)
    return isinstance(entry, Skipped) and entry.reason.startswith(("interrupted after", "not run: interrupted"))


def _say(text: str) -> None:
    """One line on stderr (never rich markup: the text may hold paths)."""
    from rich.console import Console

    Console(stderr=True, highlight=False, markup=False, soft_wrap=True).print(text)


def _settings(request: ProbeRequest):
    """The probes' settings from the flags (the library checks them and names the bad one)."""
    from curvdiag.probes.runner import ProbeSettings, parse_probe_names

    return ProbeSettings(probes=parse_probe_names(request.probes), method=request.method.value, tol=request.tol,
                         top_k=request.top_k, samples=request.samples, seed=request.seed, max_hvps=request.max_hvps,
                         glass_lambda=request.glass_lambda, glass_samples=request.glass_samples,
                         budget=request.budget)


def _measure(request: ProbeRequest, settings, progress, deadline: Optional[float]):
    """The probe report, telling ``progress`` (:mod:`curvdiag.cli.progress`) each stage, probe and
    product; ``deadline`` (``time.monotonic()``) and Ctrl-C end the probes early."""
    from curvdiag.curvature import distributed
    from curvdiag.curvature.operator import CurvatureOperator
    from curvdiag.loading.target import load_previous_parameters, load_target
    from curvdiag.probes.runner import run_probes

    world = distributed.world_size()
    progress.stage("loading recipe and checkpoint")
    target = load_target(request.recipe, str(request.checkpoint) if request.checkpoint else None,
                         max_batches=request.max_batches, device=distributed.device_for(request.device),
                         dtype=request.dtype.value if request.dtype else None, lr=request.lr,
                         optimizer_family=request.optimizer.value if request.optimizer else None,
                         rank=distributed.rank(), world_size=world)
    settings.previous = load_previous_parameters(target, str(request.previous)) if request.previous else None
    progress.stage(f"building the curvature operator ({len(target.batches)} batches)")
    op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes,
                           train_mode=request.train_mode, hvp_method=request.hvp_method.value, distributed=world > 1,
                           memory=request.memory)
    op.on_hvp = progress.hvp
    progress.plan(planned_cost(settings, op.gradient_seconds))
    return run_probes(target, op, settings, progress=progress.probe_started, finished=progress.probe_finished,
                      deadline=deadline, keyboard_interrupt_ends_run=True)


def planned_cost(settings, gradient_seconds: float) -> str:
    """One line: the budget in gradient-equivalents, about how long it takes here, and its split."""
    from curvdiag.probes import budget

    names, total = budget.runs_and_budget(settings.probes, settings.budget)
    shares = budget.scaled_asks(names, total)
    seconds = f" (≈ {total * gradient_seconds:.3g} s at {gradient_seconds:.2g} s per GE)" if gradient_seconds > 0 else ""
    return (f"plan: at most {total:g} gradient-equivalents{seconds}: "
            + ", ".join(f"{name} {share:.3g}" for name, share in shares.items()))


def _write_outputs(request: ProbeRequest, report, console) -> None:
    """The JSON report (a file or stdout), the terminal report, and the figures."""
    import json
    import sys

    from curvdiag.report.terminal import render
    from curvdiag.results.json_safe import finite_or_none

    document = finite_or_none(report.to_json())
    if request.json_to_stdout:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    elif request.json_out is not None:
        _write_file(request.json_out, json.dumps(document, indent=2) + "\n")
    render(report, console)
    if request.json_out is not None and not request.json_to_stdout:
        console.print(f"JSON report written to {request.json_out}", style="dim")
    if request.plots is not None:
        _write_figures(document, request.plots, console)


def _write_file(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise BadInput(f"--json {path}: cannot write ({exc.strerror or exc})") from exc


def _write_figures(document: dict, directory: Path, console) -> None:
    from curvdiag.cli.plot import write_report_figures

    try:
        paths, skipped = write_report_figures(document, directory)
    except OSError as exc:
        raise BadInput(f"--plots {directory}: cannot write ({exc.strerror or exc})") from exc
    console.print(f"figures written to {directory}: " + ", ".join(Path(p).name for p in paths), style="dim")
    for figure, reason in skipped.items():
        console.print(f"  figure {figure} not drawn: {reason}", style="dim")


def probe(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="Recipe: a .py file or an importable module defining model(), data(), loss(model, batch).")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Checkpoint (.pt/.pth state_dict or dict, or .safetensors).")] = None,
    previous: Annotated[Optional[Path], typer.Option(help="Checkpoint of θ_{t−1} for directional_curvature (default: one simulated optimizer step).")] = None,
    probes: Annotated[str, typer.Option(help=f"default (lambda_max, hessian_trace, hesscale_diag, directional_curvature), all, or a comma-separated list of: {', '.join(PROBE_NAMES)}.")] = "default",
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (overrides the checkpoint's optimizer state and the recipe).")] = None,
    optimizer: Annotated[Optional[OptimizerFamily], typer.Option(parser=OptimizerFamily.parse, help="Optimizer family (overrides the checkpoint and recipe).")] = None,
    method: Annotated[EigenMethod, typer.Option(parser=EigenMethod.parse, help="How λmax is computed.")] = EigenMethod.lanczos,
    tol: Annotated[float, typer.Option(help="Relative error tolerance for λmax (Lanczos: the Ritz error estimate r²/gap, or the residual r while the gap is unresolved; Lanczos stops no looser than 1e-3).")] = 1e-4,
    top_k: Annotated[int, typer.Option(help="How many of the largest eigenvalues to converge.")] = 1,
    samples: Annotated[Optional[int], typer.Option(help="Hutchinson probes for the trace and diagonal (default: until 1% s.e. of the trace, 10% of the diagonal's layer means, or the budget).")] = None,
    glass_lambda: Annotated[float, typer.Option(help="Length scale λ of the glass and power-law perturbations (absolute, per entry).")] = 1e-3,
    glass_samples: Annotated[Optional[int], typer.Option(help="Rademacher perturbations for glass and power_law (default: until ρ has 10% s.e. or the budget is spent).")] = None,
    max_batches: Annotated[Optional[int], typer.Option(help="Use only the first N batches of data() (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random vector.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[Optional[DType], typer.Option(parser=DType.parse, help="Floating-point type (default: the model's).")] = None,
    train_mode: Annotated[bool, typer.Option("--train-mode", help="Use batch statistics (BatchNorm) instead of eval mode; dropout stays off.")] = False,
    hvp_method: Annotated[HvpMethod, typer.Option(parser=HvpMethod.parse, help="How Hessian-vector products are taken.")] = HvpMethod.auto,
    max_hvps: Annotated[int, typer.Option(help="At most this many products for λmax (fewer when its share of --budget holds fewer).")] = 500,
    memory: Annotated[Optional[int], typer.Option(parser=parse_bytes, metavar="BYTES", help="Memory the kept gradient graph may take (512MiB, 2GiB; default: a quarter of the device's available memory); past it, --hvp-method auto keeps the graphs of the leading batches that fit and runs double backward for the rest.")] = None,
    budget: Annotated[Optional[float], typer.Option(metavar="GE", help="Budget of the run in gradient-equivalents (one forward and backward over all the data), split over the probes (default: the sum of the probes' asks: 150 for default, 400 for all).")] = None,
    timeout: Annotated[Optional[float], typer.Option(metavar="SECONDS", help="Once SECONDS have passed since the start (loading counts but is not cut short), stop the probes at the next Hessian-vector product (under --nproc: before the next probe) and write the report of those that finished, marked interrupted; exit status 124. Ctrl-C does the same with exit status 130.")] = None,
    threads: Annotated[Optional[int], typer.Option(metavar="N", help="CPU threads for torch (default 1, measured fastest on a shared machine; OMP_NUM_THREADS, when set, is kept). More can be faster on idle cores with a large model.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the JSON report here ('-' for stdout).")] = None,
    plots: Annotated[Optional[Path], typer.Option(help="Write the report's figures (PNG) into this directory.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no table (errors still go to stderr).")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    nproc: Annotated[Optional[int], typer.Option(help="Run on N processes: relaunches this command under torchrun (python -m torch.distributed.run --nproc-per-node N).")] = None,
    dist_timeout: Annotated[float, typer.Option(help="Under several processes: seconds a rank waits for the others before the job fails.")] = 120.0,
) -> None:
    """How close is this checkpoint to instability? λmax, edge-of-stability margin, trace, diagonal."""
    request = ProbeRequest(
        recipe=recipe, checkpoint=checkpoint, previous=previous, probes=probes, lr=lr, optimizer=optimizer,
        method=method, tol=tol, top_k=top_k, samples=samples, glass_lambda=glass_lambda, glass_samples=glass_samples,
        max_batches=max_batches, seed=seed, device=device, dtype=dtype, train_mode=train_mode, hvp_method=hvp_method,
        max_hvps=max_hvps, json_out=json_out, plots=plots, quiet=quiet, timeout=timeout, threads=threads, budget=budget,
        memory=memory)
    code = 0
    try:
        with across_processes(ctx, nproc, debug, device, dist_timeout):
            code = run_probe(request)
    except KeyboardInterrupt:  # while starting (imports, the process group): no traceback either
        _say("interrupted (Ctrl-C) before any probe ran: no report")
        code = EXIT_INTERRUPTED
    if code and _under_torchrun(code):
        code = 0
    if code:
        raise typer.Exit(code=code)


def _under_torchrun(code: int) -> bool:
    """Whether this is a rank of ``--nproc``: then it exits 0 after an interruption it reported
    (torchrun takes any other status for a failed rank) and leaves ``code`` for the launcher
    (:func:`~curvdiag.cli.launch.record_outcome`; for Ctrl-C the launcher's own status is 130)."""
    from curvdiag.cli.launch import record_outcome
    from curvdiag.curvature import distributed

    if not distributed.launched_by_torchrun():
        return False
    record_outcome(code)
    return True
