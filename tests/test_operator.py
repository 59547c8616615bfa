"""The curvature operator against dense Hessians by double backward, and its promises:
sample weighting, determinism, untouched buffers/grads/modes, fallbacks."""

import pytest
import torch

from curvdiag.errors import BadArgument, BadInput
from curvdiag.curvature.operator import CurvatureOperator
from conftest import dense_hessian, flat_loss
from models import (BatchNormNet, FusedKernelMLP, TiedAutoencoder, TinyAttention, mse, regression_batches,
                    sequence_batches, tanh_mlp)


def _vector(n, seed=3):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("method", ["kept-graph", "double-backward"])
def test_exact_hvp_equals_dense_hessian_times_vector(method):
    model, batches = tanh_mlp(), regression_batches()
    op = CurvatureOperator(model, batches, mse, [7, 3], hvp_method=method)
    H = dense_hessian(model, batches, mse, [7, 3])
    for seed in range(3):
        v = _vector(op.num_params, seed)
        torch.testing.assert_close(op.hvp(v), H @ v, rtol=1e-10, atol=1e-12)
    assert op.hvp_count == 3


def test_finite_difference_hvp_is_close_and_reports_its_step():
    model, batches = tanh_mlp(), regression_batches()
    op = CurvatureOperator(model, batches, mse, [7, 3], hvp_method="finite-difference", fd_step=1e-4)
    H = dense_hessian(model, batches, mse, [7, 3])
    v = _vector(op.num_params)
    assert torch.linalg.norm(op.hvp(v) - H @ v) <= 1e-6 * torch.linalg.norm(H @ v)
    assert op.finite_difference.step == 1e-4
    assert "h=0.0001" in op.describe_method()


def test_loss_and_gradient_are_sample_weighted_means_not_means_of_batch_means():
    model, batches = tanh_mlp(), regression_batches(sizes=(9, 1))
    op = CurvatureOperator(model, batches, mse, [9, 1])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    full = mse(model, (x, y))  # mse's mean over entries: same count per sample, so this is the sample mean
    assert op.loss() == pytest.approx(float(full.detach()), rel=1e-12)
    grads = torch.autograd.grad(full, list(model.parameters()))
    torch.testing.assert_close(op.gradient(), torch.cat([g.reshape(-1) for g in grads]))
    equal_weight = 0.5 * (mse(model, batches[0]) + mse(model, batches[1]))
    assert abs(op.loss() - float(equal_weight.detach())) > 1e-3  # the bug we must not have


def test_same_vector_gives_the_same_product_bit_for_bit():
    model, batches = tanh_mlp(torch.float32), regression_batches(torch.float32)
    op = CurvatureOperator(model, batches, mse, [7, 3])
    v = _vector(op.num_params).float()
    assert torch.equal(op.hvp(v), op.hvp(v))


def test_affine_layernorm_and_fused_attention_fall_back_to_the_exact_math_kernel():
    model, batches = TinyAttention().double(), sequence_batches()
    op = CurvatureOperator(model, batches, mse, [5])
    assert op.fallback == "math-attention"
    assert "not implemented" in op.fallback_reason
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        H = dense_hessian(model, batches, mse, [5])
    v = _vector(op.num_params)
    torch.testing.assert_close(op.hvp(v), H @ v, rtol=1e-9, atol=1e-12)


def test_math_attention_asked_up_front_gives_the_fallbacks_products_without_trying_the_fused_kernel(monkeypatch):
    """attention="math" (what a monitor or a throttle passes once the first operator fell back)
    builds straight on the math kernel: the same products, no failed try, no start-up check."""
    model, batches = TinyAttention().double(), sequence_batches()
    fallen = CurvatureOperator(model, batches, mse, [5])
    tries = []
    monkeypatch.setattr(CurvatureOperator, "_try_exact", lambda self, probe: tries.append(1))
    assert fallen.build_options() == {"hvp_method": "kept-graph", "attention": "math"}
    direct = CurvatureOperator(model, batches, mse, [5], **fallen.build_options())
    assert tries == [] and direct.fallback == "math-attention" and "math attention" in direct.describe_method()
    v = _vector(direct.num_params)
    torch.testing.assert_close(direct.hvp(v), fallen.hvp(v), rtol=0, atol=0)
    with pytest.raises(BadArgument, match="attention"):
        CurvatureOperator(model, batches, mse, [5], attention="flash")


def test_kernel_without_double_backward_falls_back_to_finite_differences():
    model, batches = FusedKernelMLP().double(), regression_batches()
    op = CurvatureOperator(model, batches, mse, [7, 3], fd_step=1e-4)
    assert op.hvp_method == "finite-difference" and op.fallback == "finite-difference"
    reference = tanh_mlp()  # same architecture and init seed, differentiable tanh
    reference.load_state_dict({"0.weight": model.a.weight, "0.bias": model.a.bias,
                               "2.weight": model.b.weight, "2.bias": model.b.bias})
    H = dense_hessian(reference, batches, mse, [7, 3])
    v = _vector(op.num_params)
    assert torch.linalg.norm(op.hvp(v) - H @ v) <= 1e-6 * torch.linalg.norm(H @ v)
    assert op.finite_difference.relative_error_estimate < 1e-5
    # The perturbed weights were restored exactly.
    assert torch.equal(model.a.weight, reference[0].weight)


