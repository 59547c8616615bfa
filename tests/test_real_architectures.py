"""Real architectures through the public API (``curvdiag.probe`` with its default probes):
ResNet-18, Hugging Face GPT-2 and BERT, the bundled tiny transformer, a model with dropout and
tied weights, BatchNorm in train mode (``tests/real_models.py``, random weights, no downloads).

For each model: the default probe finishes and leaves the model as it was; λmax agrees with a
tight reference (scipy ``eigsh``, tol 1e-10, on a LinearOperator over the same Hessian-vector
product) within the probe's own bound (its Ritz residual ≤ tol·|θ| puts θ within tol·|θ| of an
eigenvalue); that product is the Hessian of the loss as written (an independent double backward
on a copy with every dropout probability set to 0); and the report names the fallback the
model needs (the exact math attention kernel where PyTorch's fused SDPA kernel has no double
backward) and nothing where it needs none. One default probe and one reference per model.
Apart: a CTC model, whose loss has no double backward at all, probed by finite differences and
checked against the exact Hessian of the same loss written twice-differentiably.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh

import curvdiag
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.curvature.threads import torch_threads
from curvdiag.loading.recipe import leading_dimension
from curvdiag.results.probe_results import HessianTrace, LambdaMax, ProbeReport, Skipped

import real_models
from real_models import ARCHITECTURES, NEEDS_TRANSFORMERS

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
# Models whose attention runs through F.scaled_dot_product_attention (the others have none).
USES_SDPA = {"resnet18": False, "gpt2_lm": True, "bert_classifier": True, "tiny_transformer": True,
             "dropout_tied": False, "bn_cnn_train": False}
REFERENCE_TOL = 1e-10
STOPS = ("converged", "precision", "budget", "fixed", "exact", "skipped", "interrupted")


def _architecture_param(name: str):
    marks = [pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers (the [test] extra)")] \
        if name in NEEDS_TRANSFORMERS else []
    return pytest.param(name, marks=marks, id=name)


def _state(model: torch.nn.Module):
    """Everything probing must leave alone: parameter and buffer values, and every module's mode."""
    return ({n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()},
            [m.training for m in model.modules()])


def _sizes(batches):
    return [leading_dimension(b) for b in batches]


def _operator(arch: real_models.Architecture) -> CurvatureOperator:
    """The operator ``curvdiag.probe`` builds for this model (same batches, weights, mode)."""
    return CurvatureOperator(arch.model, arch.batches, arch.loss, _sizes(arch.batches), train_mode=arch.train_mode)


def eigsh_lambda_max(op) -> float:
    """The largest algebraic eigenvalue by ARPACK (scipy eigsh, which="LA", tol 1e-10) over
    ``op.matvec`` in float64 numpy, from a fixed start vector."""
    n = op.size

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x).reshape(-1)).to(device=op.device, dtype=op.dtype)
        return op.matvec(v).detach().to("cpu", torch.float64).numpy()

    start = np.random.default_rng(0).standard_normal(n)
    values = eigsh(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=1, which="LA", tol=REFERENCE_TOL,
                   v0=start, return_eigenvectors=False)
    return float(values.max())


def _one_thread():
    """curvdiag's default thread count (one) for the references too: on a shared 2-core machine
    two threads that wait on each other made the same products many times slower."""
    return torch_threads("default")


@pytest.fixture(scope="module", params=[_architecture_param(n) for n in ARCHITECTURES])
def probed(request):
    """One default probe per architecture: the model, its report, the wall time, and the model's
    state before the probe."""
    arch = ARCHITECTURES[request.param]()
    before = _state(arch.model)
    with _one_thread():
        started = time.perf_counter()
        report = curvdiag.probe(arch.model, arch.loss, arch.batches, train_mode=arch.train_mode)
        seconds = time.perf_counter() - started
    return SimpleNamespace(arch=arch, report=report, seconds=seconds, before=before)


@pytest.fixture(scope="module")
def operator(probed):
    """The operator curvdiag.probe builds for this model, built once more for the references."""
    with _one_thread():
        return _operator(probed.arch)


@pytest.fixture(scope="module")
def reference(operator):
    """λmax by eigsh over the same operator the probe used."""
    with _one_thread():
        return SimpleNamespace(lambda_max=eigsh_lambda_max(operator), fallback=operator.fallback)


# ------------------------------------------------------------------ every architecture
def test_default_probe_finishes_and_leaves_the_model_as_it_was(probed):
    report: ProbeReport = probed.report
    assert isinstance(report, ProbeReport) and not report.interrupted
    assert report.model.parameters == probed.arch.parameters
    lam = report.entry("lambda_max", LambdaMax)
    costs = {cost.name: cost for cost in report.budget.probes} if report.budget else {}
    # Converged, or stopped by its share of the budget and says so (then its residual is the bound).
    assert lam is not None and (lam.converged or costs["lambda_max"].stop == "budget"), report.probes.get("lambda_max")
    for name, entry in report.probes.items():  # every entry ran, or says why it could not
        assert not isinstance(entry, Skipped) or entry.reason, name
    document = report.to_json()  # checked against the committed JSON Schema (conftest)
    assert ProbeReport.from_json(document).to_json() == document
    values, modes = probed.before
    after_values, after_modes = _state(probed.arch.model)
    assert after_modes == modes
    assert values.keys() == after_values.keys()
    for name, value in values.items():
        assert torch.equal(after_values[name], value), name


