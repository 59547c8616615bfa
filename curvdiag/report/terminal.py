"""The terminal report: context, verdict, evidence, cost, per-layer detail (DESIGN §2.3, §2.6).

Reads a typed :class:`~curvdiag.results.probe_results.ProbeReport` and its
:func:`~curvdiag.report.verdict.probe_verdict`; never recomputes a number. It reads at the
console's width (80 columns included): lines break between their " · " parts, and the
per-layer columns that do not fit beside each other go into a second (third …) table, so a
number is never cut ("…") and a row is one line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from curvdiag.report.verdict import ProbeVerdict, probe_verdict
from curvdiag.results import probe_results as entry
from curvdiag.results.probe_results import BudgetSummary, ProbeReport, Skipped

STATUS_STYLE = {"stable": "bold green", "edge": "bold yellow", "unstable": "bold red"}
CROWDED = 0.05  # next Ritz value within 5% of λmax: the top direction may switch
INDENT = " " * 13
SEPARATOR = " · "
# Per-layer shares S_l / tr H are shown only when 2·s.e.(tr H) ≤ SHARE_PRECISION·|tr H|. The
# denominator's 2-s.e. error alone scales every share by a factor in [1/(1 + 2r), 1/(1 − 2r)],
# r = s.e./|tr H|: at 2r = 0.2 that is −17% … +25% (a 40% share reads as 33–50%); beyond it the
# shares' first digit is noise, and from 2r ≥ 1 even their sign (a GPT-2 gave −7% and −0%).
SHARE_PRECISION = 0.2


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


def fill(parts: Sequence[str], width: int, indent: str = "") -> List[str]:
    """``parts`` joined by " · " into lines of at most ``width`` characters, broken between
    parts (the lines after the first start with ``indent``); a part longer than a line is
    left for the console to wrap at its spaces."""
    lines: List[str] = []
    line = ""
    for part in parts:
        if not line:
            line = (indent if lines else "") + part
        elif len(line) + len(SEPARATOR) + len(part) <= width:
            line += SEPARATOR + part
        else:
            lines.append(line)
            line = indent + part
    return lines + ([line] if line else [])


def _context_lines(r: ProbeReport, width: int) -> List[str]:
    where = Path(r.checkpoint).name if r.checkpoint else "weights from model() (no checkpoint)"
    if r.step is not None:
        where += f" (step {r.step})"
    op = r.operator
    batches = f"{op.batches} batch{'es' if op.batches != 1 else ''}"
    lines = fill([where, f"recipe {r.recipe}", f"{r.model.parameters:,} parameters", f"{op.mode} mode",
                  f"{op.device} {op.dtype}"], width, "  ")
    lines += fill([f"data: {batches}, {op.samples:,} samples", f"loss {_g(r.loss)}", f"‖g‖ {_g(r.grad_norm, 3)}",
                   _optimizer_line(r.optimizer)], width, "  ")
    lines.append(f"Hessian-vector products: {op.description}")
    if op.fallback_reason:
        lines.append(f"  (fallback because: {op.fallback_reason})")
    if r.optimizer.note:
        lines.append(f"note: {r.optimizer.note}")
    return lines


def _eigen_details(lam: entry.LambdaMax) -> List[str]:
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
    return extra


def _verdict(verdict: ProbeVerdict, width: int) -> List[Text]:
    """The status word and η·curvature/T on the first line; the evidence under it."""
    lam, curvature = verdict.plain, verdict.curvature
    if lam is None:
        return []
    label = "λmax(P⁻¹ᐟ²HP⁻¹ᐟ²)" if verdict.preconditioned else "λmax"
    evidence = (f"{label} {_g(curvature.value, 5)} ({curvature.method}, {curvature.hvps} HVPs, "
                f"{curvature.seconds:.2g} s{'' if curvature.converged else ', NOT converged to --tol'})")
    eos = verdict.eos
    out = []
    if eos is not None:
        word = f"{verdict.words.word}  "
        first = fill([f"η·{label} / {eos.constant:.3g} = {eos.ratio:.3g}", f"stable lr ≤ {_g(eos.stable_lr, 3)}"],
                     width - len(word), INDENT)
        line = Text()
        line.append(word, style=STATUS_STYLE[eos.status])
        line.append(first[0])
        out = [line] + [Text(rest) for rest in first[1:]]
        parts = [evidence]
    else:
        parts = [evidence, f"(no verdict: {verdict.reason})"]
    if verdict.preconditioned:
        parts.append(f"plain λmax {_g(lam.value, 5)} ({lam.hvps} HVPs)")
    parts += _eigen_details(lam)
    # Under the status word when there is one; from the margin when the evidence opens the block.
    lines = fill(parts, width - len(INDENT))
    out += [Text((INDENT if eos is not None or k else "") + line) for k, line in enumerate(lines)]
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


def share_caution(diag: entry.HessianDiag) -> Optional[str]:
    """Why the per-layer shares of tr H are not shown (:data:`SHARE_PRECISION`), or None when
    the trace of the same probes is precise enough for them."""
    trace, stderr = diag.trace, diag.trace_stderr
    if not (math.isfinite(trace) and math.isfinite(stderr)) or trace == 0:
        return f"share of tr H per layer not shown: tr H = {_g(trace)} ± {_g(stderr, 2)} gives no share"
    relative = stderr / abs(trace)
    if 2 * relative <= SHARE_PRECISION:
        return None
    return (f"share of tr H per layer not shown: tr H = {_g(trace)} ± {_g(stderr, 2)} from the diagonal's "
            f"{diag.samples} probes (s.e. {100 * relative:.0f}% of |tr H|; shares need ≤ "
            f"{100 * SHARE_PRECISION / 2:.0f}%: more --samples)")


def _layer_columns(r: ProbeReport) -> List[Tuple[str, Callable[[str], str]]]:
    """(heading, cell of a layer name) for whichever probes ran; a layer without a value is "–"."""
    diag = r.entry("hessian_diag", entry.HessianDiag)
    lam = r.entry("lambda_max", entry.LambdaMax)
    means = _by_name(diag)
    hesscale = _by_name(r.entry("hesscale_diag", entry.HesScaleDiag))
    shares = {s.name: s.share for s in (lam.top_eigenvector_layers or [])} if lam else {}
    glass = _by_name(r.entry("glass", entry.Glass))
    power = _by_name(r.entry("power_law", entry.PowerLaw))
    directional = _by_name(r.entry("directional_curvature", entry.DirectionalCurvature))
    def cell(found: Dict[str, object], show: Callable[[object], str]) -> Callable[[str], str]:
        return lambda n: show(found[n]) if n in found else "–"

    columns = []
    if means:
        columns.append(("diag H ± s.e.", cell(means, lambda l: f"{l.mean:.3g} ± {l.stderr:.2g}")))
        if share_caution(diag) is None:
            columns.append(("share of tr H", cell(means, lambda l: f"{100 * l.sum / diag.trace:.0f}%")))
    if hesscale:
        columns.append(("HesScale", cell(hesscale, lambda l: f"{l.mean:.3g}{' (exact)' if l.exact else ''}")))
    if shares:
        columns.append(("top eigvec", lambda n: f"{100 * shares.get(n, 0.0):.0f}%"))
    if glass:
        columns.append(("local h", cell(glass, lambda l: f"{l.h:.3g}")))
        columns.append(("glass ρ", cell(glass, lambda l: f"{l.rho:.3g}")))
    if power:
        columns.append(("p", cell(power, lambda l: "–" if not math.isfinite(l.p)
                                  else f"{l.p:.2f} {p_interpretation(l.p)}")))
    if directional:
        columns.append(("C_t", cell(directional, lambda l: f"{l.value:.3g}")))
    return columns


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False)


def _fits(console: Console, table: Table) -> bool:
    """Whether ``table`` fits the console's width with every cell whole (measured unclamped:
    a measurement within the console's width is clamped to it)."""
    return console.measure(table, options=console.options.update_width(10 * console.width + 1000)).maximum \
        <= console.width


