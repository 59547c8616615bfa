"""``curvdiag train``: replay training from a checkpoint with a learning-rate controller
(DESIGN §2.4, §3.7–3.9) and log everything a person needs to see whether it saved the run.

The loop reads top to bottom: take a batch, forward and backward, stop cleanly on a non-finite or
exploding loss, let the controller scale this step's learning rate, step, measure, log. The
throttle and the Newton-like rate are the public adapters of :mod:`curvdiag.train.adapters`; λmax is
measured with the probe code (:func:`curvdiag.probes.sharpness.lambda_max`); thresholds come from
:mod:`curvdiag.stability`.

Run directory: ``metrics.jsonl`` (one object per step), ``run.json`` (summary and settings),
``final.pt`` (the last state whose loss was finite: model, optimizer, step) and
``checkpoints/step_N.pt`` every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from curvdiag._version import __version__
from curvdiag.loading import optimizer as optimizer_state
from curvdiag.train.adapters import CurvatureThrottle, NewtonLearningRate, adam_preconditioner
from curvdiag.loading.checkpoint import load_model_state, read_checkpoint
from curvdiag.train.controllers import CONTROLLERS
from curvdiag.train.data_parallel import DataParallel
from curvdiag.curvature.distributed import as_communication_error
from curvdiag.probes.directional import DirectionalCurvatureTracker
from curvdiag.errors import BadInput
from curvdiag.results.run_dir import RunSummary, write_run_summary
from curvdiag.curvature.operator import CurvatureOperator, preserved_state
from curvdiag.loading.recipe import load_recipe
from curvdiag.probes.sharpness import lambda_max, preconditioned_lambda_max
from curvdiag.stability import stability_constant


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
    """A warm-started 2-product power estimate of λmax on the current batch (preconditioned for
    Adam): the throttle's floor, since C_t only bounds λmax from below."""

    def __init__(self):
        self.vector: Optional[torch.Tensor] = None
        self.hvps = 0

    def estimate(self, model, loss_fn, batch, size, preconditioner, distributed: bool = False) -> float:
        op = CurvatureOperator(model, [batch], loss_fn, [size], train_mode=True, distributed=distributed)
        operator = op if preconditioner is None else None
        if preconditioner is not None:
            from curvdiag.probes.sharpness import preconditioned_operator

            operator = preconditioned_operator(op, op.flatten(preconditioner))
        v = self.vector if self.vector is not None else torch.randn(op.num_params, generator=torch.Generator().manual_seed(0)).to(op.device, op.dtype)
        value = 0.0
        for _ in range(2):
            v = v / v.norm()
            w = operator.matvec(v)
            value = float(torch.dot(v, w))
            v = w
        self.hvps += 2
        self.vector = v.detach()
        return value


