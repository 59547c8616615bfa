"""The run directory of ``curvdiag train`` (DESIGN §2.4): its one writer and its one reader.

``run.json`` is a :class:`RunSummary`; ``metrics.jsonl`` holds one :class:`StepRecord` per step
(a line cut short by a kill is skipped and counted); ``final.pt`` and ``checkpoints/`` are
written by the training loop. :func:`read_run` is what ``train --resume``, ``plot`` and
``report`` read; ``train`` (and any loop that logs the same way) writes metrics.jsonl through
:class:`MetricsLog` and run.json with :func:`write_run_summary`.
"""

from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from curvdiag.errors import BadInput, CurvdiagError
from curvdiag.results.codec import decode_record, encode
from curvdiag.results.json_safe import finite, finite_or_none, read_json

SUMMARY_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
# Runs in a --compare directory, in this order first (the rest alphabetically).
COMPARE_ORDER = ("baseline", "none", "throttle", "newton", "clip")


@dataclass
class RunSummary:
    """``run.json``. Fields after ``diverged`` have defaults so that summaries written by older
    versions (or by hand) still read; ``train`` always writes every field."""

    controller: str
    steps_completed: int
    diverged: bool
    interrupted: bool = False
    final_loss: Optional[float] = None
    best_loss: float = math.nan
    initial_loss: Optional[float] = None
    mean_throttle: Optional[float] = None
    seconds_per_step: Optional[float] = None
    extra_hvps_per_step: Optional[float] = None
    recipe: Optional[str] = None
    checkpoint: Optional[str] = None
    curvdiag_version: Optional[str] = None
    settings: Dict[str, Any] = field(default_factory=dict)  # the train settings, as given
    world_size: int = 1  # processes (data parallelism under torchrun)
    replica_spread: Optional[float] = None  # max over weights of (max − min over ranks): 0.0 when in sync
    failure: Optional[str] = None  # why the run stopped early, when it did not diverge or get interrupted
    in_progress: bool = False  # written while the run goes on: true here after a kill means it was cut short
    save_failures: List[str] = field(default_factory=list)  # periodic saves that failed ("path: cause"), retried
    # λmax at the starting weights, before step 0's update (with --sharpness-every): the one value
    # that runs started from the same checkpoint share (the step records' λmax follow each update)
    lambda_max_at_start: Optional[float] = None
    # The first step whose controller factor was below 1 (the throttle held the rate there); None: never
    first_held_step: Optional[int] = None


@dataclass
class StepRecord:
    """One line of ``metrics.jsonl``. None: not measured at this step (``lambda_max`` only every
    ``--sharpness-every`` steps) or, for the loss, not finite. A ``diverged`` line holds only
    the step and the loss that ended the run."""

    step: int
    loss: Optional[float] = None
    lr: Optional[float] = None  # in use: base_lr × throttle
    base_lr: Optional[float] = None  # what the optimizer and its scheduler set
    grad_norm: Optional[float] = None
    update_norm: Optional[float] = None
    directional_curvature: Optional[float] = None
    throttle: Optional[float] = None  # the controller's factor; 1.0 when nothing scales the rate
    lambda_floor: Optional[float] = None
    lambda_max: Optional[float] = None
    lambda_max_hvps: Optional[int] = None
    eos_ratio: Optional[float] = None
    threshold: Optional[float] = None  # T / lr
    seconds: Optional[float] = None
    diverged: bool = False


@dataclass
class RunLog:
    """One run directory, read."""

    name: str
    path: Path
    summary: RunSummary
    records: List[StepRecord]
    unreadable_lines: int = 0

    @property
    def diverged(self) -> bool:
        return self.summary.diverged or any(r.diverged for r in self.records)

    @property
    def diverged_at(self) -> Optional[int]:
        for record in self.records:
            if record.diverged:
                return record.step
        return self.summary.steps_completed if self.summary.diverged else None

    def series(self, name: str, include_diverged: bool = False) -> Tuple[List[float], List[float]]:
        """(steps, values) of the records whose field ``name`` is a finite number."""
        steps, values = [], []
        for record in self.records:
            if record.diverged and not include_diverged:
                continue
            value = finite(getattr(record, name))
            if value is not None:
                steps.append(float(record.step))
                values.append(value)
        return steps, values


