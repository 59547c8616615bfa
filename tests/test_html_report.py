"""The self-contained HTML report: verdict in words, tables, embedded figures, no web
addresses; `curvdiag report`; and a real render in headless Chromium where it is installed."""

import base64
import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from curvdiag.cli.app import app
from curvdiag.plots.html import report_verdict, runs_verdict, write_html_report
from curvdiag.results.probe_results import ProbeReport
from curvdiag.results.run_dir import read_runs
import test_plots
from test_plots import REPORT_FIGURES, _assert_one_line_error, _hand_made_compare

plot_inputs = test_plots.plot_inputs  # the fixture, bound by assignment so that its parameters redefine nothing

runner = CliRunner()
IMAGE = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


_PAGES = {}


@pytest.fixture(scope="module")
def pages(plot_inputs, tmp_path_factory):
    """One page per input, written once (drawing figures is the slow part)."""
    if not _PAGES:
        root = tmp_path_factory.mktemp("pages")
        for name in ("report_all", "report_skipped", "compare", "diverged"):
            _PAGES[name] = write_html_report(plot_inputs[name], root / f"{name}.html", dpi=40)
    return _PAGES


def _page(pages, name):
    return pages[name].read_text(encoding="utf-8")


def _assert_self_contained(page):
    assert not re.search(r"https?://", page), re.search(r".{40}https?://.{40}", page).group(0)
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    # Every src is inline data.
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))


def _images(page):
    images = IMAGE.findall(page)
    for encoded in images:
        assert base64.b64decode(encoded).startswith(b"\x89PNG\r\n\x1a\n")
    return images


def test_report_page_for_a_probe_report(plot_inputs, pages):
    page = _page(pages, "report_all")
    _assert_self_contained(page)
    report = json.loads(plot_inputs["report_all"].read_text())
    eos = report["probes"]["eos"]
    assert eos["status"] == "stable"
    assert '<section class="verdict stable"><h2>STABLE</h2>' in page
    assert f"η·λmax/3.8 = {eos['ratio']:.3f}" in page
    assert len(_images(page)) == len(REPORT_FIGURES)
    for layer in report["model"]["layers"]:
        assert f"<td>{layer}</td>" in page
    assert "diag H mean (HesScale)" in page and "glass ρ" in page
    assert "Figures not drawn" not in page


def test_report_page_lists_skipped_probes_and_figures(plot_inputs, pages):
    page = _page(pages, "report_skipped")
    _assert_self_contained(page)
    assert "<h2>NO VERDICT</h2>" in page and "No stability verdict: reason for eos." in page
    assert "skipped: reason for glass" in page
    assert "Figures not drawn" in page and "glass was skipped by the probe: reason for glass" in page
    assert len(_images(page)) == 1


def test_report_page_for_a_compare_run(plot_inputs, pages):
    page = _page(pages, "compare")
    _assert_self_contained(page)
    assert "<h2>ALL 3 RUNS COMPLETED</h2>" in page
    assert "Lowest final loss:" in page
    for name in ("baseline", "throttle", "newton"):
        assert f"<td>{name}</td>" in page
    assert len(_images(page)) == 4


def test_report_page_for_a_run_that_diverged(plot_inputs, pages):
    page = _page(pages, "diverged")
    _assert_self_contained(page)
    assert '<section class="verdict diverged"><h2>DIVERGED AT STEP 1</h2>' in page
    assert "diverged at step 1 (the loss exploded)" in page
    assert len(_images(page)) == 2
    assert "no λmax in metrics.jsonl" in page
    verdict = runs_verdict(read_runs(plot_inputs["nan_tail"]))
    assert verdict.headline == "DIVERGED AT STEP 2"
    assert "diverged at step 2 (the loss became non-finite)" in verdict.sentences[0]


def test_run_page_shows_the_lr_used_and_what_the_peak_ratio_means(tmp_path):
    """No "lr null" when --lr was not given: the rate the log shows; the peak η·λmax/T is
    said against 1, the run's own threshold, and a run far above it that did not diverge is
    told apart from one at the edge."""
    root = _hand_made_compare(tmp_path / "a", [6.751, 6.777, 6.778], [6.756, 6.764, 6.772])
    page = write_html_report(root, tmp_path / "a.html", dpi=30).read_text(encoding="utf-8")
    assert "null" not in page
    assert "<td>lr</td><td>0.3 (the optimizer&#x27;s own; --lr not given)</td>" in page
    assert "<th>lr in use</th>" in page and "<td>0.151</td>" in page
    verdict = runs_verdict(read_runs(root))
    baseline, throttle = verdict.sentences[1:]
    assert "λmax reached the run's stability threshold T/η: η·λmax/T peaked at 1.02 at step 2, at the edge" in baseline
    assert "λmax stayed below the run's stability threshold T/η: η·λmax/T peaked at 0.512 at step 2 " \
           "(1 is the threshold)" in throttle
    far = runs_verdict(read_runs(_hand_made_compare(tmp_path / "b", [28.7, 20.0], [6.7, 6.7])))
    assert "η·λmax/T peaked at 4.3 at step 0; 1 is the threshold) and yet the run did not diverge" in far.sentences[1]
    gone = runs_verdict(read_runs(_hand_made_compare(tmp_path / "c", [28.7, 20.0], [6.7, 6.7], diverged=True)))
    assert "Before it diverged, η·λmax/T peaked at 4.3 at step 0" in gone.sentences[1]


