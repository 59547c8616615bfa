"""``python -m curvdiag.cli.torchrun ARGS``: torchrun (``torch.distributed.run``) as ``--nproc`` starts
it, minus its Python tracebacks. On Ctrl-C torchrun forwards the signal to its workers (which
write their logs and stop) and then raises through its own ``main``; a failed worker ends it with
a ``ChildFailedError``. Here both end in a short line instead: exit 130 for the interruption, and
one line per failed rank (exit status or signal) — the launcher then names the root cause.
"""

from __future__ import annotations

import logging
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
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
