"""curvdiag.probe on real architectures (issue #12, item 5): what the default probe and
``probes="all"`` cost and how accurate they are, per architecture of ``tests/real_models.py``
(ResNet-18, Hugging Face GPT-2 and BERT, the bundled tiny transformer, dropout with tied
weights, BatchNorm in train mode, and a CTC model probed by finite differences; random weights,
nothing downloaded).

Per architecture and probe set, printed as a markdown table and written to
``benchmarks/architectures_results.json``:

- parameters; the budget planned and spent in gradient-equivalents (GE: one forward and
  backward over all the batches), when the report carries one (``report.budget``);
- wall time of the ``curvdiag.probe`` call (one thread by default);
- λmax relative error against scipy ``eigsh`` (which="LA", tol 1e-10) over the same product
  (for the CTC model: over the exact product of the same loss written twice-differentiably);
- the trace's relative standard error reached (``hessian_trace``: stderr/|value|), its samples
  and estimator.

Usage: python benchmarks/bench_architectures.py [--architectures resnet18,gpt2_lm,...]
[--sets default,all] [--threads 1] [--out PATH]. The eigsh reference is computed once per
architecture and is not part of the timed call. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

import curvdiag
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.loading.recipe import leading_dimension
from curvdiag.results.probe_results import HessianTrace, LambdaMax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import real_models  # noqa: E402  (tests/real_models.py: the architectures the tests probe)

BENCHMARKED = {**real_models.ARCHITECTURES, **real_models.FINITE_DIFFERENCE_ARCHITECTURES}
PROBE_SETS = {"default": None, "all": "all"}  # None: curvdiag.probe's own default
REFERENCE_TOL = 1e-10


def eigsh_reference(arch: real_models.Architecture) -> Dict[str, Any]:
    """λmax by eigsh over the operator curvdiag.probe builds for this model (over the exact
    Hessian of ``arch.reference_loss`` where the loss has no double backward), and its cost."""
    sizes = [leading_dimension(b) for b in arch.batches]
    op = CurvatureOperator(arch.model, arch.batches, arch.reference_loss or arch.loss, sizes,
                           train_mode=arch.train_mode)
    n = op.num_params

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x).reshape(-1)).to(dtype=op.dtype)
        return op.hvp(v).detach().double().numpy()

    started = time.perf_counter()
    value = eigsh(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=1, which="LA", tol=REFERENCE_TOL,
                  v0=np.random.default_rng(0).standard_normal(n), return_eigenvectors=False)
    return {"lambda_max": float(value.max()), "hvps": op.hvp_count, "seconds": time.perf_counter() - started}


def probe_row(arch: real_models.Architecture, probes: Optional[str], reference: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = {} if probes is None else {"probes": probes}
    started = time.perf_counter()
    report = curvdiag.probe(arch.model, arch.loss, arch.batches, train_mode=arch.train_mode, **kwargs)
    seconds = time.perf_counter() - started
    lam = report.entry("lambda_max", LambdaMax)
    trace = report.entry("hessian_trace", HessianTrace)
    budget = report.budget
    return {
        "probes": list(report.probes),
        "seconds": seconds,
        "hvps": report.operator.hvps,
        "fallback": report.operator.fallback,
        "finite_difference_error_estimate": report.operator.finite_difference_error_estimate,
        "hvp_method": report.operator.description,
        "budget_total_ge": budget.total if budget else None,
        "budget_spent_ge": budget.spent if budget else None,
        "gradient_seconds": budget.gradient_seconds if budget else None,
        "per_probe": [{"name": c.name, "planned": c.planned, "spent": c.spent, "seconds": c.seconds, "stop": c.stop,
                       "precision_reached": c.precision_reached} for c in budget.probes] if budget else None,
        "lambda_max": lam.value if lam else None,
        "lambda_max_hvps": lam.hvps if lam else None,
        "lambda_max_rel_error": abs(lam.value - reference["lambda_max"]) / abs(reference["lambda_max"]) if lam else None,
        "trace": trace.value if trace else None,
        "trace_rel_stderr": trace.stderr / abs(trace.value) if trace and trace.value else None,
        "trace_samples": trace.samples if trace else None,
        "trace_estimator": trace.estimator if trace else None,
    }


def _cell(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["| architecture | probes | parameters | GE planned / spent | wall s | λmax rel. error vs eigsh "
             "| trace rel. s.e. (samples, estimator) | fallback |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        cost = f"{_cell(r['budget_total_ge'], '.0f')} / {_cell(r['budget_spent_ge'], '.1f')}"
        trace = "—" if r["trace_samples"] is None else \
            f"{_cell(r['trace_rel_stderr'], '.2%')} ({r['trace_samples']}, {r['trace_estimator']})"
        lines.append(f"| {r['architecture']} | {r['set']} | {r['parameters']:,} | {cost} | {r['seconds']:.1f} "
                     f"| {_cell(r['lambda_max_rel_error'], '.1e')} | {trace} | {r['fallback'] or '—'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default=",".join(BENCHMARKED))
    parser.add_argument("--sets", default=",".join(PROBE_SETS), help="probe sets: default (curvdiag.probe's) and/or all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "architectures_results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.architectures.split(",") if n.strip()]
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in BENCHMARKED] + [s for s in sets if s not in PROBE_SETS]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    load_start = os.getloadavg()
    rows = []
    for name in names:
        arch = BENCHMARKED[name]()
        reference = eigsh_reference(arch)
        print(f"{name}: {arch.parameters:,} parameters, eigsh λmax {reference['lambda_max']:.6g} "
              f"({reference['hvps']} products, {reference['seconds']:.1f} s)", file=sys.stderr, flush=True)
        for probe_set in sets:
            row = {"architecture": name, "set": probe_set, "parameters": arch.parameters, "source": arch.source,
                   "reference": reference, **probe_row(arch, PROBE_SETS[probe_set], reference)}
            print(f"  {probe_set}: {row['seconds']:.1f} s", file=sys.stderr, flush=True)
            rows.append(row)
    table = markdown(rows)
    print(table)
    environment = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
                   "cpu_count": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                   "curvdiag": curvdiag.__version__}
    args.out.write_text(json.dumps({"environment": environment, "rows": rows, "table": table}, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
