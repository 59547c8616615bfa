"""Errors a user can act on. The CLI turns them into one line plus a hint.

``BadInput`` (exit status 2): the recipe, checkpoint, flags or model are unusable.
``ProbeFailed`` (exit status 1): a probe raised at run time on valid input.
"""

from __future__ import annotations


class CurvdiagError(Exception):
    """Base class: ``message`` is one line; ``hint`` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class BadInput(CurvdiagError):
    """Unusable input: bad recipe, checkpoint, flag value or model. Exit status 2."""

    exit_code = 2


class ProbeFailed(CurvdiagError):
    """A probe failed at run time. Exit status 1; the message names the probe."""

    exit_code = 1

    def __init__(self, probe: str, message: str, hint: str | None = None):
        super().__init__(f"probe '{probe}' failed: {message}", hint)
        self.probe = probe
