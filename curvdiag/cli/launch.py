"""Running a command on several processes (DESIGN §2.5) from the command line's side.

``--nproc N`` relaunches the same command under torchrun (:mod:`curvdiag.cli.torchrun`); each
rank runs the command body inside the process group (:mod:`curvdiag.curvature.distributed`
owns the group and the collectives), and a failing rank prints one ``rank R:`` line. Ranks
leave their outcome as small files in a status directory (``CURVDIAG_STATUS_DIR``) that the
launcher reads afterwards, to name the root cause among the ranks that failed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from curvdiag.cli.errors import fail, message_of, user_errors
from curvdiag.errors import BadArgument, BadInput, CurvdiagError

if TYPE_CHECKING:
    import subprocess

STATUS_DIR_ENV = "CURVDIAG_STATUS_DIR"  # where ranks leave their failure (set by --nproc)


# ---------------------------------------------------------------------------- the ranks' status files
def record_failure(rank: int, code: int, message: str, communication: bool = False) -> None:
    """Leave this rank's failure where the ``--nproc`` launcher looks for it (if it set a place)."""
    where = os.environ.get(STATUS_DIR_ENV)
    if not where:
        return
    try:
        Path(where, f"rank{rank}.json").write_text(
            json.dumps({"rank": rank, "code": code, "message": message, "communication": communication,
                        "time": time.time()}))
    except OSError:
        pass


def record_finished(rank: int) -> None:
    """Say that this rank finished its work (outputs written) before leaving the process group."""
    where = os.environ.get(STATUS_DIR_ENV)
    if where:
        try:
            Path(where, f"finished{rank}").write_text("")
        except OSError:
            pass


def record_outcome(code: int) -> None:
    """Leave the exit status the job should end with, when a rank finished its work but the
    command still ends otherwise than 0 (``probe --timeout``: 124); the ranks themselves exit 0."""
    where = os.environ.get(STATUS_DIR_ENV)
    if where:
        try:
            Path(where, "outcome").write_text(str(int(code)))
        except OSError:
            pass


def recorded_outcome(where: Path) -> int:
    """The status :func:`record_outcome` left in ``where``, else 0."""
    try:
        return int(Path(where, "outcome").read_text())
    except (OSError, ValueError):
        return 0


def all_finished(where: Path, world_size: int) -> bool:
    """Whether every rank recorded :func:`record_finished` (and none a failure) in ``where``."""
    where = Path(where)
    return (all((where / f"finished{r}").exists() for r in range(world_size))
            and not any(where.glob("rank*.json")))


