"""One self-contained HTML page for a run directory or a probe report: the verdict in words,
the context and per-layer tables, and every figure of :mod:`curvdiag.plots.figures` embedded as a
base64 PNG. It opens offline: no scripts, fonts, style sheets or images are fetched, and the
page holds no http(s) address.

The page reads the JSON and the logs and never recomputes a probe (STYLE habit 2); the
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
from curvdiag.plots.figures import FigureSet, PlotSource, RunLog, figures_for, load_source

PNG_DPI = 110
# Per-layer columns: (probe, key in its layer entry, heading).
LAYER_COLUMNS = (
    ("hessian_diag", "mean", "diag H mean (Hutchinson)"),
    ("hesscale_diag", "mean", "diag H mean (HesScale)"),
    ("lambda_max", "share", "share of top eigenvector"),
    ("directional_curvature", "value", "C_t"),
    ("glass", "h", "local h"),
    ("glass", "rho", "glass ρ"),
    ("power_law", "p", "p"),
)


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


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


# ------------------------------------------------------------------------------- verdicts
def report_verdict(report: Dict[str, Any]) -> Verdict:
    """The edge-of-stability verdict of a probe report, from ``eos`` (DESIGN §2.3, §3.1)."""
    probes = report.get("probes") or {}
    eos = probes.get("eos")
    if not isinstance(eos, dict) or "skipped" in eos or _number(eos.get("ratio")) is None:
        reason = eos.get("skipped") if isinstance(eos, dict) and eos.get("skipped") else (
            "the report has no eos entry (run the lambda_max probe)")
        sentences = [f"No stability verdict: {reason}."]
        lam = probes.get("lambda_max")
        if isinstance(lam, dict) and _number(lam.get("value")) is not None:
            sentences.append(f"λmax = {_fmt(lam['value'])}.")
        return Verdict("unknown", "NO VERDICT", sentences)
    ratio = float(eos["ratio"])
    status = eos.get("status", "unknown")
    curvature = "preconditioned λmax" if eos.get("curvature") == "preconditioned_lambda_max" else "λmax"
    constant = _number(eos.get("constant"))
    t_text = _fmt(constant, 3) if constant is not None else "T"
    lr, stable_lr = _number(eos.get("lr")), _number(eos.get("stable_lr"))
    value = _number(eos.get("curvature_value"))
    margin = (f"η·{curvature}/{t_text} = {ratio:.3f} ({curvature} {_fmt(value)} against the threshold "
              f"{t_text}/η = {_fmt(_number(eos.get('threshold')))} at η = {_fmt(lr)}).")
    if status == "stable":
        return Verdict("stable", "STABLE", [margin, f"Learning rates up to {_fmt(stable_lr, 3)} would be stable "
                                                    f"for this curvature ({_fmt(stable_lr / lr if lr and stable_lr else None, 3)}× the current one)."])
    safe = 0.95 * stable_lr if stable_lr is not None else None
    if status == "edge":
        return Verdict("edge", "AT THE EDGE OF STABILITY", [
            margin,
            "Expect the loss to oscillate along the top eigenvector; at the edge, training often "
            "self-stabilises rather than diverging.",
            f"lr ≤ {_fmt(safe, 3)} (κ = 0.95) would be stable."])
    return Verdict("unstable", "UNSTABLE", [
        margin, "Expect oscillation or divergence along the top eigenvector.",
        f"lr ≤ {_fmt(safe, 3)} (κ = 0.95) would be stable."])


def _run_sentence(run: RunLog) -> str:
    s = run.summary
    steps = s.get("steps_completed")
    if run.diverged:
        at = run.diverged_at
        last = [r.get("loss") for r in run.records if r.get("diverged")]
        why = "the loss became non-finite" if last and last[0] is None else "the loss exploded"
        text = f"{run.name}: diverged at step {_fmt(at)} ({why}); best loss {_fmt(_number(s.get('best_loss')))}."
    elif s.get("interrupted"):
        text = f"{run.name}: interrupted after {_fmt(steps)} steps; last loss {_fmt(_number(s.get('final_loss')))}."
    else:
        text = (f"{run.name}: completed {_fmt(steps)} steps; final loss {_fmt(_number(s.get('final_loss')))} "
                f"(from {_fmt(_number(s.get('initial_loss')))}, best {_fmt(_number(s.get('best_loss')))}).")
    throttle = _number(s.get("mean_throttle"))
    if throttle is not None and abs(throttle - 1.0) > 1e-9:
        text += f" Mean learning-rate factor {_fmt(throttle, 3)}."
    ratios = run.series("eos_ratio")[1]
    if ratios:
        text += f" Peak η·λmax/T = {max(ratios):.3f}."
    return text


def runs_verdict(runs: Sequence[RunLog]) -> Verdict:
    """What happened to each run, and which of a comparison did best."""
    sentences = [_run_sentence(run) for run in runs]
    diverged = [r.name for r in runs if r.diverged]
    if len(runs) == 1:
        run = runs[0]
        if run.diverged:
            return Verdict("diverged", f"DIVERGED AT STEP {_fmt(run.diverged_at)}", sentences)
        if run.summary.get("interrupted"):
            return Verdict("unknown", "INTERRUPTED", sentences)
        return Verdict("completed", "COMPLETED WITHOUT DIVERGING", sentences)
    finished = [(float(r.summary["final_loss"]), r.name) for r in runs
                if not r.diverged and _number(r.summary.get("final_loss")) is not None]
    if finished:
        best_loss, best = min(finished)
        baseline = next((r for r in runs if r.name in ("baseline", "none")), None)
        summary = f"Lowest final loss: {best} ({_fmt(best_loss)})"
        if baseline is not None and baseline.name != best and _number(baseline.summary.get("final_loss")):
            summary += f", {best_loss / float(baseline.summary['final_loss']):.3g}× the baseline's"
        sentences.insert(0, summary + ".")
    if not diverged:
        return Verdict("completed", f"ALL {len(runs)} RUNS COMPLETED", sentences)
    if len(diverged) == len(runs):
        return Verdict("diverged", f"ALL {len(runs)} RUNS DIVERGED", sentences)
    return Verdict("mixed", f"{len(diverged)} OF {len(runs)} RUNS DIVERGED ({', '.join(diverged)})", sentences)


def verdict_for(source: PlotSource) -> Verdict:
    return runs_verdict(source.runs) if source.kind == "runs" else report_verdict(source.report or {})


# --------------------------------------------------------------------------------- tables
def _table(headings: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headings)
    head = f"<thead><tr>{head}</tr></thead>" if any(headings) else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c) if not isinstance(c, str) else c)}</td>" for c in row)
                   + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}{head}<tbody>{body}</tbody></table>"


def _context_rows(report: Dict[str, Any]) -> List[Tuple[str, Any]]:
    model, operator, optimizer = report.get("model") or {}, report.get("operator") or {}, report.get("optimizer") or {}
    opt = ", ".join(f"{k} {_fmt(optimizer.get(k))}" for k in ("name", "family", "lr", "momentum", "betas", "source")
                    if optimizer.get(k) is not None)
    op = ", ".join(f"{k} {_fmt(operator.get(k))}" for k in ("hvp_method", "fallback", "mode", "batches", "samples",
                                                            "device", "dtype", "hvps") if operator.get(k) is not None)
    return [("checkpoint", report.get("checkpoint") or "none (recipe initialisation)"), ("step", report.get("step")),
            ("recipe", report.get("recipe")), ("parameters", model.get("parameters")), ("loss", report.get("loss")),
            ("gradient norm ‖g‖", report.get("grad_norm")), ("optimizer", opt or "—"), ("curvature operator", op or "—"),
            ("curvdiag version", report.get("curvdiag_version"))]


def _probe_summary(name: str, entry: Any) -> str:
    if not isinstance(entry, dict):
        return _fmt(entry)
    if "skipped" in entry:
        return f"skipped: {entry['skipped']}"
    g = entry.get
    if name in ("lambda_max", "preconditioned_lambda_max"):
        text = (f"{_fmt(g('value'))} ({g('method')}, {_fmt(g('hvps'))} HVPs, "
                f"{'converged' if g('converged') else 'NOT converged'})")
        if g("lambda_min") is not None:
            text += f"; λmin {_fmt(g('lambda_min'))}"
        elif g("lambda_min_estimate") is not None:
            text += f"; λmin ≈ {_fmt(g('lambda_min_estimate'))} (not converged)"
        return text
    if name == "eos":
        return (f"{g('status')}: ratio {_fmt(g('ratio'))}, threshold {_fmt(g('threshold'))}, "
                f"stable lr ≤ {_fmt(g('stable_lr'))} ({g('optimizer')}, lr {_fmt(g('lr'))})")
    if name == "hessian_trace":
        return f"{_fmt(g('value'))} ± {_fmt(g('stderr'), 2)} ({g('estimator')}, {_fmt(g('samples'))} samples)"
    if name == "hessian_diag":
        return f"trace {_fmt(g('trace'))} ± {_fmt(g('trace_stderr'), 2)} ({_fmt(g('samples'))} samples); per layer below"
    if name == "hesscale_diag":
        return "per layer below"
    if name == "directional_curvature":
        return f"C_t {_fmt(g('value'))}, Rayleigh {_fmt(g('rayleigh'))} ({g('source')})"
    if name == "glass":
        return f"ρ {_fmt(g('rho'))}, h {_fmt(g('h'))} (λ = {_fmt(g('lambda'))}, {_fmt(g('samples'))} samples)"
    if name == "power_law":
        return f"p {_fmt(g('p'))} ± {_fmt(g('p_stderr'), 2)} (λ = {_fmt(g('lambda'))})"
    if name == "spectral_density":
        return (f"support [{_fmt(g('lambda_min'))}, {_fmt(g('lambda_max'))}], tr ≈ {_fmt(g('trace_estimate'))} "
                f"({_fmt(g('probes'))} probes × {_fmt(g('steps'))} steps, {_fmt(g('hvps'))} HVPs)")
    scalars = {k: v for k, v in entry.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return ", ".join(f"{k} {_fmt(v)}" for k, v in list(scalars.items())[:6]) or "—"


def _layer_table(report: Dict[str, Any]) -> str:
    probes = report.get("probes") or {}
    columns, values = [], {}
    for probe, key, heading in LAYER_COLUMNS:
        entry = probes.get(probe)
        if not isinstance(entry, dict) or "skipped" in entry:
            continue
        layers = entry.get("top_eigenvector_layers") if probe == "lambda_max" else entry.get("layers")
        if not layers:
            continue
        columns.append(heading)
        for layer in layers:
            cell = _number(layer.get(key))
            if cell is not None and key == "share":
                text = f"{100 * cell:.0f}%"
            elif key == "mean" and _number(layer.get("stderr")) is not None and cell is not None:
                text = f"{_fmt(cell, 3)} ± {_fmt(float(layer['stderr']), 2)}"
            else:
                text = _fmt(cell, 3)
            values.setdefault(layer.get("name"), {})[heading] = text
    if not columns:
        return ""
    names = [n for n in (report.get("model") or {}).get("layers", []) if n in values]
    names += [n for n in values if n not in names]
    rows = [[str(name)] + [values[name].get(c, "—") for c in columns] for name in names]
    return _table(["layer"] + columns, rows, "per layer (one parameter tensor each)")


def _runs_table(runs: Sequence[RunLog]) -> str:
    rows = []
    for run in runs:
        s = run.summary
        lam = run.series("lambda_max")[1]
        rows.append([run.name, str(s.get("controller", "?")), s.get("steps_completed"),
                     "yes, at step " + _fmt(run.diverged_at) if run.diverged else "no",
                     _number(s.get("final_loss")), _number(s.get("best_loss")), _number(s.get("initial_loss")),
                     _number(s.get("mean_throttle")), max(lam) if lam else None,
                     _number(s.get("extra_hvps_per_step")), _number(s.get("seconds_per_step"))])
    return _table(["run", "controller", "steps", "diverged", "final loss", "best loss", "initial loss",
                   "mean lr factor", "peak λmax", "extra HVPs / step", "s / step"], rows, "runs")


def _settings_table(runs: Sequence[RunLog]) -> str:
    settings = runs[0].summary.get("settings") or {}
    if not settings:
        return ""
    rows = [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in settings.items()]
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
        report = source.report or {}
        probes = report.get("probes") or {}
        tables = (_table(["", ""], [[k, v if isinstance(v, str) else _fmt(v)] for k, v in _context_rows(report)],
                         "context")
                  + _table(["probe", "result"], [[n, _probe_summary(n, e)] for n, e in probes.items()], "probes")
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
