"""HesScale against dense Hessians (float64) and each layer rule against explicit Jacobians.

What is asserted and why:
- The output layer is exact by construction (full per-sample output Hessian), and so is every
  layer above which nothing off-diagonal was dropped: with one elementwise activation between
  the last two Linear layers both are exact. Whatever ``exact_parameters`` claims is checked
  against the dense diagonal to 1e-10 relative in every end-to-end test here.
- Deeper layers are an approximation with no worst-case bound; on the seeded 3-layer tanh MLP the
  first layer's relative error is 0.12 (weights) / 0.19 (bias), against 1.06 / 1.42 for
  Hutchinson with 10 probes on the same operator. We assert < 0.3 and < half of Hutchinson-10's,
  plus a correlation above 0.98, so a broken recursion (wrong σ'' term, dropped σ'², wrong W∘W)
  fails while the stated approximation passes.
- Each rule is exactly the diagonal rule it claims: h_x = (J∘J)ᵀ h_y for a diagonal state and
  Jᵀ A J (kept low rank) or diag(Jᵀ A J) for a full one, checked with explicit Jacobians.
"""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from curvdiag.errors import NotCovered
from curvdiag.probes.hesscale import hesscale_diag
from curvdiag.probes.hesscale_rules import RULES, ACTIVATIONS, Diag, eigen_factors, Full, _Linear, LowRank, Record
from curvdiag.probes.hutchinson import hutchinson_diag
from curvdiag.curvature.operator import CurvatureOperator
from conftest import dense_hessian
from models import FusedKernelMLP, TinyAttention, sequence_batches

D64 = torch.float64


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _class_batches(sizes, shape, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n,) + shape, generator=g, dtype=D64), torch.randint(0, classes, (n,), generator=g))
            for n in sizes]


def _run(model, batches, loss, sizes, **kw):
    """(op, HesScale result, dense diagonal); the model is in eval mode for both."""
    model.eval()
    op = CurvatureOperator(model, batches, loss, sizes, **kw)
    result = hesscale_diag(op)
    dense = torch.diagonal(dense_hessian(model, batches, loss, sizes))
    assert result.diagonal.shape == (op.num_params,) and result.diagonal.dtype == op.dtype
    for name, start, stop in op.layer_slices():  # every exactness claim holds
        if name in result.exact_parameters:
            torch.testing.assert_close(result.diagonal[start:stop], dense[start:stop], rtol=1e-10, atol=1e-13,
                                       msg=f"{name} claimed exact")
    return op, result, dense


def _segment(op, name):
    for n, start, stop in op.layer_slices():
        if n == name:
            return slice(start, stop)
    raise KeyError(name)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------- (1) one layer
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_single_linear_layer_is_exact_for_cross_entropy_and_mse(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(D64)
    if loss == "ce":
        batches, fn = _class_batches([9], (4,), 3), ce
    else:
        g = torch.Generator().manual_seed(3)
        batches, fn = [(torch.randn(9, 4, generator=g, dtype=D64), torch.randn(9, 3, generator=g, dtype=D64))], mse
    op, result, dense = _run(model, batches, fn, [9])
    torch.testing.assert_close(result.diagonal, dense, rtol=1e-12, atol=1e-14)
    assert result.exact_parameters == op.names and result.seconds > 0


# ---------------------------------------------------------------------------- (2) deeper MLP
def test_tanh_mlp_last_two_layers_exact_first_layer_close_and_better_than_hutchinson():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).to(D64)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 5, generator=g, dtype=D64), torch.randint(0, 3, (16,), generator=g))]
    op, result, dense = _run(model, batches, ce, [16])
    assert result.exact_parameters == ["2.weight", "2.bias", "4.weight", "4.bias"]
    hutch = hutchinson_diag(op, samples=10, seed=0).diagonal
    for name in ("0.weight", "0.bias"):
        s = _segment(op, name)
        err = _rel(result.diagonal[s], dense[s])
        assert err < 0.3
        assert err < 0.5 * _rel(hutch[s], dense[s])
    s = _segment(op, "0.weight")
    assert float(torch.corrcoef(torch.stack([result.diagonal[s], dense[s]]))[0, 1]) > 0.98


