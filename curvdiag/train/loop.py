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
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from curvdiag._version import __version__
from curvdiag.curvature.distributed import as_communication_error
from curvdiag.results.run_dir import MetricsLog, RunSummary, write_run_summary
from curvdiag.curvature.operator import CurvatureOperator, preserved_state
from curvdiag.errors import BadArgument, BadInput
from curvdiag.loading import optimizer as optimizer_state
from curvdiag.loading.checkpoint import load_model_state, read_checkpoint
from curvdiag.loading.recipe import load_recipe
from curvdiag.probes.directional import DirectionalCurvatureTracker
from curvdiag.probes.eigen import power_iteration
from curvdiag.probes.sharpness import lambda_max, preconditioned_lambda_max, preconditioned_operator
from curvdiag.stability import stability_constant
from curvdiag.train import controllers
from curvdiag.train.adapters import ControlledOptimizer, optimizer_preconditioner
from curvdiag.train.data_parallel import DataParallel


@dataclass
class TrainSettings:
    steps: int = 200
    lr: Optional[float] = None  # overrides every group of the recipe's optimizer
    controller: str = "none"
    seed: int = 0
    sharpness_every: int = 0  # measure λmax on all batches every K steps (0: never)
    checkpoint_every: int = 0  # 0: only final.pt
    divergence_factor: float = 1e3  # loss above this × the first loss counts as divergence
    kappa: float = 0.5  # throttle safety factor κ
    decay: float = 0.95  # throttle: Ĉ relaxes by this factor per step
    floor_every: int = 10  # throttle: λmax floor re-estimated at least this often ...
    floor_jump: float = 0.1  # ... and whenever the loss rises this fraction above its running mean
    floor_jump_decay: float = 0.9  # the running mean: an exponential average of the step losses
    clip_norm: float = 1.0
    newton_gamma: float = 1e-3
    max_batches: Optional[int] = None


def _flat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class _PowerFloor:
    """The throttle's floor, since C_t only bounds λmax from below: λmax on the current batch
    (preconditioned for Adam) by the one power iteration, 2 products warm-started from the previous
    estimate's vector. The first starts from the step's gradient (in the operator's metric), which
    leans towards the top eigenvectors; a random vector drawn from the run's seed only when that
    gradient is zero. Why not always random: 2 products from a random start underestimated the
    preconditioned λmax (≈5,600) of ``diverge_adam.py`` at step 0 as 0–1,800 depending on the seed,
    and the throttle held that run for 3 seeds of 6; from the gradient it holds all three
    ``diverge_*`` cases."""

    def __init__(self, seed: int):
        self.seed = seed
        self.vector: Optional[torch.Tensor] = None
        self.hvps = 0

    def estimate(self, operator: Any, gradient: torch.Tensor) -> float:
        """λmax estimate of ``operator``; ``gradient`` (n,) is the step's gradient in its metric."""
        start = self.vector if self.vector is not None else (gradient if bool(gradient.any()) else None)
        result = power_iteration(operator, top_k=1, max_matvecs=2, seed=self.seed, start=start)
        self.hvps += result.matvecs
        self.vector = result.eigenvectors[0]
        return result.eigenvalues[0]


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
    diverged: bool = False
    interrupted: bool = False
    failure: Optional[BaseException] = None


