"""The stability constants of DESIGN §3.7 and the edge-of-stability classification."""

import pytest
import torch

from curvdiag.stability import OPTIMIZER_FAMILIES, classify, family_of_group, stability_constant, stability_margin


def test_constants():
    assert stability_constant("sgd") == 2.0
    assert stability_constant("momentum", momentum=0.9) == pytest.approx(3.8)
    assert stability_constant("nesterov", momentum=0.9) == pytest.approx(3.8 / 2.8)
    assert stability_constant("adam", beta1=0.9) == pytest.approx(38.0)
    assert stability_constant("adamw", beta1=0.0) == pytest.approx(2.0)


def test_gd_on_a_quadratic_is_stable_exactly_below_the_threshold():
    # x_{t+1} = (1 − ηλ) x_t: stable iff |1 − ηλ| < 1 iff ηλ < 2.
    lam = 4.0
    for lr, stable in ((0.49, True), (0.51, False)):
        x = 1.0
        for _ in range(2000):
            x -= lr * lam * x
        assert (abs(x) < 1.0) == stable
        assert (stability_margin("sgd", lr, lam).ratio < 1.0) == stable


def test_heavy_ball_threshold_on_a_quadratic():
    lam, beta = 1.0, 0.9
    for lr, stable in ((3.7, True), (3.9, False)):
        x, velocity = 1.0, 0.0
        for _ in range(5000):
            velocity = beta * velocity + lam * x
            x -= lr * velocity
        assert (abs(x) < 1.0) == stable, lr


def test_margin_fields_and_classification():
    m = stability_margin("adam", lr=1e-3, curvature=40_000.0, beta1=0.9)
    assert m.threshold == pytest.approx(38_000.0)
    assert m.stable_lr == pytest.approx(38.0 / 40_000.0)
    assert m.ratio == pytest.approx(40_000.0 / 38_000.0)
    assert m.status == "edge"
    assert classify(0.89) == "stable" and classify(0.9) == "edge" and classify(1.1) == "edge"
    assert classify(1.11) == "unstable"


def test_non_positive_curvature_has_no_learning_rate_limit():
    assert stability_margin("sgd", 0.1, -1.0).stable_lr == float("inf")


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer family"):
        stability_constant("rmsprop")


@pytest.mark.parametrize("make, family", [
    (lambda p: torch.optim.SGD(p, lr=0.1), "sgd"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
    (lambda p: torch.optim.Adam(p, lr=0.1), "adam"),
    (lambda p: torch.optim.AdamW(p, lr=0.1), "adamw"),
])
def test_the_family_table_recognises_torch_optimizers_and_names_their_class(make, family):
    optimizer = make([torch.nn.Parameter(torch.zeros(2))])
    row = family_of_group(optimizer.param_groups[0])
    assert row is OPTIMIZER_FAMILIES[family]
    assert isinstance(optimizer, getattr(torch.optim, row.torch_class))
    assert row.preconditioned == (family in ("adam", "adamw"))


def test_no_family_for_an_optimizer_outside_the_table():
    assert family_of_group(torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]) is None
