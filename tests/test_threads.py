"""Issue 12, item 4: ``--threads`` (probe and train) and ``threads=`` (curvdiag.probe): the default
is one thread unless OMP_NUM_THREADS says otherwise, a count is used as given, torch's setting
comes back after an API call, and a bad count is one line (exit 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import curvdiag
from conftest import RECIPES
from curvdiag.cli.app import app
from curvdiag.curvature.threads import DEFAULT_THREADS, resolve_threads, torch_threads
from curvdiag.errors import BadArgument

TINY = str(RECIPES / "tiny_mlp.py")


def test_resolve(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads("default") == DEFAULT_THREADS == 1
    assert resolve_threads(3) == 3 and resolve_threads(None) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_threads("default") is None  # the user's OMP_NUM_THREADS is kept
    for bad in (0, -1, 1.5, True, "many"):
        with pytest.raises(BadArgument, match="threads"):
            resolve_threads(bad)


def test_torch_threads_sets_and_restores():
    torch.set_num_threads(2)
    with torch_threads(1) as used:
        assert used == torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            raise RuntimeError("restored even so")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("threads, expected", [("default", 1), (2, 2), (None, 2)])
def test_the_api_runs_on_the_threads_asked_for_and_restores_them(monkeypatch, threads, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    seen = []

    def loss(model, batch):
        seen.append(torch.get_num_threads())
        return F.mse_loss(model(batch[0]), batch[1])

    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))
    curvdiag.probe(torch.nn.Linear(3, 1), loss, [batch], probes="lambda_max", threads=threads)
    assert seen and set(seen) == {expected}
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("command", ["probe", "train"])
def test_a_bad_thread_count_is_one_line(command):
    result = CliRunner().invoke(app, [command, TINY, "--threads", "0"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --threads 0") and "Traceback" not in result.output


def test_probe_and_train_run_with_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    probe = CliRunner().invoke(app, ["probe", TINY, "--probes", "lambda_max", "--threads", "1", "-q"])
    train = CliRunner().invoke(app, ["train", TINY, "--steps", "2", "--threads", "1", "--out", str(tmp_path / "run"), "-q"])
    assert probe.exit_code == 0 and train.exit_code == 0, probe.output + train.output
    assert torch.get_num_threads() == 2  # the command's setting does not outlive it
