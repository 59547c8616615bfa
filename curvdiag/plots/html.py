"""One self-contained HTML page for a run directory or a probe report: the verdict in words,
the context and per-layer tables, and every figure of :mod:`curvdiag.plots.runs` or
:mod:`curvdiag.plots.probe` embedded as a base64 PNG. It opens offline: no scripts, fonts, style sheets or images are fetched, and the
page holds no http(s) address.

The page reads the typed results and never recomputes a probe (STYLE habit 2); the probe
verdict is :func:`curvdiag.report.verdict.probe_verdict`, the one the terminal prints; the
figures are those of ``curvdiag plot``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from curvdiag._version import __version__
from curvdiag.errors import BadInput
from curvdiag.plots.canvas import FigureSet
from curvdiag.plots.sources import PlotSource, figures_for, load_source
from curvdiag.report.verdict import peak_ratio_words, probe_verdict
from curvdiag.results import probe_results as entries
from curvdiag.results.json_safe import finite
from curvdiag.results.probe_results import ProbeReport, Skipped
from curvdiag.results.run_dir import RunLog

PNG_DPI = 110
# Per-layer columns: (probe, key in its layer entry, heading).
@dataclass
class Verdict:
    """The headline and the sentences that say what the numbers mean."""

    status: str  # a CSS class: stable | edge | unstable | unknown | diverged | completed | mixed
    headline: str
    sentences: List[str] = field(default_factory=list)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}g}"
    return str(value)


# ------------------------------------------------------------------------------- verdicts
def report_verdict(report: ProbeReport) -> Verdict:
    """The page's words for the probe verdict (:func:`curvdiag.report.verdict.probe_verdict`)."""
    verdict = probe_verdict(report)
    found = _report_verdict(verdict)
    found.sentences += verdict.cautions
    return found


def _report_verdict(verdict) -> Verdict:
    eos = verdict.eos
    if eos is None:
        sentences = [f"No stability verdict: {verdict.reason}."]
        if verdict.plain is not None and finite(verdict.plain.value) is not None:
            sentences.append(f"λmax = {_fmt(verdict.plain.value)}.")
        return Verdict("unknown", verdict.headline, sentences)
    curvature = "preconditioned λmax" if verdict.preconditioned else "λmax"
    t_text = _fmt(finite(eos.constant), 3) if finite(eos.constant) is not None else "T"
    lr, stable_lr = finite(eos.lr), finite(eos.stable_lr)
    margin = (f"η·{curvature}/{t_text} = {eos.ratio:.3f} ({curvature} {_fmt(finite(eos.curvature_value))} against "
              f"the threshold {t_text}/η = {_fmt(finite(eos.threshold))} at η = {_fmt(lr)}).")
    if eos.status == "stable":
        times = stable_lr / lr if lr and stable_lr else None
        return Verdict("stable", verdict.headline, [margin, f"Learning rates up to {_fmt(stable_lr, 3)} would be stable "
                                                            f"for this curvature ({_fmt(times, 3)}× the current one)."])
    safe = finite(verdict.safe_lr)
    return Verdict(eos.status, verdict.headline, [
        margin, verdict.words.expectation, f"lr ≤ {_fmt(safe, 3)} (κ = {verdict.kappa}) would be stable."])


def _run_sentence(run: RunLog) -> str:
    s = run.summary
    steps = s.steps_completed
    if run.diverged:
        at = run.diverged_at
        last = [r.loss for r in run.records if r.diverged]
        why = "the loss became non-finite" if last and last[0] is None else "the loss exploded"
        text = f"{run.name}: diverged at step {_fmt(at)} ({why}); best loss {_fmt(finite(s.best_loss))}."
    elif s.interrupted:
        text = f"{run.name}: interrupted after {_fmt(steps)} steps; last loss {_fmt(finite(s.final_loss))}."
    else:
        text = (f"{run.name}: completed {_fmt(steps)} steps; final loss {_fmt(finite(s.final_loss))} "
                f"(from {_fmt(finite(s.initial_loss))}, best {_fmt(finite(s.best_loss))}).")
    throttle = finite(s.mean_throttle)
    if throttle is not None and abs(throttle - 1.0) > 1e-9:
        text += f" Mean learning-rate factor {_fmt(throttle, 3)}."
    steps, ratios = run.series("eos_ratio")
    if ratios:
        peak = max(ratios)
        text += " " + peak_ratio_words(peak, steps[ratios.index(peak)], run.diverged)
    return text


