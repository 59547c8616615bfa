"""Commands run as real processes in the tests (torchrun jobs): each in its own session, so a
timeout or a signal reaches torchrun's workers too, with one thread per process."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import ROOT
from curvdiag.cli.launch import STATUS_DIR_ENV


class Job:
    """A command in its own session (so a timeout kills torchrun's workers too), started at once."""

    def __init__(self, command, env_extra=None):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
        env.pop(STATUS_DIR_ENV, None)
        self.command, self.started = command, time.monotonic()
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)

    def result(self, timeout):
        """(exit status, stdout, stderr, seconds); kills the whole session after ``timeout`` s from the start."""
        try:
            out, err = self.process.communicate(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            out, err = self.process.communicate()
            raise AssertionError(f"{self.command} still ran after {timeout} s:\n{err[-3000:]}")
        return self.process.returncode, out, err, time.monotonic() - self.started

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.communicate()

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every process of the job, as a terminal does on Ctrl-C."""
        os.killpg(self.process.pid, signum)

