"""The Python API (curvdiag.probe) gives the CLI's numbers without a recipe file, leaves the
model as it was, reads a live optimizer (Adam's second moments included), and names arguments
(not flags) in its errors."""

import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import curvdiag
from curvdiag.cli.app import app
from curvdiag.errors import BadArgument
from conftest import RECIPES

TINY = RECIPES / "tiny_mlp.py"
PROBES = "lambda_max,hessian_trace,hessian_diag,glass,power_law"


def _recipe():
    spec = importlib.util.spec_from_file_location("tiny_mlp_for_api", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_curvdiag_loads_no_torch():
    code = "import sys, curvdiag; assert 'torch' not in sys.modules; print(curvdiag.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == curvdiag.__version__


def test_probe_api_matches_the_cli(tmp_path):
    out = tmp_path / "cli.json"
    result = CliRunner().invoke(app, ["probe", str(TINY), "--probes", PROBES, "--json", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    cli = json.loads(out.read_text())
    recipe = _recipe()
    model = recipe.model()
    optimizer = recipe.optimizer(model.parameters())
    report = curvdiag.probe(model, recipe.loss, recipe.data(), probes=PROBES.split(","), optimizer=optimizer)
    api = report.to_json()
    assert api["model"] == cli["model"] and api["loss"] == cli["loss"] and api["grad_norm"] == cli["grad_norm"]
    assert api["probes"]["lambda_max"]["value"] == cli["probes"]["lambda_max"]["value"]
    assert api["probes"]["eos"] == cli["probes"]["eos"]
    for name in ("hessian_trace", "glass", "power_law"):
        stripped = [{k: v for k, v in r["probes"][name].items() if k != "seconds"} for r in (api, cli)]
        assert stripped[0] == stripped[1], name
    assert api["probes"]["hessian_diag"]["layers"] == cli["probes"]["hessian_diag"]["layers"]
    assert api["optimizer"]["source"] == "optimizer" and api["checkpoint"] is None


def test_probe_api_leaves_the_model_as_it_was():
    recipe = _recipe()
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model.train()
    before = copy.deepcopy(model.state_dict())
    report = curvdiag.probe(model, recipe.loss, recipe.data(), probes="lambda_max,directional_curvature",
                            lr=0.1, optimizer_family="sgd", train_mode=True)
    assert model.training and all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert report.to_json()["probes"]["eos"]["status"] in ("stable", "edge", "unstable")


def test_probe_api_reads_adam_second_moments_from_the_live_optimizer():
    recipe = _recipe()
    model = recipe.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in recipe.data():
        optimizer.zero_grad()
        recipe.loss(model, batch).backward()
        optimizer.step()
    probes = curvdiag.probe(model, recipe.loss, recipe.data(), probes="lambda_max", optimizer=optimizer).to_json()["probes"]
    assert probes["eos"]["curvature"] == "preconditioned_lambda_max" and probes["eos"]["optimizer"] == "adam"
    assert probes["preconditioned_lambda_max"]["value"] > 0


@pytest.mark.parametrize("kwargs, argument", [
    (dict(tol=0.0), "tol"), (dict(top_k=0), "top_k"), (dict(samples=1), "samples"), (dict(method="qr"), "method"),
    (dict(batches=[]), "batches"), (dict(optimizer="sgd"), "optimizer"), (dict(model="net"), "model"),
])
def test_probe_api_errors_name_the_argument(kwargs, argument):
    recipe = _recipe()
    arguments = dict(model=recipe.model(), loss=recipe.loss, batches=recipe.data())
    arguments.update(kwargs)
    with pytest.raises(BadArgument, match=rf"^{argument}=") as caught:
        curvdiag.probe(arguments.pop("model"), arguments.pop("loss"), arguments.pop("batches"), **arguments)
    assert caught.value.argument == argument and "--" not in caught.value.message


def test_the_readme_python_api_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"<!-- python-api-example[^>]*-->\n```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(block, namespace)
    printed = capsys.readouterr().out
    assert re.match(r"(stable|edge|unstable): lr·λmax/T = \d", printed), printed
    assert namespace["document"]["probes"]["hessian_trace"]["value"] == namespace["report"].probes["hessian_trace"].value
