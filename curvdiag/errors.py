"""Errors a user can act on. The CLI turns them into one line plus a hint.

``BadInput`` (exit status 2): the recipe, checkpoint, arguments or model are unusable.
``BadArgument`` (a ``BadInput``): one argument's value is wrong. The library names the
argument as the Python API spells it (``lr=-1.0: must be positive``); the CLI prints the same
error in terms of its flag (``--lr -1.0: must be positive``).
``ProbeFailed`` (exit status 1): a probe raised at run time on valid input.
``NotCovered``: a probe's method does not cover this model or loss (not a user error: the
probe is skipped, or another estimator is used, and the report says why).
"""

from __future__ import annotations

from typing import Any, Optional


class CurvdiagError(Exception):
    """Base class: ``message`` is one line; ``hint`` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class BadInput(CurvdiagError):
    """Unusable input: bad recipe, checkpoint, argument value or model. Exit status 2."""

    exit_code = 2


class BadArgument(BadInput):
    """One argument has a bad value. ``argument`` is its Python name (``max_batches``),
    ``value`` what was given, ``problem`` what is wrong with it (``must be at least 1``)."""

    def __init__(self, argument: str, value: Any, problem: str, hint: Optional[str] = None):
        self.argument, self.value, self.problem = argument, value, problem
        super().__init__(f"{argument}={value!r}: {problem}", hint)

    def with_flag(self, flag: str) -> str:
        """The message as the command line says it: ``--max-batches 0: must be at least 1``."""
        return f"{flag} {self.value}: {self.problem}"


class ProbeFailed(CurvdiagError):
    """A probe failed at run time. Exit status 1; the message names the probe."""

    exit_code = 1

    def __init__(self, probe: str, message: str, hint: Optional[str] = None):
        super().__init__(f"probe '{probe}' failed: {message}", hint)
        self.probe = probe


class NotCovered(Exception):
    """A method (the Gauss–Newton control variate, HesScale) does not cover this model or loss;
    ``reason`` names the module or property at fault, ``str(exc)`` is ``"not applicable: <reason>"``."""

    def __init__(self, reason: str):
        super().__init__(f"not applicable: {reason}")
        self.reason = reason
