"""``curvdiag train``: replay training from a checkpoint with a learning-rate controller
(DESIGN §2.4, §3.7–3.9) and log everything a person needs to see whether it saved the run.

The loop reads top to bottom (:meth:`Trainer._run`): take a batch, forward, stop cleanly on a
non-finite or exploding loss, backward, let the controller scale this step's learning rate and
step (:class:`curvdiag.train.adapters.ControlledOptimizer` drives every controller of the one table
:data:`curvdiag.train.controllers.CONTROLLERS`), measure, log, checkpoint. λmax is measured with the
probe code (:func:`curvdiag.probes.sharpness.lambda_max`), the throttle's floor with the one power
iteration; thresholds come from :mod:`curvdiag.stability`.

Run directory: ``metrics.jsonl`` (one object per step), ``run.json`` (summary and settings),
``final.pt`` (the last state whose loss was finite: model, optimizer, step) and
``checkpoints/step_N.pt`` every ``checkpoint_every`` steps.

Crash safety: ``run.json`` is written before the first step (``in_progress: true``) and rewritten
after every checkpoint; every file is replaced atomically (write, fsync, rename), so a kill at any
moment leaves each file whole, old or new. A checkpoint holds everything the next step depends on
(model, optimizer, scheduler, controller, the λmax floor's and the curvature tracker's memory, the
RNG, the run's settings), so :func:`resume_point` + a resumed :class:`Trainer` continue a run from
its newest complete checkpoint exactly as if it had never stopped, with ``metrics.jsonl`` cut back
to that checkpoint's step. A periodic save that fails (disk full) is recorded in
``save_failures`` and retried at the next checkpoint; a final save that fails ends the run with
:class:`~curvdiag.results.run_dir.RunDirectoryError` (exit 1) after writing run.json if it fits.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import math
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from curvdiag._version import __version__
from curvdiag.curvature.distributed import as_communication_error
from curvdiag.curvature import distributed
from curvdiag.results.run_dir import (METRICS_FILE, SUMMARY_FILE, MetricsLog, RunDirectoryError, RunSummary,
                                      describe_os_error, logged_steps, read_run_summary, truncate_metrics, with_ignored_errors,
                                      write_atomically, write_run_summary)
from curvdiag.curvature.linear_operator import Shifted, inner
from curvdiag.curvature.operator import HVP_METHODS, PARTIAL, CurvatureOperator, check_memory, math_attention
from curvdiag.model_state import preserved_state, snapshot
from curvdiag.errors import BadArgument, BadInput, CurvdiagError
from curvdiag.loading import optimizer as optimizer_state
from curvdiag.loading.checkpoint import Checkpoint, load_model_state, read_checkpoint
from curvdiag.loading.recipe import load_recipe
from curvdiag.loading.target import resolve_device
from curvdiag.probes.directional import DirectionalCurvatureTracker
from curvdiag.probes.eigen import power_iteration
from curvdiag.probes.sharpness import lambda_max, preconditioned_lambda_max, preconditioned_operator
from curvdiag.results.json_safe import finite
from curvdiag.stability import stability_constant, throttle_kappa
from curvdiag.train import controllers
from curvdiag.train.adapters import ControlledOptimizer, closure_gradient, optimizer_preconditioner, scheduled_lr
from curvdiag.train.data_parallel import DataParallel


# One checkpoint (torch.save, fsync, rename, then run.json likewise) costs 8–20 ms on the sample
# models, whose steps take 5–23 ms (benchmarks/bench_checkpoint_every.py): every 10 steps adds
# 6–26%, every 50 at most ~6% there and nothing measurable on models whose steps take longer; a kill
# loses at most 50 steps.
DEFAULT_CHECKPOINT_EVERY = 50

# A loss jump re-measures the throttle's floor at most once in this many steps: mini-batch losses jump
# by 10% often. With the batch noise in C_t, measuring every jump cost the momentum and Adam cases
# 0.23–0.39 HVPs a step, one in 5 steps 0.19–0.25 with the same losses, one in 10 0.17–0.19 and up to
# 2.7× the tuned loss. With the noise out (_BatchNoise), 10 seeds of each bench_peers MLP case from both
# starts (runs above 1.5× the tuned loss; worst on the mini-batch cases; the most HVPs a step of any
# run): one in 5 steps 3 of 80, 1.13, 0.27; one in 10: 2 of 80, 1.40, 0.21; one in 15: 3 of 80, 2.19,
# 0.19 (the runs above 1.5 are GD from initialisation but that one).
FLOOR_REST = 10

# Products a floor makes while the throttle has not taken over (engage="edge", after the first 3
# steps, from the previous floor's vector): there the floor only watches for the edge, 2 once engaged.
# One run of bench_controller_overhead.py (5 repeats, the tuned lrs, where no case engages): Adam
# 1.27 → 1.16× a plain run, the transformer 1.31 → 1.21×, 0.14 → 0.08 HVPs a step (the transformer
# at lr 0.002: 0.12 → 0.07). Every result of the failing lrs (seeds 0–19 of the MLP cases, 0–9 of the
# transformer, both starts) and of the safe lrs (seeds 0–4) came out the same (GD at its safe lr
# 1.025 → 1.022); on the lr grids the schedule at peak 5 from initialisation, a late crossing, ended
# 77× the tuned loss against 38× (the fixed run 89×), from the checkpoint 0.779 → 0.765, the
# transformer at 0.02 from initialisation 1.14 → 1.44× (fixed 1.06×), every other cell the same.
# One product on every floor, engaged too, had 28 of 80 runs above 1.5 (_PowerFloor).
WATCH_PRODUCTS = 1

# While the throttle only watches for the edge, a floor due (scheduled, or on a loss jump) waits where
# the edge is far: the rate not risen since the latest floor and WATCH_MARGIN·η_t·max(Ĉ, latest floor)
# ≤ T, with the latest floor at most WATCH_MAX_WAIT·floor_every steps back (Trainer._floor_may_wait).
# At their tuned lrs four of the five cases never engage (GD does: κ = 1, it trains at the edge); the
# transformer's and Adam's floors read 0.3–0.45 of the edge there, so each floor bought nothing,
# and a transformer floor step costs 4–5 plain steps (a product 2.1 gradients, the batch-noise
# gradient, the graph kept by the step's backward). Waiting, bench_controller_overhead (5 repeats,
# 300 steps, two runs): the transformer 1.21–1.25 → 1.05–1.09× a plain run, Adam 1.16–1.24 →
# 1.09–1.11× (11 → 5 floors, most of them loss jumps), 0.06–0.08 → 0.04 HVPs a step. Every
# failing-lr result (seeds 0–9 of the MLP cases and the transformer, both starts), every safe-lr
# result (seeds 0–4) and every lr-grid cell came out the same to the digit but one: the transformer
# at 0.02 from initialisation 1.44 → 1.14× the tuned loss (the fixed run 1.06×). The grids' late
# crossings come within half the edge's reach of what the throttle knew.
WATCH_MARGIN = 2.0
WATCH_MAX_WAIT = 2

# The batch noise's average over floors: each new sample weighs 1 − NOISE_WEIGHT (one pair of batches
# is one draw of a noisy quantity; the noise level moves slowly over training).
NOISE_WEIGHT = 0.5

# With the batch noise out of C_t (_BatchNoise) the throttle's fraction for momentum β > 0 is
# NOISE_FREE_KAPPA·√(1 − β): √(1 − β) was measured with the noise in, which at the failing rates held
# C_t about 10% above its signal. bench_peers' mini-batch cases (momentum, Adam, schedule), 10 seeds
# each from initialisation and from the checkpoint (final loss ÷ the tuned fixed lr): noise in, κ =
# √(1 − β): 6 of 60 runs above 1.5, worst 3.97; noise out, scale 1: 13 of 60 (momentum median 1.5–2.1);
# 0.9: 1 of 60 (1.88); 0.8: 0 of 60, worst 1.08. At a third to a half of the tuned lr (the runs
# that need no throttle) against the untouched run, seeds 0–4: momentum 1.49 / 1.69 → 1.07 / 1.12,
# schedule 1.02 / 1.13 → 1.03 / 1.00 (worst, from init / checkpoint). Plain SGD (β = 0) keeps κ = 1:
# only full-batch GD, which has no batch noise, was measured. Adam's κ sits just below a cliff: at a
# safe lr the throttle still holds the transformer back (lr 0.002, seeds 0–4 from initialisation:
# 1.17× the untouched run, geometric mean), but a larger κ for the Adam family only, which frees it
# (× 1.25: 1.08, × 2: 1.03), breaks the Adam MLP at its failing lr (seeds 0–19 from both starts,
# runs above 1.5× the tuned loss: none at × 1, 10 of 40 at × 1.25 (worst 5.9), 28 of 40 at × 1.5,
# 34 of 40 at × 2). Nor does a κ that grows while the loss stays below its running mean (the Adam
# family only; × 1.02 a step up to 2κ, × 0.8 on a step above): the Adam MLP at its failing lr gains
# (geometric means over both starts, seeds 0–9 / 10–19: 0.33 / 0.43 → 0.31 / 0.28, none above 1.5)
# and the transformer at lr 0.002 goes to 1.08, but the transformer at its failing lr from
# initialisation ends above 1.5 in 3 of 10 seeds (to 89×) against none (× 1.01 up to 1.5κ, × 0.5 on
# a rise: 2 of 10): its loss, near 10⁻³ by then, spikes once the rate grows and does not recover
# within the run.
NOISE_FREE_KAPPA = 0.8


@dataclass
class TrainSettings:
    steps: int = 200
    lr: Optional[float] = None  # overrides every group of the recipe's optimizer
    controller: str = "none"
    seed: int = 0
    sharpness_every: int = 0  # measure λmax on all batches every K steps (0: never)
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # 0: only final.pt
    divergence_factor: float = 1e3  # loss above this × the first loss counts as divergence
    kappa: Optional[float] = None  # throttle: the fraction κ of the edge; None: √(1 − β) for momentum β, × NOISE_FREE_KAPPA if β > 0
    decay: float = 0.95  # throttle: Ĉ relaxes by this factor per step
    floor_every: int = 20  # throttle: λmax floor re-estimated this often (while it only watches, far from the edge, up to 3× apart) ...
    floor_jump: float = 0.1  # ... and whenever the loss rises this fraction above its running mean
    floor_jump_decay: float = 0.9  # the running mean: an exponential average of the step losses
    same_batch_curvature: bool = False  # throttle: C_t on the step's own batch (one more forward and backward)
    catapult_steps: Optional[int] = None  # throttle: the fraction falls from 3κ to κ over these first steps; None: 50 with a checkpoint, else 0
    engage: str = "edge"  # throttle: "edge", from the first step whose η·λ̂ exceeds T; "always", from the first step (controllers.ENGAGE_MODES)
    clip_norm: float = 1.0
    newton_gamma: float = 1e-3
    max_batches: Optional[int] = None
    device: str = "cpu"  # cpu, cuda or cuda:N (under torchrun, cuda is each rank's own GPU)
    memory: Optional[int] = None  # bytes the floor's and λmax's kept graphs may take; None: a quarter of the available


# Where the run directory cannot be made for a reason the user controls (exit 2, not 1).
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.ENAMETOOLONG}


def check_settings(settings: TrainSettings) -> None:
    """BadArgument for a setting out of its range (a learning rate must be a positive finite number)."""
    for name in ("steps", "floor_every"):
        if not isinstance(getattr(settings, name), int) or getattr(settings, name) < 1:
            raise BadArgument(name, getattr(settings, name), "must be at least 1")
    if settings.lr is not None and not (isinstance(settings.lr, (int, float)) and math.isfinite(settings.lr)
                                        and settings.lr > 0):
        raise BadArgument("lr", settings.lr, "must be a positive finite number")
    for name in ("sharpness_every", "checkpoint_every"):
        if not isinstance(getattr(settings, name), int) or getattr(settings, name) < 0:
            raise BadArgument(name, getattr(settings, name), "must be at least 0")
    if not isinstance(settings.seed, int) or not -2**63 <= settings.seed < 2**64:
        raise BadArgument("seed", settings.seed, "must fit in 64 bits (−2^63 ≤ seed < 2^64)")
    if settings.catapult_steps is not None and not (isinstance(settings.catapult_steps, int) and settings.catapult_steps >= 0):
        raise BadArgument("catapult_steps", settings.catapult_steps, "must be an integer ≥ 0")
    check_memory(settings.memory)
    if settings.engage not in controllers.ENGAGE_MODES:
        raise BadArgument("engage", settings.engage, f"must be one of {', '.join(controllers.ENGAGE_MODES)}")
    if settings.kappa is not None and not (isinstance(settings.kappa, (int, float)) and 0 < settings.kappa <= 1):
        raise BadArgument("kappa", settings.kappa, "must lie in (0, 1]")
    for name in ("divergence_factor", "decay", "floor_jump", "floor_jump_decay", "clip_norm", "newton_gamma"):
        value = getattr(settings, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise BadArgument(name, value, "must be a positive finite number")


def prepare_run_directory(out: Path) -> None:
    """Create the run directory, or say why not: BadArgument(out) when the path is unusable
    (a file, no permission, read-only), RunDirectoryError for other I/O errors."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".curvdiag-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if exc.errno in _UNWRITABLE:
            raise BadArgument("out", str(out), f"cannot write the run directory: {describe_os_error(exc)}") from exc
        raise RunDirectoryError(out, exc) from exc


