"""README and ``--help`` agree with what runs: every flag of ``curvdiag probe`` and ``curvdiag
train`` is in the README's usage block and every flag there exists; every probe name is listed
by ``--help`` and by the README."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curvdiag.cli.app import app
from curvdiag.probes.registry import PROBE_NAMES

README = Path(__file__).resolve().parents[1] / "README.md"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
HELP_OPTION = re.compile(r"^│\s+((?:--[a-z][a-z0-9-]*[\s,]*)+)", re.M)  # the option column of rich's help
NOT_OPTIONS = {"--help", "--install-completion", "--show-completion"}


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERM": "dumb", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def _usage_block(command: str) -> str:
    """The README's usage lines of ``curvdiag COMMAND`` (until the next ``curvdiag`` line)."""
    text = README.read_text(encoding="utf-8")
    block = text.split("## What you get", 1)[1].split("```", 2)[1]
    lines, inside = [], False
    for line in block.splitlines():
        if line.startswith("curvdiag "):
            inside = line.startswith(f"curvdiag {command} ")
        if inside:
            lines.append(line)
    assert lines, f"README has no usage of curvdiag {command}"
    return "\n".join(lines)


@pytest.mark.parametrize("command", ["probe", "train"])
def test_every_flag_in_help_is_in_the_readme_and_back(command):
    in_help = {f for cell in HELP_OPTION.findall(_help(command)) for f in FLAG.findall(cell)} - NOT_OPTIONS
    assert "--seed" in in_help
    in_readme = set(FLAG.findall(_usage_block(command)))
    # A boolean pair (--x/--no-x) is documented by its positive form.
    in_help = {f for f in in_help if not (f.startswith("--no-") and "--" + f[5:] in in_help)}
    assert in_help - in_readme == set(), "flags missing from the README usage block"
    assert in_readme - in_help == set(), "README documents flags that do not exist"


def test_every_probe_is_named_in_help_and_readme():
    helptext = _help("probe")
    usage = _usage_block("probe")
    for name in PROBE_NAMES:
        assert name in helptext, name
        assert name in usage, name
    assert "default" in helptext and "default" in usage
