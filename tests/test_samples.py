"""The bundled sample checkpoints give the verdicts they were made for, through the real CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from curvdiag.cli.app import app
from curvdiag.loading.target import load_target
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.probes.sharpness import lambda_max
from conftest import SAMPLES

runner = CliRunner()
CKPT = SAMPLES / "checkpoints"


def probe_json(recipe, checkpoint, *flags):
    result = runner.invoke(app, ["probe", str(SAMPLES / recipe), "--checkpoint", str(CKPT / checkpoint),
                                 "--json", "-", "--quiet", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_tanh_edge_is_at_the_edge_and_lambda_max_matches_a_tight_reference():
    report = probe_json("tanh_mlp.py", "tanh_edge.pt", "--probes", "lambda_max")
    lam, eos = report["probes"]["lambda_max"], report["probes"]["eos"]
    assert eos["status"] == "edge" and eos["optimizer"] == "sgd" and eos["lr"] == pytest.approx(0.3)
    assert report["step"] is not None and report["operator"]["hvp_method"] == "kept-graph"
    target = load_target(str(SAMPLES / "tanh_mlp.py"), str(CKPT / "tanh_edge.pt"), dtype="float64")
    op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes)
    reference = lambda_max(op, tol=1e-9, max_hvps=400)
    assert reference.converged
    assert lam["converged"] and lam["value"] == pytest.approx(reference.value, rel=1e-3)


def test_tanh_early_is_stable():
    report = probe_json("tanh_mlp.py", "tanh_early.pt", "--probes", "lambda_max")
    assert report["probes"]["eos"]["status"] == "stable"


def test_adam_checkpoint_gives_preconditioned_sharpness_and_threshold_38_over_lr_without_flags():
    report = probe_json("adam_mlp.py", "adam_mlp.pt", "--probes", "lambda_max")
    probes = report["probes"]
    assert report["optimizer"]["source"] == "checkpoint" and report["optimizer"]["family"] == "adam"
    assert probes["eos"]["curvature"] == "preconditioned_lambda_max"
    assert probes["eos"]["threshold"] == pytest.approx(38 / 1e-3)
    assert probes["preconditioned_lambda_max"]["value"] > probes["lambda_max"]["value"]
    assert report["operator"]["batches"] == 4 and report["operator"]["samples"] == 1000


def test_batchnorm_cnn_is_probed_in_eval_mode_without_touching_running_statistics():
    report = probe_json("bn_cnn.py", "bn_cnn.pt", "--probes", "lambda_max,hessian_trace", "--samples", "5")
    assert report["operator"]["mode"] == "eval" and report["probes"]["lambda_max"]["converged"]
    trace = report["probes"]["hessian_trace"]
    # Conv2d and eval-mode BatchNorm are covered by the per-sample Gauss-Newton trace: tr(G) exact.
    assert trace["estimator"] == "hutchinson + exact Gauss-Newton control variate" and "estimator_note" not in trace
    assert abs(trace["value"] - trace["ggn_trace"]) < 3 * trace["stderr"] + 1e-6 * abs(trace["value"])
    target = load_target(str(SAMPLES / "bn_cnn.py"), str(CKPT / "bn_cnn.pt"))
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes, train_mode=True)
    lambda_max(op, tol=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in target.model.state_dict().items())
    train = probe_json("bn_cnn.py", "bn_cnn.pt", "--probes", "lambda_max", "--train-mode")
    assert train["operator"]["mode"] == "train"


def test_transformer_with_fused_attention_is_probed_through_the_math_kernel():
    report = probe_json("tiny_transformer.py", "tiny_transformer.pt", "--probes", "lambda_max")
    assert report["operator"]["fallback"] == "math-attention"
    assert "not implemented" in report["operator"]["fallback_reason"]
    assert report["probes"]["eos"]["optimizer"] == "adamw"
    assert report["probes"]["lambda_max"]["converged"]


@pytest.mark.parametrize("recipe,checkpoint", [("tanh_mlp.py", "tanh_edge.pt"), ("tanh_mlp.py", "tanh_early.pt"),
                                               ("bn_cnn.py", "bn_cnn.pt"), ("adam_mlp.py", "adam_mlp.pt"),
                                               ("tiny_transformer.py", "tiny_transformer.pt")])
def test_probe_plots_the_eigenvalues_against_the_threshold_for_every_sample(tmp_path, recipe, checkpoint):
    result = runner.invoke(app, ["probe", str(SAMPLES / recipe), "--checkpoint", str(CKPT / checkpoint),
                                 "--probes", "lambda_max", "--quiet", "--plots", str(tmp_path)])
    assert result.exit_code == 0, result.output
    figure = tmp_path / "eigenvalues.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