# ---------------------------------------------------------------------------- (3) CNN
def test_small_cnn_last_layer_exact_conv_finite_with_the_dense_sign_pattern():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(18, 3)).to(D64)
    batches = _class_batches([6], (1, 6, 6), 3)
    op, result, dense = _run(model, batches, ce, [6])
    assert {"4.weight", "4.bias"} <= set(result.exact_parameters)
    assert "0.weight" not in result.exact_parameters  # conv weights are shared across positions
    for name in ("0.weight", "0.bias"):
        s = _segment(op, name)
        est, ref = result.diagonal[s], dense[s]
        assert torch.isfinite(est).all()
        large = ref.abs() > 0.1 * ref.abs().max()
        assert large.any() and torch.equal(torch.sign(est[large]), torch.sign(ref[large]))


def test_conv_exact_when_only_exact_maps_follow_it():
    """Conv2d (stride, groups, 'valid') → Tanh → AdaptiveAvgPool2d → Flatten: the conv is the last
    parametrized layer and the full output Hessian reaches it exactly."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, groups=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten()).to(D64)
    op, result, dense = _run(model, _class_batches([5], (2, 7, 7), 4), ce, [5])
    assert result.exact_parameters == op.names


def test_eval_batchnorm_and_dropout_mlp_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 3)).to(D64)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
        model[1].bias.normal_()
    op, result, dense = _run(model, _class_batches([8], (4,), 3), ce, [8])
    assert result.exact_parameters == op.names


def test_linear_on_positions_kept_exact_at_the_output():
    """Linear layers acting on (N, T, features): the last one is exact (its W is shared over the
    T positions, so this needs the full output Hessian), the first approximated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.SiLU(), nn.Linear(3, 2), nn.Flatten()).to(D64)
    op, result, dense = _run(model, _class_batches([6], (3, 4), 6), ce, [6])
    assert result.exact_parameters == ["2.weight", "2.bias"]
    s = _segment(op, "0.weight")
    assert _rel(result.diagonal[s], dense[s]) < 0.5


# ---------------------------------------------------------------------------- (4) batch weights
def test_unequal_batch_sizes_are_sample_weighted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D64)
    batches = _class_batches([7, 3], (4,), 3, seed=5)
    op, result, dense = _run(model, batches, ce, [7, 3])
    torch.testing.assert_close(result.diagonal, dense, rtol=1e-10, atol=1e-13)
    equal = torch.diagonal(dense_hessian(model, batches, ce, [1, 1]))
    assert _rel(equal, dense) > 0.01  # the weighting matters here


# ---------------------------------------------------------------------------- (5) not applicable
def _not_applicable(model, batches, loss, **kw):
    op = CurvatureOperator(model, batches, loss, [b[0].shape[0] for b in batches], **kw)
    with pytest.raises(NotCovered) as info:
        hesscale_diag(op)
    assert str(info.value).startswith("not applicable: ")
    return str(info.value)


def test_layernorm_in_a_sequential_is_named():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(D64)
    assert _not_applicable(model, _class_batches([4], (4,), 3), ce) == "not applicable: LayerNorm"


def test_non_sequential_models_are_named():
    assert "TinyAttention" in _not_applicable(TinyAttention().to(D64), sequence_batches(), mse)
    message = _not_applicable(FusedKernelMLP().to(D64), _class_batches([4], (4,), 3), ce)
    assert message.startswith("not applicable: FusedKernelMLP")


def test_uncovered_configurations_and_losses_say_why():
    torch.manual_seed(0)
    batches = _class_batches([4], (4,), 3)
    lin = nn.Linear(4, 4).to(D64)
    assert "tied" in _not_applicable(nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(4, 3).to(D64)), batches, ce)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D64)

    def regularized(model, batch):
        return ce(model, batch) + 1e-3 * sum(p.pow(2).sum() for p in model.parameters())

    def coupled(model, batch):
        x, y = batch
        return model(x).mean(0).pow(2).sum()

    def twice(model, batch):
        x, y = batch
        return ce(model, (x[:2], y[:2])) + ce(model, (x[2:], y[2:]))

    assert "other than through the model output" in _not_applicable(mlp, batches, regularized)
    assert "couples samples" in _not_applicable(mlp, batches, coupled)
    assert "2 times" in _not_applicable(mlp, batches, twice)
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(D64)
    assert "BatchNorm1d in train mode" in _not_applicable(bn, batches, ce, train_mode=True)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                         nn.Linear(32, 3)).to(D64)
    assert "reflect" in _not_applicable(conv, _class_batches([2], (1, 4, 4), 3), ce)