def _what_raised(exc: BaseException) -> str:
    """``ValueError: bad batch`` (the first line), or ``sys.exit(3)``."""
    if isinstance(exc, SystemExit):
        return f"sys.exit({exc.code!r})"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@dataclass
class ResumePoint:
    """Where ``--resume`` continues a run: its newest complete checkpoint (``state``, as Trainer's
    ``resume_state``; None: no checkpoint, start over) and the run's recipe and settings."""

    step: int
    recipe: str
    checkpoint: Optional[str]
    settings: TrainSettings
    state: Optional[Dict[str, Any]]


def _settings_from(document: Any, source: str) -> TrainSettings:
    """TrainSettings from a stored dict (run.json or a checkpoint's ``run``), checked field by field."""
    defaults = TrainSettings()
    if not isinstance(document, dict):
        raise BadInput(f"{source}: malformed settings (expected an object)")
    values = {}
    for name, value in document.items():
        if not hasattr(defaults, name):
            continue  # a setting of another version: ignored
        default = getattr(defaults, name)
        expected = (type(None), int, float) if name in ("lr", "max_batches", "kappa", "catapult_steps", "memory") else type(default)
        if expected is float:
            expected = (int, float)
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            raise BadInput(f"{source}: malformed setting {name}={value!r}")
        values[name] = value
    if "engage" not in document:  # a run of a version before --engage: its throttle held from the first step
        values["engage"] = "always"
    settings = TrainSettings(**values)
    try:
        check_settings(settings)
        controllers.builder_of(settings.controller)
    except BadInput as exc:
        raise BadInput(f"{source}: {exc.message}") from exc
    return settings


