"""A probe run has a stated, bounded cost in gradient-equivalents: the default budget covers the
requested probes, a smaller budget stops the stochastic estimates early and says so, the
spending is priced (not timed) so a rerun spends the same, and nothing overspends its share by
more than one sample."""

import math

import pytest
import torch

import curvdiag
from curvdiag.curvature.operator import HVP_PRICE, CurvatureOperator
from curvdiag.errors import BadArgument
from curvdiag.probes import budget
from curvdiag.probes.runner import parse_probe_names
from models import mse, regression_batches, tanh_mlp


def _probe(**kw):
    torch.manual_seed(0)
    model = tanh_mlp()
    return curvdiag.probe(model, mse, regression_batches(), **kw)


def test_default_probes_and_their_budget():
    assert parse_probe_names("default") == list(budget.DEFAULT_PROBES)
    assert budget.default_budget(budget.DEFAULT_PROBES) <= 150
    assert budget.default_budget(parse_probe_names("all")) <= 400
    report = _probe()
    assert list(report.probes)[:1] == ["lambda_max"]
    assert set(budget.DEFAULT_PROBES) <= set(report.probes)
    cost = report.budget
    assert cost.total == budget.default_budget(budget.DEFAULT_PROBES)
    assert 0 < cost.spent <= cost.total
    assert [c.name for c in cost.probes] == list(budget.DEFAULT_PROBES)
    assert math.isclose(sum(c.spent for c in cost.probes), cost.spent)
    assert cost.hvp_cost == HVP_PRICE["kept-graph"] and cost.gradient_seconds > 0


def test_a_small_budget_stops_the_trace_and_says_so():
    report = _probe(probes="hessian_trace", budget=15.0)
    trace = report.probes["hessian_trace"]
    cost = report.budget.probes[0]
    # The exact tr(G) first, then probes of an HVP and a J z product (2.5 GE): 15 GE hold a few,
    # far from the 1% target, and at least the 2 a standard error needs.
    assert cost.stop == "budget" and cost.missed_target
    assert cost.precision_target == 0.01
    assert cost.precision_reached == pytest.approx(trace.stderr / abs(trace.value))
    assert trace.samples >= 2
    # Overspend is at most one sample's price beyond the share.
    assert cost.spent <= cost.planned + HVP_PRICE["kept-graph"] + 1.0 + 1e-9


def test_the_spending_is_priced_not_timed():
    first, second = (_probe(probes="lambda_max,hessian_trace,hessian_diag", budget=40.0) for _ in range(2))
    assert [c.spent for c in first.budget.probes] == [c.spent for c in second.budget.probes]
    assert first.probes["hessian_trace"].value == second.probes["hessian_trace"].value
    assert first.probes["hessian_diag"].samples == second.probes["hessian_diag"].samples


def test_lambda_max_within_its_share_reports_unconverged():
    report = _probe(probes="lambda_max", budget=4.5, tol=1e-12)
    lam = report.probes["lambda_max"]
    assert lam.hvps == 3 and not lam.converged  # 4.5 GE hold 3 products at 1.5 GE
    assert report.budget.probes[0].stop == "budget"


def test_a_fixed_count_is_reported_as_fixed():
    report = _probe(probes="hessian_diag", samples=5)
    assert report.probes["hessian_diag"].samples == 5
    assert report.budget.probes[0].stop == "fixed"


def test_the_operator_prices_its_passes():
    torch.manual_seed(0)
    op = CurvatureOperator(tanh_mlp(), regression_batches(), mse, [7, 3])
    assert op.spent == 0.0 and op.budget_left() == math.inf
    op.hvp(torch.ones(op.num_params, dtype=op.dtype))
    op.gradient_at(op.parameters_vector())
    op.charge(0.25)
    assert op.spent == HVP_PRICE["kept-graph"] + 1.0 + 0.25
    op.spend_limit = op.spent + 1.0
    assert op.can_afford(1.0) and not op.can_afford(1.5)


def test_bad_budget_is_refused_naming_the_argument():
    with pytest.raises(BadArgument, match="budget"):
        _probe(budget=0)


def test_an_estimate_that_hits_its_sample_cap_says_limit_not_budget():
    # The tiny regression MLP's trace does not reach 1% within 1,000 probes; a budget of 10^5 GE
    # holds them all, so the cap, not the budget, ends it.
    report = _probe(probes="hessian_trace", budget=1e5)
    trace, cost = report.probes["hessian_trace"], report.budget.probes[0]
    assert trace.samples == 1000
    assert cost.stop == "limit" and cost.missed_target and cost.spent < cost.planned
