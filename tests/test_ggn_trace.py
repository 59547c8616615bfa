"""The Gauss–Newton control variate against dense references (float64, tiny models): exact
tr(G) and G z against J_bᵀ A_b J_b built from dense Jacobians and dense output Hessians — by the
per-layer rules and by per-sample gradients (conv, BatchNorm in eval mode, bare parameters, tied
and shared weights) — the estimator against the dense tr(H) within the exact spread of its
probes, and every case it must refuse (NotCovered) rather than answer wrongly."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from curvdiag.curvature import per_sample
from curvdiag.curvature.ggn import LAYERS, PER_SAMPLE, GaussNewton
from curvdiag.errors import NotCovered
from curvdiag.probes.ggn_trace import ggn_control_variate_trace
from curvdiag.probes.hutchinson import hutchinson_trace, t_factor
from curvdiag.curvature.operator import CurvatureOperator
from conftest import dense_hessian
from ggn_models import conv_bn, pos_transformer
from models import (BatchNormNet, FusedKernelMLP, MarkedFusedKernelMLP, TiedAutoencoder, mse, regression_batches,
                    tanh_mlp)
from torch.nn.attention import SDPBackend, sdpa_kernel


# ---------------------------------------------------------------------------- references
def dense_ggn(model, batches, loss_fn, sizes):
    """Σ_b (n_b/N) J_bᵀ A_b J_b: J_b the dense Jacobian of the outputs, A_b the dense Hessian
    of the batch loss w.r.t. the outputs (outputs taken where loss_fn calls the model)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    total = float(sum(sizes))
    G = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for n_b, batch in zip(sizes, batches):
        def outputs(flat, batch=batch):
            params, start = {}, 0
            for name, p in named:
                params[name] = flat[start:start + p.numel()].view_as(p)
                start += p.numel()
            seen = []
            loss_fn(lambda *a, **k: seen.append(functional_call(model, params, a, k)) or seen[-1], batch)
            return seen[0]

        out = outputs(theta).detach()
        J = torch.autograd.functional.jacobian(outputs, theta).reshape(out.numel(), -1)
        A = torch.autograd.functional.hessian(
            lambda o, batch=batch: loss_fn(lambda *a, **k: o.view(out.shape), batch), out.reshape(-1))
        G += n_b / total * J.T @ A @ J
    return G


def probe_sd(M):
    """Exact s.d. of zᵀMz for Rademacher z: sqrt(2 Σ_{i≠j} M_ij²)."""
    off = M - torch.diag(torch.diagonal(M))
    return math.sqrt(2 * float(off.pow(2).sum()))


def cross_entropy(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def ce_batches(sizes=(6, 3), dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def near_fit(model, kind):
    """Batches whose targets the model nearly fits (small residuals: R = H − G is small)."""
    g = torch.Generator().manual_seed(7)
    if kind == "ce":  # confident predictions: softmax residuals p − onehot(argmax) are small
        with torch.no_grad():
            model[2].weight.mul_(10)
            model[2].bias.mul_(10)
    batches = []
    for n in (9, 4):
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        with torch.no_grad():
            out = model(x)
        if kind == "mse":
            batches.append((x, out + 0.05 * torch.randn(out.shape, generator=g, dtype=torch.float64)))
        else:
            batches.append((x, out.argmax(-1)))
    return batches, [9, 4]


class SeqNet(torch.nn.Module):
    """Linear on (n, T, d) sequence inputs, LayerNorm, RMSNorm, a causal cumulative sum over
    positions; ``tokens=True`` returns per-position outputs (n, T, C), else mean-pools to (n, C)."""

    def __init__(self, tokens: bool, hidden: int):
        super().__init__()
        torch.manual_seed(0)
        self.tokens = tokens
        self.a = torch.nn.Linear(4, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.rms = torch.nn.RMSNorm(hidden)
        self.b = torch.nn.Linear(hidden, 3)
        with torch.no_grad():
            for m in (self.norm, self.rms):
                m.weight.add_(0.3 * torch.randn(hidden))
            self.norm.bias.add_(0.1 * torch.randn(hidden))

    def forward(self, x):
        h = torch.tanh(self.rms(self.norm(self.a(x)))).cumsum(dim=1)
        out = self.b(h)
        return out if self.tokens else out.mean(dim=1)


def seq_batches(tokens: bool, length: int):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, length, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n, length) if tokens else (n,), generator=g)) for n in (4, 2)]