def save_state(state: Dict[str, Any], path: Path) -> None:
    """``torch.save(state)`` to ``path`` atomically (:func:`~curvdiag.results.run_dir.write_atomically`:
    a kill leaves the old file or the new one, never half of one); OSError when it cannot."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(Path(path), buffer.getvalue())


def _step_of_name(path: Path) -> int:
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def resume_point(run_dir: Path) -> ResumePoint:
    """The newest complete checkpoint of ``run_dir`` (final.pt or checkpoints/step_N.pt) whose step
    the log reaches; run.json when present, else that checkpoint, says which recipe and settings.
    Files left by a kill during a write (``*.tmp``) are removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir}: not a curvdiag run directory (no such directory)")
    for leftover in [*run_dir.glob("*.tmp"), *run_dir.glob("checkpoints/*.tmp")]:
        with_ignored_errors(leftover.unlink)
    summary = read_run_summary(run_dir) if (run_dir / SUMMARY_FILE).is_file() else None
    logged = len(logged_steps(run_dir))
    candidates = sorted(run_dir.glob("checkpoints/step_*.pt"), key=_step_of_name, reverse=True)
    chosen = None
    for path in [run_dir / "final.pt", *candidates] if (run_dir / "final.pt").is_file() else candidates:
        try:
            checkpoint = read_checkpoint(path)
        except BadInput:
            continue  # unreadable: an older one will do
        step = checkpoint.step or 0
        if step <= logged and (chosen is None or step > chosen.step):
            chosen = checkpoint
    if summary is None and chosen is None:
        raise BadInput(f"{run_dir}: not a curvdiag run directory (no run.json and no checkpoint)")
    if summary is not None:
        recipe, origin, settings = summary.recipe, summary.checkpoint, _settings_from(summary.settings, str(run_dir / SUMMARY_FILE))
    else:
        run = chosen.extras.get("run")
        if not isinstance(run, dict) or not isinstance(run.get("recipe"), str):
            raise BadInput(f"{run_dir}: no run.json, and {chosen.path} does not say which recipe wrote it",
                           hint="resume needs a checkpoint written by curvdiag train")
        recipe, origin, settings = run["recipe"], run.get("checkpoint"), _settings_from(run.get("settings"), chosen.path)
    if not isinstance(recipe, str) or not (origin is None or isinstance(origin, str)):
        raise BadInput(f"{run_dir / SUMMARY_FILE}: malformed (recipe {recipe!r}, checkpoint {origin!r})")
    if chosen is None:
        return ResumePoint(0, recipe, origin, settings, None)
    state = {"path": chosen.path, "model_state": chosen.model_state, "optimizer_state": chosen.optimizer_state,
             "step": chosen.step or 0, "resume": True, "extras": chosen.extras}
    return ResumePoint(chosen.step or 0, recipe, origin, settings, state)


def _flat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class _PowerFloor:
    """The throttle's floor, since C_t only bounds λmax from below: λmax on the current batch
    (preconditioned for Adam) by the one power iteration, 2 products (4 after a negative
    dominant eigenvalue, :meth:`estimate`) warm-started from the previous
    estimate's vector. The first starts from the step's gradient (in the operator's metric), which
    leans towards the top eigenvectors; a random vector drawn from the run's seed only when that
    gradient is zero. Why not always random: 2 products from a random start underestimated the
    preconditioned λmax (≈5,600) of ``diverge_adam.py`` at step 0 as 0–1,800 depending on the seed,
    and the throttle held that run for 3 seeds of 6; from the gradient it holds all three
    ``diverge_*`` cases.

    Cheaper floors tried and rejected (bench_peers' cases, 10 seeds from both starts; runs above
    1.5× the tuned loss): 1 product from the warm vector (its Rayleigh quotient, 0.32 where 2 read
    0.76 on diverge_gd): 28 of 80 with GD diverging; a second product only when the first's residual
    is above 0.2θ: 8 of 80 for 10–20% fewer products; the Hessian of every other sample of batches of
    64 or more (half the product, and the noise sample from the two halves at no gradient): 2 of 80
    and whole-run cost 1.08–1.22× against 1.22–1.29×, but the transformer from initialisation 4 of 30
    against 1 of 30: in Adam's metric a half's λmax jumps where the halves' curvatures cancel
    (17,081 against ~500 around it) and holds the rate down for ~70 steps; both products in one
    batched backward (``is_grads_batched``): 1.2× slower than two; forward differences of the step's
    gradient, (∇L(θ + h v̂) − ∇L(θ))/h·‖v‖ (one gradient a product with no graph kept, where a
    kept-graph product costs the transformer 2.1 gradients: a floor 3 gradients instead of ~5.5):
    within 1% of the exact product on the GELU transformer at h = 10⁻³, but 20–900% off on the ReLU
    MLPs, whose kinks the difference crosses; even on the transformer 1 of 20 runs above 1.5 at h =
    10⁻³ (2.35) and 2 of 20 at 3·10⁻⁴ (5.35), against 0 of 20 exact."""

    def __init__(self, seed: int):
        self.seed = seed
        self.vector: Optional[torch.Tensor] = None
        self.hvps = 0
        self.last_step: Optional[int] = None  # the step of the latest estimate
        self.lr: Optional[float] = None  # the scheduled learning rate of that step

    def estimate(self, operator: Any, gradient: torch.Tensor, products: int = 2) -> float:
        """λmax estimate of ``operator`` from ``products`` products (2; :data:`WATCH_PRODUCTS` while
        the throttle only watches for the edge); ``gradient`` (n,) is the step's gradient in its metric.
        When the 2 products find a negative dominant eigenvalue θ, 2 more on H − θI from the
        gradient estimate λmax − θ, whose eigenvalue dominates there when θ is near λmin (before,
        the shifted run started from a random vector with the one product left: its Rayleigh
        quotient, ≈ tr(H)/n, often negative, so no floor entered Ĉ, and it replaced the warm vector;
        on bench_peers' transformer such floors let the rate rise 3–4× above the tuned one between
        floors)."""
        has_gradient = bool(gradient.any())
        start = self.vector if self.vector is not None else (gradient if has_gradient else None)
        result = power_iteration(operator, top_k=1, max_matvecs=products, seed=self.seed, start=start, shift_negative=False)
        self.hvps += result.matvecs
        value, self.vector = result.eigenvalues[0], result.eigenvectors[0]
        if value < 0:
            shifted = power_iteration(Shifted(operator, value), top_k=1, max_matvecs=2, seed=self.seed,
                                      start=gradient if has_gradient else None, shift_negative=False)
            self.hvps += shifted.matvecs
            if shifted.eigenvalues[0] > 0:  # else λmin − θ dominated too (θ was not near λmin): keep the last vector
                value, self.vector = shifted.eigenvalues[0] + value, shifted.eigenvectors[0]
            else:
                self.vector = start
        return value


