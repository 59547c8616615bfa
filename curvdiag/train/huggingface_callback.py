"""curvdiag.Monitor as a Hugging Face ``transformers.TrainerCallback``
(``pip install "curvdiag[huggingface]"``).

Thin over :class:`~curvdiag.train.monitor.Monitor`: built at ``on_train_begin`` from the
trainer's model and optimizer, stepped at ``on_optimizer_step`` (right after ``optimizer.step()``
and before the scheduler and ``zero_grad``, so ``.grad`` and the learning rate are the step's),
closed at ``on_train_end``. The Trainer does not hand the step's batch to callbacks, so the
curvature is measured on ``held_batches`` (fixed batches, on the model's device): a smooth
trajectory comparable across steps. Each measurement's scalars are appended to
``state.log_history`` (saved in ``trainer_state.json``) as ``curvdiag/<name>`` with the Trainer's
1-based ``step``; ``out``/``tensorboard``/``on_measure`` of the monitor pass through unchanged.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

try:
    from transformers import TrainerCallback
except ImportError as exc:  # the framework is optional
    raise ImportError(f"curvdiag.HuggingFaceMonitor needs transformers ({exc}); "
                      "pip install \"curvdiag[huggingface]\"") from exc

from curvdiag.train.monitor import LossFn, Measurement, Monitor


def model_output_loss(model: Any, batch: Any) -> Any:
    """The loss a Hugging Face model returns for a batch holding its labels: ``model(**batch).loss``."""
    outputs = model(**batch)
    return outputs["loss"] if isinstance(outputs, dict) else outputs.loss


class HuggingFaceMonitor(TrainerCallback):
    """Watch λmax, the EoS ratio and C_t while a ``transformers.Trainer`` trains.

    Args:
        held_batches: the batches to measure on (dicts as the model takes them, labels included).
        loss: ``loss(model, batch)`` → scalar mean loss; default ``model(**batch).loss``.
        **monitor_options: keyword arguments of :class:`~curvdiag.train.monitor.Monitor`.

    ``monitor`` is the live :class:`Monitor` once training has begun.
    """

    def __init__(self, held_batches: Sequence[Any], loss: LossFn = model_output_loss, **monitor_options: Any):
        self.held_batches, self.loss, self.options = list(held_batches), loss, monitor_options
        self.monitor: Optional[Monitor] = None
        self._state: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        user_hook = self.options.get("on_measure")
        self._state = state

        def on_measure(step: int, measurement: Measurement) -> None:
            scalars = {f"curvdiag/{k}": v for k, v in measurement.scalars().items()}
            self._state.log_history.append({**scalars, "step": step + 1})
            if user_hook is not None:
                user_hook(step, measurement)

        # accelerate wraps the optimizer; the monitor reads the torch optimizer inside
        self.monitor = Monitor(model, self.loss, getattr(optimizer, "optimizer", optimizer),
                               **{**self.options, "held_batches": self.held_batches, "on_measure": on_measure})

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.monitor.step(None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
