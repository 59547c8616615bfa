"""The CLI through typer's runner: the JSON contract, the verdict, and every bad input."""

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from curvdiag.cli.app import app
from conftest import RECIPES

TINY = str(RECIPES / "tiny_mlp.py")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["probe", *map(str, args)])


def _assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_probe_writes_the_json_contract(tmp_path):
    out = tmp_path / "report.json"
    result = invoke(TINY, "--probes", "all", "--json", out, "--samples", 20, "--dtype", "float64")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert {"curvdiag_version", "recipe", "checkpoint", "model", "operator", "loss", "grad_norm", "probes"} <= set(report)
    assert report["model"]["parameters"] == 51 and report["model"]["layers"][0] == "0.weight"
    assert {"hvp_method", "fallback", "mode", "batches", "samples", "device", "dtype"} <= set(report["operator"])
    assert report["operator"]["mode"] == "eval" and report["operator"]["samples"] == 10
    probes = report["probes"]
    assert {"value", "lambda_min", "method", "hvps", "converged", "seconds"} <= set(probes["lambda_max"])
    eos = probes["eos"]
    assert {"optimizer", "lr", "threshold", "stable_lr", "ratio", "status"} <= set(eos)
    assert eos["optimizer"] == "momentum" and eos["threshold"] == pytest.approx(3.8 / 0.5)
    assert eos["ratio"] == pytest.approx(0.5 * probes["lambda_max"]["value"] / 3.8)
    assert probes["preconditioned_lambda_max"] == {"skipped": "not an Adam-family optimizer"}
    assert {"value", "stderr", "samples", "estimator"} <= set(probes["hessian_trace"])
    assert probes["hessian_trace"]["estimator"] == "hutchinson + exact Gauss-Newton control variate"
    assert {"name", "mean", "min", "max"} <= set(probes["hessian_diag"]["layers"][0])
    assert "STABLE" in result.output and "stable lr" in result.output


