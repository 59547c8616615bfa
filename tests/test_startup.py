"""Start-up: the commands that need no curvature start without torch (issue #16 item 4).

Each check runs in a fresh interpreter (``sys.modules`` of this one already holds torch) and
reads which heavy modules the command left imported.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent / "recipes"


def _fresh(args, cwd: Path) -> list:
    """Run ``curvdiag ARGS`` through its console entry point (curvdiag.cli.app.main) in a new
    interpreter; return the heavy modules it imported, sorted. Fails on a non-zero exit."""
    script = textwrap.dedent(f"""
        import sys
        sys.argv = ["curvdiag", *{[str(a) for a in args]!r}]
        from curvdiag.cli.app import main
        try:
            main()
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
        heavy = ("torch", "sympy", "numpy", "matplotlib")
        print(sorted(name for name in heavy if name in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["plot", "--help"], ["report", "--help"]])
def test_help_and_version_import_neither_torch_nor_numpy(args, tmp_path):
    assert _fresh(args, tmp_path) == []


def test_plot_and_report_of_a_probe_report_do_not_import_torch(tmp_path):
    report = tmp_path / "report.json"
    _fresh(["probe", RECIPES / "tiny_mlp.py", "--probes", "lambda_max", "--json", report, "-q"], tmp_path)
    assert json.loads(report.read_text())["probes"]["lambda_max"]["value"] > 0
    assert "torch" not in _fresh(["report", report, "--out", tmp_path / "page.html"], tmp_path)
    assert (tmp_path / "page.html").stat().st_size > 0
    assert "torch" not in _fresh(["plot", report, "--out", tmp_path / "figures"], tmp_path)
    assert any((tmp_path / "figures").iterdir())