def runs_verdict(runs: Sequence[RunLog]) -> Verdict:
    """What happened to each run, and which of a comparison did best."""
    sentences = [_run_sentence(run) for run in runs]
    diverged = [r.name for r in runs if r.diverged]
    if len(runs) == 1:
        run = runs[0]
        if run.diverged:
            return Verdict("diverged", f"DIVERGED AT STEP {_fmt(run.diverged_at)}", sentences)
        if run.summary.interrupted:
            return Verdict("unknown", "INTERRUPTED", sentences)
        return Verdict("completed", "COMPLETED WITHOUT DIVERGING", sentences)
    finished = [(r.summary.final_loss, r.name) for r in runs
                if not r.diverged and finite(r.summary.final_loss) is not None]
    if finished:
        best_loss, best = min(finished)
        baseline = next((r for r in runs if r.name in ("baseline", "none")), None)
        summary = f"Lowest final loss: {best} ({_fmt(best_loss)})"
        if baseline is not None and baseline.name != best and finite(baseline.summary.final_loss):
            summary += f", {best_loss / baseline.summary.final_loss:.3g}× the baseline's"
        sentences.insert(0, summary + ".")
    if not diverged:
        return Verdict("completed", f"ALL {len(runs)} RUNS COMPLETED", sentences)
    if len(diverged) == len(runs):
        return Verdict("diverged", f"ALL {len(runs)} RUNS DIVERGED", sentences)
    return Verdict("mixed", f"{len(diverged)} OF {len(runs)} RUNS DIVERGED ({', '.join(diverged)})", sentences)


def verdict_for(source: PlotSource) -> Verdict:
    return runs_verdict(source.runs) if source.kind == "runs" else report_verdict(source.report)


# --------------------------------------------------------------------------------- tables
def _table(headings: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headings)
    head = f"<thead><tr>{head}</tr></thead>" if any(headings) else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c) if not isinstance(c, str) else c)}</td>" for c in row)
                   + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}{head}<tbody>{body}</tbody></table>"


def _context_rows(report: ProbeReport) -> List[Tuple[str, Any]]:
    optimizer, operator = report.optimizer, report.operator
    opt = ", ".join(f"{k} {_fmt(getattr(optimizer, k))}" for k in ("name", "family", "lr", "momentum", "betas", "source")
                    if getattr(optimizer, k) is not None)
    op = ", ".join(f"{k} {_fmt(getattr(operator, k))}" for k in ("hvp_method", "fallback", "mode", "batches", "samples",
                                                                 "device", "dtype", "hvps") if getattr(operator, k) is not None)
    return [("checkpoint", report.checkpoint or "none (recipe initialisation)"), ("step", report.step),
            ("recipe", report.recipe), ("parameters", report.model.parameters), ("loss", report.loss),
            ("gradient norm ‖g‖", report.grad_norm), ("optimizer", opt or "—"), ("curvature operator", op or "—"),
            ("curvdiag version", report.curvdiag_version)]


def _cost_table(report: ProbeReport) -> str:
    """What each probe was allowed and spent, in gradient-equivalents, and why it stopped."""
    budget = report.budget
    if budget is None:
        return ""
    rows = [[c.name, c.planned, c.spent, c.seconds, c.stop,
             "" if c.precision_reached is None else
             f"{c.precision_name or 'precision'} {_fmt(c.precision_reached, 2)} "
             f"{'>' if c.missed_target else '≤'} target {_fmt(c.precision_target, 2)}"] for c in budget.probes]
    rows.append(["total", budget.total, budget.spent, budget.seconds, "", ""])
    return _table(["probe", "GE planned", "GE spent", "seconds", "stopped", "precision reached"], rows,
                  f"cost in gradient-equivalents (1 GE = one forward + backward over the data = "
                  f"{_fmt(budget.gradient_seconds, 2)} s here; one HVP = {_fmt(budget.hvp_cost, 2)} GE)")


def _sharpness_summary(e: entries.LambdaMax) -> str:
    text = f"{_fmt(e.value)} ({e.method}, {_fmt(e.hvps)} HVPs, {'converged' if e.converged else 'NOT converged'})"
    if e.lambda_min is not None:
        text += f"; λmin {_fmt(e.lambda_min)}"
    elif e.lambda_min_estimate is not None:
        text += f"; λmin ≈ {_fmt(e.lambda_min_estimate)} (not converged)"
    return text


