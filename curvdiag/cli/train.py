"""``curvdiag train RECIPE``: replay training with a curvature controller (DESIGN §2.4).

A thin layer: the flags become a :class:`TrainRequest`, then one :class:`PlannedRun` per
controller (``--compare`` adds the baseline, ``--resume`` continues a stopped run); the
:class:`~curvdiag.train.loop.Trainer` runs each and the report prints them side by side.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, List, Optional

import typer

from curvdiag.cli.choices import ThrottleEngage, parse_bytes
from curvdiag.cli.launch import across_processes
from curvdiag.errors import BadArgument, BadInput
from curvdiag.train.controllers import CONTROLLERS

if TYPE_CHECKING:
    from curvdiag.train.loop import TrainSettings

DEFAULT_STEPS = 200


@dataclass(frozen=True)
class TrainRequest:
    """What one ``curvdiag train`` asks for, as its flags say it (see ``curvdiag train --help``)."""

    recipe: Optional[str]
    checkpoint: Optional[Path]
    steps: Optional[int]
    lr: Optional[float]
    controller: str
    compare: bool
    sharpness_every: int
    checkpoint_every: int
    kappa: Optional[float]
    seed: int
    max_batches: Optional[int]
    out: Optional[Path]
    resume: Optional[Path]
    quiet: bool
    threads: Optional[int] = None  # None: the default (curvdiag.curvature.threads)
    device: Optional[str] = None  # None: cpu, or with --resume the stopped run's device
    memory: Optional[int] = None  # bytes the kept gradient graphs may take; None: a quarter of the available
    engage: str = "edge"  # throttle: when it takes over (curvdiag.train.controllers.ENGAGE_MODES)


@dataclass(frozen=True)
class PlannedRun:
    """One replay: its controller, run directory, start (recipe, checkpoint or a stopped run's state)."""

    controller: str
    run_dir: Path
    recipe: str
    checkpoint: Optional[str]
    settings: TrainSettings
    resume_state: Optional[dict] = None


def controller_names(request: TrainRequest) -> List[str]:
    """The controllers of ``--controller a,b`` in run order (with ``--compare``: the baseline first)."""
    names = [name.strip() for name in request.controller.split(",") if name.strip()]
    if not names:
        raise BadInput("--controller is empty", hint=f"choose from {', '.join(CONTROLLERS)}")
    for name in names:
        if name not in CONTROLLERS:
            raise BadInput(f"--controller {name}: unknown", hint=f"choose from {', '.join(CONTROLLERS)}")
    if len(names) > 1 and not request.compare:
        raise BadInput("several controllers need --compare")
    return ["none"] + [name for name in names if name != "none"] if request.compare else names


def new_runs(request: TrainRequest) -> List[PlannedRun]:
    """One run per controller, into ``--out`` (with ``--compare``: ``baseline/`` and ``<controller>/`` in it)."""
    from curvdiag.train.loop import TrainSettings

    if request.recipe is None:
        raise BadInput("train needs a RECIPE (or --resume RUN_DIR)")
    base = request.out or Path("runs") / Path(request.recipe).stem
    runs = []
    for name in controller_names(request):
        settings = TrainSettings(steps=DEFAULT_STEPS if request.steps is None else request.steps, lr=request.lr,
                                 controller=name, seed=request.seed, sharpness_every=request.sharpness_every,
                                 checkpoint_every=request.checkpoint_every, kappa=request.kappa,
                                 max_batches=request.max_batches, device=request.device or "cpu", memory=request.memory,
                                 engage=request.engage)
        run_dir = base / ("baseline" if name == "none" else name) if request.compare else base
        runs.append(PlannedRun(name, run_dir, request.recipe, str(request.checkpoint) if request.checkpoint else None,
                               settings))
    return runs


def resumed_run(run_dir: Path, steps: Optional[int], device: Optional[str] = None) -> PlannedRun:
    """The stopped run in ``run_dir``, continued from its newest complete checkpoint to ``steps``
    (default: its own) on ``device`` (default: its own); from the start when it has none. Runs the
    recipe that run.json (or the checkpoint) names: a run directory is trusted like a recipe."""
    from curvdiag.train.loop import resume_point

    point = resume_point(run_dir)
    settings = point.settings
    settings.steps = steps if steps is not None else settings.steps
    settings.device = device or settings.device  # checkpoints are read onto the CPU: any device resumes them
    if settings.steps < point.step:
        raise BadInput(f"--steps {settings.steps}: the run in {run_dir} already completed "
                       f"{point.step} steps", hint="give a larger --steps to continue it")
    return PlannedRun(settings.controller, Path(run_dir), point.recipe, point.checkpoint, settings, point.state)


def replay(run: PlannedRun, quiet: bool, started: float) -> Any:
    """Train one planned run, showing its progress on stderr (:mod:`curvdiag.cli.progress`: a bar on a
    terminal, a step line every 10 s elsewhere); its :class:`~curvdiag.train.loop.RunSummary`."""
    from curvdiag.cli.progress import StepLines, is_terminal
    from curvdiag.train.loop import Trainer

    trainer = Trainer(run.recipe, run.checkpoint, run.run_dir, run.settings, resume_state=run.resume_state)
    append = run.resume_state is not None
    label, total = f"train [{run.controller}]", run.settings.steps
    if quiet:
        return trainer.run(append=append)
    if not is_terminal(sys.stderr):
        lines = StepLines(sys.stderr, started, label, total, completed=trainer.start_step)
        trainer.on_products = lambda purpose, count: lines.working(_products_info(purpose, count))
        return trainer.run(on_step=lambda record: lines.update(record["step"] + 1, _step_info(record)), append=append)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True) as progress:
        task = progress.add_task(label, total=total, completed=trainer.start_step, info="")

        def on_step(record: dict) -> None:
            progress.update(task, completed=record["step"] + 1, info=_step_info(record))

        trainer.on_products = lambda purpose, count: progress.update(task, info=_products_info(purpose, count))
        return trainer.run(on_step=on_step, append=append)