class Trainer:
    """One replay: build from the recipe (and checkpoint), then :meth:`run`."""

    def __init__(self, recipe_spec: str, checkpoint: Optional[str], out: Path, settings: TrainSettings,
                 resume_state: Optional[Dict[str, Any]] = None):
        builder = controllers.builder_of(settings.controller)  # an unknown name fails before the recipe runs
        if settings.steps < 1:
            raise BadArgument("steps", settings.steps, "must be at least 1")
        if settings.lr is not None and not settings.lr > 0:
            raise BadArgument("lr", settings.lr, "must be positive")
        self.settings, self.out, self.checkpoint_path = settings, Path(out), checkpoint
        torch.manual_seed(settings.seed)
        self.recipe = load_recipe(recipe_spec)
        self.model = self.recipe.model()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise BadInput(f"recipe {self.recipe.name}: the model has no trainable parameters")
        if not self.recipe.has("optimizer"):
            raise BadInput(f"recipe {self.recipe.name}: train needs optimizer(params) in the recipe")
        self.optimizer = self.recipe.optimizer(self.params)
        self.start_step = 0
        source = resume_state or (read_checkpoint(checkpoint).__dict__ if checkpoint else None)
        if source is not None:
            self._load(source)
        if settings.lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = settings.lr
                group["initial_lr"] = settings.lr
        self.scheduler = self.recipe._call("scheduler", self.optimizer) if self.recipe.has("scheduler") else None
        info = optimizer_state.from_optimizer(self.optimizer)
        self.info = info
        self.constant = stability_constant(info.family, info.momentum, info.betas[0] if info.betas else 0.9) if info.family else None
        if self.constant is None and "constant" in controllers.hyperparameters_of(builder):
            raise BadInput(f"the {settings.controller} needs a known stability threshold; {info.name} has none",
                           hint="use an SGD or Adam-family optimizer, or the controller newton or clip")
        self.controller = controllers.configured(builder, constant=self.constant, kappa=settings.kappa,
                                                 decay=settings.decay, max_norm=settings.clip_norm,
                                                 gamma=settings.newton_gamma)
        self.replicas = DataParallel(self.model, self.recipe, settings.max_batches)

    def _load(self, source: Dict[str, Any]) -> None:
        from curvdiag.loading.checkpoint import Checkpoint

        checkpoint = Checkpoint(source.get("path", "resume"), source["model_state"], source.get("optimizer_state"), source.get("step"))
        load_model_state(self.model, checkpoint)
        if checkpoint.optimizer_state is not None:
            try:
                self.optimizer.load_state_dict(checkpoint.optimizer_state)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise BadInput(f"checkpoint {checkpoint.path}: its optimizer state does not fit the recipe's optimizer ({exc})") from exc
        self.start_step = int(checkpoint.step or 0) if source.get("resume") else 0

    # ------------------------------------------------------------------ files
    def _state(self, step: int) -> Dict[str, Any]:
        return {"model": copy.deepcopy(self.model.state_dict()), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "step": step}

    def _save(self, state: Dict[str, Any], path: Path) -> None:
        if not self.replicas.is_writer:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # never leave a half-written checkpoint

    # ------------------------------------------------------------------ loop
    def run(self, on_step: Optional[Callable[[Dict[str, Any]], None]] = None, append: bool = False) -> RunSummary:
        """Replay ``settings.steps`` steps; ``on_step(record)`` after each. Interrupted (Ctrl-C,
        SIGTERM), diverged or failed runs still write the log, run.json and the last good state."""
        with _stop_on_signals() as signals:
            return self._run(on_step, append, signals)

    def _run(self, on_step: Optional[Callable[[Dict[str, Any]], None]], append: bool, signals: "_Signals") -> RunSummary:
        """The step loop: one line of metrics.jsonl per step, then the summary however it ended."""
        replicas = self.replicas
        if replicas.is_writer:
            self.out.mkdir(parents=True, exist_ok=True)
        batches = replicas.batches(skip=self.start_step)  # resume: the data order of an uninterrupted run
        reduce = replicas.sum_over_ranks if replicas.world_size > 1 else None
        controlled = ControlledOptimizer(self.optimizer, self.controller, reduce=reduce)
        tracker, floor = DirectionalCurvatureTracker(self.model), _PowerFloor(self.settings.seed)
        progress = _Progress(step=self.start_step, clean=self.start_step, last_good=self._state(self.start_step))
        metrics = MetricsLog(self.out if replicas.is_writer else None, append=append)
        try:
            for step in range(self.start_step, self.settings.steps):
                progress.step = step
                record = self._step(progress, batches, controlled, tracker, floor)
                metrics.write(record)
                if progress.diverged:
                    break
                self._account(progress, record, on_step)
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
            metrics.close()
        return self._finish(progress, floor)

    def _step(self, progress: _Progress, batches: Iterator[Tuple[Any, int]], controlled: ControlledOptimizer,
              tracker: DirectionalCurvatureTracker, floor: _PowerFloor) -> Dict[str, Any]:
        """One step: forward, the divergence check, the controlled update, λmax, the scheduler."""
        s = self.settings
        started = time.perf_counter()
        batch, size = next(batches)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        local_loss = self.recipe.loss(self.replicas.module, batch)
        value, total = self.replicas.global_loss(float(local_loss.detach()), size)
        progress.initial_loss = value if progress.initial_loss is None else progress.initial_loss
        if not math.isfinite(value) or value > s.divergence_factor * max(abs(progress.initial_loss), 1e-12):
            progress.diverged = True
            return {"step": progress.step, "loss": value if math.isfinite(value) else None, "diverged": True}
        progress.last_good, progress.clean = self._state(progress.step), None
        record = self._update(progress, batch, size, total, local_loss, value, controlled, tracker, floor)
        if s.sharpness_every and progress.step % s.sharpness_every == 0:
            record.update(self._sharpness(record["lr"]))
        if self.scheduler is not None:
            self.scheduler.step()
        record["seconds"] = time.perf_counter() - started
        return record

    def _update(self, progress: _Progress, batch: Any, size: int, total: int, local_loss: torch.Tensor, value: float,
                controlled: ControlledOptimizer, tracker: DirectionalCurvatureTracker,
                floor: _PowerFloor) -> Dict[str, Any]:
        """Backward, then the controller's step on the same batch; the step's record."""
        distributed = self.replicas.world_size > 1
        (local_loss * self.replicas.backward_scale(size, total) if distributed else local_loss).backward()
        grad_norm = float(_flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]).norm())
        base_lr = max(float(g["lr"]) for g in self.optimizer.param_groups)
        theta_before = _flat(self.params).clone()
        consecutive = tracker.update()
        share = self.replicas.share(size, total)

        def same_batch_loss() -> torch.Tensor:
            """This rank's share of the step's global mean loss at the current weights."""
            with preserved_state(self.model, train_mode=True):
                local = self.recipe.loss(self.model, batch)
                return local * share if distributed else local

        lambda_floor = self._floor(progress, value, batch, size, controlled, floor)
        controlled.step(same_batch_loss, value)
        factor = controlled.factor
        curvature = controlled.curvature if controlled.measures_step else getattr(consecutive, "value", None)
        record = {"step": progress.step, "loss": value, "lr": base_lr * factor, "base_lr": base_lr,
                  "grad_norm": grad_norm, "update_norm": float((_flat(self.params) - theta_before).norm()),
                  "directional_curvature": curvature, "throttle": factor}
        if lambda_floor is not None:
            record["lambda_floor"] = lambda_floor
        return record

    def _floor(self, progress: _Progress, value: float, batch: Any, size: int, controlled: ControlledOptimizer,
               floor: _PowerFloor) -> Optional[float]:
        """For a controller that observes a floor: λmax on this batch (preconditioned for Adam) in the
        first 3 steps, every ``floor_every`` steps and whenever the loss jumps above its running
        mean; handed to the controller. None on the other steps."""
        s = self.settings
        if "floor" not in self.controller.observes:
            return None
        jumped = progress.loss_average is not None and value > (1 + s.floor_jump) * progress.loss_average
        if not (progress.step - self.start_step < 3 or progress.step % s.floor_every == 0 or jumped):
            return None
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        preconditioner = optimizer_preconditioner(self.optimizer, self.params, grads)
        op = CurvatureOperator(self.model, [batch], self.recipe.loss, [size], train_mode=True,
                               distributed=self.replicas.world_size > 1)
        gradient = op.flatten(grads)
        if preconditioner is None:
            controlled.floor = floor.estimate(op, gradient)
        else:  # in P^{-1/2} H P^{-1/2}'s coordinates the gradient is P^{-1/2} g
            diagonal = op.flatten(preconditioner)
            controlled.floor = floor.estimate(preconditioned_operator(op, diagonal), gradient * diagonal.rsqrt())
        return controlled.floor

    def _account(self, progress: _Progress, record: Dict[str, Any],
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
            self._save(self._state(step + 1), self.out / "checkpoints" / f"step_{step + 1}.pt")
        if on_step is not None:
            on_step(record)

    def _finish(self, progress: _Progress, floor: _PowerFloor) -> RunSummary:
        """final.pt (the last finite or clean state), run.json; re-raises a failure after writing them."""
        s, replicas = self.settings, self.replicas
        diverged, interrupted, failure = progress.diverged, progress.interrupted, progress.failure
        losses, factors, times = progress.losses, progress.factors, progress.times
        completed = progress.step if (diverged or interrupted or failure) else s.steps
        final_state = progress.last_good if diverged else self._state(completed)
        if interrupted or failure is not None:
            # Stopped between steps: the live weights are clean. Mid-step they may be half-updated:
            # keep the state from before that step, whose log line was not written either.
            final_state = self._state(progress.clean) if progress.clean is not None else progress.last_good
            completed = int(final_state["step"])
        self._save(final_state, self.out / "final.pt")
        spread = None
        if replicas.world_size > 1 and not (interrupted or failure is not None):
            spread = replicas.replica_spread()
        summary = RunSummary(
            controller=s.controller,
            steps_completed=completed,
            diverged=diverged,
            interrupted=interrupted,
            final_loss=losses[-1] if losses and not diverged else None,
            best_loss=min(losses) if losses else float("nan"),
            initial_loss=progress.initial_loss,
            mean_throttle=sum(factors) / len(factors) if factors else 1.0,
            seconds_per_step=sum(times) / len(times) if times else 0.0,
            extra_hvps_per_step=floor.hvps / max(len(times), 1),
            recipe=self.recipe.name,
            checkpoint=self.checkpoint_path,
            curvdiag_version=__version__,
            settings=asdict(s),
            world_size=replicas.world_size,
            replica_spread=spread,
            failure=None if failure is None else f"{type(failure).__name__}: {failure}".strip()[:500],
        )
        if replicas.is_writer:
            write_run_summary(self.out, summary)
        if failure is not None:
            raise failure
        return summary

    def _sharpness(self, lr: float) -> Dict[str, Any]:
        """λmax on all batches with the probe code; the EoS ratio lr·λ/T."""
        batches, sizes = self.replicas.sharpness_batches()
        op = CurvatureOperator(self.model, batches, self.recipe.loss, sizes, train_mode=True,
                               distributed=self.replicas.world_size > 1)
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