# One line per probe entry in the "probes" table, by the entry's record.
PROBE_SUMMARIES = {
    entries.LambdaMax: _sharpness_summary,
    entries.EdgeOfStability: lambda e: (f"{e.status}: ratio {_fmt(e.ratio)}, threshold {_fmt(e.threshold)}, "
                                        f"stable lr ≤ {_fmt(e.stable_lr)} ({e.optimizer}, lr {_fmt(e.lr)})"),
    entries.HessianTrace: lambda e: f"{_fmt(e.value)} ± {_fmt(e.stderr, 2)} ({e.estimator}, {_fmt(e.samples)} samples)",
    entries.HessianDiag: lambda e: (f"trace {_fmt(e.trace)} ± {_fmt(e.trace_stderr, 2)} ({_fmt(e.samples)} samples); "
                                    "per layer below"),
    entries.HesScaleDiag: lambda e: "per layer below",
    entries.DirectionalCurvature: lambda e: f"C_t {_fmt(e.value)}, Rayleigh {_fmt(e.rayleigh)} ({e.source})",
    entries.Glass: lambda e: f"ρ {_fmt(e.rho)}, h {_fmt(e.h)} (λ = {_fmt(e.lam)}, {_fmt(e.samples)} samples)",
    entries.PowerLaw: lambda e: f"p {_fmt(e.p)} ± {_fmt(e.p_stderr, 2)} (λ = {_fmt(e.lam)})",
    entries.SpectralDensity: lambda e: (f"support [{_fmt(e.lambda_min)}, {_fmt(e.lambda_max)}], tr ≈ "
                                        f"{_fmt(e.trace_estimate)} ({_fmt(e.probes)} probes × {_fmt(e.steps)} steps, "
                                        f"{_fmt(e.hvps)} HVPs)"),
    Skipped: lambda e: f"skipped: {e.reason}",
}


def _layer_cells(report: ProbeReport) -> Dict[str, List[Tuple[str, Optional[float], Optional[float]]]]:
    """heading → [(layer name, value, its standard error)] for the probes that ran."""
    lam = report.entry("lambda_max", entries.LambdaMax)
    diag = report.entry("hessian_diag", entries.HessianDiag)
    hesscale = report.entry("hesscale_diag", entries.HesScaleDiag)
    directional = report.entry("directional_curvature", entries.DirectionalCurvature)
    glass = report.entry("glass", entries.Glass)
    power = report.entry("power_law", entries.PowerLaw)
    columns = {
        "diag H mean (Hutchinson)": [(l.name, l.mean, l.stderr) for l in diag.layers] if diag else [],
        "diag H mean (HesScale)": [(l.name, l.mean, None) for l in hesscale.layers] if hesscale else [],
        "share of top eigenvector": [(l.name, l.share, None) for l in lam.top_eigenvector_layers or []] if lam else [],
        "C_t": [(l.name, l.value, None) for l in directional.layers] if directional else [],
        "local h": [(l.name, l.h, None) for l in glass.layers] if glass else [],
        "glass ρ": [(l.name, l.rho, None) for l in glass.layers] if glass else [],
        "p": [(l.name, l.p, None) for l in power.layers] if power else [],
    }
    return {heading: cells for heading, cells in columns.items() if cells}


def _cell_text(heading: str, value: Optional[float], stderr: Optional[float]) -> str:
    value, stderr = finite(value), finite(stderr)
    if value is not None and heading == "share of top eigenvector":
        return f"{100 * value:.0f}%"
    if value is not None and stderr is not None:
        return f"{_fmt(value, 3)} ± {_fmt(stderr, 2)}"
    return _fmt(value, 3)


def _layer_table(report: ProbeReport) -> str:
    columns = _layer_cells(report)
    if not columns:
        return ""
    values: Dict[str, Dict[str, str]] = {}
    for heading, cells in columns.items():
        for name, value, stderr in cells:
            values.setdefault(name, {})[heading] = _cell_text(heading, value, stderr)
    names = [n for n in report.model.layers if n in values]
    names += [n for n in values if n not in names]
    rows = [[name] + [values[name].get(c, "—") for c in columns] for name in names]
    return _table(["layer"] + list(columns), rows, "per layer (one parameter tensor each)")


def lr_used(run: RunLog, key: str = "lr") -> str:
    """The learning rate a run used, from its log: "0.3", or "0.15 – 0.151" when it moved."""
    rates = run.series(key)[1]
    if not rates:
        return "—"
    low, high = min(rates), max(rates)
    return _fmt(low, 3) if _fmt(low, 3) == _fmt(high, 3) else f"{_fmt(low, 3)} – {_fmt(high, 3)}"


def _runs_table(runs: Sequence[RunLog]) -> str:
    rows = []
    for run in runs:
        s = run.summary
        lam = run.series("lambda_max")[1]
        rows.append([run.name, s.controller, s.steps_completed,
                     "yes, at step " + _fmt(run.diverged_at) if run.diverged else "no",
                     lr_used(run), finite(s.final_loss), finite(s.best_loss), finite(s.initial_loss),
                     finite(s.mean_throttle), max(lam) if lam else None,
                     finite(s.extra_hvps_per_step), finite(s.seconds_per_step)])
    return _table(["run", "controller", "steps", "diverged", "lr in use", "final loss", "best loss", "initial loss",
                   "mean lr factor", "peak λmax", "extra HVPs / step", "s / step"], rows, "runs")