def _step_info(record: dict) -> str:
    return f"loss {record['loss']:.4g} · lr {record['lr']:.3g} · throttle {record['throttle']:.3g}"


def _products_info(purpose: str, count: int) -> str:
    """What a long step is doing: the throttle's floor or --sharpness-every's λmax, with its products."""
    return f"{'λmax' if purpose == 'sharpness' else 'throttle floor'}: {count} HVPs"


def run_train(request: TrainRequest) -> None:
    """Plan the runs, replay each (on ``--threads``), and print them side by side (only rank 0 prints)."""
    from curvdiag.curvature.threads import torch_threads

    if request.kappa is not None and not 0 < request.kappa <= 1:
        raise BadArgument("kappa", request.kappa, "must lie in (0, 1]")
    for argument in ("sharpness_every", "checkpoint_every"):
        if getattr(request, argument) < 0:
            raise BadArgument(argument, getattr(request, argument), "must be at least 0")
    with torch_threads("default" if request.threads is None else request.threads):
        _replay_all(request)


def _replay_all(request: TrainRequest) -> None:
    from rich.console import Console

    from curvdiag.curvature import distributed
    from curvdiag.report.runs import render_comparison

    started = time.monotonic()
    runs = [resumed_run(request.resume, request.steps, request.device)] if request.resume is not None else new_runs(request)
    quiet = request.quiet or distributed.rank() != 0
    console = Console(quiet=quiet)
    warn = Console(stderr=True, quiet=distributed.rank() != 0, markup=False, highlight=False, soft_wrap=True)
    summaries = []
    for run in runs:
        summary = replay(run, quiet, started)
        summaries.append((run.controller, run.run_dir, summary))
        for failed in summary.save_failures:
            warn.print(f"warning: a checkpoint could not be saved (retried at the next one): {failed}")
        if summary.interrupted:
            console.print(f"interrupted at step {summary.steps_completed}: log and final.pt kept in {run.run_dir}",
                          markup=False, highlight=False)
            raise typer.Exit(code=130)
    render_comparison(summaries, console)


