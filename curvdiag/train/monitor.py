"""Curvature inside the user's own training loop: :class:`Monitor` (issue #13).

``monitor.step(batch)`` goes right after ``optimizer.step()`` (before ``scheduler.step()``, so the
learning rate read is the one the step just took). Every ``every`` steps it measures, at the new
weights θ_{t+1} and on the step's batch (or on ``held_batches``):

- λmax by the one Lanczos (:func:`curvdiag.probes.eigen.lanczos`), warm-started from the sum of
  the previous measurement's top two Ritz vectors (the first is cold, from a random vector of
  ``seed``); for
  Adam/AdamW the preconditioned λmax(P^{-1/2} H P^{-1/2}) with P from the live optimizer state
  (:func:`curvdiag.train.adapters.optimizer_preconditioner`);
- the edge-of-stability ratio η·λ/T with η the optimizer's *current* learning rate (largest
  group) and T from :mod:`curvdiag.stability`;
- every ``trace_every`` steps the Hessian trace (Hutchinson, :mod:`curvdiag.probes.hutchinson`).

At the measured steps (every ``norms_every`` steps when given; no extra forward or backward) it
logs the gradient norm from ``.grad``, the update norm, and the directional curvature
C_t = ‖G_t − G_{t−1}‖/‖θ_t − θ_{t−1}‖ from consecutive steps' ``.grad`` (it keeps copies of θ and
G over the two steps before; every other step costs a counter and a log record). With mini-batches those gradients come from different batches, so C_t is
biased *upwards* by the batch noise: E‖ΔG‖² ≈ ‖HΔθ‖² + 2 tr(Σ)/b (:mod:`curvdiag.probes.directional`);
under full-batch GD it is exact. It is logged as measured, not corrected.

Which batch: the step's own batch gives the curvature the optimizer saw at that step (what
governs the stability of that step; it scatters from batch to batch); ``held_batches`` (a fixed
list) gives a smooth trajectory comparable across steps, e.g. of progressive sharpening.

Never disturbs training: measurements go through :class:`~curvdiag.curvature.operator.CurvatureOperator`
(``.grad`` never written; buffers such as BatchNorm statistics and every module's mode restored;
dropout off while measuring) inside ``torch.random.fork_rng`` (the global RNG state comes back), and
the optimizer is only read. Nothing of a measurement outlives it except the warm-start vectors
(a few times n floats), so memory stays flat.

Under several processes (DDP: ``torch.nn.parallel.DistributedDataParallel`` or Lightning's
``strategy="ddp"``; ``distributed=None`` detects an initialised process group of more than one
rank) each rank measures on its own batch (or held batches) and the curvature operator sums every
product over the ranks in its one reduction (:meth:`~curvdiag.curvature.operator.CurvatureOperator.sum_over_ranks`):
λmax, the EoS ratio and the trace are those of the union of the ranks' batches, the same on every
rank, which must all call :meth:`Monitor.step` at the same steps. The step losses and norms are the
rank's own (DDP averages ``.grad``, so the norms agree too); only rank 0 writes ``out`` and TensorBoard.

Where the numbers go: ``out=`` a run directory in the format of ``curvdiag train`` (metrics.jsonl
through :class:`~curvdiag.results.run_dir.MetricsLog`, run.json through
:func:`~curvdiag.results.run_dir.write_run_summary`, final.pt at :meth:`Monitor.close`), which
``curvdiag plot`` and ``curvdiag report`` draw; ``tensorboard=`` a log directory (or a
``SummaryWriter``) for scalars under ``curvdiag/``; ``on_measure(step, measurement)`` for anything else.

Warnings and actions: one ``logging`` warning (logger ``curvdiag.monitor``) when the EoS ratio
crosses ``warn_ratio`` from below, or λmax rises by more than ``warn_jump`` (relative) between two
measurements; with ``actions=("checkpoint",)`` the model, optimizer and step are saved to
``out/checkpoints/warning_step_N.pt`` (the format of ``curvdiag probe --checkpoint``); with
``"throttle"`` the curvature throttle (:class:`~curvdiag.train.adapters.CurvatureThrottle`) is engaged for
the rest of the run: :meth:`Monitor.optimizer_step` then steps through it, and every λmax the monitor
measures is the throttle's floor (as ``curvdiag train``'s power estimate is), which also caps its
free C_t at twice that λmax.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from curvdiag._version import __version__
from curvdiag.curvature import distributed as dist
from curvdiag.curvature.operator import CurvatureOperator, LossFn, check_memory
from curvdiag.errors import BadArgument, BadInput
from curvdiag.loading import optimizer as optimizer_state
from curvdiag.loading.recipe import leading_dimension
from curvdiag.probes.directional import EPS
from curvdiag.probes.eigen import lanczos
from curvdiag.probes.hutchinson import hutchinson_trace
from curvdiag.probes.sharpness import preconditioned_operator
from curvdiag.results.run_dir import MetricsLog, RunSummary, write_run_summary
from curvdiag.stability import OPTIMIZER_FAMILIES, classify, stability_constant
from curvdiag.train.adapters import CurvatureThrottle, optimizer_preconditioner, scheduled_lr
from curvdiag.train.loop import save_state

LOGGER = logging.getLogger("curvdiag.monitor")
ACTIONS = ("checkpoint", "throttle")
# Consecutive products on which Lanczos' error estimate must meet the tolerance before a warm-started
# measurement stops. Measured at tol 1e-2 on the benchmark's MLP workload (benchmarks/bench_monitor.py;
# 540 measurements per rule: 3 seeds, SGD and Adam, step and held batch, each against eigsh): with the
# estimate asked down to tol, a window of 3 took 7.06 products a measurement (worst error 5.2e-3) and
# a window of 2 took 6.04 but stopped up to 12% low, on a lower eigenvalue, at 3 of 540. Since Lanczos
# stops no looser than 1e-3 (eigen.LOOSEST_STOP), a window of 2 takes 6.86 (worst 3.2e-3, none over
# tol) and 3 takes 7.86 (worst 8e-5). The oracle stop (the first product within tol) was a median 4,
# warm or cold.
WARM_STOP_WINDOW = 2


@dataclass
class Measurement:
    """What one measurement found (handed to ``on_measure``; its numbers also go to metrics.jsonl)."""

    step: int  # 0-based index of the optimizer step just taken; measured at the weights after it
    lambda_max: float  # λmax(H), or λmax(P^{-1/2} H P^{-1/2}) when ``preconditioned``
    hvps: int  # Hessian-vector products of the Lanczos run
    converged: bool
    warm_start: bool  # started from the previous measurement's top eigenvector
    preconditioned: bool
    lr: float  # the optimizer's current learning rate (largest group)
    eos_ratio: Optional[float]  # lr·λmax / T; None for an optimizer without a known threshold
    threshold: Optional[float]  # T / lr, the largest stable curvature at this lr
    status: Optional[str]  # "stable" | "edge" | "unstable"
    loss: float  # the mean loss of the measured batches at the weights measured
    batch: str  # "step" (the step's own batch) or "held"
    seconds: float
    directional_curvature: Optional[float] = None  # C_t of this step (see the module docstring)
    trace: Optional[float] = None  # tr(H) (Hutchinson) on the trace steps
    trace_stderr: Optional[float] = None
    trace_hvps: int = 0
    warnings: List[str] = field(default_factory=list)

    def scalars(self) -> Dict[str, float]:
        """The numbers a logger plots, by name (those defined at this step): what the Lightning and
        Hugging Face callbacks log under ``curvdiag/<name>``."""
        values = {"lambda_max": self.lambda_max, "eos_ratio": self.eos_ratio, "lr": self.lr, "loss": self.loss,
                  "directional_curvature": self.directional_curvature, "hessian_trace": self.trace}
        return {name: float(value) for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class MonitorCost:
    """What watching has cost so far (:meth:`Monitor.cost`), measured in the user's process.

    ``loop_seconds`` is the wall time the loop spent between ``monitor.step`` calls (its own
    forward, backward, optimizer step, data loading), ``monitor_seconds`` the time inside them;
    ``slowdown`` = (loop + monitor) / loop, the factor the benchmark's "wall time / plain loop"
    measures (None before the second step)."""

    steps: int
    measurements: int
    hvps: int  # every product, λmax and trace
    hvps_per_measurement: Optional[float]
    monitor_seconds: float
    loop_seconds: float
    slowdown: Optional[float]

    def __str__(self) -> str:
        text = f"{self.measurements} measurements in {self.steps} steps, {self.hvps} products"
        if self.slowdown is not None:
            text += (f"; {self.monitor_seconds:.3g} s watching against {self.loop_seconds:.3g} s of training"
                     f" ({self.slowdown:.2f}× the loop alone)")
        return text


class Monitor:
    """Watch λmax, the edge-of-stability ratio and C_t while the user's own loop trains.

    Args:
        model: the module being trained.
        loss: ``loss(model, batch)`` → the scalar mean loss of one batch (as in a recipe).
        optimizer: the live ``torch.optim`` optimizer (learning rate, family, Adam's state).
        every: measure λmax every this many steps (at steps 0, K, 2K, ...).
        trace_every: also the Hessian trace every this many steps (0: never).
        held_batches: measure on these batches instead of each step's own batch.
        batch_size: ``batch_size(batch)`` → samples in a batch (weights of held batches);
            default: the leading dimension of the first tensor in the batch.
        out: a run directory (``curvdiag train``'s format) or None.
        tensorboard: a log directory or a ``torch.utils.tensorboard.SummaryWriter``, or None.
        on_measure: ``on_measure(step, measurement)`` after every measurement.
        warn_ratio: warn when the EoS ratio crosses this from below.
        warn_jump: warn when λmax rises by more than this fraction between measurements (1.0: it
            more than doubled; early training sharpens fast, so smaller values warn often).
        actions: what to do on a warning besides logging: "checkpoint", "throttle".
        tol: Lanczos tolerance (relative Ritz residual); max_hvps: its product budget.
        trace_samples: Hutchinson probes per trace; seed: seeds every random vector.
        hvp_method: the operator's product method ("auto": measured at the first measurement).
        memory: bytes the kept gradient graphs may take under ``auto`` (past it the graphs of the
            held batches that fit are kept, the rest double-backward); default a quarter of the
            device's available memory at the measurement.
        train_mode: measure with batch statistics (BatchNorm in train mode, dropout off), as the
            training forward sees them; False: eval mode.
        norms_every: log ‖G‖, ‖Δθ‖ and C_t every this many steps (None: at the measured steps;
            1: every step, 38 µs a step on the benchmark's MLP).
        distributed: sum the curvature over the ranks of the process group (None: when one of more
            than one rank is initialised). A ``DistributedDataParallel`` model is watched through
            its ``module``.
    """

    def __init__(self, model: torch.nn.Module, loss: LossFn, optimizer: torch.optim.Optimizer, *,
                 every: int = 10, trace_every: int = 0, held_batches: Optional[Sequence[Any]] = None,
                 batch_size: Optional[Callable[[Any], int]] = None, out: Union[str, Path, None] = None,
                 tensorboard: Any = None, on_measure: Optional[Callable[[int, Measurement], None]] = None,
                 warn_ratio: float = 1.0, warn_jump: float = 1.0, actions: Sequence[str] = (),
                 tol: float = 1e-2, max_hvps: int = 100, trace_samples: int = 10, seed: int = 0,
                 hvp_method: str = "auto", train_mode: bool = True, kappa: Optional[float] = None,
                 norms_every: Optional[int] = None, distributed: Optional[bool] = None,
                 memory: Optional[int] = None):
        _check_count("every", every, 1)
        check_memory(memory)
        self.memory = memory
        if norms_every is not None:
            _check_count("norms_every", norms_every, 1)
        _check_count("trace_every", trace_every, 0)
        _check_count("max_hvps", max_hvps, 2)
        _check_count("trace_samples", trace_samples, 1)
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise BadArgument("tol", tol, "must lie in (0, 1)")
        if not warn_ratio > 0:
            raise BadArgument("warn_ratio", warn_ratio, "must be positive")
        if not warn_jump > 0:
            raise BadArgument("warn_jump", warn_jump, "must be positive")
        unknown = [a for a in actions if a not in ACTIONS]
        if unknown:
            raise BadArgument("actions", tuple(actions), f"unknown action {unknown[0]!r}", hint=f"choose from {', '.join(ACTIONS)}")
        if "checkpoint" in actions and out is None:
            raise BadArgument("actions", tuple(actions), "'checkpoint' needs a run directory", hint="pass out=DIR")
        if held_batches is not None and len(list(held_batches)) == 0:
            raise BadArgument("held_batches", held_batches, "must hold at least one batch")
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # its forward would take part in DDP's gradient reduction
        self.distributed = dist.is_distributed() if distributed is None else bool(distributed) and dist.is_distributed()
        self.writes = not self.distributed or dist.rank() == 0  # one run directory, written by rank 0
        self.model, self.loss_fn, self.optimizer = model, loss, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise BadInput("the model has no trainable parameters")
        self.every, self.trace_every, self.tol, self.max_hvps = every, trace_every, tol, max_hvps
        self.norms_every = every if norms_every is None else norms_every
        self.trace_samples, self.seed, self.hvp_method, self.train_mode = trace_samples, seed, hvp_method, train_mode
        self._asked_method = hvp_method  # what builds the operator until a measurement has ended
        self._build_options: Optional[Dict[str, str]] = None  # how the first measurement's operator ended up
        self.held_batches = list(held_batches) if held_batches is not None else None
        self.batch_size = batch_size or _samples_in
        self.on_measure, self.warn_ratio, self.warn_jump = on_measure, warn_ratio, warn_jump
        self.actions, self.kappa = tuple(actions), kappa
        info = optimizer_state.from_optimizer(optimizer)
        self.family = info.family
        self.constant = (stability_constant(info.family, info.momentum, info.betas[0] if info.betas else 0.9)
                         if info.family else None)
        self.out = Path(out) if out is not None and self.writes else None
        self._metrics = MetricsLog(self.out) if self.out is not None else None
        self._writer, self._own_writer = _summary_writer(tensorboard if self.writes else None)
        self.throttle: Optional[CurvatureThrottle] = None
        self.measurements: List[Measurement] = []
        self.steps = 0  # optimizer steps seen
        self.hvps = 0  # every product spent so far
        self._vector: Optional[torch.Tensor] = None  # warm start: the last top two Ritz vectors, summed
        # Per-step bookkeeping in flat buffers of the parameters' dtype, reused (two of each, swapped):
        # θ_t (the weights the step's .grad was taken at), G_{t−1}, and ‖θ_t − θ_{t−1}‖ for C_t.
        self._theta: Optional[torch.Tensor] = None
        self._gradient: Optional[torch.Tensor] = None
        self._spares: Dict[str, torch.Tensor] = {}
        self._last_update_norm: Optional[float] = None
        self._losses: List[float] = []
        self._times: List[float] = []
        self._loop_seconds = 0.0  # between step() calls: the user's own work
        self._left_at: Optional[float] = None  # when the last step() returned
        self._initial_loss: Optional[float] = None
        self._closed = False

    # ------------------------------------------------------------------ the loop's calls
    def watch(self) -> None:
        """Remember the weights before the first step (call once before training starts; without it
        C_t and the update norm start one step later)."""
        self._theta = self._flat_into("theta", [p.detach() for p in self.params])

    def optimizer_step(self) -> None:
        """``optimizer.step()``, or the throttle's step once the "throttle" action has engaged it."""
        if self.throttle is not None:
            self.throttle.step()
        else:
            self.optimizer.step()

    def step(self, batch: Any, loss: Optional[Union[float, torch.Tensor]] = None) -> Optional[Measurement]:
        """After ``optimizer.step()``: log this step; measure when it is due. ``batch`` is the step's
        batch, ``loss`` its loss (logged; optional). Returns the measurement or None."""
        if self._closed:
            raise BadInput("this monitor is closed", hint="create a new Monitor for a new run")
        started = time.perf_counter()
        if self._left_at is not None:
            self._loop_seconds += started - self._left_at
        step = self.steps
        base_lr = scheduled_lr(self.optimizer)
        factor = self.throttle.factor if self.throttle is not None else 1.0
        grad_norm, update_norm, curvature = self._step_norms(step)
        record: Dict[str, Any] = {"step": step, "lr": base_lr * factor, "base_lr": base_lr, "throttle": factor,
                                  "grad_norm": grad_norm, "update_norm": update_norm,
                                  "directional_curvature": curvature}
        if loss is not None:
            record["loss"] = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        measurement = None
        if step % self.every == 0:
            measurement = self._measure(step, batch, base_lr * factor, curvature)
            record.update(self._record_of(measurement))
            if loss is None:
                record["loss"] = measurement.loss
        record["seconds"] = time.perf_counter() - started
        self._log(record)
        self.steps += 1
        if measurement is not None:
            self._announce(measurement)
            self._times[-1] = time.perf_counter() - started  # with the hook, run.json and any checkpoint
        self._left_at = time.perf_counter()
        return measurement

    def _step_norms(self, step: int) -> tuple:
        """(‖G_t‖, ‖θ_{t+1} − θ_t‖, C_t) of the step just taken, from the ``.grad`` fields and the
        weights, each None where undefined or not due. C_t = ‖G_t − G_{t−1}‖ / (‖θ_t − θ_{t−1}‖ + ε) as in
        :func:`~curvdiag.probes.directional.directional_curvature`, with the differences taken in
        place in reused flat buffers of the parameters' dtype and the three norms read back in one
        transfer: 38 µs a step on the benchmark's MLP (26k parameters), where fresh float64 copies
        took 87. Only a due step and the two before it (which hold θ_{t−1}, θ_t and G_{t−1}) do
        this work; any other step only lets the copies go stale."""
        due = step % self.norms_every == 0
        if not (due or (step + 1) % self.norms_every == 0 or (step + 2) % self.norms_every == 0):
            self._forget_step()
            return None, None, None
        norms: Dict[str, torch.Tensor] = {}
        theta = self._flat_into("theta", [p.detach() for p in self.params])
        if self._theta is not None:
            norms["update"] = torch.linalg.vector_norm(self._theta.sub_(theta))  # θ_t − θ_{t+1}
            self._spares["theta"] = self._theta
        self._theta = theta
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads) or not (due or (step + 1) % self.norms_every == 0):
            if self._gradient is not None:
                self._spares["gradient"] = self._gradient
            self._gradient = None
        else:
            gradient = self._flat_into("gradient", [g.detach() for g in grads])
            norms["grad"] = torch.linalg.vector_norm(gradient)
            if self._gradient is not None:
                if self._last_update_norm is not None:
                    norms["change"] = torch.linalg.vector_norm(self._gradient.sub_(gradient))  # G_{t−1} − G_t
                self._spares["gradient"] = self._gradient
            self._gradient = gradient
        values = dict(zip(norms, torch.stack(list(norms.values())).tolist())) if norms else {}
        curvature = None
        if "change" in values:
            curvature = values["change"] / (self._last_update_norm + EPS)
        self._last_update_norm = values.get("update")
        if not due:
            return None, None, None
        return values.get("grad"), values.get("update"), curvature

    def _forget_step(self) -> None:
        """Drop θ_t, G_t and ‖Δθ‖ (their buffers kept for reuse): the next step starts afresh."""
        for name in ("theta", "gradient"):
            held = getattr(self, f"_{name}")
            if held is not None:
                self._spares[name] = held
                setattr(self, f"_{name}", None)
        self._last_update_norm = None

    def _flat_into(self, name: str, tensors: List[torch.Tensor]) -> torch.Tensor:
        """``tensors`` concatenated into the spare flat buffer ``name`` (allocated on first use)."""
        out = self._spares.pop(name, None)
        if out is None:
            out = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
        return torch.cat([t.reshape(-1) for t in tensors], out=out)

    # ------------------------------------------------------------------ measuring
    def _operator(self, batch: Any) -> CurvatureOperator:
        batches = self.held_batches if self.held_batches is not None else [batch]
        # Measured once: later operators are built as the first one ended up and skip the memory
        # estimate, the start-up check and the failed tries of a kernel without double backward.
        op = CurvatureOperator(self.model, batches, self.loss_fn, [self.batch_size(b) for b in batches],
                               train_mode=self.train_mode, distributed=self.distributed, memory=self.memory,
                               **(self._build_options or {"hvp_method": self._asked_method}))
        if self._build_options is None:
            self.hvp_method = op.hvp_method
        return op

    def _measure(self, step: int, batch: Any, lr: float, curvature: Optional[float]) -> Measurement:
        """λmax (and the trace when due) at the current weights; the EoS ratio at ``lr``."""
        started = time.perf_counter()
        with _rng_untouched(self.params[0].device):
            op = self._operator(batch)
            pre = optimizer_preconditioner(self.optimizer, self.params) if self._preconditioned() else None
            target = op if pre is None else preconditioned_operator(op, op.flatten(pre))
            warm = self._vector is not None and self._vector.shape == (op.num_params,)
            # Between measurements (another batch, other weights) the top two eigenvectors often
            # trade places: from the old top one alone, Lanczos first converges to what is now the
            # second eigenvalue and stalls there with a small residual (4-14% low on the benchmark,
            # at 1-5 of 30-100 measurements). The sum of the old top two has weight on the new top
            # one, and the estimate must hold on 2 consecutive products (WARM_STOP_WINDOW); min 4.
            result = lanczos(target, tol=self.tol, max_matvecs=self.max_hvps, seed=self.seed,
                             start=self._vector if warm else None, want_vectors=2,
                             min_iterations=4 if warm else 8, stability_window=WARM_STOP_WINDOW)
            self._vector = result.eigenvectors.sum(dim=0).detach().clone()
            trace = None
            if self.trace_every and step % self.trace_every == 0:
                trace = hutchinson_trace(op, samples=self.trace_samples, seed=self.seed + step)
            loss_value = op.loss()
            spent = op.hvp_count
            # As the operator ended up: an explicit method finds a fused kernel's missing double
            # backward only at its first product, then switches to math attention.
            self._build_options = op.build_options()
        del op, target
        value = result.eigenvalues[0]
        ratio = threshold = status = None
        if self.constant is not None and (pre is not None or not self._preconditioned()):
            ratio, threshold = lr * value / self.constant, self.constant / lr
            status = classify(ratio)
        self.hvps += spent
        return Measurement(step=step, lambda_max=value, hvps=result.matvecs, converged=result.converged,
                           warm_start=warm, preconditioned=pre is not None, lr=lr, eos_ratio=ratio,
                           threshold=threshold, status=status, loss=loss_value,
                           batch="held" if self.held_batches is not None else "step",
                           seconds=time.perf_counter() - started, directional_curvature=curvature,
                           trace=None if trace is None else trace.value,
                           trace_stderr=None if trace is None else trace.stderr,
                           trace_hvps=0 if trace is None else trace.samples)

    def _preconditioned(self) -> bool:
        return self.family is not None and OPTIMIZER_FAMILIES[self.family].preconditioned

    @staticmethod
    def _record_of(m: Measurement) -> Dict[str, Any]:
        record = {"lambda_max": m.lambda_max, "lambda_max_hvps": m.hvps, "lambda_max_warm_start": m.warm_start,
                  "eos_ratio": m.eos_ratio, "threshold": m.threshold}
        if m.trace is not None:
            record.update(hessian_trace=m.trace, hessian_trace_stderr=m.trace_stderr)
        return record

    # ------------------------------------------------------------------ outputs
    def _log(self, record: Dict[str, Any]) -> None:
        if record.get("loss") is not None:
            value = record["loss"]
            self._losses.append(value)
            self._initial_loss = value if self._initial_loss is None else self._initial_loss
        self._times.append(record["seconds"])
        if self._metrics is not None:
            self._metrics.write(record)
        if self._writer is not None:
            for key in ("loss", "lambda_max", "eos_ratio", "directional_curvature", "hessian_trace", "lr"):
                if record.get(key) is not None:
                    self._writer.add_scalar(f"curvdiag/{key}", record[key], record["step"])

    def _announce(self, m: Measurement) -> None:
        """Warnings, actions, the caller's hook; run.json refreshed (a live run is plottable)."""
        previous = self.measurements[-1] if self.measurements else None
        if m.eos_ratio is not None and m.eos_ratio >= self.warn_ratio and (
                previous is None or previous.eos_ratio is None or previous.eos_ratio < self.warn_ratio):
            m.warnings.append(f"step {m.step}: η·λmax/T = {m.eos_ratio:.3f} crossed {self.warn_ratio:g} "
                              f"(λmax {m.lambda_max:.4g}, lr {m.lr:.3g}, stable lr ≤ {m.lr / m.eos_ratio:.3g})")
        if previous is not None and previous.lambda_max > 0 and m.lambda_max > (1 + self.warn_jump) * previous.lambda_max:
            m.warnings.append(f"step {m.step}: λmax jumped from {previous.lambda_max:.4g} to {m.lambda_max:.4g} "
                              f"since step {previous.step}")
        self.measurements.append(m)
        for line in m.warnings:
            LOGGER.warning(line)
        if m.warnings:
            self._act(m)
        if self.throttle is not None:  # each λmax (in the optimizer's metric) is the engaged throttle's floor
            self.throttle.floor = m.lambda_max
        if self.on_measure is not None:
            self.on_measure(m.step, m)
        if self.out is not None:
            write_run_summary(self.out, self.summary())

    def _act(self, m: Measurement) -> None:
        if "checkpoint" in self.actions and self.out is not None:
            path = self.out / "checkpoints" / f"warning_step_{m.step + 1}.pt"
            save_state(self._state(m.step + 1), path)
            LOGGER.warning(f"step {m.step}: saved {path} (curvdiag probe RECIPE --checkpoint {path})")
        if "throttle" in self.actions and self.throttle is None:
            # The monitor engages it on its own crossing: the rule holds from here on.
            self.throttle = CurvatureThrottle(self.optimizer, kappa=self.kappa, constant=self.constant, engage="always")
            LOGGER.warning(f"step {m.step}: curvature throttle engaged (κ = {self.throttle.kappa:.2g}) for the rest of the run")

    def _state(self, step: int) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}

    def cost(self) -> MonitorCost:
        """Products, measurements and wall time spent watching against the loop's own time."""
        measured = len(self.measurements)
        watched = sum(self._times)
        return MonitorCost(steps=self.steps, measurements=measured, hvps=self.hvps,
                           hvps_per_measurement=self.hvps / measured if measured else None,
                           monitor_seconds=watched, loop_seconds=self._loop_seconds,
                           slowdown=(self._loop_seconds + watched) / self._loop_seconds if self._loop_seconds > 0 else None)

    def summary(self) -> RunSummary:
        """run.json of the steps logged so far."""
        times = self._times
        return RunSummary(
            controller="throttle" if self.throttle is not None else "none", steps_completed=self.steps,
            diverged=bool(self._losses) and not math.isfinite(self._losses[-1]),
            final_loss=self._losses[-1] if self._losses else None,
            best_loss=min(self._losses) if self._losses else math.nan, initial_loss=self._initial_loss,
            mean_throttle=None, seconds_per_step=sum(times) / len(times) if times else None,
            extra_hvps_per_step=self.hvps / max(self.steps, 1), recipe="Monitor",
            curvdiag_version=__version__,
            settings={"every": self.every, "trace_every": self.trace_every, "tol": self.tol, "seed": self.seed,
                      "held_batches": self.held_batches is not None, "actions": list(self.actions),
                      "hvp_method": self.hvp_method, "train_mode": self.train_mode, "source": "monitor"})

    def close(self) -> None:
        """Write run.json and final.pt (model, optimizer, step), close the log and TensorBoard writer."""
        if self._closed:
            return
        self._closed = True
        LOGGER.info(f"monitor closed: {self.cost()}")
        if self.out is not None:
            self._metrics.close()
            write_run_summary(self.out, self.summary())
            save_state(self._state(self.steps), self.out / "final.pt")
        if self._writer is not None:
            self._writer.flush()
            if self._own_writer:
                self._writer.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Monitor(every={self.every}, steps={self.steps}, measurements={len(self.measurements)})"


def _check_count(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise BadArgument(name, value, f"must be an integer ≥ {least}")


def _samples_in(batch: Any) -> int:
    """Samples in a batch: the leading dimension of the first tensor found (as for recipes)."""
    size = leading_dimension(batch)
    if size is None:
        raise BadArgument("batch_size", None, "no tensor in the batch to count samples from",
                          hint="pass batch_size=lambda batch: ...")
    return size


@contextlib.contextmanager
def _rng_untouched(device: torch.device):
    """The global RNG state (CPU, and this CUDA device) as it was before the block."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _summary_writer(tensorboard: Any) -> tuple:
    """(writer, owned): a SummaryWriter given, made for a directory, or (None, False)."""
    if tensorboard is None:
        return None, False
    if hasattr(tensorboard, "add_scalar"):
        return tensorboard, False
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise BadArgument("tensorboard", str(tensorboard), f"torch.utils.tensorboard is not usable ({exc})",
                          hint="pip install tensorboard") from exc
    return SummaryWriter(log_dir=str(tensorboard)), True
