"""The command line's one error boundary: every error a user can act on ends as one line plus a
hint on stderr, with the error's exit status (2 bad input, 1 a failure at run time); ``--debug``
shows the traceback instead. Library errors name Python arguments
(:class:`~curvdiag.errors.BadArgument`); here they are said in terms of the flags.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from curvdiag.cli.choices import UnknownChoice
from curvdiag.errors import BadArgument, BadInput, CurvdiagError

# Library arguments whose flag is not ``--`` + the argument with ``_`` → ``-``.
FLAG_OF_ARGUMENT = {
    "recipe_spec": "RECIPE",
    "checkpoint_path": "--checkpoint",
    "optimizer_family": "--optimizer",
    "family": "--optimizer",
    "timeout": "--dist-timeout",
    "fmt": "--format",
    "json_out": "--json",
}


def flag_of(argument: str) -> str:
    """The flag that sets a library argument: ``max_batches`` → ``--max-batches``."""
    return FLAG_OF_ARGUMENT.get(argument, "--" + argument.replace("_", "-"))


def message_of(exc: CurvdiagError) -> str:
    """The error's line as the command line says it (a bad argument is named by its flag)."""
    return exc.with_flag(flag_of(exc.argument)) if isinstance(exc, BadArgument) else exc.message


def fail(exc: CurvdiagError, debug: bool, prefix: str = "") -> None:
    """One line (plus a hint) on stderr and the error's exit status; the traceback with --debug."""
    if debug:
        raise exc
    err = Console(stderr=True, highlight=False)
    err.print(f"{escape(prefix)}[bold red]error:[/] {escape(message_of(exc))}", markup=True, soft_wrap=True)
    if exc.hint:
        err.print(f"{prefix}hint: {exc.hint}", markup=False, soft_wrap=True)
    raise typer.Exit(code=exc.exit_code)


@contextlib.contextmanager
def user_errors(debug: bool, fail_with: Callable[[CurvdiagError, bool], None] = fail) -> Iterator[None]:
    """Every error ends as one line plus a hint (exit 2 bad input, 1 otherwise), unless --debug;
    ``fail_with`` prints it (:func:`fail`, or the per-rank line under torchrun)."""
    try:
        yield
    except CurvdiagError as exc:
        fail_with(exc, debug)
    except (KeyboardInterrupt, typer.Exit):
        raise
    except Exception as exc:  # a bug of ours or an unforeseen input: still one line
        fail_with(CurvdiagError(f"unexpected {type(exc).__name__}: {exc}",
                           hint="rerun with --debug for the traceback and report it"), debug)


def _long_flag(param: Optional[object]) -> str:
    opts = getattr(param, "opts", None) or ["?"]
    return next((opt for opt in opts if opt.startswith("--")), opts[0])


def usage_error(exc: typer.BadParameter) -> BadInput:
    """A value typer could not parse, as the one-line error: ``--method qr: unknown method``."""
    if isinstance(exc, UnknownChoice):
        flag = _long_flag(exc.param)
        return BadInput(f"{flag} {exc.value}: unknown {flag.lstrip('-')}", hint=f"choose one of {', '.join(exc.choices)}")
    hint = f"see {exc.ctx.command_path} --help" if exc.ctx is not None else None
    return BadInput(exc.format_message(), hint=hint)


class OneLineUsageErrors(TyperCommand):
    """A command whose unparsable values (a bad choice, a number that is not one, a missing
    argument) end as one error line like every other error, instead of typer's framed box."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except typer.BadParameter as exc:
            fail(usage_error(exc), debug=False)