# ---------------------------------------------------------------------------- (6) untouched model
def test_model_buffers_grads_modes_and_inplace_flags_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(inplace=True), nn.Dropout(0.5),
                          nn.Sequential(nn.Linear(5, 5), nn.ELU(inplace=True)), nn.Linear(5, 3)).to(D64)
    model.train()
    model[4].eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    op = CurvatureOperator(model, _class_batches([6], (4,), 3), ce, [6])
    result = hesscale_diag(op)
    assert torch.isfinite(result.diagonal).all()
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert model[2].inplace and model[4][1].inplace


# ---------------------------------------------------------------------------- rules
@pytest.mark.parametrize("module", [nn.Tanh(), nn.Sigmoid(), nn.LogSigmoid(), nn.ReLU(), nn.LeakyReLU(0.2),
                                    nn.ReLU6(), nn.Hardtanh(-0.7, 1.3), nn.ELU(0.7), nn.SELU(), nn.CELU(0.6),
                                    nn.Softplus(2.0, 3.0), nn.SiLU(), nn.GELU(), nn.GELU("tanh"),
                                    nn.Softsign()], ids=lambda m: repr(m))
def test_activation_derivatives_match_autograd(module):
    assert type(module) in ACTIVATIONS
    z = torch.cat([torch.linspace(-7.05, 7.05, 57, dtype=D64), torch.tensor([-0.3, 0.2, 1.45, 1.55], dtype=D64)])
    zz = z.clone().requires_grad_()
    (d1,) = torch.autograd.grad(module(zz).sum(), zz, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), zz, allow_unused=True)[0] if d1.requires_grad else None
    ours1, ours2 = RULES[type(module)].derivatives(module, z, module(z))
    # PyTorch's CELU backward rounds 1/alpha to single precision (relative 4e-7); ours is exact.
    rtol = 1e-6 if isinstance(module, nn.CELU) else 1e-10
    torch.testing.assert_close(ours1, d1.detach(), rtol=rtol, atol=1e-12)
    ref2 = torch.zeros_like(z) if d2 is None else d2
    torch.testing.assert_close(torch.zeros_like(z) if ours2 is None else ours2, ref2, rtol=rtol, atol=1e-12)


def _record(module, x, graph=False):
    """What the hooks would record; with ``graph`` the output keeps its autograd node, which
    pooling rules use for a single vector per sample (otherwise their own transpose runs)."""
    rec = Record()
    rec.calls, rec.x, rec.training = 1, x, False
    if graph:
        rec.x_graph = x.clone().requires_grad_()
        rec.y = module(rec.x_graph)
    else:
        with torch.no_grad():
            rec.y = module(x)
    return rec


def _jacobians(module, x):
    """Per sample: J (out_numel, in_numel)."""
    out = []
    for n in range(x.shape[0]):
        j = torch.autograd.functional.jacobian(lambda t: module(t.unsqueeze(0)).squeeze(0), x[n])
        out.append(j.reshape(module(x[n:n + 1]).numel(), x[n].numel()))
    return out


def _random_symmetric(n, dim, gen):
    a = torch.randn(n, dim, dim, generator=gen, dtype=D64)
    return a + a.transpose(1, 2)