def _stored_device(run_dir: Optional[Path]) -> str:
    """The device a stopped run trained on (its run.json), which its resume keeps by default; cpu
    for a new run, or when run.json is missing or unreadable (the resume then says why)."""
    if run_dir is None:
        return "cpu"
    from curvdiag.errors import CurvdiagError
    from curvdiag.results.run_dir import read_run_summary

    try:
        device = read_run_summary(run_dir).settings.get("device", "cpu")
    except (CurvdiagError, OSError, AttributeError):  # the resume itself says what is wrong with the run
        return "cpu"
    return device if isinstance(device, str) else "cpu"


def train(
    ctx: typer.Context,
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe file or module (not needed with --resume).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Start from this checkpoint (model and optimizer state); default: model() initialisation.")] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Total optimizer steps (default {DEFAULT_STEPS}; with --resume: the stopped run's).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Override the learning rate of the recipe's optimizer.")] = None,
    controller: Annotated[str, typer.Option(help=f"{', '.join(CONTROLLERS)} (comma-separated with --compare).")] = "none",
    compare: Annotated[bool, typer.Option("--compare", help="Also run without a controller, same start, data order and seed; print a side-by-side table.")] = False,
    sharpness_every: Annotated[int, typer.Option(help="Measure λmax (all batches) every K steps; 0 never.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Write checkpoints/step_N.pt (and run.json) every K steps, so that a killed run resumes from there; 0 only final.pt.")] = 50,
    kappa: Annotated[Optional[float], typer.Option(
        help="Throttle: the fraction κ of the edge, in (0, 1]; default √(1 − β) for the optimizer's momentum β, × 0.8 when β > 0 (C_t has its batch noise taken out).")] = None,
    engage: Annotated[ThrottleEngage, typer.Option(parser=ThrottleEngage.parse, help="Throttle: when it takes over. edge: the first step on which the optimizer's own rate would cross the edge (η·λmax > T), then for the rest of the run; a run that trains stably is left alone. always: from the first step, holding κ of the edge (slows a stable run too).")] = ThrottleEngage.edge,
    seed: Annotated[int, typer.Option(help="Seed (model init, data order of shuffling loaders, probes).")] = 0,
    max_batches: Annotated[Optional[int], typer.Option(help="Use only the first N batches of data() per epoch.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<recipe name>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the stopped run in this directory.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (under --nproc, cuda is each rank's own GPU, with nccl); default cpu, or with --resume the stopped run's.")] = None,
    memory: Annotated[Optional[int], typer.Option(parser=parse_bytes, metavar="BYTES", help="Memory the kept gradient graphs of the throttle's floor and of --sharpness-every may take (512MiB, 2GiB; default: a quarter of the device's available memory); past it the graphs of the leading batches that fit are kept and the rest double-backward.")] = None,
    threads: Annotated[Optional[int], typer.Option(metavar="N", help="CPU threads for torch (default 1, measured fastest on a shared machine; OMP_NUM_THREADS, when set, is kept). More can be faster on idle cores with a large model.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no table.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    nproc: Annotated[Optional[int], typer.Option(help="Train data-parallel on N processes: relaunches this command under torchrun (each step's batch is split over the ranks).")] = None,
    dist_timeout: Annotated[float, typer.Option(help="Under several processes: seconds a rank waits for the others before the job fails.")] = 120.0,
) -> None:
    """Replay training with a curvature controller (and, with --compare, without) and log it."""
    request = TrainRequest(
        recipe=recipe, checkpoint=checkpoint, steps=steps, lr=lr, controller=controller, compare=compare,
        sharpness_every=sharpness_every, checkpoint_every=checkpoint_every, kappa=kappa, seed=seed,
        max_batches=max_batches, out=out, resume=resume, quiet=quiet, threads=threads, device=device, memory=memory,
        engage=engage.value)
    with across_processes(ctx, nproc, debug, device or _stored_device(resume), dist_timeout):
        run_train(request)