class Trainer:
    """One replay: build from the recipe (and checkpoint), then :meth:`run`."""

    def __init__(self, recipe_spec: str, checkpoint: Optional[str], out: Path, settings: TrainSettings,
                 resume_state: Optional[Dict[str, Any]] = None):
        if settings.controller not in CONTROLLERS:
            raise BadInput(f"--controller {settings.controller}: unknown", hint=f"choose from {', '.join(CONTROLLERS)}")
        if settings.steps < 1:
            raise BadInput(f"--steps {settings.steps}: must be at least 1")
        if settings.lr is not None and not settings.lr > 0:
            raise BadInput(f"--lr {settings.lr}: must be positive")
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
        if info.family is None and settings.controller == "throttle":
            raise BadInput(f"the throttle needs a known stability threshold; {info.name} has none",
                           hint="use an SGD or Adam-family optimizer, or --controller newton|clip")
        self.info = info
        self.constant = stability_constant(info.family, info.momentum, info.betas[0] if info.betas else 0.9) if info.family else None
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
        s = self.settings
        replicas = self.replicas
        distributed = replicas.world_size > 1
        reduce = replicas.sum_over_ranks if distributed else None
        if replicas.is_writer:
            self.out.mkdir(parents=True, exist_ok=True)
        batches = replicas.batches(skip=self.start_step)  # resume: the data order of an uninterrupted run
        throttle = CurvatureThrottle(self.optimizer, s.kappa, s.decay, self.constant, reduce=reduce) if s.controller == "throttle" else None
        newton = NewtonLearningRate(self.optimizer, gamma=s.newton_gamma, reduce=reduce) if s.controller == "newton" else None
        tracker = DirectionalCurvatureTracker(self.model)
        floor = _PowerFloor()
        metrics_file = open(self.out / "metrics.jsonl" if replicas.is_writer else os.devnull, "a" if append else "w")
        losses, factors, times = [], [], []
        initial_loss: Optional[float] = None
        loss_average: Optional[float] = None  # mini-batch losses scatter: compare with their mean
        last_good = self._state(self.start_step)
        clean: Optional[int] = self.start_step  # the step the live weights hold, None while they change
        diverged = interrupted = False
        failure: Optional[BaseException] = None
        step = self.start_step
        try:
            for step in range(self.start_step, s.steps):
                started = time.perf_counter()
                batch, size = next(batches)
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                local_loss = self.recipe.loss(replicas.module, batch)
                value, total = replicas.global_loss(float(local_loss.detach()), size)
                initial_loss = value if initial_loss is None else initial_loss
                if not math.isfinite(value) or value > s.divergence_factor * max(abs(initial_loss), 1e-12):
                    diverged = True
                    record = {"step": step, "loss": value if math.isfinite(value) else None, "diverged": True}
                    metrics_file.write(json.dumps(record) + "\n")
                    break
                last_good = self._state(step)
                clean = None
                (local_loss * replicas.backward_scale(size, total) if distributed else local_loss).backward()
                grad_norm = float(_flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]).norm())
                base_lr = max(float(g["lr"]) for g in self.optimizer.param_groups)
                theta_before = _flat(self.params).clone()
                consecutive = tracker.update()
                curvature = consecutive.value if consecutive is not None else None
                factor = 1.0
                lambda_floor = None
                share = replicas.share(size, total)

                def same_batch_loss() -> torch.Tensor:
                    """This rank's share of the step's global mean loss at the current weights."""
                    with preserved_state(self.model, train_mode=True):
                        local = self.recipe.loss(self.model, batch)
                        return local * share if distributed else local

                if s.controller in ("none", "clip"):
                    if s.controller == "clip":
                        torch.nn.utils.clip_grad_norm_(self.params, s.clip_norm)
                    self.optimizer.step()
                elif throttle is not None:
                    jumped = loss_average is not None and value > (1 + s.floor_jump) * loss_average
                    if step - self.start_step < 3 or step % s.floor_every == 0 or jumped:
                        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
                        pre = adam_preconditioner(self.optimizer, self.params, grads) if self.info.is_adaptive else None
                        lambda_floor = floor.estimate(self.model, self.recipe.loss, batch, size, pre, distributed)
                        throttle.floor = lambda_floor
                    throttle.step(same_batch_loss)
                    factor, curvature = throttle.factor, throttle.curvature
                else:
                    newton.step(value, same_batch_loss)
                    factor, curvature = newton.factor, newton.curvature
                update_norm = float((_flat(self.params) - theta_before).norm())
                record = {"step": step, "loss": value, "lr": base_lr * factor, "base_lr": base_lr,
                          "grad_norm": grad_norm, "update_norm": update_norm,
                          "directional_curvature": curvature, "throttle": factor}
                if lambda_floor is not None:
                    record["lambda_floor"] = lambda_floor
                if s.sharpness_every and step % s.sharpness_every == 0:
                    record.update(self._sharpness(base_lr * factor))
                if self.scheduler is not None:
                    self.scheduler.step()
                elapsed = time.perf_counter() - started
                record["seconds"] = elapsed
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                clean = step + 1
                losses.append(value)
                factors.append(factor)
                times.append(elapsed)
                loss_average = value if loss_average is None else s.floor_jump_decay * loss_average + (1 - s.floor_jump_decay) * value
                if s.checkpoint_every and (step + 1) % s.checkpoint_every == 0:
                    self._save(self._state(step + 1), self.out / "checkpoints" / f"step_{step + 1}.pt")
                if on_step is not None:
                    on_step(record)
            else:
                step = s.steps
        except KeyboardInterrupt:
            interrupted = True
        except Exception as exc:  # another rank lost, the recipe raised mid-run: keep what was done, then fail
            if signals.received:  # stopped by a signal that also stopped the other ranks: an interruption
                interrupted = True
            else:
                failure = as_communication_error(exc)
        finally:
            signals.armed = False
            metrics_file.close()
        completed = step if (diverged or interrupted or failure) else s.steps
        final_state = last_good if diverged else self._state(completed)
        if interrupted or failure is not None:
            # Stopped between steps: the live weights are clean. Mid-step they may be half-updated:
            # keep the state from before that step, whose log line was not written either.
            final_state = self._state(clean) if clean is not None else last_good
            completed = int(final_state["step"])
        self._save(final_state, self.out / "final.pt")
        spread = None
        if distributed and not (interrupted or failure is not None):
            spread = replicas.replica_spread()
        summary = RunSummary(
            controller=s.controller,
            steps_completed=completed,
            diverged=diverged,
            interrupted=interrupted,
            final_loss=losses[-1] if losses and not diverged else None,
            best_loss=min(losses) if losses else float("nan"),
            initial_loss=initial_loss,
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
        pre = adam_preconditioner(self.optimizer, self.params) if self.info.is_adaptive else None
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
