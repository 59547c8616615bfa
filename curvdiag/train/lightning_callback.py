"""curvdiag.Monitor as a PyTorch Lightning callback (``pip install "curvdiag[lightning]"``).

Thin over :class:`~curvdiag.train.monitor.Monitor`: it builds one at ``on_train_start`` from the
trainer's optimizer, calls ``monitor.step(batch, loss)`` at ``on_train_batch_end`` (after the
optimizer step, ``.grad`` still holding the step's gradient), logs each measurement's scalars
under ``curvdiag/<name>`` to every logger of the trainer, at the monitor's step, and closes the
monitor at ``on_train_end``. Every option of the monitor (``every``, ``out``, ``tensorboard``,
``held_batches``, ``actions``, ...) passes through unchanged. Under ``strategy="ddp"`` (or
``ddp_fork``/``ddp_spawn``) each rank's monitor sums the curvature over the ranks (the monitor's
``distributed=None`` finds the process group): every rank logs the union's λmax.
"""

from __future__ import annotations

from typing import Any, Optional

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # the framework is optional
    raise ImportError(f"curvdiag.LightningMonitor needs PyTorch Lightning ({exc}); "
                      "pip install \"curvdiag[lightning]\"") from exc

from curvdiag.errors import BadInput
from curvdiag.train.monitor import LossFn, Measurement, Monitor


class LightningMonitor(Callback):
    """Watch λmax, the EoS ratio and C_t while a Lightning ``Trainer`` trains.

    Args:
        loss: ``loss(module, batch)`` → the scalar mean loss of one batch (the curvature is that
            of this function; usually what ``training_step`` computes).
        **monitor_options: keyword arguments of :class:`~curvdiag.train.monitor.Monitor`.

    ``monitor`` is the live :class:`Monitor` once training has started (its ``measurements``).
    One optimizer, ``accumulate_grad_batches=1`` and automatic optimization are supported.
    """

    def __init__(self, loss: LossFn, **monitor_options: Any):
        super().__init__()
        self.loss, self.options = loss, monitor_options
        self.monitor: Optional[Monitor] = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1 or trainer.accumulate_grad_batches != 1:
            raise BadInput("LightningMonitor watches one optimizer stepping every batch",
                           hint="use one optimizer and accumulate_grad_batches=1")
        user_hook = self.options.get("on_measure")

        def on_measure(step: int, measurement: Measurement) -> None:
            # Straight to the loggers at the monitor's step: ``pl_module.log`` would repeat the
            # last value at every later step of the epoch, as if measured there.
            for logger in trainer.loggers:
                logger.log_metrics({f"curvdiag/{k}": v for k, v in measurement.scalars().items()}, step=step)
            if user_hook is not None:
                user_hook(step, measurement)

        self.monitor = Monitor(pl_module, self.loss, trainer.optimizers[0], **{**self.options, "on_measure": on_measure})

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.monitor.step(batch, loss=loss)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