def test_default_probe_stays_within_its_budget(probed, request):
    """The issue's 150 gradient-equivalents for the default probe, each probe accounted for, each
    stop stated, a missed precision target said (the precision reached is given)."""
    budget = probed.report.budget
    assert budget is not None and budget.total <= 150, budget
    assert sum(cost.spent for cost in budget.probes) == pytest.approx(budget.spent)
    for cost in budget.probes:
        assert cost.stop in STOPS, cost
        assert cost.stop != "budget" or cost.precision_name is None or cost.precision_reached is not None, cost
    assert 0 < budget.spent <= budget.total, [(cost.name, cost.planned, cost.spent) for cost in budget.probes]


def test_lambda_max_agrees_with_eigsh_on_the_same_product(probed, reference):
    """|θ − λmax| ≤ tol·|θ|: Lanczos' stopping rule bounds the Ritz residual ‖Hy − θy‖ ≤ tol·|θ|,
    which bounds θ's distance to an eigenvalue; Ritz values never pass λmax (so the eigenvalue
    θ is near is the top one unless Lanczos missed it, which this test would catch). A λmax
    stopped by its budget share is held to its reported residual instead, the same bound."""
    lam = probed.report.probes["lambda_max"]
    assert reference.fallback == probed.report.operator.fallback
    error = abs(lam.value - reference.lambda_max)
    bound = lam.tol * abs(lam.value) if lam.converged else lam.residuals[0]
    assert error <= bound, (lam.value, reference.lambda_max, error / abs(reference.lambda_max), lam.converged)


def _without_dropout(model: torch.nn.Module, train_mode: bool) -> torch.nn.Module:
    """A copy with every nn.Dropout's probability 0 (which also zeroes the functional attention
    dropout Hugging Face models read from those modules), in train mode or eval mode."""
    twin = copy.deepcopy(model).train(train_mode)
    for module in twin.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return twin


def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _double_backward_hvp(arch: real_models.Architecture, v: torch.Tensor) -> torch.Tensor:
    """Hv = ∇(∇L·v) by plain autograd on a dropout-free copy: L the sample-weighted mean of the
    batch losses, in the probe's mode, through the math attention kernel."""
    twin = _without_dropout(arch.model, arch.train_mode)
    params = [p for p in twin.parameters() if p.requires_grad]
    sizes = _sizes(arch.batches)
    context = _math_attention() if USES_SDPA[arch.name] else contextlib.nullcontext()
    with context:
        loss = sum(n / sum(sizes) * arch.loss(twin, b) for n, b in zip(sizes, arch.batches))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        pieces = torch.split(v, [p.numel() for p in params])
        dot = sum((g * piece.view_as(g)).sum() for g, piece in zip(grads, pieces))
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)])


def test_the_product_is_the_hessian_of_the_loss_as_written(probed, operator):
    """Dropout off (also where it is functional), BatchNorm in the requested mode, tied weights
    once: the operator's Hv equals an independent double backward on a dropout-free copy."""
    arch, op = probed.arch, operator
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(op.dtype)
    with _one_thread():
        exact, product = _double_backward_hvp(arch, v), op.hvp(v)
    # float64: rounding of two summation orders; float32 (tiny transformer): its unit roundoff × depth.
    bound = 1e-10 if op.dtype == torch.float64 else 1e-4
    assert float((product - exact).norm() / exact.norm()) <= bound


def _fused_attention_lacks_double_backward(dtype: torch.dtype) -> bool:
    """Whether differentiating PyTorch's default SDPA kernel's backward raises here (on CPU in
    torch 2.13 it does: derivative for ..._flash_attention_for_cpu_backward is not implemented)."""
    q = torch.randn(1, 2, 4, 8, dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, q, q).sum(), q, create_graph=True)
    try:
        torch.autograd.grad(g.sum(), q)
    except RuntimeError:
        return True
    return False


def test_the_report_names_the_fallback_the_model_needs(probed):
    arch, operator = probed.arch, probed.report.operator
    dtype = next(arch.model.parameters()).dtype
    needs_math_attention = USES_SDPA[arch.name] and _fused_attention_lacks_double_backward(dtype)
    assert operator.hvp_method == "kept-graph"
    if needs_math_attention:
        assert operator.fallback == "math-attention"
        assert "scaled_dot_product" in operator.fallback_reason and "not implemented" in operator.fallback_reason
        assert "math attention kernel" in operator.description
    else:
        assert (operator.fallback, operator.fallback_reason, operator.description) == (None, None, "kept-graph")
    assert operator.finite_difference_step is None and operator.finite_difference_error_estimate is None
    trace = probed.report.entry("hessian_trace", HessianTrace)
    if trace is not None and trace.ggn_trace is None:  # no control variate: the estimator says why
        assert trace.estimator_note and "not applicable" in trace.estimator_note, trace


