"""``python -m curvdiag.cli.torchrun ARGS``: torchrun (``torch.distributed.run``) as ``--nproc`` starts
it, minus its Python tracebacks. On Ctrl-C torchrun forwards the signal to its workers (which
write their logs and stop) and then raises through its own ``main``; a failed worker ends it with
a ``ChildFailedError``. Here both end in a short line instead: exit 130 for the interruption, and
one line per failed rank (exit status or signal) — the launcher then names the root cause.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import List, Optional


def _describe(failure) -> str:
    code = getattr(failure, "exitcode", None)
    if isinstance(code, int) and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _record_death(rank: int, failure) -> None:
    """A rank killed by a signal (OOM killer, kill -9) could not say why: say it for it, so that the
    launcher's last line names it rather than a survivor that only lost contact with it."""
    from pathlib import Path

    from curvdiag.cli.launch import STATUS_DIR_ENV, record_failure

    code = getattr(failure, "exitcode", None)
    where = os.environ.get(STATUS_DIR_ENV)
    if not (isinstance(code, int) and code < 0 and where):
        return
    if not (Path(where, f"rank{rank}.json").exists() or Path(where, f"finished{rank}").exists()):
        record_failure(rank, 1, f"{_describe(failure)} (pid {failure.pid})")


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun's own log lines (its banner, "Received 15 death signal", "failed (exitcode …)") are
    # not for the user: the ranks print their one-line errors, the launcher the job's last line.
    logging.disable(logging.CRITICAL)
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except SignalException:
        return 130
    except ChildFailedError as exc:
        for rank, failure in sorted(exc.failures.items()):
            print(f"torchrun: rank {rank} (pid {failure.pid}) {_describe(failure)}", file=sys.stderr)
            _record_death(rank, failure)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
