"""The terminal report at 80 columns (and wider): no line longer than the console, no number cut
("…"), one line per table row; per-layer shares of tr H only when the trace's s.e. allows them;
the cost table; the interruption and missed precision targets in the verdict. Reports are built
by hand (no probe runs), with GPT-2-like layer names."""

import io
import re

import pytest
from rich.console import Console

from curvdiag.report.terminal import SHARE_PRECISION, fill, render
from curvdiag.report.verdict import probe_verdict
from curvdiag.results import probe_results as r

LAYERS = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
          "transformer.h.0.mlp.c_fc.weight", "transformer.h.11.mlp.c_proj.weight", "transformer.ln_f.bias"]


def _report(trace=12.5, trace_stderr=0.4, budget=None, interrupted_by=None) -> r.ProbeReport:
    n = len(LAYERS)
    means = [0.0123 * (k + 1) * (-1) ** k for k in range(n)]
    diag = r.HessianDiag(samples=40, estimator="hutchinson", trace=trace, trace_stderr=trace_stderr, seconds=1.2,
                         layers=[r.DiagLayer(name, m, 0.00456 * (k + 1), m - 1.0, m + 1.0, trace * (k + 1) / 21)
                                 for k, (name, m) in enumerate(zip(LAYERS, means))])
    lam = r.LambdaMax(value=123.456, lambda_min=None, lambda_min_estimate=-7.5, eigenvalues=[123.456, 120.1],
                      residuals=[1e-4, 1e-3], next_ritz_values=[118.2], method="lanczos", tol=1e-3, hvps=48,
                      converged=True, seconds=3.4,
                      top_eigenvector_layers=[r.LayerShare(name, 1 / n) for name in LAYERS])
    eos = r.EdgeOfStability(optimizer="sgd", lr=0.01, momentum=None, beta1=None, curvature="lambda_max",
                            curvature_value=123.456, constant=2.0, threshold=200.0, stable_lr=2 / 123.456,
                            ratio=0.61728, status="stable")
    probes = {
        "lambda_max": lam, "eos": eos,
        "hessian_trace": r.HessianTrace(value=trace, stderr=trace_stderr, samples=40, estimator="hutchinson",
                                        seconds=2.0, hvps=40),
        "hessian_diag": diag,
        "hesscale_diag": r.HesScaleDiag(seconds=0.1, exact_parameters=[LAYERS[-1]],
                                        layers=[r.HesScaleLayer(name, -0.000123456 * (k + 1), -1.0, 1.0,
                                                                name == LAYERS[-1])
                                                for k, name in enumerate(LAYERS)]),
        "glass": r.Glass(lam=1e-3, samples=4, rho=2.5e-7, h=0.0345, constant=2.0, gradients=12, seconds=0.5,
                         layers=[r.GlassLayer(name, 1.2345e-7 * (k + 1), 1e-8, 0.0321, 0.001, 0.04)
                                 for k, name in enumerate(LAYERS)]),
        "power_law": r.PowerLaw(lam=1e-3, samples=4, p=1.41, p_stderr=0.05,
                                layers=[r.PowerLawLayer(name, 1.2 + 0.15 * k, 0.05) for k, name in enumerate(LAYERS)]),
        "directional_curvature": r.DirectionalCurvature(
            value=98.7654, rayleigh=-3.21, step_norm=0.123, gradient_change_norm=12.1, source="the last step",
            layers=[r.DirectionalLayer(name, 11.1111 * (k + 1), 1.0, 0.01) for k, name in enumerate(LAYERS)]),
        "preconditioned_lambda_max": r.Skipped("not an Adam-family optimizer"),
    }
    return r.ProbeReport(
        curvdiag_version="0", recipe="recipes/a_rather_long_recipe_name_for_a_gpt2_model.py",
        checkpoint="/data/checkpoints/gpt2_small_step_012000.pt", step=12000,
        model=r.ModelSummary(parameters=124_439_808, layers=LAYERS),
        operator=r.OperatorSummary(hvp_method="double-backward", fallback=None, fallback_reason=None,
                                   description="double backward (math attention)", finite_difference_step=None,
                                   finite_difference_error_estimate=None, mode="eval", batches=8, samples=64,
                                   world_size=None, sharding=None, device="cpu", dtype="float32", hvps=200),
        optimizer=r.OptimizerSummary(name="SGD", family="sgd", lr=0.01, momentum=None, betas=None,
                                     source="checkpoint", note=None),
        loss=3.2109, grad_norm=0.9876, probes=probes, budget=budget,
        interrupted=interrupted_by is not None, interrupted_by=interrupted_by)