def test_json_to_stdout_and_quiet(tmp_path):
    result = runner.invoke(app, ["probe", TINY, "--probes", "lambda_max", "--json", "-", "--quiet"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert set(report["probes"]) == {"lambda_max", "preconditioned_lambda_max", "eos"}
    quiet = runner.invoke(app, ["probe", TINY, "--probes", "lambda_max", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stdout == ""


def test_adam_checkpoint_gives_the_preconditioned_sharpness_and_38_over_lr(tmp_path):
    from curvdiag.loading.recipe import load_recipe

    model = load_recipe(TINY).model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 5}, tmp_path / "adam.pt")
    result = invoke(TINY, "--checkpoint", tmp_path / "adam.pt", "--probes", "lambda_max", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    probes = json.loads((tmp_path / "r.json").read_text())["probes"]
    assert probes["eos"]["optimizer"] == "adam"
    assert probes["eos"]["threshold"] == pytest.approx(38 / 2e-3)
    assert probes["eos"]["curvature"] == "preconditioned_lambda_max"
    assert probes["eos"]["ratio"] == pytest.approx(2e-3 * probes["preconditioned_lambda_max"]["value"] / 38)


def _recipe(tmp_path, body, name="recipe.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


GOOD_PARTS = """
import torch
import torch.nn.functional as F
def model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)
def data():
    return [(torch.ones(4, 3), torch.zeros(4, 2))]
"""


def test_bad_inputs_exit_2_with_one_line_and_a_hint(tmp_path):
    _assert_one_line_error(invoke(tmp_path / "absent.py"), 2, "no such file", "hint:")
    broken = _recipe(tmp_path, "raise RuntimeError('boom')\n", "broken.py")
    _assert_one_line_error(invoke(broken), 2, "broken.py", "boom")
    no_loss = _recipe(tmp_path, GOOD_PARTS, "noloss.py")
    _assert_one_line_error(invoke(no_loss), 2, "missing required function loss()")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    _assert_one_line_error(invoke(TINY, "--checkpoint", tmp_path / "junk.pt"), 2, "unreadable")
    torch.save({"model": {"0.weight": torch.zeros(6, 4)}}, tmp_path / "partial.pt")
    _assert_one_line_error(invoke(TINY, "--checkpoint", tmp_path / "partial.pt"), 2, "missing keys: 0.bias, 2.weight")
    from curvdiag.loading.recipe import load_recipe

    state = load_recipe(TINY).model().state_dict()
    state["2.bias"][0] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    _assert_one_line_error(invoke(TINY, "--checkpoint", tmp_path / "inf.pt"), 2, "non-finite", "2.bias")
    _assert_one_line_error(invoke(TINY, "--probes", "lambda_max,nonsense"), 2, "unknown probe 'nonsense'", "hint:")
    _assert_one_line_error(invoke(TINY, "--tol", "-1"), 2, "--tol")
    _assert_one_line_error(invoke(TINY, "--optimizer", "rmsprop"), 2, "unknown optimizer")
    _assert_one_line_error(invoke(TINY, "--method", "qr"), 2, "--method qr")
    _assert_one_line_error(invoke(TINY, "--samples", "1"), 2, "--samples")
    if not torch.cuda.is_available():
        _assert_one_line_error(invoke(TINY, "--device", "cuda"), 2, "CUDA is not available")


def test_model_problems_are_bad_input(tmp_path):
    frozen = _recipe(tmp_path, GOOD_PARTS.replace("return torch.nn.Linear(3, 2)",
                                                 "return torch.nn.Linear(3, 2).requires_grad_(False)")
                     + "def loss(model, batch):\n    return F.mse_loss(model(batch[0]), batch[1])\n", "frozen.py")
    _assert_one_line_error(invoke(frozen), 2, "no trainable parameters")
    nan_loss = _recipe(tmp_path, GOOD_PARTS + "def loss(model, batch):\n    return model(batch[0]).sum() * float('nan')\n",
                       "nanloss.py")
    _assert_one_line_error(invoke(nan_loss), 2, "loss is not finite")
    vector_loss = _recipe(tmp_path, GOOD_PARTS + "def loss(model, batch):\n    return model(batch[0])\n", "vector.py")
    _assert_one_line_error(invoke(vector_loss), 2, "expected a scalar tensor")


def test_a_probe_failing_at_run_time_exits_1_naming_the_probe(tmp_path):
    flaky = _recipe(tmp_path, GOOD_PARTS + """
calls = {"n": 0}
def loss(model, batch):
    calls["n"] += 1
    if calls["n"] > 6:  # 3 calls for the mean-loss check (a batch and its halves), 3 more
        raise RuntimeError("out of memory (simulated)")
    return F.mse_loss(model(batch[0]), batch[1])
""", "flaky.py")
    result = invoke(flaky, "--hvp-method", "double-backward", "--probes", "hessian_trace")
    _assert_one_line_error(result, 1, "probe 'hessian_trace' failed", "out of memory (simulated)")


def test_debug_shows_the_traceback(tmp_path):
    result = invoke(tmp_path / "absent.py", "--debug")
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "BadInput"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and "curvdiag" in result.output


def test_hesscale_probe_reports_exact_layers_or_why_it_does_not_apply(tmp_path):
    result = runner.invoke(app, ["probe", TINY, "--probes", "hesscale_diag", "--json", "-", "-q", "--dtype", "float64"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["probes"]["hesscale_diag"]
    assert [layer["name"] for layer in entry["layers"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "2.weight" in entry["exact_parameters"]
    other = _recipe(tmp_path, GOOD_PARTS.replace("return torch.nn.Linear(3, 2)",
                                                 "return torch.nn.Sequential(torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))")
                    + "def loss(model, batch):\n    return F.mse_loss(model(batch[0]), batch[1])\n", "ln.py")
    skipped = runner.invoke(app, ["probe", str(other), "--probes", "hesscale_diag", "--json", "-", "-q"])
    assert skipped.exit_code == 0, skipped.output
    assert json.loads(skipped.stdout)["probes"]["hesscale_diag"]["skipped"].startswith("not applicable: LayerNorm")


def test_help_starts_without_torch_or_matplotlib():
    """--help of every command, in a fresh interpreter: the library is imported only when a command runs."""
    import subprocess
    import sys

    script = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from curvdiag.cli.app import app
        for args in ([], ["probe"], ["train"], ["plot"], ["report"]):
            result = CliRunner().invoke(app, [*args, "--help"])
            assert result.exit_code == 0, result.output
        print(sorted(name for name in ("torch", "matplotlib") if name in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_probes_help_lists_every_probe():
    from curvdiag.probes.registry import PROBE_NAMES as PROBES

    text = " ".join(runner.invoke(app, ["probe", "--help"], terminal_width=400).output.split())
    assert all(name in text for name in PROBES), text


def test_choices_are_the_library_s():
    from curvdiag.cli.choices import DType, HvpMethod, OptimizerFamily, ThrottleEngage
    from curvdiag.curvature.operator import HVP_METHODS
    from curvdiag.loading.optimizer import FAMILIES
    from curvdiag.loading.target import DTYPES
    from curvdiag.train.controllers import ENGAGE_MODES

    assert [m.value for m in OptimizerFamily] == list(FAMILIES)
    assert [m.value for m in HvpMethod] == list(HVP_METHODS)
    assert [m.value for m in DType] == list(DTYPES)
    assert [m.value for m in ThrottleEngage] == list(ENGAGE_MODES)


def test_library_arguments_are_named_by_their_flags(capsys):
    import typer

    from curvdiag.cli.errors import user_errors
    from curvdiag.errors import BadArgument

    cases = [(BadArgument("max_batches", 0, "must be at least 1"), "error: --max-batches 0: must be at least 1"),
             (BadArgument("optimizer_family", "rmsprop", "unknown optimizer", hint="choose one of sgd, adam"),
              "error: --optimizer rmsprop: unknown optimizer"),
             (BadArgument("timeout", -1.0, "must be a positive number of seconds"), "error: --dist-timeout -1.0:")]
    for exc, line in cases:
        with pytest.raises(typer.Exit) as exit_:
            with user_errors(debug=False):
                raise exc
        assert exit_.value.exit_code == 2
        assert capsys.readouterr().err.startswith(line)
    _assert_one_line_error(invoke(TINY, "--top-k", "0"), 2, "--top-k 0: must be at least 1")


def test_bad_values_are_one_line_and_choices_any_case(tmp_path):
    _assert_one_line_error(invoke(TINY, "--tol", "abc"), 2, "--tol", "hint: see")
    _assert_one_line_error(invoke(TINY, "--hvp-method", "exact"), 2, "--hvp-method exact: unknown",
                           "auto, kept-graph, double-backward, finite-difference")
    _assert_one_line_error(runner.invoke(app, ["train", TINY, "--controller", "throttle,magic", "--compare"]), 2,
                           "--controller magic: unknown", "choose from none, clip, throttle, newton")
    result = invoke(TINY, "--probes", "lambda_max", "--method", "Power", "--dtype", "FLOAT64", "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["probes"]["lambda_max"]["method"] == "power"


def test_nproc_forwards_the_same_command_line():
    import typer

    from curvdiag.cli.launch import forwarded_args

    command = typer.main.get_command(app).commands["probe"]
    ctx = command.make_context("probe", [TINY, "--dtype", "FLOAT64", "--method", "power", "--train-mode", "--nproc", "2"])
    assert forwarded_args(ctx) == [TINY, "--method", "power", "--dtype", "float64", "--train-mode"]


@pytest.mark.parametrize("args, line", [
    (["--max-batches", "0"], "error: --max-batches 0: must be at least 1"),
    (["--samples", "1"], "error: --samples 1: must be at least 2 (for a standard error)"),
    (["--probes", "lambda_max,nonsense"], "error: --probes lambda_max,nonsense: unknown probe 'nonsense'"),
])
def test_library_argument_errors_reach_the_user_as_flags(args, line):
    result = invoke(TINY, *args)
    _assert_one_line_error(result, 2, line)
