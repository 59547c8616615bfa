"""The terminal report: context, verdict, evidence, per-layer detail (DESIGN §2.3).

Reads a typed :class:`~curvdiag.results.probe_results.ProbeReport` and its
:func:`~curvdiag.report.verdict.probe_verdict`; never recomputes a number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from rich.console import Console
from rich.table import Table
from rich.text import Text

from curvdiag.report.verdict import probe_verdict
from curvdiag.results import probe_results as entry
from curvdiag.results.probe_results import ProbeReport, Skipped

STATUS_STYLE = {"stable": "bold green", "edge": "bold yellow", "unstable": "bold red"}
CROWDED = 0.05  # next Ritz value within 5% of λmax: the top direction may switch
INDENT = " " * 13


def _g(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _optimizer_line(opt: entry.OptimizerSummary) -> str:
    if not opt.family:
        return "optimizer unknown"
    text = f"optimizer from {opt.source}: {opt.name or opt.family}"
    if opt.family in ("momentum", "nesterov"):
        text += f" ({opt.family} {opt.momentum:g})"
    if opt.betas:
        text += f" (β1 {opt.betas[0]:g})"
    return text + f", lr {_g(opt.lr)}"


def _context_lines(r: ProbeReport) -> List[str]:
    where = Path(r.checkpoint).name if r.checkpoint else "weights from model() (no checkpoint)"
    if r.step is not None:
        where += f" (step {r.step})"
    op = r.operator
    batches = f"{op.batches} batch{'es' if op.batches != 1 else ''}"
    lines = [
        f"{where} · recipe {r.recipe} · {r.model.parameters:,} parameters · {op.mode} mode · {op.device} {op.dtype}",
        f"data: {batches}, {op.samples:,} samples · loss {_g(r.loss)} · ‖g‖ {_g(r.grad_norm, 3)} · "
        f"{_optimizer_line(r.optimizer)}",
        f"Hessian-vector products: {op.description}",
    ]
    if op.fallback_reason:
        lines.append(f"  (fallback because: {op.fallback_reason})")
    if r.optimizer.note:
        lines.append(f"note: {r.optimizer.note}")
    return lines


def _eigen_details(lam: entry.LambdaMax) -> Optional[str]:
    """λmin, the next eigenvalues (crowded or not) and where the top direction lives."""
    extra = []
    if lam.lambda_min is not None:
        extra.append(f"λmin {_g(lam.lambda_min)}")
    elif lam.lambda_min_estimate is not None:
        extra.append(f"λmin ≲ {_g(lam.lambda_min_estimate)} (not converged)")
    others = lam.eigenvalues[1:] + lam.next_ritz_values[:2]
    if others:
        crowded = (lam.value - others[0]) <= CROWDED * abs(lam.value)
        extra.append("next eigenvalues " + ", ".join(_g(x) for x in others[:3])
                     + (" (crowded: the top direction may switch)" if crowded else ""))
    if lam.top_eigenvector_layers:
        top = lam.top_eigenvector_layers[0]
        extra.append(f"top direction mostly in {top.name} ({100 * top.share:.0f}%)")
    return INDENT + " · ".join(extra) if extra else None


def _verdict(r: ProbeReport) -> List[Text]:
    verdict = probe_verdict(r)
    lam, curvature = verdict.plain, verdict.curvature
    if lam is None:
        return []
    label = "λmax(P⁻¹ᐟ²HP⁻¹ᐟ²)" if verdict.preconditioned else "λmax"
    evidence = (f"{label} {_g(curvature.value, 5)} ({curvature.method}, {curvature.hvps} HVPs, "
                f"{curvature.seconds:.2g} s{'' if curvature.converged else ', NOT converged to --tol'})")
    eos = verdict.eos
    if eos is not None:
        line = Text()
        line.append(f"{verdict.words.word}  ", style=STATUS_STYLE[eos.status])
        line.append(f"η·curvature / {eos.constant:.3g} = {eos.ratio:.3g}   {evidence}   "
                    f"stable lr ≤ {_g(eos.stable_lr, 3)}")
        out = [line]
    else:
        out = [Text(f"{evidence}   (no verdict: {verdict.reason})")]
    if verdict.preconditioned:
        out.append(Text(f"{INDENT}plain λmax {_g(lam.value, 5)} ({lam.hvps} HVPs)"))
    details = _eigen_details(lam)
    if details:
        out.append(Text(details))
    if eos is not None:
        out.append(Text(verdict.advice(_g(verdict.safe_lr, 3)), style="italic"))
    return out


def p_interpretation(p: Optional[float]) -> str:
    """Seed 004: p ≈ 2 is Hessian-dominated (smooth); well below 2, gradient glass dominates."""
    if p is None or not math.isfinite(p):
        return "–"
    if p >= 1.8:
        return "smooth"
    if p >= 1.3:
        return "partly glassy"
    return "glassy"


def _by_name(found: Optional[object]) -> Dict[str, object]:
    return {layer.name: layer for layer in getattr(found, "layers", None) or []}


def _layer_columns(r: ProbeReport) -> List[Tuple[str, Callable[[str], str]]]:
    """(heading, cell of a layer name) for whichever probes ran."""
    diag = r.entry("hessian_diag", entry.HessianDiag)
    lam = r.entry("lambda_max", entry.LambdaMax)
    means = _by_name(diag)
    hesscale = _by_name(r.entry("hesscale_diag", entry.HesScaleDiag))
    shares = {s.name: s.share for s in (lam.top_eigenvector_layers or [])} if lam else {}
    glass = _by_name(r.entry("glass", entry.Glass))
    power = _by_name(r.entry("power_law", entry.PowerLaw))
    directional = _by_name(r.entry("directional_curvature", entry.DirectionalCurvature))
    columns = []
    if means:
        columns.append(("diag H mean ± s.e.", lambda n: f"{means[n].mean:.3g} ± {means[n].stderr:.2g}"))
        if diag.trace:
            columns.append(("share of tr H", lambda n: f"{100 * means[n].sum / diag.trace:.0f}%"))
    if hesscale:
        columns.append(("HesScale mean", lambda n: f"{hesscale[n].mean:.3g}{' (exact)' if hesscale[n].exact else ''}"))
    if shares:
        columns.append(("top eigvec", lambda n: f"{100 * shares.get(n, 0.0):.0f}%"))
    if glass:
        columns.append(("local h", lambda n: f"{glass[n].h:.3g}"))
        columns.append(("glass ρ", lambda n: f"{glass[n].rho:.3g}"))
    if power:
        columns.append(("p", lambda n: "–" if not math.isfinite(power[n].p)
                        else f"{power[n].p:.2f} {p_interpretation(power[n].p)}"))
    if directional:
        columns.append(("C_t", lambda n: f"{directional[n].value:.3g}"))
    return columns


def _layer_table(r: ProbeReport) -> Optional[Table]:
    """One row per parameter tensor; columns for whichever probes ran."""
    columns = _layer_columns(r)
    if not columns:
        return None
    table = Table(title="per layer", title_justify="left", header_style="bold")
    table.add_column("layer", no_wrap=True)
    for title, _ in columns:
        table.add_column(title, justify="right")
    for name in r.model.layers:
        table.add_row(Text(name), *[cell(name) for _, cell in columns])  # a layer name is text, never markup
    return table


def _glassy(layers: Sequence[entry.PowerLawLayer]) -> List[str]:
    return [l.name for l in layers if math.isfinite(l.p) and p_interpretation(l.p) != "smooth"]


def _seed_probe_lines(r: ProbeReport) -> List[str]:
    lines = []
    d = r.entry("directional_curvature", entry.DirectionalCurvature)
    if d:
        sharpest = max(d.layers, key=lambda l: l.value)
        lines.append(f"last step ran into curvature C_t = {_g(d.value)} (Rayleigh {_g(d.rayleigh)}"
                     f"{', negative: along negative curvature' if d.rayleigh < 0 else ''}; ‖Δθ‖ {_g(d.step_norm, 3)}; "
                     f"sharpest in {sharpest.name}) — {d.source}")
    p = r.entry("power_law", entry.PowerLaw)
    if p:
        glassy = _glassy(p.layers)
        lines.append(f"power-law exponent p = {_g(p.p, 3)} at λ = {p.lam:g} ({p_interpretation(p.p)}; "
                     + (f"glassy layers: {', '.join(glassy)}" if glassy else "every layer smooth, Hessian-dominated")
                     + f"; {p.samples} samples)")
    g = r.entry("glass", entry.Glass)
    if g:
        lines.append(f"glass density ρ = {_g(g.rho, 3)}, locally averaged diag H mean {_g(g.h, 3)} "
                     f"(λ = {g.lam:g}, {g.samples} samples, {g.gradients} gradients, no double backward)")
    return lines


def render(r: ProbeReport, console: Console) -> None:
    """Print the report: context, verdict, evidence, per-layer detail."""
    for line in _context_lines(r):
        console.print(line, highlight=False, markup=False)
    console.print()
    for line in _verdict(r):
        console.print(line, highlight=False)
    trace = r.entry("hessian_trace", entry.HessianTrace)
    if trace:
        console.print(f"tr H = {_g(trace.value)} ± {_g(trace.stderr, 2)} (s.e., {trace.samples} probes, "
                      f"{trace.estimator})", highlight=False, markup=False)
    for line in _seed_probe_lines(r):
        console.print(line, highlight=False, markup=False)
    for name, found in r.probes.items():
        if isinstance(found, Skipped) and name != "eos":
            console.print(f"{name}: skipped — {found.reason}", style="dim", highlight=False, markup=False)
    table = _layer_table(r)
    if table is not None:
        console.print()
        console.print(table)