def _budget() -> r.BudgetSummary:
    return r.BudgetSummary(total=150.0, spent=131.25, seconds=42.5, gradient_seconds=0.31, hvp_cost=1.5, probes=[
        r.ProbeCost("lambda_max", 60.0, 72.0, 20.1, "converged"),
        r.ProbeCost("hessian_trace", 40.0, 40.5, 12.0, "budget", "relative s.e. of tr H", 0.01, 0.0213),
        r.ProbeCost("hessian_diag", 30.0, 12.75, 8.4, "precision", "relative s.e. of tr H", 0.05, 0.032),
        r.ProbeCost("glass", 20.0, 6.0, 2.0, "fixed")])


def _text(report: r.ProbeReport, width: int) -> str:
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    render(report, console)
    return console.export_text()


def _assert_reads_at(text: str, width: int) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, max(lines, key=len)
    assert "…" not in text, [line for line in lines if "…" in line]


def _rows(text: str, name: str):
    return [line for line in text.splitlines() if re.match(rf"\s*{re.escape(name)}\s", line)]


@pytest.mark.parametrize("width", [80, 100, 160])
def test_the_report_reads_at_the_console_width_without_cutting_a_number(width):
    report = _report(budget=_budget())
    text = _text(report, width)
    _assert_reads_at(text, width)
    tables = len(re.findall(r"^per layer", text, flags=re.M))
    assert tables >= 1
    diag = report.probes["hessian_diag"]
    for k, layer in enumerate(diag.layers):
        rows = _rows(text, layer.name)
        assert len(rows) == tables, (layer.name, rows)  # one line per row of each table: nothing wrapped
        row = " ".join(rows)
        # Every number of the row, whole.
        assert f"{layer.mean:.3g} ± {layer.stderr:.2g}" in row
        assert f"{report.probes['glass'].layers[k].rho:.3g}" in row
        assert f"{report.probes['directional_curvature'].layers[k].value:.3g}" in row
        assert f"{report.probes['power_law'].layers[k].p:.2f}" in row
        assert f"{100 * layer.sum / diag.trace:.0f}%" in row
    assert "(exact)" in _rows(text, LAYERS[-1])[0] + " ".join(_rows(text, LAYERS[-1]))


def test_narrow_consoles_get_a_second_table_wide_ones_one():
    narrow, wide = _text(_report(), 80), _text(_report(), 200)
    parts = re.findall(r"^per layer \((\d) of (\d)\)", narrow, flags=re.M)
    assert len(parts) >= 2 and parts == [(str(k + 1), str(len(parts))) for k in range(len(parts))]
    assert re.search(r"^per layer\s*$", wide, flags=re.M) and "(1 of" not in wide
    # The context and the evidence break between their parts, not inside a number.
    assert "124,439,808 parameters" in narrow and "stable lr ≤ 0.0162" in narrow


def test_fill_breaks_between_parts():
    assert fill(["aaaa", "bbbb", "cccc"], 11, "  ") == ["aaaa · bbbb", "  cccc"]
    assert fill(["a" * 20], 5) == ["a" * 20]  # longer than a line: left whole for the console to wrap
    assert fill([], 80) == []