def _layer_tables(r: ProbeReport, console: Console) -> List[Table]:
    """One row per parameter tensor, columns for whichever probes ran, as many columns to a
    table as fit the console's width: the rest go to the next table, led by the layer again."""
    columns = _layer_columns(r)
    if not columns:
        return []
    groups: List[List[Tuple[str, Callable[[str], str]]]] = [[]]
    for column in columns:
        if groups[-1] and not _fits(console, _filled(r, groups[-1] + [column], "per layer")):
            groups.append([])
        groups[-1].append(column)
    return [_filled(r, group, "per layer" + (f" ({k + 1} of {len(groups)})" if len(groups) > 1 else ""))
            for k, group in enumerate(groups)]


def _filled(r: ProbeReport, columns: Sequence[Tuple[str, Callable[[str], str]]], title: str) -> Table:
    table = _table(title)
    table.add_column("layer", overflow="fold")  # a name longer than the screen folds, never "…"
    for heading, _ in columns:
        table.add_column(heading, justify="right", no_wrap=True, overflow="fold")
    for name in r.model.layers:
        table.add_row(Text(name), *[cell(name) for _, cell in columns])  # a layer name is text, never markup
    return table


def _precision(cost: entry.ProbeCost, named: bool) -> str:
    """``reached ≤ target`` (met) or ``reached > target`` (missed), named when ``named``."""
    if cost.precision_target is None and cost.precision_reached is None:
        return ""
    text = f"{_g(cost.precision_reached, 2)} {'>' if cost.missed_target else '≤'} {_g(cost.precision_target, 2)}"
    return f"{cost.precision_name} {text}" if named and cost.precision_name else text


