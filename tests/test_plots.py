"""Every figure for every kind of input, built from real `curvdiag train` / `curvdiag probe`
output on the tiny test recipes, and the `curvdiag plot` command with its errors."""

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curvdiag.cli.app import app
from curvdiag.plots.canvas import NotPlottable
from curvdiag.plots.probe import report_figures
from curvdiag.plots.runs import BASELINE_COLOUR, loss_figure, sharpness_figure
from curvdiag.plots.sources import figures_for, load_source
from curvdiag.results.probe_results import ProbeReport
from curvdiag.results.run_dir import read_runs
from conftest import RECIPES

runner = CliRunner()
LINEAR = str(RECIPES / "linear_regression.py")
TINY = str(RECIPES / "tiny_mlp.py")
RUN_FIGURES = {"loss", "learning_rate", "sharpness", "directional_curvature"}
REPORT_FIGURES = {"eigenvalues", "spectral_density", "hessian_diag", "power_law", "glass"}

_BUILT = {}


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _write(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path


def build_inputs(root: Path) -> dict:
    """Real run directories and probe reports (about 4 s on two cores), plus variants of the
    report with skipped entries and an Adam-family threshold."""
    inputs = {}
    # A --compare run at a stable lr with λmax every 4 steps; the Newton rate moves η.
    _cli("train", LINEAR, "--steps", 16, "--lr", 0.05, "--controller", "throttle,newton", "--compare",
         "--sharpness-every", 4, "--out", root / "compare", "-q")
    inputs["compare"] = root / "compare"
    inputs["single"] = root / "compare" / "throttle"
    # lr 5 is far above 2/λmax: the loss explodes at step 1.
    _cli("train", LINEAR, "--lr", 5, "--steps", 20, "--out", root / "diverged", "-q")
    inputs["diverged"] = root / "diverged"
    # A run whose log ends in a non-finite loss (null) after a line cut short by a kill.
    nan_run = root / "nan_tail"
    nan_run.mkdir()
    records = [{"step": 0, "loss": 2.0, "lr": 0.1, "base_lr": 0.1, "grad_norm": 1.0, "update_norm": 0.1,
                "directional_curvature": None, "throttle": 1.0, "lambda_max": 3.0, "threshold": 20.0, "eos_ratio": 0.15},
               {"step": 1, "loss": float("inf"), "lr": 0.1, "base_lr": 0.1, "grad_norm": float("nan"),
                "update_norm": 0.1, "directional_curvature": 5.0, "throttle": 1.0},
               {"step": 2, "loss": None, "diverged": True}]
    lines = [json.dumps(r).replace("Infinity", "1e999") for r in records]
    (nan_run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n{\"step\": 2, \"lo\n" + lines[2] + "\n")
    _write(nan_run / "run.json", {"controller": "none", "steps_completed": 2, "diverged": True, "final_loss": None,
                                  "best_loss": 2.0, "recipe": "my_recipe.py", "checkpoint": None})
    inputs["nan_tail"] = nan_run

    _cli("probe", TINY, "--probes", "all", "--samples", 4, "--glass-samples", 2, "--json", root / "all.json", "-q")
    report = json.loads((root / "all.json").read_text())
    if "spectral_density" not in report["probes"]:  # until probes.py runs it: the same code path
        from curvdiag.loading.target import load_target
        from curvdiag.curvature.operator import CurvatureOperator
        from curvdiag.probes.spectral_density import spectral_density

        target = load_target(TINY, None)
        op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes)
        report["probes"]["spectral_density"] = spectral_density(op, steps=30, probes=2, seed=0).to_json()
    inputs["report_all"] = _write(root / "all.json", report)

    _cli("probe", TINY, "--probes", "hessian_diag", "--samples", 4, "--json", root / "single.json", "-q")
    inputs["report_single"] = root / "single.json"

    skipped = copy.deepcopy(report)
    for name in ("hesscale_diag", "glass", "power_law", "spectral_density", "eos"):
        skipped["probes"][name] = {"skipped": f"reason for {name}"}
    del skipped["probes"]["hessian_diag"]
    inputs["report_skipped"] = _write(root / "skipped.json", skipped)

    adam = copy.deepcopy(report)
    pre = copy.deepcopy(report["probes"]["lambda_max"])
    pre.update(value=30.0, eigenvalues=[30.0], next_ritz_values=[29.0, 25.0])
    adam["probes"]["preconditioned_lambda_max"] = pre
    adam["probes"]["eos"].update(optimizer="adam", curvature="preconditioned_lambda_max", curvature_value=30.0,
                                 constant=38.0, lr=1.0, threshold=38.0, ratio=30.0 / 38.0, status="stable")
    inputs["report_adam"] = _write(root / "adam.json", adam)
    return inputs


@pytest.fixture(scope="session")
def plot_inputs(tmp_path_factory):
    if not _BUILT:
        _BUILT.update(build_inputs(tmp_path_factory.mktemp("plot_inputs")))
    return _BUILT


_FIGURES = {}


@pytest.fixture(scope="session")
def figure_sets(plot_inputs):
    if not _FIGURES:
        _FIGURES.update({name: figures_for(load_source(path)) for name, path in plot_inputs.items()})
    return _FIGURES


def _legend(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def _lines_labelled(ax, prefix):
    return [line for line in ax.get_lines() if line.get_label().startswith(prefix)]


def _check_labelled(figure, title_fragment):
    assert title_fragment in figure._suptitle.get_text()
    for ax in figure.axes:
        assert ax.get_ylabel(), ax.get_title()
        assert ax.get_title()
        assert _legend(ax), ax.get_title()
    assert figure.axes[-1].get_xlabel()


# ------------------------------------------------------------------------------ run figures
def test_compare_run_overlays_every_run_in_every_figure(plot_inputs, figure_sets):
    figures = figure_sets["compare"]
    assert set(figures.figures) == RUN_FIGURES and figures.skipped == {}
    for figure in figures.figures.values():
        _check_labelled(figure, "linear_regression · compare compare: baseline, throttle, newton")
        legend = " ".join(_legend(figure.axes[0]))
        assert all(name in legend for name in ("baseline", "throttle", "newton")), legend
    assert figures.figures["loss"].axes[0].get_xlabel() == "step"
    assert figures.figures["loss"].axes[0].get_ylabel() == "loss"
    assert figures.figures["loss"].axes[0].get_yscale() == "log"  # MSE losses are positive


def test_compared_runs_share_the_lambda_max_of_their_starting_weights(plot_inputs, figure_sets):
    """Every run of a --compare starts from the same weights: run.json holds the λmax measured
    there, the same in each run, and the figure draws it once, at step 0, as shared."""
    from curvdiag.curvature.operator import CurvatureOperator
    from curvdiag.loading.target import load_target
    from curvdiag.probes.sharpness import lambda_max

    runs = read_runs(plot_inputs["compare"])
    starts = {run.summary.lambda_max_at_start for run in runs}
    assert len(starts) == 1 and None not in starts, starts
    target = load_target(LINEAR)
    op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes, train_mode=True)
    assert starts.pop() == pytest.approx(lambda_max(op, tol=1e-8).value, rel=1e-3)  # measured at tol 1e-3
    ax = figure_sets["compare"].figures["sharpness"].axes[0]
    (star,) = _lines_labelled(ax, "λmax at the starting weights (shared by the 3 runs)")
    assert list(star.get_xdata()) == [0] and star.get_marker() == "*"


def test_sharpness_figure_draws_lambda_max_and_the_threshold_two_over_lr(plot_inputs, figure_sets):
    figure = figure_sets["compare"].figures["sharpness"]
    ax, ratio_ax = figure.axes
    assert ax.get_ylabel() == "curvature λ (loss / parameter²)"
    runs = read_runs(plot_inputs["compare"])
    baseline = runs[0]
    assert baseline.name == "baseline"
    steps, values = baseline.series("lambda_max")
    assert steps == [0, 4, 8, 12]
    (line,) = _lines_labelled(ax, "baseline: λmax")
    assert list(line.get_xdata()) == steps and list(line.get_ydata()) == pytest.approx(values)
    # GD at constant η = 0.05: the baseline's own horizontal line at 2/η = 40, in its colour.
    (threshold,) = _lines_labelled(ax, "baseline: threshold 2/η = 40")
    assert list(threshold.get_ydata()) == pytest.approx([40.0, 40.0])
    assert threshold.get_color() == BASELINE_COLOUR
    # The Newton rate changes η, so its threshold is a curve 2/η_t over the steps.
    (curve,) = _lines_labelled(ax, "newton: threshold 2/η_t")
    newton = next(r for r in runs if r.name == "newton")
    lr_steps, lrs = newton.series("lr")
    assert list(curve.get_ydata()) == pytest.approx([2.0 / lr for lr in lrs])
    # Below: each run's η_t·λmax/T, read against the one line at 1.
    for run in runs:
        (ratio,) = [l for l in ratio_ax.get_lines() if l.get_label() == run.name]
        assert list(ratio.get_ydata()) == pytest.approx(run.series("eos_ratio")[1])
    (one,) = _lines_labelled(ratio_ax, "its threshold (ratio 1)")
    assert list(one.get_ydata()) == [1.0, 1.0]
    # T is defined on the figure, and the runs that share their first λmax are said to.
    note = _notes(figure)
    assert "T/η is the stability threshold" in note and "here T = 2." in note
    assert f"All runs share λmax = {values[0]:.4g} at step 0." in note


def _notes(figure):
    return " ".join(t.get_text() for ax in figure.axes for t in ax.texts)


def _hand_made_compare(root: Path, lambdas_baseline, lambdas_throttle, diverged=False) -> Path:
    """A --compare directory as the edge-of-stability tanh MLP wrote it (λmax, lr and T/η from
    a real run, rounded): the throttle halved η, so its threshold 2/η_t is twice the baseline's."""
    from curvdiag.results.run_dir import MetricsLog, RunSummary, write_run_summary

    for name, lr, lams in (("baseline", 0.3, lambdas_baseline), ("throttle", 0.1512, lambdas_throttle)):
        run = root / name
        with MetricsLog(run) as log:
            for step, lam in enumerate(lams):
                log.write({"step": step, "loss": 0.019, "lr": lr, "base_lr": 0.3, "throttle": lr / 0.3,
                           "lambda_max": lam, "threshold": 2 / lr, "eos_ratio": lr * lam / 2})
        write_run_summary(run, RunSummary(controller="none" if name == "baseline" else name,
                                          steps_completed=len(lams), diverged=diverged and name == "baseline",
                                          final_loss=0.019, best_loss=0.019, initial_loss=0.019, recipe="tanh_mlp.py",
                                          settings={"steps": len(lams), "lr": None}))
    return root


def test_each_run_is_read_against_its_own_threshold(tmp_path):
    """The throttled run's λmax sits above the baseline's 2/η but far under its own 2/η_t:
    its own line is drawn in its colour, and its ratio to that line is under 1."""
    from curvdiag.plots.runs import RUN_COLOURS

    root = _hand_made_compare(tmp_path, [6.751, 6.777, 6.778], [6.756, 6.764, 6.772])
    figure = figures_for(load_source(root)).figures["sharpness"]
    ax, ratio_ax = figure.axes
    (own,) = _lines_labelled(ax, "throttle: threshold 2/η = 13.2")
    assert own.get_ydata()[0] == pytest.approx(2 / 0.1512) and own.get_color() == RUN_COLOURS[0]
    (theirs,) = _lines_labelled(ax, "baseline: threshold 2/η = 6.67")
    (lam,) = _lines_labelled(ax, "throttle: λmax")
    assert min(lam.get_ydata()) > theirs.get_ydata()[0]  # above the baseline's line ...
    (ratio,) = [l for l in ratio_ax.get_lines() if l.get_label() == "throttle"]
    assert max(ratio.get_ydata()) < 0.52  # ... but at half of its own threshold
    assert not _lines_labelled(ax, "stability threshold")  # no line that belongs to no run
    assert "their first logged λmax differ because each is measured after that step's update" in _notes(figure)


def test_a_single_run_threshold_is_red_and_labelled_plainly(figure_sets):
    from curvdiag.plots.canvas import THRESHOLD_COLOUR

    ax = figure_sets["single"].figures["sharpness"].axes[0]
    (threshold,) = _lines_labelled(ax, "stability threshold 2/η")
    assert threshold.get_color() == THRESHOLD_COLOUR


def test_no_figure_labels_curvature_in_lr_units(figure_sets):
    for name, figures in figure_sets.items():
        for key, figure in figures.figures.items():
            for ax in figure.axes:
                labels = ax.get_xlabel() + ax.get_ylabel()
                assert "1/lr" not in labels, (name, key, labels)
                if key in ("sharpness", "directional_curvature", "eigenvalues") and ax is figure.axes[0]:
                    assert "loss / parameter²" in ax.get_ylabel(), (name, key)
            if key in ("sharpness", "directional_curvature", "eigenvalues", "spectral_density"):
                thresholds = [line for ax in figure.axes for line in ax.get_lines() if "threshold" in line.get_label()]
                if thresholds:
                    assert "T/η is the stability threshold: along an eigendirection of curvature λ" in _notes(figure)


def test_single_run(figure_sets):
    figures = figure_sets["single"]
    assert set(figures.figures) == RUN_FIGURES
    _check_labelled(figures.figures["learning_rate"], "run throttle (throttle)")
    top, bottom = figures.figures["learning_rate"].axes
    assert top.get_ylabel() == "learning rate η" and bottom.get_ylabel() == "η / η_base"
    assert _lines_labelled(bottom, "factor 1")


def test_run_that_diverged_after_one_step(plot_inputs, figure_sets):
    figures = figure_sets["diverged"]
    assert set(figures.figures) == {"loss", "learning_rate"}
    assert "--sharpness-every" in figures.skipped["sharpness"]
    assert "directional curvature" in figures.skipped["directional_curvature"]
    ax = figures.figures["loss"].axes[0]
    assert any("diverged at step 1" in text for text in _legend(ax))
    vertical = [l for l in ax.get_lines() if list(l.get_xdata()) == [1, 1]]
    assert vertical, "no line marking the step of divergence"
    exploded = json.loads((plot_inputs["diverged"] / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    crosses = [l for l in ax.get_lines() if l.get_marker() == "X"]
    assert crosses and crosses[0].get_ydata()[0] == pytest.approx(exploded)
    assert ax.get_yscale() == "log"


def test_non_finite_tail_and_a_cut_line_are_tolerated(plot_inputs, figure_sets):
    (run,) = read_runs(plot_inputs["nan_tail"])
    assert run.unreadable_lines == 1 and run.diverged and run.diverged_at == 2
    assert run.series("loss") == ([0.0], [2.0])  # inf and null are dropped
    figures = figure_sets["nan_tail"]
    assert set(figures.figures) == RUN_FIGURES
    assert "my_recipe" in figures.title
    ax = figures.figures["sharpness"].axes[0]
    (threshold,) = _lines_labelled(ax, "stability threshold 2/η = 20")


def test_a_figure_without_its_data_says_why():
    with pytest.raises(NotPlottable, match="no finite loss"):
        loss_figure([], "t")
    with pytest.raises(NotPlottable, match="--sharpness-every"):
        sharpness_figure([], "t")


# --------------------------------------------------------------------------- report figures
def test_report_with_every_probe(plot_inputs, figure_sets):
    figures = figure_sets["report_all"]
    assert set(figures.figures) == REPORT_FIGURES and figures.skipped == {}
    report = json.loads(plot_inputs["report_all"].read_text())
    eos = report["probes"]["eos"]
    for figure in figures.figures.values():
        _check_labelled(figure, "initialisation (no checkpoint) · tiny_mlp")
    # Eigenvalues against the momentum threshold 3.8/η.
    ax = figures.figures["eigenvalues"].axes[0]
    (threshold,) = _lines_labelled(ax, f"stability threshold 3.8/η = {eos['threshold']:.3g}")
    assert threshold.get_ydata()[0] == pytest.approx(eos["threshold"])
    (top,) = _lines_labelled(ax, "Hessian H: converged")
    assert top.get_ydata()[0] == pytest.approx(report["probes"]["lambda_max"]["value"])
    (following,) = _lines_labelled(ax, "Hessian H: next Ritz values")
    assert list(following.get_ydata()) == pytest.approx(report["probes"]["lambda_max"]["next_ritz_values"])
    assert "stable" in ax.get_title()
    assert "here T = 3.8 (heavy-ball momentum, β = 0.9)" in _notes(figures.figures["eigenvalues"])
    assert figures.figures["spectral_density"].axes[0].get_xlabel() == "eigenvalue λ of H (loss / parameter²)"
    # Hutchinson and HesScale side by side.
    legend = " ".join(_legend(figures.figures["hessian_diag"].axes[0]))
    assert "Hutchinson" in legend and "HesScale" in legend
    # The p = 2 reference line.
    ax = figures.figures["power_law"].axes[0]
    (two,) = _lines_labelled(ax, "p = 2")
    assert two.get_ydata()[0] == 2.0
    # The density and its nodes; λmax of the SLQ support matches the Lanczos λmax.
    density = report["probes"]["spectral_density"]
    assert density["lambda_max"] == pytest.approx(report["probes"]["lambda_max"]["value"], rel=1e-3)
    ax = figures.figures["spectral_density"].axes[0]
    assert ax.get_yscale() == "log"
    assert _lines_labelled(ax, "quadrature nodes") and _lines_labelled(ax, "stability threshold 3.8/η")


def test_hessian_diagonal_is_mean_and_standard_error_not_the_range(plot_inputs, figure_sets):
    """Bars of ± one s.e. around each layer's mean; no min–max of the entries (mostly estimator
    noise that dwarfs the means); HesScale's means without error bars (deterministic)."""
    from matplotlib.collections import LineCollection
    from matplotlib.container import ErrorbarContainer

    report = ProbeReport.from_json(json.loads(plot_inputs["report_all"].read_text()))
    ax = figure_sets["report_all"].figures["hessian_diag"].axes[0]
    legend = _legend(ax)
    assert "Hutchinson (Rademacher): mean ± s.e. (4 samples)" in legend and "HesScale: mean (deterministic)" in legend
    assert not any("min –" in text or "max" in text for text in legend)
    (hutchinson,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
    (bars,) = hutchinson.lines[2]
    layers = report.probes["hessian_diag"].layers
    for segment, layer in zip(bars.get_segments(), layers):
        assert segment[0][1] == pytest.approx(layer.mean - layer.stderr)
        assert segment[1][1] == pytest.approx(layer.mean + layer.stderr)
    others = [c for c in ax.collections if isinstance(c, LineCollection) and c is not bars]
    assert not others, "a second set of bars (the min – max range?)"
    assert "loss / parameter²" in ax.get_ylabel()


def test_glass_figure_draws_points_not_bars(figure_sets):
    from matplotlib.container import BarContainer, ErrorbarContainer

    ax = figure_sets["report_all"].figures["glass"].axes[0]
    assert not [c for c in ax.containers if isinstance(c, BarContainer)] and not ax.patches
    (points,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert points.get_label().startswith("ρ per layer ± s.e.")
    assert points.lines[0].get_marker() == "o" and points.lines[0].get_linestyle() == "None"


def test_glass_figure_goes_log_only_when_every_error_bar_stays_above_zero(plot_inputs):
    report = json.loads(plot_inputs["report_all"].read_text())
    layers = report["probes"]["glass"]["layers"]
    for k, layer in enumerate(layers):
        layer.update(rho=10.0 ** -k, rho_stderr=0.1 * 10.0 ** -k)
    assert report_figures(ProbeReport.from_json(report), "t").figures["glass"].axes[0].get_yscale() == "log"
    layers[0]["rho_stderr"] = 2.0  # its bar reaches below 0
    assert report_figures(ProbeReport.from_json(report), "t").figures["glass"].axes[0].get_yscale() == "linear"


def test_report_with_a_single_probe(figure_sets):
    figures = figure_sets["report_single"]
    assert set(figures.figures) == {"hessian_diag"}
    for name in REPORT_FIGURES - {"hessian_diag"}:
        assert "not in the report" in figures.skipped[name], figures.skipped
    assert "add it to --probes" in figures.skipped["power_law"]


def test_report_with_skipped_entries(figure_sets):
    figures = figure_sets["report_skipped"]
    assert set(figures.figures) == {"eigenvalues"}
    assert figures.skipped["glass"] == "glass was skipped by the probe: reason for glass"
    assert figures.skipped["spectral_density"] == "spectral_density was skipped by the probe: reason for spectral_density"
    assert figures.skipped["hessian_diag"] == ("hessian_diag not in the report (probe not run: add it to --probes); "
                                               "hesscale_diag was skipped by the probe: reason for hesscale_diag")
    ax = figures.figures["eigenvalues"].axes[0]
    assert any("no stability threshold: reason for eos" in t.get_text() for t in ax.texts)
    assert not _lines_labelled(ax, "stability threshold")


def test_adam_threshold_applies_to_the_preconditioned_sharpness(figure_sets):
    figures = figure_sets["report_adam"]
    ax = figures.figures["eigenvalues"].axes[0]
    (threshold,) = _lines_labelled(ax, "stability threshold 38/η = 38 (on the preconditioned sharpness)")
    (pre,) = _lines_labelled(ax, "preconditioned P^-1/2 H P^-1/2: converged")
    assert pre.get_ydata()[0] == 30.0
    # The density is of H, not of the preconditioned matrix: Adam's threshold is not drawn on it.
    assert not _lines_labelled(figures.figures["spectral_density"].axes[0], "stability threshold")


def test_spectral_density_from_nodes_only(plot_inputs):
    report = json.loads(plot_inputs["report_all"].read_text())
    entry = report["probes"]["spectral_density"]
    del entry["grid"], entry["density"]
    figures = report_figures(ProbeReport.from_json(report), "t")
    line = figures.figures["spectral_density"].axes[0].get_lines()[0]
    xs, ys = line.get_xdata(), line.get_ydata()
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    assert area == pytest.approx(1.0, abs=0.01)


# ------------------------------------------------------------------------------ the command
@pytest.mark.parametrize("source, fmt, magic, names", [
    ("report_all", "png", b"\x89PNG", REPORT_FIGURES),
    ("diverged", "svg", b"<?xml", {"loss", "learning_rate"}),
    ("diverged", "pdf", b"%PDF", {"loss", "learning_rate"}),
])
def test_plot_command_writes_one_file_per_figure(plot_inputs, tmp_path, source, fmt, magic, names):
    out = tmp_path / fmt
    result = _cli("plot", plot_inputs[source], "--out", out, "--format", fmt, "--dpi", 40)
    files = sorted(out.iterdir())
    assert {f.name for f in files} == {f"{name}.{fmt}" for name in names}
    for f in files:
        assert f.stat().st_size > 1000 and f.read_bytes().startswith(magic)
        assert str(f) in result.output
    assert f"{len(names)} figures written to {out}" in result.output


def test_plot_command_defaults_and_skips(plot_inputs):
    result = _cli("plot", plot_inputs["diverged"], "--dpi", 40)
    out = plot_inputs["diverged"] / "plots"
    assert {f.name for f in out.iterdir()} == {"loss.png", "learning_rate.png"}
    assert "skipped sharpness: no λmax" in result.output
    result = _cli("plot", plot_inputs["report_single"], "--dpi", 40, "--format", "SVG")
    assert (plot_inputs["report_single"].parent / "single_plots" / "hessian_diag.svg").is_file()
    # A run's run.json or metrics.jsonl stands for its directory.
    assert load_source(plot_inputs["diverged"] / "run.json").path == plot_inputs["diverged"]
    assert load_source(plot_inputs["compare"] / "newton" / "metrics.jsonl").title.endswith("run newton (newton)")


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_plot_command_bad_inputs(plot_inputs, tmp_path):
    missing = tmp_path / "missing"
    _assert_one_line_error(runner.invoke(app, ["plot", str(missing)]), "no such file or directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(runner.invoke(app, ["plot", str(empty)]), "not a curvdiag run directory")
    other = _write(tmp_path / "other.json", {"loss": 1.0})
    _assert_one_line_error(runner.invoke(app, ["plot", str(other)]), "not a curvdiag probe report")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _assert_one_line_error(runner.invoke(app, ["plot", str(text)]), "not valid JSON")
    _assert_one_line_error(runner.invoke(app, ["plot", str(plot_inputs["diverged"]), "--format", "gif"]),
                           "--format gif: unknown", "png, svg, pdf")
    _assert_one_line_error(runner.invoke(app, ["plot", str(plot_inputs["diverged"]), "--dpi", "5"]),
                           "--dpi 5: must lie in [10, 1200]")
    broken = tmp_path / "broken_run"
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    _assert_one_line_error(runner.invoke(app, ["plot", str(broken)]), "run.json: not valid JSON")
    assert not (tmp_path / "missing").exists()


def test_report_figures_from_memory_for_probe_plots(plot_inputs, tmp_path):
    from curvdiag.cli.plot import write_report_figures

    report = json.loads(plot_inputs["report_single"].read_text())
    written, skipped = write_report_figures(report, tmp_path / "plots", dpi=40)
    assert [p.name for p in written] == ["hessian_diag.png"] and written[0].stat().st_size > 1000
    assert set(skipped) == REPORT_FIGURES - {"hessian_diag"}


def test_plot_functions_write_nothing(plot_inputs):
    before = sorted(p.name for p in plot_inputs["compare"].rglob("*"))
    figures_for(load_source(plot_inputs["compare"]))
    assert sorted(p.name for p in plot_inputs["compare"].rglob("*")) == before
