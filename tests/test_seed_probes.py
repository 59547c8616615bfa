"""Directional curvature, glass density, local Hessian diagonal and the power-law exponent
against quadratics (exact answers) and the ReLU/tanh contrast of seed 004."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from curvdiag.cli.app import app
from curvdiag.probes.directional import DirectionalCurvatureTracker, directional_curvature
from curvdiag.probes.glass import glass_probe
from curvdiag.curvature.operator import CurvatureOperator
from conftest import RECIPES, quadratic_spectrum

TINY = str(RECIPES / "tiny_mlp.py")


class Quadratic(torch.nn.Module):
    """L(θ) = ½ θᵀAθ + bᵀθ over two parameter tensors (two "layers")."""

    def __init__(self, A, b):
        super().__init__()
        self.A, self.b = A, b
        g = torch.Generator().manual_seed(9)
        self.first = torch.nn.Parameter(torch.randn(8, generator=g, dtype=A.dtype))
        self.second = torch.nn.Parameter(torch.randn(A.shape[0] - 8, generator=g, dtype=A.dtype))

    def forward(self, _):
        theta = torch.cat([self.first, self.second])
        return 0.5 * theta @ self.A @ theta + self.b @ theta


def quadratic_operator(eigenvalues):
    A = quadratic_spectrum(eigenvalues, seed=7)
    b = torch.linspace(-1, 1, A.shape[0], dtype=A.dtype)
    model = Quadratic(A, b)
    return CurvatureOperator(model, [torch.zeros(1)], lambda m, batch: m(batch), [1]), A


SPECTRUM = [float(x) for x in torch.linspace(-2.0, 5.0, 20)]


def test_directional_curvature_on_a_quadratic_is_exact_globally_and_per_layer():
    op, A = quadratic_operator(SPECTRUM)
    theta = op.parameters_vector()
    step = torch.randn(op.num_params, generator=torch.Generator().manual_seed(1), dtype=A.dtype)
    _, grad_next = op.gradient_at(theta + step)
    result = directional_curvature(theta, theta + step, op.gradient(), grad_next, op.layer_slices())
    assert result.value == pytest.approx(float((A @ step).norm() / step.norm()), rel=1e-10)
    assert result.rayleigh == pytest.approx(float(step @ A @ step / step.dot(step)), rel=1e-10)
    first = result.layers[0]
    assert first.name == "first" and first.value == pytest.approx(float((A @ step)[:8].norm() / step[:8].norm()), rel=1e-10)
    # The global value comes from the summed squares, not from the per-layer ratios.
    assert result.value != pytest.approx(sum(l.value for l in result.layers) / 2, rel=1e-3)


def test_rayleigh_is_negative_along_negative_curvature():
    op, A = quadratic_operator(SPECTRUM)
    eigenvalues, vectors = torch.linalg.eigh(A)
    theta = op.parameters_vector()
    step = vectors[:, 0]  # the −2 eigenvector
    _, grad_next = op.gradient_at(theta + step)
    result = directional_curvature(theta, theta + step, op.gradient(), grad_next)
    assert result.rayleigh == pytest.approx(-2.0, rel=1e-9) and result.value == pytest.approx(2.0, rel=1e-9)


def test_tracker_matches_the_function_and_reads_without_writing():
    op, A = quadratic_operator(SPECTRUM)
    model = op.model
    tracker = DirectionalCurvatureTracker(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    states = []
    for _ in range(3):
        optimizer.zero_grad()
        model(None).backward()
        states.append((op.flatten([p.detach().clone() for p in model.parameters()]),
                       op.flatten([p.grad.clone() for p in model.parameters()])))
        result = tracker.update()
        optimizer.step()
    (t1, g1), (t2, g2) = states[-2], states[-1]
    assert result.value == pytest.approx(float((g2 - g1).norm() / (t2 - t1).norm()), rel=1e-9)
    assert result.value == pytest.approx(float((A @ (t2 - t1)).norm() / (t2 - t1).norm()), rel=1e-9)


def test_glass_on_a_quadratic_has_zero_density_p_two_and_unbiased_h():
    op, A = quadratic_operator(SPECTRUM)
    samples = 200
    glass, power = glass_probe(op, lam=1e-2, samples=samples, seed=0)
    assert abs(glass.rho) < 1e-12 and all(abs(l.rho) < 1e-12 for l in glass.layers)
    assert power.p == pytest.approx(2.0, abs=1e-9) and all(l.p == pytest.approx(2.0, abs=1e-9) for l in power.layers)
    # h = δ ⊙ Aδ exactly for a quadratic: mean diag(A), per-entry variance Σ_{j≠i} A_ij².
    off = (A - torch.diag(torch.diagonal(A))).pow(2).sum(dim=1)
    z = (glass.h_diagonal - torch.diagonal(A)) / (off / samples).sqrt()
    assert 0.4 <= float(z.pow(2).mean()) <= 1.6 and float(z.abs().max()) < 4.5


def test_glass_and_power_law_restore_the_parameters():
    op, _ = quadratic_operator(SPECTRUM)
    before = op.parameters_vector().clone()
    glass_probe(op, lam=1e-3, samples=3)
    assert torch.equal(op.parameters_vector(), before)


def _digits_mlp(activation):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:300], dtype=torch.float64) / 16
    y = torch.tensor(digits.target[:300])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), activation(), torch.nn.Linear(32, 32), activation(),
                                torch.nn.Linear(32, 10)).double()
    return CurvatureOperator(model, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]), [300])


def test_relu_layers_are_glassy_and_tanh_layers_smooth():
    relu = glass_probe(_digits_mlp(torch.nn.ReLU), lam=1e-4, samples=4, seed=0)[1]
    tanh = glass_probe(_digits_mlp(torch.nn.Tanh), lam=1e-4, samples=4, seed=0)[1]
    p_relu = {l.name: l.p for l in relu.layers}
    assert p_relu["0.weight"] < 1.7  # kinks behind the first layer: gradient glass
    assert p_relu["4.weight"] == pytest.approx(2.0, abs=0.05)  # last layer: no ReLU after it
    assert all(abs(l.p - 2.0) < 0.1 for l in tanh.layers)


runner = CliRunner()


def test_cli_directional_curvature_from_a_previous_checkpoint(tmp_path):
    from curvdiag.loading.recipe import load_recipe

    recipe = load_recipe(TINY)
    previous = recipe.model()
    torch.save(previous.state_dict(), tmp_path / "prev.pt")
    current = recipe.model()
    with torch.no_grad():
        for p in current.parameters():
            p.add_(0.01)
    torch.save(current.state_dict(), tmp_path / "now.pt")
    result = runner.invoke(app, ["probe", TINY, "--checkpoint", str(tmp_path / "now.pt"), "--previous",
                                 str(tmp_path / "prev.pt"), "--probes", "directional_curvature", "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["probes"]["directional_curvature"]
    assert entry["source"].startswith("previous checkpoint")
    assert entry["step_norm"] == pytest.approx(0.01 * math.sqrt(51), rel=1e-4)
    assert {"value", "rayleigh", "layers"} <= set(entry) and entry["layers"][0]["name"] == "0.weight"
    torch.save({"0.weight": torch.zeros(6, 4)}, tmp_path / "bad.pt")
    bad = runner.invoke(app, ["probe", TINY, "--previous", str(tmp_path / "bad.pt"), "--probes", "directional_curvature"])
    assert bad.exit_code == 2 and "missing keys" in bad.output


def test_cli_directional_curvature_from_a_simulated_step_matches_a_manual_step():
    result = runner.invoke(app, ["probe", TINY, "--probes", "directional_curvature", "--json", "-", "-q", "--dtype", "float64"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["probes"]["directional_curvature"]
    assert "simulated SGD step" in entry["source"]
    from curvdiag.loading.target import load_target

    target = load_target(TINY, dtype="float64")
    op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes)
    theta, grad = op.parameters_vector(), op.gradient()
    theta_next = theta - 0.5 * grad  # fresh momentum buffer: the first step is plain SGD
    _, grad_next = op.gradient_at(theta_next)
    expected = directional_curvature(theta, theta_next, grad, grad_next)
    assert entry["value"] == pytest.approx(expected.value, rel=1e-9)
    assert entry["step_norm"] == pytest.approx(0.5 * float(grad.norm()), rel=1e-9)


def test_cli_glass_and_power_law_report(tmp_path):
    result = runner.invoke(app, ["probe", TINY, "--probes", "glass,power_law", "--glass-samples", "2", "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    probes = json.loads(result.stdout)["probes"]
    assert set(probes) == {"glass", "power_law"}
    assert probes["glass"]["samples"] == 2 and probes["glass"]["lambda"] == 1e-3
    assert {"name", "rho", "h"} <= set(probes["glass"]["layers"][0])
    assert {"name", "p"} <= set(probes["power_law"]["layers"][0]) and "p" in probes["power_law"]
    bad = runner.invoke(app, ["probe", TINY, "--glass-lambda", "0"])
    assert bad.exit_code == 2 and "--glass-lambda" in bad.output


def test_products_still_work_after_a_simulated_step_that_was_skipped(tmp_path):
    from curvdiag.loading.target import load_target
    from curvdiag.probes.simulated_step import simulate_step

    recipe = tmp_path / "no_optimizer.py"
    recipe.write_text((RECIPES / "tiny_mlp.py").read_text().split("def optimizer")[0])
    target = load_target(str(recipe), dtype="float64")
    op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes)
    v = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = op.hvp(v)
    theta_next, reason = simulate_step(target, op)
    assert theta_next is None and "no optimizer" in reason
    torch.testing.assert_close(op.hvp(v), before)  # the parameters were rewritten in place: graph rebuilt