@pytest.mark.parametrize("relative, shown", [(0.099, True), (SHARE_PRECISION / 2, True), (0.11, False), (1.2, False)])
def test_shares_of_the_trace_only_when_its_standard_error_allows(relative, shown):
    trace = 0.5
    text = _text(_report(trace=trace, trace_stderr=relative * trace), 200)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("per layer"))
    rule = next(i for i in range(start, len(lines)) if lines[i].startswith("───"))
    assert ("share of tr H" in " ".join(lines[start + 1:rule])) == shown
    caution = "share of tr H per layer not shown"
    if shown:
        assert caution not in text
    else:
        assert caution in text and f"s.e. {100 * relative:.0f}% of |tr H|" in text and "more --samples" in text
        assert "%" not in "".join(_rows(text, LAYERS[0])).split("±")[1].split()[1]  # no share cell in the row


def test_a_gpt2_like_trace_whose_error_exceeds_it_prints_no_negative_shares():
    text = _text(_report(trace=-0.3, trace_stderr=0.9), 80)
    assert "share of tr H per layer not shown" in text
    assert not re.search(r"\s-\d+%", text)


def _cost_row(text, name):
    (row,) = [line for line in _rows(text, name) if "→" in line]
    return row.rstrip()


def test_the_cost_table():
    report = _report(budget=_budget())
    wide = _text(report, 160)
    assert "cost in GE (gradient-equivalents: 1 GE = a forward + backward over the data = 0.31 s here; " \
           "1 HVP = 1.5 GE)" in " ".join(wide.split())
    trace_row = _cost_row(wide, "hessian_trace")
    assert re.search(r"40 → 40.5\s+12\s+budget\s+relative s.e. of tr H 0.021 > 0.01$", trace_row), trace_row
    assert re.search(r"30 → 12.8\s+8.4\s+precision\s+relative s.e. of tr H 0.032 ≤ 0.05$",
                     _cost_row(wide, "hessian_diag"))
    assert re.search(r"60 → 72\s+20\s+converged$", _cost_row(wide, "lambda_max"))
    assert re.search(r"150 → 131\s+42$", _cost_row(wide, "total"))


def test_the_cost_table_at_80_columns_names_the_precision_under_it():
    budget = _budget()
    budget.probes.append(r.ProbeCost("preconditioned_lambda_max", 100.0, 131.25, 112.0, "interrupted",
                                     "relative s.e. of λ", 0.0123, 0.0234))
    narrow = _text(_report(budget=budget), 80)
    _assert_reads_at(narrow, 80)
    assert _cost_row(narrow, "hessian_trace").endswith("0.021 > 0.01")
    assert re.search(r"100 → 131\s+112\s+interrupted\s+0.023 > 0.012$", _cost_row(narrow, "preconditioned_lambda_max"))
    assert "hessian_trace: precision = relative s.e. of tr H" in narrow
    assert "preconditioned_lambda_max: precision = relative s.e. of λ" in narrow


def test_no_cost_table_without_a_budget():
    assert "cost in GE" not in _text(_report(), 120)


def test_the_verdict_flags_an_estimate_that_stopped_above_its_target():
    report = _report(budget=_budget())
    verdict = probe_verdict(report)
    assert [c.name for c in verdict.missed] == ["hessian_trace"]
    (caution,) = verdict.cautions
    assert caution.startswith("hessian_trace stopped at relative s.e. of tr H 0.021, above its target 0.01")
    assert "its share of the budget was spent first" in caution
    text = " ".join(_text(report, 80).split())
    assert "precision: hessian_trace stopped at relative s.e. of tr H 0.021" in text
    assert probe_verdict(_report()).cautions == []


@pytest.mark.parametrize("by, words", [("timeout", "the --timeout"), ("keyboard", "Ctrl-C")])
def test_an_interrupted_report_says_so_first(by, words):
    report = _report(interrupted_by=by)
    verdict = probe_verdict(report)
    assert verdict.interrupted and verdict.cautions[0].startswith(f"Interrupted by {words}:")
    text = _text(report, 80)
    _assert_reads_at(text, 80)
    lines = [line for line in text.splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if line.startswith("INTERRUPTED"))
    assert first < next(i for i, line in enumerate(lines) if line.startswith("STABLE"))
    assert f"Interrupted by {words}: this report holds only the probes that finished" in " ".join(text.split())
