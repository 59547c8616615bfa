"""The terminal report: context, verdict, evidence, per-layer detail (DESIGN §2.3).

Reads a :class:`~curvdiag.probes.runner.ProbeReport` and never recomputes a number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table
from rich.text import Text

from curvdiag.probes.runner import ProbeReport

STATUS_STYLE = {"stable": ("STABLE", "bold green"), "edge": ("AT THE EDGE", "bold yellow"),
                "unstable": ("UNSTABLE", "bold red")}
SAFETY = 0.95  # κ in the advice line: a learning rate with a 5% margin below the threshold
CROWDED = 0.05  # next Ritz value within 5% of λmax: the top direction may switch


def _g(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def _context_lines(r: ProbeReport) -> List[str]:
    where = Path(r.checkpoint).name if r.checkpoint else "weights from model() (no checkpoint)"
    if r.step is not None:
        where += f" (step {r.step})"
    op = r.operator
    batches = f"{op['batches']} batch{'es' if op['batches'] != 1 else ''}"
    opt = r.optimizer
    if opt["family"]:
        optimizer = f"optimizer from {opt['source']}: {opt['name'] or opt['family']}"
        if opt["family"] in ("momentum", "nesterov"):
            optimizer += f" ({opt['family']} {opt['momentum']:g})"
        if opt["betas"]:
            optimizer += f" (β1 {opt['betas'][0]:g})"
        optimizer += f", lr {_g(opt['lr'])}"
    else:
        optimizer = "optimizer unknown"
    lines = [
        f"{where} · recipe {r.recipe} · {r.parameters:,} parameters · {op['mode']} mode · {op['device']} {op['dtype']}",
        f"data: {batches}, {op['samples']:,} samples · loss {_g(r.loss)} · ‖g‖ {_g(r.grad_norm, 3)} · {optimizer}",
        f"Hessian-vector products: {op['description']}",
    ]
    if op.get("fallback_reason"):
        lines.append(f"  (fallback because: {op['fallback_reason']})")
    if opt.get("note"):
        lines.append(f"note: {opt['note']}")
    return lines


def _verdict(r: ProbeReport) -> List[Text]:
    probes = r.probes
    lam = probes.get("lambda_max")
    if lam is None:
        return []
    out: List[Text] = []
    eos = probes.get("eos", {})
    pre = probes.get("preconditioned_lambda_max", {})
    curvature = pre if "value" in pre else lam
    label = "λmax(P⁻¹ᐟ²HP⁻¹ᐟ²)" if curvature is pre else "λmax"
    evidence = (f"{label} {_g(curvature['value'], 5)} ({curvature['method']}, {curvature['hvps']} HVPs, "
                f"{curvature['seconds']:.2g} s{'' if curvature['converged'] else ', NOT converged to --tol'})")
    if "status" in eos:
        word, style = STATUS_STYLE[eos["status"]]
        line = Text()
        line.append(f"{word}  ", style=style)
        line.append(f"η·curvature / {eos['constant']:.3g} = {eos['ratio']:.3g}   {evidence}   "
                    f"stable lr ≤ {_g(eos['stable_lr'], 3)}")
        out.append(line)
    else:
        out.append(Text(f"{evidence}   (no verdict: {eos.get('skipped', 'no optimizer information')})"))
    if curvature is pre:
        out.append(Text(f"             plain λmax {_g(lam['value'], 5)} ({lam['hvps']} HVPs)"))
    extra = []
    if lam.get("lambda_min") is not None:
        extra.append(f"λmin {_g(lam['lambda_min'])}")
    elif lam.get("lambda_min_estimate") is not None:
        extra.append(f"λmin ≲ {_g(lam['lambda_min_estimate'])} (not converged)")
    others = lam["eigenvalues"][1:] + lam.get("next_ritz_values", [])[:2]
    if others:
        crowded = (lam["value"] - others[0]) <= CROWDED * abs(lam["value"])
        extra.append("next eigenvalues " + ", ".join(_g(x) for x in others[:3])
                     + (" (crowded: the top direction may switch)" if crowded else ""))
    shares = lam.get("top_eigenvector_layers")
    if shares:
        extra.append(f"top direction mostly in {shares[0]['name']} ({100 * shares[0]['share']:.0f}%)")
    if extra:
        out.append(Text("             " + " · ".join(extra)))
    if "status" in eos:
        safe = SAFETY * eos["stable_lr"]
        advice = {
            "stable": f"Room to spare: the learning rate could grow to about {_g(safe, 3)} (κ = {SAFETY}) before the edge.",
            "edge": (f"Expect the loss to oscillate along the top eigenvector (edge of stability: often harmless); "
                     f"lr ≤ {_g(safe, 3)} (κ = {SAFETY}) would be stable."),
            "unstable": (f"Unstable: expect oscillation or divergence along the top eigenvector; "
                         f"lr ≤ {_g(safe, 3)} (κ = {SAFETY}) would be stable."),
        }[eos["status"]]
        out.append(Text(advice, style="italic"))
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


def _by_name(entry: Optional[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {layer["name"]: layer for layer in (entry or {}).get("layers", [])}


def _layer_table(r: ProbeReport) -> Optional[Table]:
    """One row per parameter tensor; columns for whichever probes ran."""
    probes = r.probes
    diag = _by_name(probes.get("hessian_diag"))
    trace = probes.get("hessian_diag", {}).get("trace")
    shares = {s["name"]: s["share"] for s in probes.get("lambda_max", {}).get("top_eigenvector_layers", [])}
    glass = _by_name(probes.get("glass"))
    power = _by_name(probes.get("power_law"))
    directional = _by_name(probes.get("directional_curvature"))
    columns = []
    if diag:
        columns.append(("diag H mean ± s.e.", lambda n: f"{diag[n]['mean']:.3g} ± {diag[n]['stderr']:.2g}"))
        if trace:
            columns.append(("share of tr H", lambda n: f"{100 * diag[n]['sum'] / trace:.0f}%"))
    hesscale = _by_name(probes.get("hesscale_diag"))
    if hesscale:
        columns.append(("HesScale mean", lambda n: f"{hesscale[n]['mean']:.3g}{' (exact)' if hesscale[n]['exact'] else ''}"))
    if shares:
        columns.append(("top eigvec", lambda n: f"{100 * shares.get(n, 0.0):.0f}%"))
    if glass:
        columns.append(("local h", lambda n: f"{glass[n]['h']:.3g}"))
        columns.append(("glass ρ", lambda n: f"{glass[n]['rho']:.3g}"))
    if power:
        columns.append(("p", lambda n: "–" if power[n]["p"] is None or not math.isfinite(power[n]["p"])
                        else f"{power[n]['p']:.2f} {p_interpretation(power[n]['p'])}"))
    if directional:
        columns.append(("C_t", lambda n: f"{directional[n]['value']:.3g}"))
    if not columns:
        return None
    table = Table(title="per layer", title_justify="left", header_style="bold")
    table.add_column("layer", no_wrap=True)
    for title, _ in columns:
        table.add_column(title, justify="right")
    for name in r.layers:
        table.add_row(name, *[cell(name) for _, cell in columns])
    return table


def _seed_probe_lines(r: ProbeReport) -> List[str]:
    lines = []
    d = r.probes.get("directional_curvature")
    if d and "value" in d:
        layers = sorted(d["layers"], key=lambda l: -l["value"])
        lines.append(f"last step ran into curvature C_t = {_g(d['value'])} (Rayleigh {_g(d['rayleigh'])}"
                     f"{', negative: along negative curvature' if d['rayleigh'] < 0 else ''}; ‖Δθ‖ {_g(d['step_norm'], 3)}; "
                     f"sharpest in {layers[0]['name']}) — {d['source']}")
    p = r.probes.get("power_law")
    if p and "p" in p:
        glassy = [l["name"] for l in p["layers"] if math.isfinite(l["p"] if l["p"] is not None else float("nan"))
                  and p_interpretation(l["p"]) != "smooth"]
        lines.append(f"power-law exponent p = {_g(p['p'], 3)} at λ = {p['lambda']:g} ({p_interpretation(p['p'])}; "
                     + (f"glassy layers: {', '.join(glassy)}" if glassy else "every layer smooth, Hessian-dominated")
                     + f"; {p['samples']} samples)")
    g = r.probes.get("glass")
    if g and "rho" in g:
        lines.append(f"glass density ρ = {_g(g['rho'], 3)}, locally averaged diag H mean {_g(g['h'], 3)} "
                     f"(λ = {g['lambda']:g}, {g['samples']} samples, {g['gradients']} gradients, no double backward)")
    return lines


def render(r: ProbeReport, console: Console) -> None:
    """Print the report: context, verdict, evidence, per-layer detail."""
    for line in _context_lines(r):
        console.print(line, highlight=False, markup=False)
    console.print()
    for line in _verdict(r):
        console.print(line, highlight=False)
    trace = r.probes.get("hessian_trace")
    if trace:
        console.print(f"tr H = {_g(trace['value'])} ± {_g(trace['stderr'], 2)} (s.e., {trace['samples']} probes, "
                      f"{trace['estimator']})", highlight=False, markup=False)
    for line in _seed_probe_lines(r):
        console.print(line, highlight=False, markup=False)
    for name, entry in r.probes.items():
        if "skipped" in entry and name != "eos":
            console.print(f"{name}: skipped — {entry['skipped']}", style="dim", highlight=False, markup=False)
    table = _layer_table(r)
    if table is not None:
        console.print()
        console.print(table)