class _BatchNoise:
    """E‖ξ_t − ξ_{t−1}‖² for the throttle's consecutive C_t: ΔG = HΔθ + (ξ_t − ξ_{t−1}) with ξ a
    batch's gradient noise, which does not shrink with the step, so at a safe rate (short steps) it
    made C_t up to twice the λmax floor and the factor fall to ~0.6 where none was needed. Sampled on
    every floor step as ‖∇L_{t−1}(θ_t) − ∇L_t(θ_t)‖² in the step's metric (one gradient of the
    previous step's batch at the weights the floor measures, dropout off), averaged over floors with
    weight :data:`NOISE_WEIGHT`; 0 while every step sees the same batch (full-batch GD). The sample
    draws no dropout masks, so it holds none of their noise; a recipe that refills one batch object
    in place looks like full-batch data, and is never sampled. Only once a sample is taken and no
    forward has drawn from the RNG does the throttle count C_t whole (``noise_free``); until then,
    and for the rest of a run with dropout, it caps C_t at controllers.NOISE_CAP floors. Under SGD
    the step itself, made from ∇L_{t−1}, correlates with ξ_{t−1}: C_t also drops that part, the
    noise gain of :meth:`curvdiag.train.adapters.ControlledOptimizer._noise_gain`."""

    def __init__(self):
        self.value: Optional[float] = None  # the average so far; None before the first sample
        self.previous: Optional[Tuple[Any, int, int]] = None  # the last step's (batch, size, global size)

    def add(self, sample: float) -> float:
        self.value = sample if self.value is None else NOISE_WEIGHT * self.value + (1 - NOISE_WEIGHT) * sample
        return self.value


def _checked_build_options(saved: Any) -> Dict[str, Dict[str, str]]:
    """A checkpoint's operator build options per purpose ("floor", "sharpness"): a resumed run builds
    its operators as the uninterrupted run did (and runs a scheduled floor's forward in its kernel).
    ValueError for anything else."""
    if not isinstance(saved, dict) or not set(saved) <= {"floor", "sharpness"}:
        raise ValueError(f"build options {saved!r}")
    for options in saved.values():
        if not (isinstance(options, dict) and set(options) == {"hvp_method", "attention"}
                and options["hvp_method"] in HVP_METHODS + (PARTIAL,) and options["attention"] in ("auto", "math")):
            raise ValueError(f"build options {options!r}")
    return {purpose: dict(options) for purpose, options in saved.items()}


