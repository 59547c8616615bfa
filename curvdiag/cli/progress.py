"""What ``curvdiag probe`` and ``curvdiag train`` show while they run, on stderr: a live rich line
on a terminal, plain lines elsewhere (a log file, CI, ``nohup``, a cluster job), nothing with
``--quiet`` or on ranks other than 0.

Plain lines, each stamped with the seconds since the command started::

    [probe   2.1 s] lambda_max: started
    [probe  12.1 s] lambda_max: running for 10.0 s, 118 HVPs
    [probe  13.0 s] lambda_max: finished in 10.9 s, 130 HVPs

A line when a probe starts and finishes, and a heartbeat from a background thread at
least every ``interval`` seconds (10 by default) while nothing else was printed, so a log shows
the run is alive even while one slow product or the set-up runs. The cost on a finished line is
the probe's :class:`~curvdiag.results.probe_results.ProbeCost` (gradient-equivalents) where the
runner supplies one, else its Hessian-vector products.

``curvdiag train`` off a terminal (:class:`StepLines`): a line when a run starts, then the step
reached at most every ``interval`` seconds, and the last step::

    [train   0.4 s] train [throttle]: started at step 0 of 300
    [train  10.4 s] train [throttle]: step 212/300 · loss 0.3127 · lr 0.3 · throttle 0.81
    [train  14.6 s] train [throttle]: step 300/300 · loss 0.2214 · lr 0.3 · throttle 0.77
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any, Optional

PREFIX = "probe"  # a plain line starts "[probe <seconds> s]", so a log can be grepped for them
HEARTBEAT_SECONDS = 10.0


def write_stamped(stream: IO[str], prefix: str, seconds: float, text: str) -> None:
    """One plain progress line, ``[prefix  12.3 s] text``, flushed; a closed or broken stream is
    ignored (it must not end the run)."""
    try:
        stream.write(f"[{prefix} {seconds:6.1f} s] {text}\n")
        stream.flush()
    except (OSError, ValueError):
        pass


class ProbeProgress:
    """The interface the command reports to; this base shows nothing (``--quiet``, ranks > 0)."""

    def __enter__(self) -> "ProbeProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stage(self, description: str) -> None:
        """A set-up stage began (loading, building the operator)."""

    def plan(self, text: str) -> None:
        """The planned cost, once, before the first probe."""

    def probe_started(self, name: str) -> None:
        """Probe ``name`` began."""

    def probe_finished(self, done: Any) -> None:
        """A probe finished: ``done`` is the runner's :class:`~curvdiag.probes.runner.ProbeDone`."""

    def hvp(self, count: int) -> None:
        """The operator finished its ``count``-th Hessian-vector product."""

    def close(self) -> None:
        """Stop showing progress (before the report is printed)."""


def cost_text(done: Any) -> str:
    """``12.3 of 20.0 gradient-equivalents (converged)`` from the probe's cost when there is one,
    else ``130 HVPs``."""
    cost = getattr(done, "cost", None)
    if cost is not None:
        text = f"{cost.spent:.3g} of {cost.planned:.3g} gradient-equivalents ({cost.stop})"
        if cost.precision_reached is not None and cost.precision_name:
            text += f", {cost.precision_name} {cost.precision_reached:.2g}"
        return text
    return f"{done.hvps} HVPs"


