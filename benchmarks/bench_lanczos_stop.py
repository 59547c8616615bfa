"""Lanczos stop against an oracle: products to reach λmax within tol, per sample model.

    python benchmarks/bench_lanczos_stop.py            # 5 sample checkpoints, 3 seeds, 3 tolerances
    python benchmarks/bench_lanczos_stop.py --quick    # seed 0 only

For every sample checkpoint (float32, the CLI's default, one torch thread) and start seed:
- the reference λmax: scipy ``eigsh`` (ARPACK, tol 1e-10) on the same Hessian-vector product,
  through :class:`curvdiag.curvature.linear_operator`'s interface;
- one long Lanczos run from the seed's start vector (the one ``lambda_max`` uses), recording the
  Ritz values and residuals after each product. The *oracle* is the first product whose top Ritz
  value is within tol·|λ| of the reference: no stopping rule can do better from that start;
- ``lambda_max`` as it runs now (the Kato–Temple estimate on two consecutive products), and the
  rule of main before it (residual ≤ tol·|θ|, at least 8 products, the top Ritz value steady over
  3 steps), replayed on the recorded run (the process is deterministic, so the replay makes the
  same products).
Reported: products and relative error reached, per model, seed and tol. Results go to
``benchmarks/lanczos_stop_results.json`` and a markdown table to ``lanczos_stop_results.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from curvdiag.curvature.linear_operator import random_vector  # noqa: E402
from curvdiag.curvature.operator import CurvatureOperator  # noqa: E402
from curvdiag.loading.target import load_target  # noqa: E402
from curvdiag.probes.eigen import LanczosProcess  # noqa: E402
from curvdiag.probes.sharpness import lambda_max  # noqa: E402

MODELS = [("bn_cnn", "bn_cnn.pt"), ("tiny_transformer", "tiny_transformer.pt"), ("tanh_mlp", "tanh_edge.pt"),
          ("tanh_mlp", "tanh_early.pt"), ("adam_mlp", "adam_mlp.pt")]
TOLS = (1e-2, 1e-3, 1e-4)
TRACE_PRODUCTS = 60

Row = Tuple[List[float], List[float]]  # (ascending Ritz values, their residuals) after a product


def reference(op: CurvatureOperator) -> float:
    from scipy.sparse.linalg import LinearOperator, eigsh

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1)).to(op.dtype)
        return op.hvp(v).double().numpy()

    A = LinearOperator((op.size, op.size), matvec=matvec, dtype=np.float64)
    return float(eigsh(A, k=1, which="LA", tol=1e-10, return_eigenvectors=False)[0])


def record(op: CurvatureOperator, seed: int, products: int) -> List[Row]:
    q = random_vector(op.size, seed, op.device, op.dtype)
    process = LanczosProcess(op, q / q.norm(), products)
    rows: List[Row] = []
    for step in range(products):
        beta = process.step()
        ritz, s = torch.linalg.eigh(process.tridiagonal())
        rows.append((ritz.tolist(), (beta * s[-1, :]).abs().tolist()))
        if step < products - 1:
            process.advance()
    return rows


def oracle(rows: List[Row], lam: float, tol: float) -> Optional[int]:
    return next((k + 1 for k, (ritz, _) in enumerate(rows) if lam - ritz[-1] <= tol * abs(lam)), None)


def main_rule(rows: List[Row], tol: float) -> Tuple[int, float]:
    """The stop of main before this change: residual ≤ tol·|θ|, ≥ 8 products, θ steady over 3 steps."""
    history: List[float] = []
    for k, (ritz, res) in enumerate(rows):
        history.append(ritz[-1])
        window = history[-4:]
        if (res[-1] <= tol * abs(ritz[-1]) and len(window) > 3 and max(window) - min(window) <= tol * abs(ritz[-1])
                and k + 1 >= 8):
            return k + 1, ritz[-1]
    return len(rows), rows[-1][0][-1]


def run(quick: bool) -> Dict[str, Any]:
    torch.set_num_threads(1)
    seeds = [0] if quick else [0, 1, 2]
    out: Dict[str, Any] = {"platform": platform.platform(), "torch": torch.__version__, "threads": 1,
                           "dtype": "float32", "models": []}
    for recipe, checkpoint in MODELS:
        target = load_target(str(ROOT / "sample_models" / f"{recipe}.py"),
                             str(ROOT / "sample_models" / "checkpoints" / checkpoint))
        op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes)
        started = time.perf_counter()
        lam = reference(op)
        entry: Dict[str, Any] = {"model": checkpoint, "parameters": op.num_params, "lambda_max": lam,
                                 "reference_seconds": round(time.perf_counter() - started, 2), "runs": []}
        for seed in seeds:
            rows = record(op, seed, TRACE_PRODUCTS)
            for tol in TOLS:
                result = lambda_max(op, tol=tol, seed=seed)
                before, before_value = main_rule(rows, tol)
                entry["runs"].append({
                    "seed": seed, "tol": tol, "oracle": oracle(rows, lam, tol),
                    "curvdiag": result.hvps, "curvdiag_error": (lam - result.value) / abs(lam),
                    "curvdiag_estimate": result.error_estimates[0] / abs(result.value),
                    "main_rule": before, "main_rule_error": (lam - before_value) / abs(lam),
                })
        out["models"].append(entry)
        print(f"{checkpoint}: λmax {lam:.6g}", flush=True)
    return out


def markdown(results: Dict[str, Any]) -> str:
    lines = ["| model | tol | oracle | curvdiag | − oracle | error reached | main's rule | − oracle | its error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in results["models"]:
        for tol in TOLS:
            runs = [r for r in entry["runs"] if r["tol"] == tol]

            def span(key: str) -> str:
                values = sorted(r[key] for r in runs)
                return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}–{values[-1]}"

            excess = sorted(r["curvdiag"] - r["oracle"] for r in runs)
            before = sorted(r["main_rule"] - r["oracle"] for r in runs)
            lines.append(f"| {entry['model']} | {tol:g} | {span('oracle')} | {span('curvdiag')} | "
                         f"+{excess[0]}..{excess[-1]} | {max(r['curvdiag_error'] for r in runs):.1e} | "
                         f"{span('main_rule')} | +{before[0]}..{before[-1]} | "
                         f"{max(r['main_rule_error'] for r in runs):.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "lanczos_stop_results.json"))
    args = parser.parse_args()
    results = run(args.quick)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    Path(args.out).with_suffix(".md").write_text(
        "# Lanczos stop against the oracle (products to λmax within tol; float32, 1 thread)\n\n"
        "Oracle: the first product whose top Ritz value is within tol of scipy eigsh's λmax, from the\n"
        "same start. Errors are relative, the largest over the seeds (0, 1, 2).\n\n" + table)
    print(table)