class Squeezed(torch.nn.Module):
    """One output per sample: shape (n,)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 5)
        self.b = torch.nn.Linear(5, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).squeeze(-1)


def token_ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1))


CASES = {
    "mse": (tanh_mlp, lambda: regression_batches(), mse, [7, 3]),
    "cross-entropy": (tanh_mlp, lambda: ce_batches(), cross_entropy, [6, 3]),
    # hidden 8, length 2: the Gram form ⟨XXᵀ, ΔΔᵀ⟩; hidden 5, length 3: per-sample gradients
    "sequence-inputs": (lambda: SeqNet(False, 8).double(), lambda: seq_batches(False, 2), cross_entropy, [4, 2]),
    "per-position-outputs": (lambda: SeqNet(True, 5).double(), lambda: seq_batches(True, 3), token_ce, [4, 2]),
    "one-output-per-sample": (lambda: Squeezed().double(), lambda: [(x, y[:, 0]) for x, y in regression_batches()],
                              mse, [7, 3]),
}


def _regression(make):
    """(model, batches, mse, sizes) on the 3-output regression batches (a tied autoencoder: its 4 inputs)."""
    def build():
        model = make().eval()
        if isinstance(model, TiedAutoencoder):
            g = torch.Generator().manual_seed(1)
            return model, [(torch.randn(5, 4, generator=g, dtype=torch.float64),) * 2], mse, [5]
        batches = [(x, y[:, :3]) for x, y in regression_batches()]
        return model, batches, mse, [7, 3]
    return build


def _classifier(make):
    def build():
        model, batches, sizes = make()
        return model, batches, cross_entropy, sizes
    return build


#: Models only per-sample gradients cover: the per-layer rules refuse them with the reason given.
PER_SAMPLE_CASES = {
    "conv-batchnorm": (_classifier(conv_bn), "Conv2d not covered"),
    "bare-parameter-attention": (_classifier(pos_transformer), r"PosTransformer not covered \(parameter pos\)"),
    "batchnorm-eval-dropout": (_regression(lambda: BatchNormNet().double()), "BatchNorm1d not covered"),
    "conv1d": (_regression(lambda: ConvNet().double()), "Conv1d not covered"),
    "tied-weights": (_regression(lambda: TiedAutoencoder().double()), "tied weights"),
    "module-run-twice": (_regression(lambda: Doubled().double()), "runs 2 times per forward"),
    "weight-used-outside": (_regression(lambda: WeightUsedDirectly(False).double()), "used outside"),
    "weight-used-inside-and-outside": (_regression(lambda: WeightUsedDirectly(True).double()), "used outside"),
}


def _case(name, **kw):
    if name in PER_SAMPLE_CASES:
        model, batches, loss_fn, sizes = PER_SAMPLE_CASES[name][0]()
    else:
        make_model, make_batches, loss_fn, sizes = CASES[name]
        model, batches = make_model(), make_batches()
    return model, batches, loss_fn, sizes, CurvatureOperator(model, batches, loss_fn, sizes, **kw)


def _check_exact(ggn, G, op):
    assert ggn.trace() == pytest.approx(float(torch.trace(G)), rel=1e-10)
    for (pname, start, stop) in op.layer_slices():
        assert ggn.trace_by_parameter[pname] == pytest.approx(float(torch.trace(G[start:stop, start:stop])),
                                                              rel=1e-9, abs=1e-12)
    g = torch.Generator().manual_seed(11)
    for _ in range(2):
        z = torch.randn(op.num_params, generator=g, dtype=torch.float64)
        torch.testing.assert_close(ggn.matvec(z), G @ z, rtol=1e-10, atol=1e-12)
        assert ggn.quadratic(z) == pytest.approx(float(z @ G @ z), rel=1e-10)


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("rules", [LAYERS, PER_SAMPLE])
@pytest.mark.parametrize("name", list(CASES))
def test_exact_trace_and_products_equal_the_dense_gauss_newton_matrix(name, rules):
    model, batches, loss_fn, sizes, op = _case(name)
    G = dense_ggn(model, batches, loss_fn, sizes)
    ggn = GaussNewton(op, rules=rules)
    assert ggn.rules == rules
    _check_exact(ggn, G, op)
    assert (ggn.per_sample_vjps > 0) == (rules == PER_SAMPLE)


@pytest.mark.parametrize("name", list(PER_SAMPLE_CASES))
def test_models_beyond_the_layer_rules_get_the_exact_gauss_newton_matrix_from_per_sample_gradients(name):
    model, batches, loss_fn, sizes, op = _case(name)
    with sdpa_kernel(SDPBackend.MATH):  # the reference's own double backward
        G = dense_ggn(model, batches, loss_fn, sizes)
    ggn = GaussNewton(op)
    assert ggn.rules == PER_SAMPLE
    _check_exact(ggn, G, op)
    with pytest.raises(NotCovered, match=PER_SAMPLE_CASES[name][1]):  # why the layer rules did not run
        GaussNewton(op, rules=LAYERS)


def test_per_sample_chunks_under_a_small_memory_cap_give_the_same_trace(monkeypatch):
    *_, op = _case("conv-batchnorm")
    whole = GaussNewton(op)
    monkeypatch.setattr(per_sample, "MAX_PER_SAMPLE_BYTES", op.num_params * 8)  # one sample × one direction
    chunked = GaussNewton(op)
    assert chunked.trace() == pytest.approx(whole.trace(), rel=1e-12)
    # 2 batches (4 and 2 samples) × 2 nonzero eigen-directions (3 classes): one pass per sample and
    # direction, plus the set-up check's one pass per sample.
    assert chunked.per_sample_passes == 6 * 2 + 6 and chunked.per_sample_vjps == 6 * 2 + 6
    assert whole.per_sample_passes == 2 + 2


def test_graphs_not_kept_give_the_same_gauss_newton_matrix():
    model, batches, loss_fn, sizes, op = _case("cross-entropy", hvp_method="double-backward")
    G = dense_ggn(model, batches, loss_fn, sizes)
    ggn = GaussNewton(op)
    assert not ggn.keep_graphs and all(b.out is None for b in ggn.batches)
    assert ggn.trace() == pytest.approx(float(torch.trace(G)), rel=1e-10)
    z = torch.randn(op.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(ggn.matvec(z), G @ z, rtol=1e-10, atol=1e-12)


def test_cross_entropy_skips_the_zero_eigenvalue_of_its_output_hessian():
    *_, op = _case("cross-entropy")
    ggn = GaussNewton(op)
    ggn.trace()
    assert ggn.trace_backwards == 2 * (3 - 1)  # 2 batches × (C − 1) nonzero eigen-directions
    per_sample = GaussNewton(op, rules=PER_SAMPLE)
    setup = per_sample.per_sample_vjps  # the check: one per sample
    per_sample.trace()
    assert (setup, per_sample.per_sample_vjps - setup) == (9, 9 * (3 - 1))


# ---------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("kind", ["mse", "ce"])
def test_estimate_is_unbiased_and_its_probes_spread_far_less_than_plain_hutchinson(kind):
    model = tanh_mlp()
    batches, sizes = near_fit(model, kind)
    loss_fn = mse if kind == "mse" else cross_entropy
    op = CurvatureOperator(model, batches, loss_fn, sizes)
    H = dense_hessian(model, batches, loss_fn, sizes)
    G = dense_ggn(model, batches, loss_fn, sizes)
    n = 30
    result = ggn_control_variate_trace(op, samples=n, seed=0)
    plain = hutchinson_trace(op, samples=n, seed=0)
    sd_residual, sd_plain = probe_sd(H - G), probe_sd(H)
    assert sd_residual < 0.2 * sd_plain  # the premise on a nearly fitted model
    assert abs(result.value - float(torch.trace(H))) <= 4 * sd_residual / math.sqrt(n)
    assert result.ggn_trace == pytest.approx(float(torch.trace(G)), rel=1e-10)
    assert result.value == pytest.approx(result.ggn_trace + result.residual_trace, rel=1e-12)
    # Measured spreads (same z's): the control variate's is several times smaller.
    assert result.probe_sd < 0.3 * plain.stderr * math.sqrt(n)
    assert result.probe_sd == pytest.approx(sd_residual, rel=0.5)
    assert result.stderr == pytest.approx(result.probe_sd / math.sqrt(n) * t_factor(n))  # widened: small n
    assert (result.samples, result.hvps, result.ggn_products) == (n, n, 2 * n)
    assert result.estimator == "hutchinson + exact Gauss-Newton control variate"


def test_probes_are_added_until_the_target_relative_standard_error():
    model = tanh_mlp()
    batches, sizes = near_fit(model, "mse")
    op = CurvatureOperator(model, batches, mse, sizes)
    result = ggn_control_variate_trace(op, target_rel_stderr=0.01, seed=1)
    assert result.stderr <= 0.01 * abs(result.value)
    assert 3 <= result.samples < 1000 and result.hvps == result.samples
    capped = ggn_control_variate_trace(op, target_rel_stderr=1e-9, seed=1, max_samples=5)
    assert capped.samples == 5


def test_probing_leaves_the_model_untouched():
    model, batches, loss_fn, sizes, op = _case("sequence-inputs")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ggn_control_variate_trace(op, samples=2)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# ---------------------------------------------------------------------------- refusals
class Doubled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(1, 2, 3, padding=1)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.conv(x.unsqueeze(1))).flatten(1))


class WeightUsedDirectly(torch.nn.Module):
    """``a.weight`` used outside ``a``'s forward; ``call_too``: ``a`` is also called."""

    def __init__(self, call_too: bool):
        super().__init__()
        torch.manual_seed(0)
        self.call_too = call_too
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = x @ self.a.weight.T
        return self.b(torch.tanh(h + self.a(x) if self.call_too else h))