@pytest.mark.parametrize("module, shape", [
    (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (2, 3, 5, 6)),
    (nn.MaxPool2d(2, dilation=2), (2, 2, 6, 5)),
    (nn.AdaptiveMaxPool2d((2, 3)), (2, 2, 5, 7)),
    (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), (2, 2, 6, 5)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True), (2, 2, 5, 5)),
    (nn.AvgPool2d(2, divisor_override=3), (2, 1, 4, 6)),
    (nn.AdaptiveAvgPool2d((3, 2)), (2, 2, 5, 7)),
    (nn.Flatten(), (2, 2, 3, 2)),
    (nn.Dropout(0.4).eval(), (2, 5)),
    (nn.BatchNorm2d(3).eval(), (2, 3, 2, 3)),
], ids=lambda v: repr(v))
def test_parameter_free_and_diagonal_maps_against_jacobians(module, shape):
    module = module.to(D64)
    gen = torch.Generator().manual_seed(0)
    if isinstance(module, nn.BatchNorm2d):
        with torch.no_grad():
            module.running_var.uniform_(0.5, 2, generator=gen)
            module.running_mean.uniform_(-1, 1, generator=gen)
            module.weight.uniform_(-2, 2, generator=gen)
    x = torch.randn(shape, generator=gen, dtype=D64)
    rule, rec = RULES[type(module)], _record(module, x)
    jac = _jacobians(module, x)
    out_shape = rec.y.shape[1:]
    n, dim = shape[0], rec.y[0].numel()
    # Diagonal state: h_x = (J∘J)ᵀ h_y, by the rule's own transpose and through the graph.
    h = torch.rand((n,) + tuple(out_shape), generator=gen, dtype=D64)
    want = torch.stack([(j * j).T @ h[i].reshape(-1) for i, j in enumerate(jac)])
    for record in (rec, _record(module, x, graph=True)):
        got = rule.backpropagate(module, record, Diag(h, True))
        torch.testing.assert_close(got.h.reshape(n, -1), want, rtol=1e-12, atol=1e-14)
    # Full state Σ s v vᵀ + diag(d): the low-rank part is carried exactly (Jᵀ A J), d by (J∘J)ᵀ d.
    a = _random_symmetric(n, dim, gen)
    state = eigen_factors(a, out_shape)
    state.d = h
    got = rule.backpropagate(module, rec, state)
    assert isinstance(got, LowRank)
    v = got.v.reshape(n, got.v.shape[1], -1)
    full = torch.einsum("nr,nri,nrj->nij", got.sign, v, v)
    torch.testing.assert_close(full, torch.stack([j.T @ a[i] @ j for i, j in enumerate(jac)]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.d.reshape(n, -1), want, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("module, shape", [
    (nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), (2, 2, 6, 5)),
    (nn.Conv2d(1, 2, 4, padding="same", dilation=1), (2, 1, 5, 6)),
    (nn.Conv2d(3, 2, 3, stride=2, bias=False), (2, 3, 6, 7)),
    (nn.Linear(4, 3), (2, 4)),
    (nn.Linear(4, 3), (2, 2, 4)),
], ids=lambda v: repr(v))
def test_layers_with_parameters_pass_diagonals_like_their_jacobians(module, shape, monkeypatch):
    module = module.to(D64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=D64)
    rule, rec = RULES[type(module)], _record(module, x)
    jac = _jacobians(module, x)
    n, dim = shape[0], rec.y[0].numel()
    h = torch.rand((n,) + tuple(rec.y.shape[1:]), generator=gen, dtype=D64)
    got = rule.backpropagate(module, rec, Diag(h, True))
    want = torch.stack([(j * j).T @ h[i].reshape(-1) for i, j in enumerate(jac)])
    torch.testing.assert_close(got.h.reshape(n, -1), want, rtol=1e-12, atol=1e-14)
    # From a full state, the input gets the exact diagonal of Jᵀ A J.
    a = _random_symmetric(n, dim, gen)
    want = torch.stack([torch.diagonal(j.T @ a[i] @ j) for i, j in enumerate(jac)])
    for state in (Full(a, rec.y.shape[1:]), eigen_factors(a, rec.y.shape[1:])):
        if isinstance(state, Full) and not rule.handles_full:
            state = state.low_rank()  # as the driver does
        got = rule.backpropagate(module, rec, state)
        torch.testing.assert_close(got.h.reshape(n, -1), want, rtol=1e-10, atol=1e-12)
    if isinstance(module, nn.Linear):  # the large-layer branch of the dense form
        monkeypatch.setattr(_Linear, "MAX_PAIR_ENTRIES", 0)
        got = rule.backpropagate(module, rec, Full(a, rec.y.shape[1:]))
        torch.testing.assert_close(got.h.reshape(n, -1), want, rtol=1e-10, atol=1e-12)


def test_float32_runs_without_tripping_the_checks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 5))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 4, generator=g), torch.randint(0, 5, (64,), generator=g))]
    op = CurvatureOperator(model, batches, ce, [64])
    result = hesscale_diag(op)
    dense = torch.diagonal(dense_hessian(model.double(), [(batches[0][0].double(), batches[0][1])], ce, [64]))
    s = _segment(op, "2.weight")
    torch.testing.assert_close(result.diagonal[s].double(), dense[s], rtol=1e-4, atol=1e-6)