def _same_batch(a: Any, b: Any) -> bool:
    """Whether two batches hold the same data (tensors equal; lists, tuples and dicts item by item)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_batch(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):  # dicts, Hugging Face's BatchEncoding
        return a.keys() == b.keys() and all(_same_batch(a[k], b[k]) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 -- an object without a plain ==: treat as different
        return False


@dataclass
class _Progress:
    """What the loop has done so far: the numbers run.json sums up, the state to keep, how it ended."""

    step: int  # the step being taken (settings.steps once all are done)
    clean: Optional[int]  # the step the live weights hold, None while they change
    last_good: Dict[str, Any]  # the state from before the step being taken
    losses: List[float] = field(default_factory=list)
    factors: List[float] = field(default_factory=list)
    times: List[float] = field(default_factory=list)
    initial_loss: Optional[float] = None
    loss_average: Optional[float] = None  # mini-batch losses scatter: compare with their mean
    floor_may_wait: bool = False  # a floor due on the step being taken may wait (the edge is far)
    floor_scheduled: bool = False  # the step being taken measures the floor whatever its loss
    diverged: bool = False
    interrupted: bool = False
    failure: Optional[BaseException] = None
    save_failures: List[str] = field(default_factory=list)


class Trainer:
    """One replay: build from the recipe (and checkpoint), then :meth:`run`. ``resume_state`` (a
    checkpoint written by this loop, as a dict with ``resume: True``) continues a stopped run."""

    def __init__(self, recipe_spec: str, checkpoint: Optional[str], out: Path, settings: TrainSettings,
                 resume_state: Optional[Dict[str, Any]] = None):
        builder = controllers.builder_of(settings.controller)  # an unknown name fails before the recipe runs
        check_settings(settings)
        if settings.catapult_steps is None:  # trained weights in a new run: the throttle may cross the edge first
            settings = replace(settings, catapult_steps=controllers.CATAPULT_STEPS if checkpoint else 0)
        self.settings, self.out, self.checkpoint_path = settings, Path(out), checkpoint
        self._loop: Optional[Tuple[ControlledOptimizer, DirectionalCurvatureTracker, _PowerFloor]] = None
        self._batch_noise = _BatchNoise()
        self._forward_draws_rng = False  # seen once, for the rest of the run (dropout)
        # Called with (purpose, its operator's products so far) after each product of the throttle's
        # floor ("floor") or of --sharpness-every's λmax ("sharpness"): a heartbeat inside a long step.
        self.on_products: Optional[Callable[[str, int], None]] = None
        if distributed.rank() == 0:
            prepare_run_directory(self.out)
        torch.manual_seed(settings.seed)
        self.device = resolve_device(distributed.device_for(settings.device))
        self.recipe = load_recipe(recipe_spec)
        self.model = self.recipe.model()
        self.model.to(self.device)  # before optimizer(params): its state lives where the parameters do
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise BadInput(f"recipe {self.recipe.name}: the model has no trainable parameters")
        if not self.recipe.has("optimizer"):
            raise BadInput(f"recipe {self.recipe.name}: train needs optimizer(params) in the recipe")
        self.optimizer = self.recipe.optimizer(self.params)
        optimizer_state.check_hyperparameters(self.optimizer, f"recipe {self.recipe.name}: optimizer(params)")
        self.start_step, self.resumed = 0, bool(resume_state and resume_state.get("resume"))
        self._start_lambda: Optional[float] = None  # λmax at the starting weights (run.json)
        self._build_options: Dict[str, Dict[str, str]] = {}  # per purpose, how its first operator ended up (_operator)
        self._resume_extras: Dict[str, Any] = dict(resume_state.get("extras") or {}) if self.resumed else {}
        source = resume_state or (read_checkpoint(checkpoint).__dict__ if checkpoint else None)
        if source is not None:
            self._load(source)
        if settings.lr is not None and not self.resumed:  # resumed: the optimizer state holds the rates in use
            for group in self.optimizer.param_groups:
                group["lr"] = settings.lr
                group["initial_lr"] = settings.lr
        self.scheduler = self._scheduler()
        info = optimizer_state.from_optimizer(self.optimizer)
        self.info = info
        self.constant = stability_constant(info.family, info.momentum, info.betas[0] if info.betas else 0.9) if info.family else None
        if self.constant is None and "constant" in controllers.hyperparameters_of(builder):
            raise BadInput(f"the {settings.controller} needs a known stability threshold; {info.name} has none",
                           hint="use an SGD or Adam-family optimizer, or the controller newton or clip")
        kappa = settings.kappa
        if kappa is None and info.beta > 0 and not settings.same_batch_curvature:  # C_t without the batch noise
            kappa = NOISE_FREE_KAPPA * throttle_kappa(info.beta)
        self.controller = controllers.configured(builder, constant=self.constant, momentum=info.beta, kappa=kappa,
                                                 catapult_steps=settings.catapult_steps, engage=settings.engage,
                                                 decay=settings.decay, max_norm=settings.clip_norm,
                                                 gamma=settings.newton_gamma)
        self.replicas = DataParallel(self.model, self.recipe, settings.max_batches, self.device)

    def _load(self, source: Dict[str, Any]) -> None:
        checkpoint = Checkpoint(source.get("path", "resume"), source["model_state"], source.get("optimizer_state"), source.get("step"))
        load_model_state(self.model, checkpoint)
        if checkpoint.optimizer_state is not None:
            try:
                self.optimizer.load_state_dict(checkpoint.optimizer_state)
            except Exception as exc:  # a state of another optimizer, or a malformed one
                raise BadInput(f"checkpoint {checkpoint.path}: its optimizer state does not fit the recipe's optimizer "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
            optimizer_state.check_hyperparameters(self.optimizer, f"checkpoint {checkpoint.path}")
        self.start_step = int(checkpoint.step or 0) if self.resumed else 0

    def _scheduler(self) -> Any:
        """The recipe's ``scheduler(optimizer)``, at the resumed step when resuming."""
        if not self.recipe.has("scheduler"):
            return None
        rates = [group["lr"] for group in self.optimizer.param_groups]
        scheduler = self.recipe._call("scheduler", self.optimizer)
        if not all(callable(getattr(scheduler, name, None)) for name in ("step", "state_dict", "load_state_dict")):
            raise BadInput(f"recipe {self.recipe.name}: scheduler(optimizer) returned {type(scheduler).__name__}, "
                           "expected a torch.optim.lr_scheduler scheduler")
        saved = self._resume_extras.get("scheduler")
        if saved is not None:
            try:
                scheduler.load_state_dict(saved)
            except Exception as exc:
                raise BadInput(f"the resumed checkpoint's scheduler state does not fit the recipe's scheduler ({exc})") from exc
            for group, lr in zip(self.optimizer.param_groups, rates):  # a new scheduler resets the rates: undo
                group["lr"] = lr
        optimizer_state.check_hyperparameters(self.optimizer, f"recipe {self.recipe.name}: scheduler(optimizer)")
        return scheduler

    # ------------------------------------------------------------------ files
    def _state(self, step: int, progress: Optional["_Progress"] = None) -> Dict[str, Any]:
        """Everything step ``step`` depends on (what a checkpoint holds)."""
        state = {"model": snapshot(self.model.state_dict()), "optimizer": snapshot(self.optimizer.state_dict()),
                 "step": step}
        if self._loop is not None:
            controlled, tracker, floor = self._loop
            memory = controlled.memory()
            state["loop"] = {"controller": list(controlled.state), "floor_vector": floor.vector, "floor_hvps": floor.hvps,
                             "floor_step": floor.last_step, "floor_lr": floor.lr, "batch_noise": self._batch_noise.value,
                             "build_options": self._build_options, "forward_draws_rng": self._forward_draws_rng,
                             "controller_memory": None if memory is None else [list(memory[0]), list(memory[1])],
                             "step_rate": controlled.step_rate,
                             "tracker": list(tracker.state()) if tracker.state() is not None else None,
                             "initial_loss": progress.initial_loss if progress else None,
                             "loss_average": progress.loss_average if progress else None,
                             "rng": torch.get_rng_state(),
                             "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        if self.scheduler is not None:
            state["scheduler"] = snapshot(self.scheduler.state_dict())
        return state

    def _restore_loop(self, progress: "_Progress") -> None:
        """A resumed run: the controller's, floor's and tracker's memory and the RNG as the checkpoint left them."""
        saved = self._resume_extras.get("loop")
        if not isinstance(saved, dict):
            return
        controlled, tracker, floor = self._loop
        try:
            values = saved.get("controller")
            if values is not None:
                controlled.state = type(controlled.state)(*values)
            floor.vector, floor.hvps = saved.get("floor_vector"), int(saved.get("floor_hvps") or 0)
            controlled.load_memory(saved.get("controller_memory"))
            controlled.step_rate = finite(saved.get("step_rate")) or 0.0  # none in a checkpoint of an older version
            floor.last_step = None if saved.get("floor_step") is None else int(saved["floor_step"])
            floor.lr = finite(saved.get("floor_lr"))  # none in a checkpoint of an older version: no floor waits
            self._batch_noise.value = finite(saved.get("batch_noise"))
            controlled.batch_noise = self._batch_noise.value or 0.0
            self._build_options = _checked_build_options(saved.get("build_options") or {})
            self._forward_draws_rng = bool(saved.get("forward_draws_rng", False))
            if saved.get("tracker") is not None:
                tracker.load_state(tuple(saved["tracker"]))
            if saved.get("rng") is not None:
                torch.set_rng_state(saved["rng"])
            if saved.get("cuda_rng") is not None and self.device.type == "cuda":  # dropout masks drawn on the GPU
                torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BadInput(f"the resumed checkpoint's loop state is malformed ({exc})",
                           hint="resume from another checkpoint of the run") from exc
        progress.initial_loss = finite(saved.get("initial_loss"))
        progress.loss_average = finite(saved.get("loss_average"))

    def _run_metadata(self) -> Dict[str, Any]:
        """What a checkpoint says about its run, so that --resume works without run.json."""
        return {"recipe": self.recipe.name, "checkpoint": self.checkpoint_path, "controller": self.settings.controller,
                "settings": asdict(self.settings)}

    def _save(self, state: Dict[str, Any], path: Path) -> None:
        """``state`` to ``path`` atomically (never a half-written checkpoint); OSError when it cannot."""
        if self.replicas.is_writer:
            save_state({**state, "run": self._run_metadata()}, path)

    def _checkpoint(self, progress: "_Progress", metrics: MetricsLog, step: int) -> None:
        """checkpoints/step_N.pt, then run.json saying so; a failure is recorded, and the next
        checkpoint tries again."""
        path = self.out / "checkpoints" / f"step_{step}.pt"
        try:
            metrics.sync()
            self._save(self._state(step, progress), path)
            path = self.out / SUMMARY_FILE
            self._write_summary(self._summary(progress, step, in_progress=True))
        except OSError as exc:
            progress.save_failures.append(f"{path}: {describe_os_error(exc)}")

    def _write_summary(self, summary: RunSummary) -> None:
        if self.replicas.is_writer:
            write_run_summary(self.out, summary)

    # ------------------------------------------------------------------ loop
    def run(self, on_step: Optional[Callable[[Dict[str, Any]], None]] = None, append: bool = False) -> RunSummary:
        """Replay ``settings.steps`` steps; ``on_step(record)`` after each. Interrupted (Ctrl-C,
        SIGTERM), diverged or failed runs still write the log, run.json and the last good state."""
        with _stop_on_signals() as signals:
            return self._run(on_step, append, signals)

    def _run(self, on_step: Optional[Callable[[Dict[str, Any]], None]], append: bool, signals: "_Signals") -> RunSummary:
        """The step loop: one line of metrics.jsonl per step, then the summary however it ended."""
        replicas = self.replicas
        previous_wanted = bool(self.start_step) and self._samples_batch_noise()
        # resume: the data order of an uninterrupted run (and the throttle's previous batch, taken again)
        batches = replicas.batches(skip=self.start_step - 1 if previous_wanted else self.start_step)
        reduce = replicas.sum_over_ranks if replicas.world_size > 1 else None
        controlled = ControlledOptimizer(self.optimizer, self.controller, reduce=reduce)
        tracker, floor = DirectionalCurvatureTracker(self.model), _PowerFloor(self.settings.seed)
        self._loop = (controlled, tracker, floor)
        progress = _Progress(step=self.start_step, clean=self.start_step, last_good={})
        if self.resumed:
            self._restore_loop(progress)
            if replicas.is_writer:  # the log from before the checkpoint, cut back to it: no repeated step
                for record in truncate_metrics(self.out, self.start_step):
                    if not record.get("diverged"):
                        progress.losses.append(record.get("loss"))
                        progress.factors.append(record.get("throttle"))
                        progress.times.append(record.get("seconds"))
        if previous_wanted:  # after the restore, where the first step would have read the stream
            batch, size = self._next_batch(batches, self.start_step - 1)
            self._batch_noise.previous = (batch, size, replicas.global_loss(0.0, size)[1])
        progress.last_good = self._state(self.start_step, progress)
        self._start_lambda = self._lambda_max_at_start()
        try:
            metrics = MetricsLog(self.out if replicas.is_writer else None, append=self.resumed or append)
            self._write_summary(self._summary(progress, self.start_step, in_progress=True))
        except OSError as exc:
            raise RunDirectoryError(self.out, exc) from exc
        try:
            for step in range(self.start_step, self.settings.steps):
                progress.step = step
                record = self._step(progress, batches, controlled, tracker, floor)
                try:
                    metrics.write(record)
                except OSError as exc:
                    raise RunDirectoryError(self.out / METRICS_FILE, exc) from exc
                if progress.diverged:
                    break
                self._account(progress, record, metrics, on_step)
            else:
                progress.step = self.settings.steps
        except KeyboardInterrupt:
            progress.interrupted = True
        except Exception as exc:  # another rank lost, the recipe raised mid-run: keep what was done, then fail
            if signals.received:  # stopped by a signal that also stopped the other ranks: an interruption
                progress.interrupted = True
            else:
                progress.failure = as_communication_error(exc)
        finally:
            signals.armed = False
            with_ignored_errors(metrics.close)  # a write that failed has been reported already
        return self._finish(progress, floor)

    def _step(self, progress: _Progress, batches: Iterator[Tuple[Any, int]], controlled: ControlledOptimizer,
              tracker: DirectionalCurvatureTracker, floor: _PowerFloor) -> Dict[str, Any]:
        """One step: forward, the divergence check, the controlled update, λmax, the scheduler."""
        s = self.settings
        started = time.perf_counter()
        # The state before this step, taken before the forward (which draws dropout masks from the RNG
        # and moves BatchNorm statistics): what an interruption keeps, and what resuming it replays.
        before = self._state(progress.step, progress)
        batch, size = self._next_batch(batches, progress.step)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        progress.floor_may_wait = self._floor_may_wait(progress, controlled, floor)
        progress.floor_scheduled = self._floor_scheduled(progress)
        reusable = self._floor_graph_may_be_reused(progress)
        # A throttle watches whether the forward draws from the RNG (dropout): the batch-noise sample
        # draws no masks, and the floor's operator keeps dropout off.
        rng_before = self._rng_states() if "floor" in self.controller.observes and not self._forward_draws_rng else None
        in_math = reusable and self._build_options["floor"].get("attention") == "math"
        with math_attention() if in_math else contextlib.nullcontext():  # the floor operator's kernel
            local_loss = self.recipe.loss(self.replicas.module, batch)
        if rng_before is not None and not all(torch.equal(a, b) for a, b in zip(rng_before, self._rng_states())):
            self._forward_draws_rng = True
        # The step's graph is the floor operator's only if the forward drew no dropout masks.
        graph_reusable = reusable and not self._forward_draws_rng
        if not local_loss.requires_grad:
            raise BadInput(f"recipe {self.recipe.name}: loss(model, batch) does not depend on the trainable parameters "
                           "(no autograd graph)", hint="is the loss computed under torch.no_grad() or detached?")
        value, total = self.replicas.global_loss(float(local_loss.detach()), size)
        progress.initial_loss = value if progress.initial_loss is None else progress.initial_loss
        if not math.isfinite(value) or value > s.divergence_factor * max(abs(progress.initial_loss), 1e-12):
            progress.diverged = True
            return {"step": progress.step, "loss": value if math.isfinite(value) else None, "diverged": True}
        progress.last_good, progress.clean = before, None
        record = self._update(progress, batch, size, total, local_loss, value, controlled, tracker, floor, graph_reusable)
        if s.sharpness_every and progress.step % s.sharpness_every == 0:
            record.update(self._sharpness(record["lr"]))
        if self.scheduler is not None:
            self.scheduler.step()
        record["seconds"] = time.perf_counter() - started
        return record

    def _next_batch(self, batches: Iterator[Tuple[Any, int]], step: int) -> Tuple[Any, int]:
        """The batch of step ``step`` from the stream; the recipe's failure as one line."""
        try:
            return next(batches)
        except CurvdiagError:
            raise
        except (Exception, SystemExit) as exc:  # the recipe's data iterator, midway
            raise BadInput(f"recipe {self.recipe.name}: data() raised {_what_raised(exc)} at step {step}",
                           hint="run the recipe's data() by hand, or use --debug for the traceback") from exc

    def _samples_batch_noise(self) -> bool:
        """Whether floor steps sample the batch noise: a controller with floors whose C_t is the
        consecutive one (a same-batch C_t has no batch noise)."""
        return "floor" in self.controller.observes and not self.settings.same_batch_curvature

    def _update(self, progress: _Progress, batch: Any, size: int, total: int, local_loss: torch.Tensor, value: float,
                controlled: ControlledOptimizer, tracker: DirectionalCurvatureTracker,
                floor: _PowerFloor, graph_reusable: bool = False) -> Dict[str, Any]:
        """Backward, then the controller's step on the same batch; the step's record. On a step that
        measures the floor, the backward keeps its graph for the floor's operator when that graph is
        the operator's (:meth:`_floor_graph_may_be_reused`, and no dropout drawn): one forward and
        backward fewer per floor."""
        distributed = self.replicas.world_size > 1
        floor_due, floor_graph = self._floor_due(progress, value, floor), None
        try:
            if floor_due and graph_reusable:
                grads = torch.autograd.grad(local_loss, self.params, create_graph=True, allow_unused=True)
                for p, g in zip(self.params, grads):  # .grad as backward() leaves it (a copy: the graph keeps g)
                    p.grad = None if g is None else g.detach().clone()
                floor_graph = (value, grads)
            else:
                (local_loss * self.replicas.backward_scale(size, total) if distributed else local_loss).backward()
        except CurvdiagError:
            raise
        except Exception as exc:  # the user's loss or model (a custom backward), unless a collective failed
            if as_communication_error(exc) is not exc:
                raise
            raise BadInput(f"recipe {self.recipe.name}: the loss's backward raised {_what_raised(exc)}",
                           hint="use --debug for the traceback") from exc
        grad_norm = float(_flat(self._gradients()).norm())
        if self.scheduler is not None:  # what the scheduler set for this step: a NaN rate would train silently wrong
            optimizer_state.check_hyperparameters(self.optimizer, f"recipe {self.recipe.name}: at step {progress.step} "
                                                                  "the scheduler set")
        base_lr = scheduled_lr(self.optimizer)
        theta_before = _flat(self.params).clone()
        consecutive = None if controlled.measures_step else tracker.update()  # the controller measures C_t itself
        same_batch_loss = self._rank_loss(batch, size, total)
        lambda_floor = self._floor(progress, batch, size, controlled, floor, floor_graph) if floor_due else None
        del floor_graph  # the graph goes with the floor's operator
        if floor_due and self._samples_batch_noise():  # after the floor's graphs are gone: one graph at a time
            self._sample_batch_noise(batch, controlled)
        # C_t counts whole once the batch noise is measured and is all of C_t's noise (no dropout).
        controlled.noise_free = self._batch_noise.value is not None and not self._forward_draws_rng
        try:
            needs_closure = "lookahead" in self.controller.observes or self.settings.same_batch_curvature
            controlled.step(same_batch_loss if needs_closure else None, value)
        except RuntimeError as exc:
            if "overflow" not in str(exc):
                raise
            raise BadInput(f"step {progress.step}: the update overflows (learning rate {base_lr:g} × the controller's "
                           f"factor {controlled.factor:g} × the gradient)", hint="give a smaller --lr") from exc
        if self._samples_batch_noise():  # the next floor's batch-noise sample compares with this batch
            self._batch_noise.previous = (batch, size, total)
        factor = controlled.factor
        curvature = controlled.curvature if controlled.measures_step else getattr(consecutive, "value", None)
        record = {"step": progress.step, "loss": value, "lr": base_lr * factor, "base_lr": base_lr,
                  "grad_norm": grad_norm, "update_norm": float((_flat(self.params) - theta_before).norm()),
                  "directional_curvature": curvature, "throttle": factor}
        if lambda_floor is not None:
            record["lambda_floor"] = lambda_floor
        return record

    def _floor_due(self, progress: _Progress, value: float, floor: _PowerFloor) -> bool:
        """Whether this step measures the floor: for a controller that observes one, in the first 3
        steps, every ``floor_every`` steps and whenever the loss jumps above its running mean, a
        jump at most once in :data:`FLOOR_REST` steps; but not while the floor may wait
        (:meth:`_floor_may_wait`: the throttle only watches for the edge, and the edge is far).

        Fewer floors tried and rejected (bench_peers' MLP cases, 10 seeds from both starts, runs
        above 1.5× the tuned loss against 2 of 80; seeds 10–19, held out, against 6 of 80): a jump
        only when the rise also exceeds 2 standard deviations of the losses' scatter (an exponential
        average of the squared deviation, of the loss or of its logarithm; near convergence a 10%
        rise of a mini-batch loss is mostly scatter): 13–15 of 80 with 21–22% fewer products, so the
        jump floors earn their cost; the scheduled floor ``floor_every`` steps after the last floor
        of any kind instead of on multiples of ``floor_every``: 13 of 80, and 7 of 80 held out, 12%
        fewer products. Twice the curvature the throttle knows leaving its factor at 1 skipped one
        floor in one run of the five cases at their tuned and safe lrs while the rule held from the
        first step (the factor is below 1 there); while it only watches for the edge, that test
        (against the edge) is what lets a floor wait (:meth:`_floor_may_wait`)."""
        s = self.settings
        if "floor" not in self.controller.observes:
            return False
        jumped = progress.loss_average is not None and value > (1 + s.floor_jump) * progress.loss_average
        rested = floor.last_step is None or progress.step - floor.last_step >= FLOOR_REST
        return progress.floor_scheduled or (jumped and rested and not progress.floor_may_wait)

    def _floor_scheduled(self, progress: _Progress) -> bool:
        """Whether this step measures the floor whatever its loss (the loss jumps are known only after
        the forward): the first 3 steps and every ``floor_every``, unless the floor may wait."""
        step = progress.step
        due = "floor" in self.controller.observes and (step < 3 or step % self.settings.floor_every == 0)
        return due and not progress.floor_may_wait

    def _floor_may_wait(self, progress: _Progress, controlled: ControlledOptimizer, floor: _PowerFloor) -> bool:
        """Whether a floor due on this step may wait: the throttle only watches for the edge (not
        engaged, past the first 3 steps), the rate has not risen since the latest floor, twice the
        curvature the throttle knows, WATCH_MARGIN·η_t·max(Ĉ, latest floor), is still within the edge T,
        and the latest floor is at most WATCH_MAX_WAIT·``floor_every`` steps back."""
        state = controlled.state
        if not self._only_watches(progress, controlled) or floor.lr is None or floor.last_step is None:
            return False
        if not math.isfinite(state.floor):  # no positive floor yet: nothing known to wait on
            return False
        lr = scheduled_lr(self.optimizer)
        return (lr <= floor.lr and WATCH_MARGIN * lr * controllers.known_curvature(state.curvature, state.floor)
                <= self.constant and progress.step - floor.last_step <= WATCH_MAX_WAIT * self.settings.floor_every)

    @staticmethod
    def _only_watches(progress: _Progress, controlled: ControlledOptimizer) -> bool:
        """Whether the throttle only watches for the edge: not engaged (engage="edge"), past the first
        3 steps, which measure their floors as an engaged throttle's (controllers without an
        ``engaged`` state always count as engaged)."""
        return progress.step >= 3 and not getattr(controlled.state, "engaged", True)

    def _floor_graph_may_be_reused(self, progress: _Progress) -> bool:
        """Whether this step's own gradient graph can be the floor operator's: one process (DDP's
        backward hooks need backward()) and a kept graph already chosen (the first floor still
        chooses). With the fused attention kernel the step's forward is the operator's as it is;
        where that kernel had no double backward and the operator runs math attention, the step's
        forward runs in math attention too, on a step whose floor is :meth:`_floor_scheduled` (the
        rest keep the fused kernel). Never once a forward has drawn from the RNG (dropout: the
        operator keeps dropout off, so the step's graph is another Hessian's)."""
        options = self._build_options.get("floor")
        if self.replicas.world_size != 1 or options is None or options.get("hvp_method") != "kept-graph":
            return False
        if self._forward_draws_rng:  # dropout: the step's graph is another Hessian's
            return False
        return options.get("attention") == "auto" or progress.floor_scheduled

    def _rng_states(self) -> Tuple[torch.Tensor, ...]:
        """The RNG states a forward may draw dropout masks from (the CPU's, and the device's)."""
        if self.device.type == "cuda":
            return torch.get_rng_state(), torch.cuda.get_rng_state(self.device)
        return (torch.get_rng_state(),)

    def _floor(self, progress: _Progress, batch: Any, size: int, controlled: ControlledOptimizer,
               floor: _PowerFloor, graph: Optional[Tuple[float, Any]] = None) -> float:
        """λmax on this batch (preconditioned for Adam), handed to the controller, on a step that
        :meth:`_floor_due`. ``graph``: the step's own (loss, create_graph gradient), or None."""
        floor.last_step, floor.lr = progress.step, scheduled_lr(self.optimizer)
        grads = self._gradients()
        preconditioner = optimizer_preconditioner(self.optimizer, self.params, grads)
        op = self._operator("floor", [batch], [size], first_batch_graph=graph)
        gradient = op.flatten(grads)
        watching = self._only_watches(progress, controlled) and floor.vector is not None
        products = WATCH_PRODUCTS if watching else 2
        if preconditioner is None:
            controlled.floor = floor.estimate(op, gradient, products)
        else:  # in P^{-1/2} H P^{-1/2}'s coordinates the gradient is P^{-1/2} g
            diagonal = op.flatten(preconditioner)
            controlled.floor = floor.estimate(preconditioned_operator(op, diagonal), gradient * diagonal.rsqrt(), products)
        return controlled.floor

    def _gradients(self) -> List[torch.Tensor]:
        """Every parameter's ``.grad``, zeros where a parameter has none (unused in the loss)."""
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]

    def _rank_loss(self, batch: Any, size: int, total: int) -> Callable[[], torch.Tensor]:
        """A closure: this rank's share of ``batch``'s global mean loss at the current weights (train
        mode, dropout off, BatchNorm's buffers untouched); in one process the loss itself."""
        share, distributed = self.replicas.share(size, total), self.replicas.world_size > 1

        def loss() -> torch.Tensor:
            with preserved_state(self.model, train_mode=True):
                local = self.recipe.loss(self.model, batch)
                return local * share if distributed else local
        return loss

    def _sample_batch_noise(self, batch: Any, controlled: ControlledOptimizer) -> None:
        """One sample of :class:`_BatchNoise` on a floor step: ‖∇L_{t−1}(θ_t) − ∇L_t(θ_t)‖² in the
        metric of the step about to be taken (∇L_t(θ_t) is ``.grad``), into the controller's C_t.
        One process skips it when the previous batch is this one (full-batch GD); a sample that is
        not finite (an overflowing gradient) is dropped."""
        noise, previous = self._batch_noise, self._batch_noise.previous
        if previous is None or (self.replicas.world_size == 1 and _same_batch(previous[0], batch)):
            return
        _, previous_grads = closure_gradient(self._rank_loss(*previous), self.params, controlled.reduce)
        now = _flat(self._gradients())
        difference = _flat(previous_grads).sub_(now)
        metric = optimizer_preconditioner(self.optimizer, self.params, now, flat=True)
        del previous_grads, now
        sample = inner(difference, difference if metric is None else difference / metric)
        if math.isfinite(sample):
            controlled.batch_noise = noise.add(sample)

    def _account(self, progress: _Progress, record: Dict[str, Any], metrics: MetricsLog,
                 on_step: Optional[Callable[[Dict[str, Any]], None]]) -> None:
        """A logged step: its numbers for run.json, the periodic checkpoint, then the caller's hook."""
        s, step, value = self.settings, progress.step, record["loss"]
        progress.clean = step + 1
        progress.losses.append(value)
        progress.factors.append(record["throttle"])
        progress.times.append(record["seconds"])
        average = progress.loss_average
        progress.loss_average = value if average is None else s.floor_jump_decay * average + (1 - s.floor_jump_decay) * value
        if s.checkpoint_every and (step + 1) % s.checkpoint_every == 0:
            self._checkpoint(progress, metrics, step + 1)
        if on_step is not None:
            on_step(record)

    def _finish(self, progress: _Progress, floor: _PowerFloor) -> RunSummary:
        """final.pt (the last finite or clean state), run.json; re-raises a failure after writing them
        (a final.pt that cannot be written is the failure: RunDirectoryError, exit 1)."""
        s, replicas = self.settings, self.replicas
        diverged, interrupted, failure = progress.diverged, progress.interrupted, progress.failure
        completed = progress.step if (diverged or interrupted or failure) else s.steps
        final_state = progress.last_good if diverged else self._state(completed, progress)
        if interrupted or failure is not None:
            # Stopped between steps: the live weights are clean. Mid-step they may be half-updated:
            # keep the state from before that step, whose log line was not written either.
            final_state = self._state(progress.clean, progress) if progress.clean is not None else progress.last_good
            completed = int(final_state["step"])
        try:
            self._save(final_state, self.out / "final.pt")
        except OSError as exc:
            failure = progress.failure = failure or RunDirectoryError(self.out / "final.pt", exc)
        spread = None
        if replicas.world_size > 1 and not (interrupted or failure is not None):
            spread = replicas.replica_spread()
        summary = self._summary(progress, completed, in_progress=False, replica_spread=spread)
        try:
            self._write_summary(summary)
        except OSError as exc:
            failure = failure or RunDirectoryError(self.out / SUMMARY_FILE, exc)
        if failure is not None:
            raise failure
        return summary

    def _summary(self, progress: _Progress, completed: int, in_progress: bool,
                 replica_spread: Optional[float] = None) -> RunSummary:
        """run.json's numbers for the steps done so far (``completed`` of them)."""
        losses = [v for v in progress.losses if v is not None]
        factors = [v for v in progress.factors if v is not None]
        times = [v for v in progress.times if v is not None]
        failure = progress.failure
        return RunSummary(
            controller=self.settings.controller,
            steps_completed=completed,
            diverged=progress.diverged,
            interrupted=progress.interrupted,
            final_loss=losses[-1] if losses and not progress.diverged else None,
            best_loss=min(losses) if losses else float("nan"),
            initial_loss=progress.initial_loss,
            mean_throttle=sum(factors) / len(factors) if factors else 1.0,
            seconds_per_step=sum(times) / len(times) if times else 0.0,
            extra_hvps_per_step=self._loop[2].hvps / max(len(times), 1) if self._loop else 0.0,
            recipe=self.recipe.name,
            checkpoint=self.checkpoint_path,
            curvdiag_version=__version__,
            settings=asdict(self.settings),
            world_size=self.replicas.world_size,
            replica_spread=replica_spread,
            failure=None if failure is None else f"{type(failure).__name__}: {failure}".strip()[:500],
            in_progress=in_progress,
            save_failures=list(progress.save_failures),
            lambda_max_at_start=self._start_lambda,
            first_held_step=next((step for step, factor in enumerate(progress.factors)
                                  if factor is not None and factor < 1.0), None),
        )

    def _lambda_max_at_start(self) -> Optional[float]:
        """λmax at the weights the run starts from (with --sharpness-every); a resumed run keeps
        the value its first start measured (its run.json)."""
        if not self.settings.sharpness_every:
            return None
        if self.resumed:
            try:
                return read_run_summary(self.out).lambda_max_at_start
            except CurvdiagError:
                return None
        return self._sharpness(self.optimizer.param_groups[0]["lr"])["lambda_max"]

    def _operator(self, purpose: str, batches: List[Any], sizes: List[int],
                  first_batch_graph: Optional[Tuple[float, Any]] = None) -> CurvatureOperator:
        """The curvature operator at the current weights, for ``purpose`` ("floor": the step's batch,
        "sharpness": all batches). The first one of each purpose chooses the product method ("auto":
        the kept graph's bytes counted while its first batch is built, a check product, and on a
        kernel without double backward the tries of the fallbacks); later ones are built as it ended
        up (:meth:`CurvatureOperator.build_options`) and skip the check and the tries, which cost a
        floor as much as its two products."""
        op = CurvatureOperator(self.model, batches, self.recipe.loss, sizes, train_mode=True,
                               distributed=self.replicas.world_size > 1, first_batch_graph=first_batch_graph,
                               memory=self.settings.memory, **self._build_options.get(purpose, {}))
        self._build_options.setdefault(purpose, op.build_options())
        if self.on_products is not None:
            op.on_hvp = functools.partial(self.on_products, purpose)
        return op

    def _sharpness(self, lr: float) -> Dict[str, Any]:
        """λmax on all batches with the probe code; the EoS ratio lr·λ/T."""
        batches, sizes = self.replicas.sharpness_batches()
        op = self._operator("sharpness", batches, sizes)
        pre = optimizer_preconditioner(self.optimizer, self.params) if self.info.is_adaptive else None
        if pre is not None:
            result = preconditioned_lambda_max(op, op.flatten(pre), tol=1e-3, max_hvps=200)
        else:
            result = lambda_max(op, tol=1e-3, max_hvps=200)
        out = {"lambda_max": result.value, "lambda_max_hvps": result.hvps}
        if self.constant:
            out["eos_ratio"] = lr * result.value / self.constant
            out["threshold"] = self.constant / lr
        return out


class _Signals:
    """SIGINT/SIGTERM received during a run; ``armed`` while the loop may still be stopped."""

    def __init__(self):
        self.received: List[int] = []
        self.armed = True


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_Signals]:
    """The first SIGINT or SIGTERM (Ctrl-C, ``kill``, torchrun's agent stopping its workers) while
    the loop runs raises KeyboardInterrupt, which stops it cleanly; once the loop is over (disarmed)
    signals are only recorded, so the log and the last good checkpoint are always written.
    Previous handlers come back afterwards."""
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return

    def stop(signum, frame):
        signals.received.append(signum)
        if signals.armed and len(signals.received) == 1:
            raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield signals
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