class LineProgress(ProbeProgress):
    """Plain lines on ``stream`` (see the module's docstring); ``interval`` seconds between
    heartbeats, from a background thread unless ``heartbeat`` is False (then :meth:`beat` is
    called by hand); ``clock`` is ``time.monotonic`` (replaceable in tests)."""

    def __init__(self, stream: IO[str], started: float, interval: float = HEARTBEAT_SECONDS, clock=time.monotonic,
                 heartbeat: bool = True):
        self.stream, self.started, self.interval, self.clock = stream, started, interval, clock
        self._lock = threading.Lock()
        self._last_line = clock()
        self._doing: Optional[str] = None  # the stage or probe running now
        self._doing_since = self._last_line
        self._hvps = 0
        self._hvps_at_start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="curvdiag-progress", daemon=True)
        if heartbeat:
            self._thread.start()

    def _write(self, text: str) -> None:
        with self._lock:
            self._last_line = self.clock()
            write_stamped(self.stream, PREFIX, self._last_line - self.started, text)

    def stage(self, description: str) -> None:
        # Recorded for the heartbeat, not printed: a run that fails while loading shows its one
        # error line alone, as every input error does.
        self._doing, self._doing_since = description, self.clock()

    def plan(self, text: str) -> None:
        self._write(text)

    def probe_started(self, name: str) -> None:
        self._doing, self._doing_since, self._hvps_at_start = name, self.clock(), self._hvps
        self._write(f"{name}: started")

    def probe_finished(self, done: Any) -> None:
        self._doing = None
        self._write(f"{done.name}: finished in {done.seconds:.1f} s, {cost_text(done)}")

    def hvp(self, count: int) -> None:
        self._hvps = count

    def heartbeat_due(self) -> bool:
        return self.clock() - self._last_line >= self.interval

    def beat(self) -> None:
        """The heartbeat line: what is running, for how long, and its products so far."""
        doing = self._doing
        if doing is None:
            self._write("working")
            return
        text = f"{doing}: running for {self.clock() - self._doing_since:.1f} s"
        products = self._hvps - self._hvps_at_start
        self._write(text + (f", {products} HVPs" if products else ""))

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.interval / 4)):
            if self.heartbeat_due():
                self.beat()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class RichProgress(ProbeProgress):
    """The live line on a terminal: a spinner, the stage or probe, the products, the time."""

    def __init__(self, console: Any):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[hvps]}"),
                                  TimeElapsedColumn(), console=console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("starting", hvps="")

    def stage(self, description: str) -> None:
        self._progress.update(self._task, description=description)

    def plan(self, text: str) -> None:
        self._progress.console.print(text, style="dim", markup=False, highlight=False)

    def probe_started(self, name: str) -> None:
        self._progress.update(self._task, description=f"probe {name}")

    def hvp(self, count: int) -> None:
        self._progress.update(self._task, hvps=f"{count} HVPs")

    def close(self) -> None:
        self._progress.stop()


class StepLines:
    """Plain lines for a run of ``total`` steps on ``stream`` (see the module's docstring): a step
    line when :meth:`update` comes ``interval`` seconds or more after the last line, or reaches
    ``total``."""

    def __init__(self, stream: IO[str], started: float, label: str, total: int, completed: int = 0,
                 interval: float = HEARTBEAT_SECONDS, clock=time.monotonic):
        self.stream, self.started, self.label, self.total = stream, started, label, total
        self.interval, self.clock, self.completed = interval, clock, completed
        self._last_line = clock()
        self._write(f"started at step {completed} of {total}")

    def _write(self, text: str) -> None:
        self._last_line = self.clock()
        write_stamped(self.stream, "train", self._last_line - self.started, f"{self.label}: {text}")

    def update(self, completed: int, info: str) -> None:
        self.completed = completed
        if completed >= self.total or self.clock() - self._last_line >= self.interval:
            self._write(f"step {completed}/{self.total}" + (f" · {info}" if info else ""))

    def working(self, what: str) -> None:
        """A line from inside a step that takes long (λmax on every batch of a large model), at the
        same interval as the step lines."""
        if self.clock() - self._last_line >= self.interval:
            self._write(f"in step {self.completed + 1}/{self.total}: {what}")


def progress_for(quiet: bool, started: float, stream: Optional[IO[str]] = None) -> ProbeProgress:
    """Nothing when ``quiet``; the rich line when ``stream`` (stderr) is a terminal; plain lines otherwise."""
    if quiet:
        return ProbeProgress()
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        from rich.console import Console

        return RichProgress(Console(file=stream))
    return LineProgress(stream, started)


def is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