@pytest.mark.parametrize("train_mode", [False, True])
def test_probing_leaves_buffers_grads_and_modes_as_they_were(train_mode):
    model = BatchNormNet().double()
    model.train()
    model.a.weight.grad = torch.full_like(model.a.weight, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = regression_batches()
    op = CurvatureOperator(model, batches, mse, [7, 3], train_mode=train_mode, hvp_method="double-backward")
    op.hvp(_vector(op.num_params))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and model.drop.training
    assert torch.equal(model.a.weight.grad, torch.full_like(model.a.weight, 7.0))
    assert model.b.weight.grad is None


def test_train_mode_uses_batch_statistics_and_dropout_stays_off():
    model = BatchNormNet().double()
    batches = regression_batches()
    eval_op = CurvatureOperator(model, batches, mse, [7, 3])
    train_op = CurvatureOperator(model, batches, mse, [7, 3], train_mode=True)
    assert eval_op.loss() != pytest.approx(train_op.loss())
    again = CurvatureOperator(model, batches, mse, [7, 3], train_mode=True)
    assert again.loss() == train_op.loss()  # dropout off: deterministic
    # Against a dense reference evaluated with batch statistics and no dropout.
    model.train()
    model.drop.eval()
    H = dense_hessian(model, batches, mse, [7, 3])
    v = _vector(train_op.num_params)
    torch.testing.assert_close(train_op.hvp(v), H @ v, rtol=1e-9, atol=1e-12)


def test_tied_weights_are_one_parameter():
    model = TiedAutoencoder().double()
    batches = [(torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64))]
    op = CurvatureOperator(model, batches, mse, [6])
    assert op.names == ["encoder.weight"] and op.num_params == 12
    H = dense_hessian(model, batches, mse, [6])
    v = _vector(12)
    torch.testing.assert_close(op.hvp(v), H @ v, rtol=1e-10, atol=1e-12)


def test_no_trainable_parameters_is_bad_input():
    model = tanh_mlp().requires_grad_(False)
    with pytest.raises(BadInput, match="no trainable parameters"):
        CurvatureOperator(model, regression_batches(), mse, [7, 3])


def test_non_finite_loss_is_bad_input():
    model = tanh_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(BadInput, match="not finite"):
        CurvatureOperator(model, regression_batches(), mse, [7, 3])


def test_flat_loss_reference_matches_operator_loss():
    model, batches = tanh_mlp(), regression_batches()
    op = CurvatureOperator(model, batches, mse, [7, 3])
    theta = op.parameters_vector()
    assert float(flat_loss(model, batches, mse, [7, 3])(theta)) == pytest.approx(op.loss(), rel=1e-12)


def test_kept_graph_products_stay_exact_after_gradients_at_other_parameters():
    model, batches = tanh_mlp(), regression_batches()
    op = CurvatureOperator(model, batches, mse, [7, 3])
    H = dense_hessian(model, batches, mse, [7, 3])
    v = _vector(op.num_params)
    op.gradient_at(op.parameters_vector() + 0.1 * v)  # writes the parameters in place, then restores them
    torch.testing.assert_close(op.hvp(v), H @ v, rtol=1e-10, atol=1e-12)
    assert op.hvp_method == "kept-graph"


def test_bad_arguments_are_named_as_the_python_api_spells_them():
    model, batches = tanh_mlp(), regression_batches()
    with pytest.raises(BadArgument, match=r"^hvp_method='newton': unknown$") as caught:
        CurvatureOperator(model, batches, mse, [7, 3], hvp_method="newton")
    assert "kept-graph" in caught.value.hint
    with pytest.raises(BadArgument, match=r"^batch_sizes=\[7\]: must have one entry per batch \(2\)$"):
        CurvatureOperator(model, batches, mse, [7])


def test_the_per_batch_interface_sums_to_the_operator_loss_and_gradient():
    """What the Gauss-Newton matrix and HesScale build on: Σ_b w_b over for_each_batch, through
    sum_over_ranks, is the operator's own loss and gradient; probing leaves no trace."""
    model, batches = tanh_mlp(), regression_batches()
    op = CurvatureOperator(model, batches, mse, [7, 3])
    loss, gradient = 0.0, torch.zeros(op.num_params, dtype=op.dtype)
    for weight, batch in op.for_each_batch():
        batch_loss = op.batch_loss(batch)
        loss += weight * float(batch_loss.detach())
        gradient.add_(op.flatten(op.parameter_gradients(batch_loss)), alpha=weight)
    assert loss == pytest.approx(op.loss(), rel=1e-12)
    torch.testing.assert_close(op.sum_over_ranks(gradient), op.gradient(), rtol=1e-12, atol=1e-14)
    assert op.keeps_graph and model.training and all(p.grad is None for p in model.parameters())