def _setting_text(run: RunLog, key: str, value: Any) -> str:
    if key == "lr" and value is None:  # no --lr: the recipe's (or the checkpoint's) rate, as the log shows it
        return f"{lr_used(run, 'base_lr')} (the optimizer's own; --lr not given)"
    return json.dumps(value) if not isinstance(value, str) else value


def _settings_table(runs: Sequence[RunLog]) -> str:
    settings = runs[0].summary.settings
    if not settings:
        return ""
    rows = [[k, _setting_text(runs[0], k, v)] for k, v in settings.items()]
    return _table(["setting", "value"], rows, f"settings ({runs[0].name})")


# -------------------------------------------------------------------------------- figures
def figure_png_base64(figure: Any, dpi: int = PNG_DPI) -> str:
    buffer = io.BytesIO()
    # No "Software" text chunk: the PNG then names no web address either.
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figures_html(figures: FigureSet, dpi: int) -> str:
    parts = []
    for name, figure in figures.figures.items():
        caption = figures.captions.get(name, name)
        parts.append(f'<figure id="fig-{html.escape(name)}"><img alt="{html.escape(caption)}" '
                     f'src="data:image/png;base64,{figure_png_base64(figure, dpi)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if figures.skipped:
        items = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(r)}</li>" for n, r in figures.skipped.items())
        parts.append(f'<div class="skipped"><h3>Figures not drawn</h3><ul>{items}</ul></div>')
    return "\n".join(parts)


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
main{max-width:1040px;margin:0 auto;padding:24px}
h1{font-size:1.5em;margin:0 0 4px}
.sub{color:#555;margin:0 0 18px}
.verdict{border-left:8px solid #888;background:#fff;padding:12px 18px;margin:0 0 20px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.verdict h2{margin:0 0 6px;font-size:1.3em;letter-spacing:.02em}
.verdict p{margin:4px 0}
.stable,.completed{border-color:#2ca02c}.edge,.mixed{border-color:#ff9f1a}
.unstable,.diverged{border-color:#d62728}.unknown{border-color:#888}
table{border-collapse:collapse;margin:0 0 20px;background:#fff;font-size:.92em;width:100%}
caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
figure{background:#fff;margin:0 0 20px;padding:8px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
figure img{width:100%;height:auto;display:block}
figcaption{color:#444;font-size:.9em;padding-top:4px}
.skipped{background:#fff;padding:8px 16px;margin-bottom:20px;color:#444}
footer{color:#777;font-size:.85em;margin-top:24px}
"""


def render_html(source: PlotSource, figures: FigureSet, dpi: int = PNG_DPI) -> str:
    """The page for ``source`` as a string (see :func:`write_html_report`)."""
    verdict = verdict_for(source)
    sentences = "".join(f"<p>{html.escape(s)}</p>" for s in verdict.sentences)
    if source.kind == "report":
        report = source.report
        tables = (_table(["", ""], [[k, v if isinstance(v, str) else _fmt(v)] for k, v in _context_rows(report)],
                         "context")
                  + _table(["probe", "result"], [[n, PROBE_SUMMARIES[type(e)](e)] for n, e in report.probes.items()],
                           "probes")
                  + _cost_table(report)
                  + _layer_table(report))
        kind = "probe report"
    else:
        tables = _runs_table(source.runs) + _settings_table(source.runs)
        kind = "training run" if len(source.runs) == 1 else "training comparison"
    title = html.escape(source.title)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>curvdiag · {title}</title>
<style>{STYLE}</style></head>
<body><main>
<h1>curvdiag {html.escape(kind)}</h1>
<p class="sub">{title}</p>
<section class="verdict {html.escape(verdict.status)}"><h2>{html.escape(verdict.headline)}</h2>{sentences}</section>
{tables}
{_figures_html(figures, dpi)}
<footer>Written by curvdiag {html.escape(__version__)} from {html.escape(str(source.path))}.</footer>
</main></body></html>
"""


def write_html_report(source: Any, out_path: Any, dpi: int = PNG_DPI) -> Path:
    """Write one self-contained HTML page for a run directory, a ``--compare`` directory or a
    probe report JSON to ``out_path``; return the path.

    Raises:
        BadInput: the source is neither a run directory nor a report, or the page cannot be written.
    """
    loaded = source if isinstance(source, PlotSource) else load_source(source)
    figures = figures_for(loaded)
    try:
        page = render_html(loaded, figures, dpi=dpi)
    finally:
        for figure in figures.figures.values():
            figure.clf()
    out = Path(out_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"{out}: cannot write the report ({exc.strerror or exc})") from exc
    return out