def first_failure(where: Path) -> Optional[dict]:
    """The earliest failure a rank recorded in ``where``, or None."""
    found = []
    for path in Path(where).glob("rank*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    # A rank that lost contact with the failing one fails too, a moment later: prefer root causes.
    found.sort(key=lambda f: (f.get("communication", False), f.get("time", 0.0)))
    return found[0] if found else None


# ---------------------------------------------------------------------------- a command on many processes
@contextlib.contextmanager
def across_processes(ctx: typer.Context, nproc: Optional[int], debug: bool, device: str,
                     dist_timeout: float) -> Iterator[None]:
    """The body of a command that may run on several processes. ``--nproc N`` (N > 1) relaunches the
    command under torchrun and exits with its status; otherwise the body runs inside the process
    group torchrun describes (none in one process), with one error line per failing rank, and
    each rank leaves the group after success (a failed rank just exits; torchrun ends the others)."""
    from curvdiag.curvature import distributed

    with user_errors(debug):
        check_device(device)
        if not (math.isfinite(dist_timeout) and dist_timeout > 0):
            raise BadArgument("timeout", dist_timeout, "must be a positive finite number of seconds")
    if nproc is not None:
        with user_errors(debug):
            code = relaunch_under_torchrun(ctx, nproc)
        if code is not None:
            raise typer.Exit(code=code)
    with user_errors(debug, fail_rank):
        distributed.init_from_env(device, dist_timeout)
        yield
    record_finished(distributed.env_rank())
    distributed.shutdown()


def check_device(name: str) -> None:
    """BadArgument unless ``name`` is a device this machine has (checked before any process starts)."""
    from curvdiag.loading.target import resolve_device

    resolve_device(name)


def fail_rank(exc: CurvdiagError, debug: bool) -> None:
    """:func:`~curvdiag.cli.errors.fail` in one process; under torchrun one line on stderr prefixed
    by ``rank R:`` from every failing rank (torchrun's agent then ends the job), recorded for the
    ``--nproc`` launcher."""
    from curvdiag.curvature import distributed

    if not distributed.launched_by_torchrun():
        fail(exc, debug)
    rank = distributed.env_rank()
    record_failure(rank, exc.exit_code, message_of(exc), communication=isinstance(exc, distributed.CommunicationError))
    fail(exc, debug, prefix=f"rank {rank}: ")


def forwarded_args(ctx: typer.Context, drop: tuple = ("nproc",)) -> List[str]:
    """The command line of this invocation rebuilt from its parsed parameters (minus ``drop``)."""
    args: List[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        text = str(value.value if isinstance(value, Enum) else value)
        if param.name in drop:
            continue
        if getattr(param, "param_type_name", "option") == "argument":
            if value is not None:
                args.append(text)
        elif value is not None and value != param.default:
            if getattr(param, "is_flag", False):
                if value or param.secondary_opts:
                    args.append(param.opts[0] if value else param.secondary_opts[0])
            else:
                args += [param.opts[0], text]
    return args


def relaunch_under_torchrun(ctx: typer.Context, nproc: int) -> Optional[int]:
    """``--nproc N``: run ``python -m torch.distributed.run --standalone --nproc-per-node N -m curvdiag
    probe|train <the same arguments>`` and return its exit status (the failing rank's own status and
    one summary line naming it when a rank failed); None for N = 1 (run here)."""
    import subprocess
    import tempfile

    from curvdiag.curvature import distributed

    if nproc < 1:
        raise BadInput(f"--nproc {nproc}: must be at least 1")
    if distributed.launched_by_torchrun():
        raise BadInput("--nproc inside a torchrun job", hint="drop --nproc: torchrun already started the processes")
    if nproc == 1:
        return None
    command = [sys.executable, "-m", "curvdiag.cli.torchrun", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "curvdiag", ctx.command.name, *forwarded_args(ctx)]
    with tempfile.TemporaryDirectory(prefix="curvdiag-ranks-") as status_dir:
        # OMP_NUM_THREADS=1 is what torchrun sets anyway; given, it skips its 4-line banner.
        env = dict(os.environ, **{STATUS_DIR_ENV: status_dir})
        env.setdefault("OMP_NUM_THREADS", "1")
        # torchrun runs in a session of its own, so that a signal reaches it exactly once, from here,
        # whether it was sent to this process alone (kill PID, timeout, docker stop, systemd) or to
        # the terminal's process group (Ctrl-C); it dies with this process even on SIGKILL.
        process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        with _forwarded_signals(process) as received:
            code = process.wait()  # torchrun stops its workers between steps, then ends
        if received:
            return 130  # an interruption, like one process, whatever torchrun made of it
        if code == 0:
            return recorded_outcome(Path(status_dir))
        return _job_outcome(code, Path(status_dir), nproc)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies, however (Linux prctl PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _forwarded_signals(process: "subprocess.Popen") -> Iterator[List[int]]:
    """While the block runs, SIGINT and SIGTERM to this process are sent on to ``process``
    (torchrun, which forwards them to its workers); the list of those received is yielded."""
    received: List[int] = []

    def forward(signum, frame):
        received.append(signum)
        if process.poll() is None:
            process.send_signal(signum)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _job_outcome(code: int, status_dir: Path, nproc: int) -> int:
    """The exit status of a job torchrun ended with status ``code``, and one line saying why."""
    err = Console(stderr=True, highlight=False)
    if all_finished(status_dir, nproc):  # every rank wrote its results, then one crashed while leaving
        err.print(f"[yellow]warning:[/] every rank finished and wrote its results, but the job ended with torchrun "
                  f"exit status {code} while the processes shut down; the results are complete", markup=True,
                  soft_wrap=True)
        return 0
    failure = first_failure(status_dir)
    if failure is None:
        err.print(f"[bold red]error:[/] the {nproc}-process job failed (torchrun exit status {code}) before any "
                  "rank reported a cause; see the output above", markup=True, soft_wrap=True)
        return 1
    err.print(f"[bold red]error:[/] rank {failure['rank']} failed: {escape(str(failure['message']))}", markup=True,
              soft_wrap=True)
    return int(failure.get("code") or 1)