def _seconds(x: float) -> str:
    return f"{x:.2g}" if x < 10 else f"{x:.0f}"


def _cost_table(budget: BudgetSummary, named: bool) -> Table:
    table = _table(f"cost in GE (gradient-equivalents: 1 GE = a forward + backward over the data = "
                   f"{_g(budget.gradient_seconds, 2)} s here; 1 HVP = {_g(budget.hvp_cost, 2)} GE)")
    for heading in ("probe", "GE planned\n→ spent", "s", "stopped", "precision\nvs target"):
        table.add_column(heading, justify="left" if heading in ("probe", "stopped") else "right", no_wrap=True,
                         overflow="fold")
    for cost in budget.probes:
        table.add_row(Text(cost.name), f"{_g(cost.planned, 3)} → {_g(cost.spent, 3)}", _seconds(cost.seconds),
                      cost.stop, Text(_precision(cost, named), style="yellow" if cost.missed_target else ""))
    table.add_section()
    table.add_row("total", f"{_g(budget.total, 3)} → {_g(budget.spent, 3)}", _seconds(budget.seconds), "", "")
    return table


def _cost(budget: BudgetSummary, console: Console) -> Tuple[Table, List[str]]:
    """The cost table: each precision named in its cell when that fits the width, else named
    once per probe under the table."""
    table = _cost_table(budget, named=True)
    if _fits(console, table):
        return table, []
    notes = [f"{c.name}: precision = {c.precision_name}" for c in budget.probes if c.precision_name]
    return _cost_table(budget, named=False), notes


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
    """Print the report: context, verdict (and what qualifies it), evidence, cost, per layer."""
    width = console.width
    for line in _context_lines(r, width):
        console.print(line, highlight=False, markup=False)
    console.print()
    verdict = probe_verdict(r)
    if verdict.interrupted:
        console.print("INTERRUPTED  " + verdict.cautions[0], style="bold yellow", highlight=False, markup=False)
    for line in _verdict(verdict, width):
        console.print(line, highlight=False)
    for caution in verdict.cautions[1 if verdict.interrupted else 0:]:
        console.print("precision: " + caution, style="yellow", highlight=False, markup=False)
    trace = r.entry("hessian_trace", entry.HessianTrace)
    if trace:
        console.print(f"tr H = {_g(trace.value)} ± {_g(trace.stderr, 2)} (s.e., {trace.samples} probes, "
                      f"{trace.estimator})", highlight=False, markup=False)
    for line in _seed_probe_lines(r):
        console.print(line, highlight=False, markup=False)
    for name, found in r.probes.items():
        if isinstance(found, Skipped) and name != "eos":
            console.print(f"{name}: skipped — {found.reason}", style="dim", highlight=False, markup=False)
    if r.budget is not None:
        table, notes = _cost(r.budget, console)
        console.print()
        console.print(table)
        for note in notes:
            console.print(note, style="dim", highlight=False, markup=False)
    tables = _layer_tables(r, console)
    diag = r.entry("hessian_diag", entry.HessianDiag)
    caution = share_caution(diag) if diag and tables else None
    for table in tables:
        console.print()
        console.print(table)
    if caution:
        console.print(caution, style="dim", highlight=False, markup=False)