def _mixing_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5, affine=False), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3)).double()


def _twice(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y) + 0.1 * F.mse_loss(model(2 * x), y)


def _weight_decay(model, batch):
    return mse(model, batch) + 0.01 * sum(p.pow(2).sum() for p in model.parameters())


def _coupled(model, batch):
    x, y = batch
    return (model(x) - y).sum(0).pow(2).mean()


def _conv_bn_train():
    return conv_bn()[0].train()


def _batch_of_pairs(model, batch):
    """A model input whose first dimension is not the sample dimension: (2, n, 4)."""
    x, y = batch
    return F.mse_loss(model(torch.stack([x, x])), y)


class Stacked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(4, 3, 1)

    def forward(self, pair):  # (2, n, 4) → (n, 3)
        return self.conv(pair.permute(1, 2, 0)).sum(-1)


@pytest.mark.parametrize("make, loss_fn, kw, reason", [
    (lambda: FusedKernelMLP().double(), mse, {}, "no double backward"),
    (lambda: MarkedFusedKernelMLP().double(), mse, {}, "once_differentiable"),  # else J z silently 0
    (tanh_mlp, _twice, {}, "forward ran 2 times"),
    (tanh_mlp, _weight_decay, {}, "other than through the model output"),
    (tanh_mlp, _coupled, {}, "couples the outputs"),
    (_mixing_net, mse, {"train_mode": True}, "mixes samples"),
    (_conv_bn_train, mse, {"train_mode": True}, "mixes samples"),
    (lambda: Stacked().double(), _batch_of_pairs, {}, "sample dimension"),
])
def test_uncovered_models_and_losses_are_refused_with_a_reason(make, loss_fn, kw, reason):
    model = make()
    if loss_fn is None:  # the tied autoencoder reconstructs its 4 inputs
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(5, 4, generator=g, dtype=torch.float64),) * 2]
        loss_fn = mse
    elif make is _conv_bn_train:
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(4, 1, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g,
                                                                                          dtype=torch.float64))]
    else:
        batches = [(x, y[:, :3] if y.shape[-1] != 3 else y) for x, y in regression_batches()]
    op = CurvatureOperator(model, batches, loss_fn, [len(b[0]) for b in batches], **kw)
    with pytest.raises(NotCovered, match=reason) as info:
        ggn_control_variate_trace(op, samples=2)
    assert str(info.value) == f"not applicable: {info.value.reason}"  # NotCovered's one wording
    assert op.hvp_count <= 1  # refused before any probe (the operator's own start-up check aside)


def test_gauss_newton_and_hesscale_share_one_output_hessian_and_its_size_cap(monkeypatch):
    """One per-sample output Hessian (curvature/output_hessian.py), one cap: both refuse alike."""
    from curvdiag.curvature import output_hessian
    from curvdiag.probes.hesscale import hesscale_diag

    *_, op = _case("mse")
    monkeypatch.setattr(output_hessian, "MAX_OUTPUT_HESSIAN_ENTRIES", 10)
    with pytest.raises(NotCovered, match="use smaller batches") as ggn_refusal:
        GaussNewton(op)
    with pytest.raises(NotCovered, match="use smaller batches") as hesscale_refusal:
        hesscale_diag(op)
    assert str(ggn_refusal.value) == str(hesscale_refusal.value)
