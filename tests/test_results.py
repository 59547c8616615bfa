"""Typed results: the JSON round trip, the committed JSON Schema, the run-directory reader and
writer, the probe registry and the one verdict."""

import json
import math

import jsonschema
import pytest

from curvdiag.errors import BadInput
from curvdiag.probes.registry import COMPANIONS, PROBE_NAMES, REGISTRY
from curvdiag.report.verdict import SAFETY, probe_verdict
from curvdiag.results import probe_results as entries
from curvdiag.results.json_safe import finite_or_none
from curvdiag.results.probe_results import ENTRY_TYPES, ProbeReport, Skipped, smoothed_density
from curvdiag.results.run_dir import RunSummary, read_run, write_run_summary
from curvdiag.results.schema import SCHEMA_PATH, report_schema, schema_text
import test_plots

plot_inputs = test_plots.plot_inputs  # the fixture, bound by assignment so that its parameters redefine nothing


def test_committed_schema_is_the_generated_one():
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), "run: python -m curvdiag.results.schema"
    jsonschema.Draft202012Validator.check_schema(report_schema())


def test_a_real_report_reads_back_key_for_key_and_validates(plot_inputs):
    document = json.loads(plot_inputs["report_all"].read_text())
    report = ProbeReport.from_json(document)
    assert isinstance(report.probes["preconditioned_lambda_max"], Skipped)
    assert isinstance(report.probes["glass"], entries.Glass) and report.probes["glass"].lam == document["probes"]["glass"]["lambda"]
    written = finite_or_none(report.to_json())
    assert written["schema_version"] == document["schema_version"] == 1
    assert written == document and list(written) == list(document)
    assert list(written["probes"]["lambda_max"]) == list(document["probes"]["lambda_max"])


def test_the_schema_rejects_what_curvdiag_does_not_write(plot_inputs):
    document = json.loads(plot_inputs["report_all"].read_text())
    document["schema_version"] = 1
    validator = jsonschema.Draft202012Validator(report_schema())
    validator.validate(document)
    bad = json.loads(json.dumps(document))
    del bad["probes"]["eos"]["ratio"]
    assert not validator.is_valid(bad)
    bad = json.loads(json.dumps(document))
    bad["probes"]["no_such_probe"] = {"value": 1.0}
    assert not validator.is_valid(bad)


def test_not_a_report_is_bad_input():
    with pytest.raises(BadInput, match="not a curvdiag probe report"):
        ProbeReport.from_json({"loss": 1.0})
    with pytest.raises(BadInput, match=r"report: no 'recipe'"):
        ProbeReport.from_json({"probes": {}, "curvdiag_version": "0"})
    with pytest.raises(BadInput, match=r"probes.eos: no 'lr'"):
        entries.decode_entry("eos", {"optimizer": "sgd"})
    with pytest.raises(BadInput, match=r"probes.glass.samples: expected integer"):
        entries.decode_entry("glass", {"lambda": 1e-3, "samples": "ten"})
    with pytest.raises(BadInput, match="not an entry curvdiag writes"):
        entries.decode_entry("nonsense", {})


def test_spectral_density_without_its_curve_gets_it_when_read():
    nodes, weights = [[-1.0, 2.0]], [[0.25, 0.75]]
    grid, density, sigma = smoothed_density(nodes, weights)
    assert sigma == pytest.approx(0.03)
    area = sum((grid[i + 1] - grid[i]) * (density[i + 1] + density[i]) / 2 for i in range(len(grid) - 1))
    assert area == pytest.approx(1.0, abs=1e-6)
    entry = entries.SpectralDensity(method="slq", size=2, steps=2, probes=1, seed=0, hvps=2, seconds=0.0, nodes=nodes,
                                    weights=weights, lambda_min=-1.0, lambda_max=2.0, trace_estimate=2.5)
    assert entry.grid == grid and entry.density == density
    with pytest.raises(ValueError, match="no quadrature nodes"):
        smoothed_density([], [])


def test_run_summary_written_and_read_back(tmp_path):
    summary = RunSummary(controller="throttle", steps_completed=3, diverged=False, final_loss=0.5,
                         best_loss=float("nan"), settings={"steps": 3}, curvdiag_version="x")
    write_run_summary(tmp_path, summary)
    assert json.loads((tmp_path / "run.json").read_text())["best_loss"] is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0, "lr": 0.1}\n{"step": "x"}\n')
    run = read_run(tmp_path)
    assert run.summary.settings == {"steps": 3} and math.isnan(run.summary.best_loss)
    assert run.records[0].lr == 0.1 and run.unreadable_lines == 1
    with pytest.raises(BadInput, match="not a curvdiag run directory"):
        read_run(tmp_path / "nothing")


def test_the_registry_lists_every_probe_with_the_record_the_report_reads():
    assert PROBE_NAMES == ("lambda_max", "hessian_trace", "hessian_diag", "hesscale_diag", "directional_curvature",
                           "glass", "power_law", "spectral_density")
    for name, probe in REGISTRY.items():
        assert ENTRY_TYPES[name] is probe.result
        assert callable(probe.load())
    assert set(ENTRY_TYPES) == set(PROBE_NAMES) | set(COMPANIONS)


def test_one_verdict_for_the_terminal_and_the_page(plot_inputs):
    from curvdiag.plots.html import report_verdict

    report = ProbeReport.from_json(json.loads(plot_inputs["report_adam"].read_text()))
    verdict = probe_verdict(report)
    assert verdict.preconditioned and verdict.curvature.value == 30.0
    assert verdict.safe_lr == pytest.approx(SAFETY * report.probes["eos"].stable_lr)
    assert report_verdict(report).headline == verdict.headline == "STABLE"
    report.probes["eos"] = Skipped("no learning rate known (pass --lr)")
    verdict = probe_verdict(report)
    assert verdict.status == "unknown" and verdict.reason.startswith("no learning rate")
