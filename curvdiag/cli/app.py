"""The ``curvdiag`` command: a thin typer layer over loading, the curvature operator, the probes,
training and the report (DESIGN §4). One module per command (:mod:`~curvdiag.cli.probe`,
:mod:`~curvdiag.cli.train`, :mod:`~curvdiag.cli.plot`), registered here; the commands never
import this module. No mathematics and no collectives in ``cli/``; the library is imported
when a command runs, so ``--help`` and ``--version`` start without torch.

Errors the user can act on are one line plus a hint on stderr (exit 2 for bad input, 1 for a
probe that failed; :mod:`curvdiag.cli.errors`); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

from typing import Annotated

import typer

from curvdiag._version import __version__
from curvdiag.cli import plot, probe, train
from curvdiag.cli.errors import OneLineUsageErrors

app = typer.Typer(
    name="curvdiag",
    help="Training-stability diagnostics from the curvature of the loss.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

COMMANDS = {"probe": probe.probe, "train": train.train, "plot": plot.plot, "report": plot.report}
for _name, _command in COMMANDS.items():
    app.command(_name, cls=OneLineUsageErrors)(_command)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"curvdiag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """curvdiag: what the curvature says about a training run."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