# ------------------------------------------------------------------ what particular models must show
def test_resnet18_is_torchvisions_resnet18():
    """The hand-written ResNet-18 has torchvision's 11,689,512 parameters (62 tensors) and 122
    state_dict entries at 1000 classes; with torchvision importable, the same names and shapes."""
    model = real_models.ResNet18()
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    assert len(list(model.parameters())) == 62 and len(shapes) == 122
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1) and shapes["fc.weight"] == (1000, 512)
    try:
        from torchvision.models import resnet18
    except Exception:
        return
    assert {name: tuple(t.shape) for name, t in resnet18().state_dict().items()} == shapes


def test_tied_weights_count_once_and_dropout_stays_on_for_the_caller():
    arch = real_models.dropout_tied()
    report = curvdiag.probe(arch.model, arch.loss, arch.batches, probes="lambda_max")
    assert "embed.weight" in report.model.layers and "decoder.weight" not in report.model.layers
    assert arch.model.decoder.weight is arch.model.embed.weight
    assert report.model.parameters == 40 * 24 + 24 * 48 + 48 + 48 * 24 + 24 + 40 == arch.parameters
    assert arch.model.training and arch.model.drop.training  # the caller's train mode is kept
    # Dropout off while probing: the loss is the dropout-free loss (a mask would change it).
    with torch.no_grad():
        twin = _without_dropout(arch.model, True)
        clean = sum(float(arch.loss(twin, b)) for b in arch.batches) / len(arch.batches)
    assert report.loss == pytest.approx(clean, rel=1e-12)


def test_batchnorm_train_mode_uses_batch_statistics():
    """train_mode=True: the report says so and its λmax is the one with batch statistics (eigsh
    in train mode), well apart from eval mode's (running statistics) on the same weights."""
    arch = real_models.bn_cnn_train()
    with _one_thread():
        train = curvdiag.probe(arch.model, arch.loss, arch.batches, probes="lambda_max", train_mode=True)
        evaluated = curvdiag.probe(arch.model, arch.loss, arch.batches, probes="lambda_max")
    assert (train.operator.mode, evaluated.operator.mode) == ("train", "eval")
    lam_train, lam_eval = train.probes["lambda_max"].value, evaluated.probes["lambda_max"].value
    assert abs(lam_train - lam_eval) > 100 * train.probes["lambda_max"].tol * lam_train
    with _one_thread():
        eval_op = CurvatureOperator(arch.model, arch.batches, arch.loss, _sizes(arch.batches), train_mode=False)
        reference = eigsh_lambda_max(eval_op)
    assert abs(lam_eval - reference) <= evaluated.probes["lambda_max"].tol * lam_eval


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers (the [test] extra)")
def test_train_mode_turns_off_functional_attention_dropout():
    """Hugging Face attention passes dropout_p=self.attn_dropout.p to SDPA whenever the attention
    module is in train mode: train_mode=True must zero the rate, not only the dropout's mode."""
    arch = real_models.gpt2_lm()
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        losses.append(curvdiag.probe(arch.model, arch.loss, arch.batches, probes="lambda_max", train_mode=True).loss)
    clean = curvdiag.probe(_without_dropout(arch.model, True), arch.loss, arch.batches, probes="lambda_max",
                           train_mode=True).loss
    assert losses == [clean, clean]


# ------------------------------------------------------------------ no double backward at all: CTC
def test_ctc_falls_back_to_finite_differences_and_says_how_accurate_they_are():
    """PyTorch's CTC loss has no double backward (and no attention kernel to swap): the default
    probe runs on central differences of gradients and reports the step and its error estimate;
    its λmax is held to the Ritz bound plus that estimate against eigsh on the exact Hessian (the
    same loss written with twice-differentiable operations)."""
    arch = real_models.ctc_conv()
    with _one_thread():
        report = curvdiag.probe(arch.model, arch.loss, arch.batches)
        with torch.no_grad():
            written = [float(arch.reference_loss(arch.model, b)) for b in arch.batches]
            torchs = [float(arch.loss(arch.model, b)) for b in arch.batches]
        exact = CurvatureOperator(arch.model, arch.batches, arch.reference_loss, _sizes(arch.batches))
        reference = eigsh_lambda_max(exact)
    assert written == pytest.approx(torchs, rel=1e-12)
    assert exact.fallback is None  # the reference's product is exact
    operator = report.operator
    assert (operator.hvp_method, operator.fallback) == ("finite-difference", "finite-difference")
    assert "_ctc_loss_backward" in operator.fallback_reason and "not implemented" in operator.fallback_reason
    estimate = operator.finite_difference_error_estimate
    assert operator.finite_difference_step > 0 and 0 < estimate < 1e-3
    assert f"h={operator.finite_difference_step:g}" in operator.description
    budget = report.budget
    assert budget is not None and 0 < budget.spent <= budget.total <= 150
    lam = report.probes["lambda_max"]
    bound = lam.tol * abs(lam.value) if lam.converged else lam.residuals[0]
    # An O(h²) error: the product's change when h doubles (the estimate) is 3× its error at h.
    assert abs(lam.value - reference) <= bound + estimate * abs(reference), (lam.value, reference)