def _param_jacobians(module, x, name):
    """Per sample: the Jacobian of the layer output w.r.t. one parameter, (out_numel, param_numel)."""
    from torch.func import functional_call, jacrev

    p = getattr(module, name).detach()
    out = []
    for n in range(x.shape[0]):
        j = jacrev(lambda q: functional_call(module, {name: q}, (x[n:n + 1],)))(p)
        out.append(j.reshape(-1, p.numel()))
    return out


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("module, shape", [
    (nn.Linear(4, 3), (3, 4)),
    (nn.Linear(4, 3), (3, 2, 4)),
    (nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), (2, 2, 6, 5)),
    (nn.Conv2d(1, 2, 4, padding="same"), (2, 1, 5, 6)),
    (nn.BatchNorm2d(3).eval(), (2, 3, 2, 3)),
    (nn.BatchNorm1d(3).eval(), (3, 3)),
], ids=lambda v: repr(v))
def test_parameter_diagonals_against_parameter_jacobians(module, shape):
    """Diagonal state h: Σ_n (J_θ∘J_θ)ᵀ h_n; full state A_n + diag(d_n): Σ_n diag(J_θᵀ (A_n + diag d_n) J_θ)."""
    module = module.to(D64)
    gen = torch.Generator().manual_seed(2)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        with torch.no_grad():
            module.running_var.uniform_(0.5, 2, generator=gen)
            module.running_mean.uniform_(-1, 1, generator=gen)
            module.weight.uniform_(-2, 2, generator=gen)
    x = torch.randn(shape, generator=gen, dtype=D64)
    rule, rec = RULES[type(module)], _record(module, x)
    n, out_shape = shape[0], rec.y.shape[1:]
    dim = rec.y[0].numel()
    h = torch.rand((n,) + tuple(out_shape), generator=gen, dtype=D64)
    a = _random_symmetric(n, dim, gen)
    low_rank = eigen_factors(a, out_shape)
    low_rank.d = h
    a_plus_d = a + torch.diag_embed(h.reshape(n, -1))
    states = [(Diag(h, True), None), (low_rank, a_plus_d), (Full(a_plus_d, out_shape), a_plus_d)]
    for state, full in states:
        if isinstance(state, Full) and not rule.handles_full:
            state = state.low_rank()
        got, _ = rule.param_diagonals(module, rec, state)
        for name, _ in rule.params(module):
            jac = _param_jacobians(module, x, name)
            if full is None:
                want = sum((j * j).T @ h[i].reshape(-1) for i, j in enumerate(jac))
            else:
                want = sum(torch.diagonal(j.T @ full[i] @ j) for i, j in enumerate(jac))
            torch.testing.assert_close(got[name].reshape(-1), want, rtol=1e-10, atol=1e-12,
                                       msg=f"{name} from {type(state).__name__}")


def test_parameter_free_tail_without_a_rule_counts_as_part_of_the_loss():
    """LogSoftmax + NLL, Softmax + a custom per-sample loss: the Hessian starts at the last Linear's
    output with those layers folded in, so the last two layers stay exact; before the last
    layer with parameters the same modules are not covered."""
    torch.manual_seed(0)
    batches = _class_batches([7], (4,), 3)

    def nll(model, batch):
        x, y = batch
        return F.nll_loss(model(x), y)

    def brier(model, batch):
        x, y = batch
        return (model(x) - F.one_hot(y, 3)).pow(2).sum(1).mean()

    for tail, loss in ((nn.LogSoftmax(dim=1), nll), (nn.Softmax(dim=1), brier)):
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), tail).to(D64)
        op, result, dense = _run(model, batches, loss, [7])
        assert result.exact_parameters == op.names
    inner = nn.Sequential(nn.Linear(4, 5), nn.Softmax(dim=1), nn.Linear(5, 3)).to(D64)
    assert _not_applicable(inner, batches, ce) == "not applicable: Softmax"