def test_report_page_shows_the_cost_and_what_qualifies_the_verdict(plot_inputs, tmp_path):
    report = json.loads(plot_inputs["report_skipped"].read_text())
    report["interrupted"], report["interrupted_by"] = True, "timeout"
    report["budget"] = {"total": 150.0, "spent": 61.5, "seconds": 9.0, "gradient_seconds": 0.05, "hvp_cost": 1.5,
                        "probes": [{"name": "lambda_max", "planned": 60.0, "spent": 21.0, "seconds": 1.1,
                                    "stop": "converged"},
                                   {"name": "hessian_trace", "planned": 40.0, "spent": 40.5, "seconds": 7.9,
                                    "stop": "budget", "precision_name": "relative s.e. of tr H",
                                    "precision_target": 0.01, "precision_reached": 0.0213}]}
    sentences = report_verdict(ProbeReport.from_json(report)).sentences
    assert sentences[-2].startswith("Interrupted by the --timeout: this report holds only the probes that finished")
    assert sentences[-1].startswith("hessian_trace stopped at relative s.e. of tr H 0.021, above its target 0.01")
    source = tmp_path / "cost.json"
    source.write_text(json.dumps(report))
    page = write_html_report(source, tmp_path / "cost.html", dpi=30).read_text(encoding="utf-8")
    assert "<caption>cost in gradient-equivalents (1 GE = one forward + backward over the data = 0.05 s here; " \
           "one HVP = 1.5 GE)</caption>" in page
    assert "<td>hessian_trace</td><td>40</td><td>40.5</td><td>7.9</td><td>budget</td>" \
           "<td>relative s.e. of tr H 0.021 &gt; target 0.01</td>" in page
    assert "<td>total</td><td>150</td><td>61.5</td>" in page


@pytest.mark.parametrize("status, ratio, headline, words", [
    ("edge", 1.02, "AT THE EDGE OF STABILITY", "oscillate along the top eigenvector"),
    ("unstable", 1.5, "UNSTABLE", "Expect oscillation or divergence"),
    ("stable", 0.5, "STABLE", "Learning rates up to 4 would be stable"),
])
def test_verdict_words(plot_inputs, status, ratio, headline, words):
    report = json.loads(plot_inputs["report_all"].read_text())
    eos = report["probes"]["eos"]
    eos.update(status=status, ratio=ratio, lr=1.0, stable_lr=2.0 / ratio, constant=2.0, threshold=2.0,
               curvature_value=2.0 * ratio)
    verdict = report_verdict(ProbeReport.from_json(report))
    assert verdict.status == status and verdict.headline == headline
    text = " ".join(verdict.sentences)
    assert words in text and f"η·λmax/2 = {ratio:.3f}" in text
    if status != "stable":
        assert f"lr ≤ {0.95 * 2.0 / ratio:.3g} (κ = 0.95) would be stable" in text


def test_adam_verdict_names_the_preconditioned_sharpness(plot_inputs):
    verdict = report_verdict(ProbeReport.from_json(json.loads(plot_inputs["report_adam"].read_text())))
    assert verdict.headline == "STABLE"
    assert "η·preconditioned λmax/38 = 0.789" in verdict.sentences[0]


def test_report_command(plot_inputs, tmp_path):
    out = tmp_path / "sub" / "page.html"
    result = runner.invoke(app, ["report", str(plot_inputs["report_skipped"]), "--out", str(out), "--dpi", "40"])
    assert result.exit_code == 0, result.output
    assert f"report written to {out}" in result.output
    assert "<h2>NO VERDICT</h2>" in out.read_text()
    result = runner.invoke(app, ["report", str(plot_inputs["diverged"]), "--dpi", "40"])
    assert result.exit_code == 0, result.output
    assert "DIVERGED AT STEP 1" in (plot_inputs["diverged"] / "report.html").read_text()


def test_report_command_bad_inputs(plot_inputs, tmp_path):
    _assert_one_line_error(runner.invoke(app, ["report", str(tmp_path / "nothing.json")]), "no such file")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([1, 2]))
    _assert_one_line_error(runner.invoke(app, ["report", str(bad)]), "not a curvdiag probe report")
    _assert_one_line_error(runner.invoke(app, ["report", str(plot_inputs["report_all"]), "--out", str(tmp_path)]),
                           "is a directory")


def _pixels_near(image, rgb, tol=0.06):
    import numpy as np

    colour = np.array(rgb, dtype=float) / 255.0
    return int((np.abs(image[..., :3] - colour).max(axis=-1) < tol).sum())


def _reddish_pixels(image):
    """Red-dominated pixels: the threshold line survives the blur of a low-dpi figure scaled up."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return int(((r - g > 0.45) & (r - b > 0.45)).sum())


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(plot_inputs, tmp_path):
    """A real browser opens the page offline and draws the verdict box and the figure."""
    from matplotlib.image import imread

    # A report at the edge whose only figure is the eigenvalue plot (the rest skipped): one draw.
    report = json.loads(plot_inputs["report_skipped"].read_text())
    report["probes"]["eos"] = json.loads(plot_inputs["report_all"].read_text())["probes"]["eos"]
    report["probes"]["eos"].update(status="edge", ratio=1.02)
    source = tmp_path / "edge.json"
    source.write_text(json.dumps(report))
    page = write_html_report(source, tmp_path / "edge.html", dpi=80)
    shot = tmp_path / "shot.png"
    command = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
               page.resolve().as_uri()]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert shot.is_file() and shot.stat().st_size > 10_000, completed.stderr[-2000:]
    image = imread(str(shot))
    assert image.shape[:2] == (2000, 1280)
    # The verdict box's orange border (CSS class "edge", #ff9f1a) is drawn ...
    assert _pixels_near(image, (0xFF, 0x9F, 0x1A)) > 500
    # ... and so is the embedded figure: the eigenvalue markers (#1f77b4) and the red threshold line.
    assert _pixels_near(image, (0x1F, 0x77, 0xB4)) > 200
    assert _reddish_pixels(image) > 300