class MetricsLog:
    """The one writer of ``RUN_DIR/metrics.jsonl``: one JSON object per step (a :class:`StepRecord`'s
    keys; non-finite numbers as null), flushed at once, so a killed run keeps every step it logged.
    ``run_dir=None`` writes nothing (a rank other than 0). A context manager."""

    def __init__(self, run_dir: Optional[Path], append: bool = False):
        self._file = None
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(Path(run_dir) / METRICS_FILE, "a" if append else "w")

    def write(self, record: Dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(finite_or_none(record)) + "\n")
            self._file.flush()

    def sync(self) -> None:
        """Force the lines written so far to the disk (before a checkpoint that counts on them)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RunDirectoryError(CurvdiagError):
    """A file of the run directory could not be written (disk full, I/O error): exit status 1,
    one line naming the path and the cause."""

    def __init__(self, path: Path, exc: BaseException):
        self.path, self.cause = Path(path), describe_os_error(exc)
        super().__init__(f"cannot write {path}: {self.cause}",
                         hint="free space on that disk (or give --out elsewhere), then continue with --resume")


def describe_os_error(exc: BaseException) -> str:
    """``No space left on device (ENOSPC)``: the cause of an I/O error in a few words."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def write_atomically(path: Path, data: bytes) -> Path:
    """Replace ``path`` by ``data`` so that a kill at any moment leaves the old or the new file,
    never a mixture: write ``path.tmp``, fsync it, rename it over ``path``, fsync the directory.
    On an error (disk full) the ``.tmp`` file is removed and the OSError raised."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with_ignored_errors(tmp.unlink)
        raise
    with_ignored_errors(lambda: _fsync_directory(path.parent))
    return path


def with_ignored_errors(action) -> None:
    try:
        action()
    except OSError:
        pass


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_run_summary(run_dir: Path, summary: RunSummary) -> Path:
    """``RUN_DIR/run.json`` (non-finite numbers as null), written atomically (:func:`write_atomically`)."""
    path = Path(run_dir) / SUMMARY_FILE
    return write_atomically(path, (json.dumps(finite_or_none(encode(summary)), indent=2) + "\n").encode())


def logged_steps(run_dir: Path) -> List[Dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl`` that form an unbroken sequence of steps from the
    first (a line cut short by a kill, or one out of sequence, ends it)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({describe_os_error(exc)})") from exc
    records: List[Dict[str, Any]] = []
    for line in lines[:-1]:  # the part after the last newline was never completed
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            break
        if records and record["step"] != records[-1]["step"] + 1:
            break
        records.append(record)
    return records


def truncate_metrics(run_dir: Path, steps: int) -> List[Dict[str, Any]]:
    """Cut ``RUN_DIR/metrics.jsonl`` to the records of steps 0 … ``steps`` − 1 (what a resume from a
    checkpoint of step ``steps`` keeps), atomically; returns them. BadInput when fewer are logged."""
    records = [r for r in logged_steps(run_dir) if r["step"] < steps]
    if len(records) != steps or (records and records[0]["step"] != 0):
        raise BadInput(f"{Path(run_dir) / METRICS_FILE}: logs {len(records)} steps before step {steps}, "
                       f"expected {steps}", hint="the log and the checkpoint are from different runs")
    write_atomically(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records).encode())
    return records


def _read_records(path: Path) -> Tuple[List[StepRecord], int]:
    if not path.is_file():
        return [], 0
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read ({exc})") from exc
    records, unreadable = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(decode_record(StepRecord, json.loads(line), f"{path}:{number}"))
        except (json.JSONDecodeError, BadInput):
            unreadable += 1
    return records, unreadable


def read_run_summary(run_dir: Path) -> RunSummary:
    """A run directory's run.json alone (its log unread); BadInput when it is not one."""
    path = Path(run_dir)
    if not (path / SUMMARY_FILE).is_file():
        raise BadInput(f"{run_dir}: not a curvdiag run directory (no run.json)")
    document = read_json(path / SUMMARY_FILE)
    if not isinstance(document, dict):
        raise BadInput(f"{path / SUMMARY_FILE}: not a curvdiag run summary (expected a JSON object)")
    return decode_record(RunSummary, document, str(path / SUMMARY_FILE))


def read_run(run_dir: Path, name: Optional[str] = None) -> RunLog:
    """A run directory → :class:`RunLog`; BadInput when it is not one."""
    path = Path(run_dir)
    summary = read_run_summary(path)
    records, unreadable = _read_records(path / METRICS_FILE)
    return RunLog(name=name or path.name, path=path, summary=summary, records=records, unreadable_lines=unreadable)


def _compare_key(run: RunLog) -> Tuple[int, str]:
    order = COMPARE_ORDER.index(run.name) if run.name in COMPARE_ORDER else len(COMPARE_ORDER)
    return order, run.name


def read_runs(path: Path) -> List[RunLog]:
    """A run directory → one run; a ``--compare`` directory → its runs, baseline first."""
    path = Path(path)
    if (path / SUMMARY_FILE).is_file():
        return [read_run(path)]
    children = sorted(p for p in path.iterdir() if p.is_dir() and (p / SUMMARY_FILE).is_file()) if path.is_dir() else []
    if not children:
        raise BadInput(f"{path}: not a curvdiag run directory (no run.json here or in its subdirectories)",
                       hint="give the --out directory of curvdiag train, or a report written by curvdiag probe --json")
    return sorted((read_run(child) for child in children), key=_compare_key)
