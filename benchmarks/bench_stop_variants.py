"""Variants of the Lanczos stop and start, replayed on recorded runs (issue 16 item 1: "≤ oracle + 2").

    python benchmarks/bench_stop_variants.py            # analytic spectra + 5 sample checkpoints (~1 min)
    python benchmarks/bench_stop_variants.py --big      # + the 1.86M-parameter MLP of bench_lambda_peers (~3 min)

One Lanczos run per (operator, seed) records the Ritz values and residuals after every product
(the process is deterministic, so a stop rule replayed on the record makes the same products as if
it had run). The reference λmax: the analytic spectra's own (tests/test_lanczos_stop.py: outliers,
indefinite, a crowded top, a pair at λ2/λ1 = 0.994; float64 and float32), scipy ``eigsh`` on
the checkpoints' product (bench_lanczos_stop.reference). The oracle is the first product within
tol. Each rule is :func:`curvdiag.probes.eigen.ritz_error_estimates` met on ``window``
consecutive products, the estimate asked to min(tol, LOOSEST_STOP), with one change:

- ``gate g``: the Kato–Temple estimate r₁²/(d − r_j) is trusted when the nearest other Ritz value is
  settled to r_j ≤ g·d (g = 1 drops the test). Shipped: 1/4, and 2/3 at tol ≤ 1e-4 (chosen here);
- ``window 1``: stop on the first product whose estimate meets tol;
- ``extrapolated``: min(estimate, Aitken's Δ_j ρ/(1 − ρ)) over the top Ritz value's increments.

With ``--starts`` it also runs ``lambda_max`` from three start vectors on the checkpoints: random
(shipped), the loss gradient, and their normalised sum. Printed: products beyond the oracle
(min..max over seeds) and the worst error reached ÷ tol, per group and tol.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests", ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from curvdiag.curvature.linear_operator import random_vector  # noqa: E402
from curvdiag.curvature.operator import CurvatureOperator  # noqa: E402
from curvdiag.loading.target import load_target  # noqa: E402
from curvdiag.probes.eigen import LOOSEST_STOP, LanczosProcess, lanczos, ritz_error_estimates  # noqa: E402

CHECKPOINTS = [("tanh_mlp", "tanh_edge.pt"), ("tanh_mlp", "tanh_early.pt"), ("bn_cnn", "bn_cnn.pt"),
               ("tiny_transformer", "tiny_transformer.pt"), ("adam_mlp", "adam_mlp.pt")]
TOLS = (1e-2, 1e-3, 1e-4)
Row = Tuple[np.ndarray, np.ndarray]  # ascending Ritz values, their residuals


def record(op, seed: int, products: int) -> List[Row]:
    q = random_vector(op.size, seed, op.device, op.dtype)
    process = LanczosProcess(op, q / q.norm(), products)
    rows = []
    for step in range(products):
        beta = process.step()
        ritz, s = np.linalg.eigh(process.tridiagonal_array())
        rows.append((ritz, np.abs(beta * s[-1, :])))
        if step < products - 1:
            process.advance()
    return rows


def gated(fraction: float) -> Callable[[np.ndarray, np.ndarray, List[float]], float]:
    def estimate(ritz, residuals, history):
        r = residuals[-1]
        if ritz.size < 2:
            return r
        distance = np.abs(ritz - ritz[-1])
        distance[-1] = np.inf
        j = int(distance.argmin())
        gap = distance[j] - residuals[j]
        return r * r / gap if residuals[j] <= fraction * distance[j] and gap > r else r
    return estimate


def shipped(ritz, residuals, history):  # the gate 1/4 (eigen.SETTLED)
    return float(ritz_error_estimates(ritz, residuals, 1)[0])


def extrapolated(ritz, residuals, history):
    e = shipped(ritz, residuals, history)
    if len(history) >= 3:
        d1, d0 = history[-1] - history[-2], history[-2] - history[-3]
        if d0 > 0 and 0 <= d1 < d0:
            e = min(e, d1 * (d1 / d0) / (1 - d1 / d0))
    return e


RULES: Dict[str, Tuple[Callable, int]] = {
    "gate 1/4, window 2": (shipped, 2), "window 1": (shipped, 1), "gate 1/2": (gated(0.5), 2),
    "gate 2/3": (gated(2 / 3), 2), "gate 2/3, window 1": (gated(2 / 3), 1), "gate 1 (none)": (gated(1.0), 2),
    "extrapolated": (extrapolated, 2),
}


def replay(rule: Callable, window: int, rows: List[Row], tol: float) -> Tuple[int, float]:
    met, history = 0, []
    for j, (ritz, residuals) in enumerate(rows):
        history.append(float(ritz[-1]))
        met = met + 1 if rule(ritz, residuals, history) <= min(tol, LOOSEST_STOP) * abs(ritz[-1]) else 0
        if met >= window and j + 1 >= 3:
            return j + 1, float(ritz[-1])
    return len(rows), float(rows[-1][0][-1])


def checkpoint_operators(big: bool) -> Dict[str, Tuple[CurvatureOperator, float]]:
    from bench_lanczos_stop import reference

    ops = {}
    for recipe, checkpoint in CHECKPOINTS:
        t = load_target(str(ROOT / "sample_models" / f"{recipe}.py"), str(ROOT / "sample_models" / "checkpoints" / checkpoint))
        op = CurvatureOperator(t.model, t.batches, t.loss_fn, t.batch_sizes)
        ops[checkpoint] = (op, reference(op))
    if big:
        import bench_lambda_peers

        w = bench_lambda_peers.workload("mlp_1m86")
        op = CurvatureOperator(w.model, w.batches, w.loss_fn, w.sizes)
        ops["mlp_1m86"] = (op, reference(op))
    return ops


def main() -> None:
    from test_lanczos_stop import Diagonal, spectrum

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--starts", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs: Dict[str, List[Tuple[float, List[Row]]]] = {}
    for kind in ("outliers", "indefinite", "crowded", "ratio_0.994"):
        for dtype in (torch.float64, torch.float32):
            for seed in range(8 if dtype == torch.float64 else 4):
                d = spectrum(kind, seed).to(dtype)
                runs.setdefault(f"{kind} {str(dtype)[6:]}", []).append((float(d.max()), record(Diagonal(d), seed, 120)))
    ops = checkpoint_operators(args.big)
    for name, (op, lam) in ops.items():
        runs[name] = [(lam, record(op, seed, 45)) for seed in range(3)]
    for tol in TOLS:
        print(f"\ntol {tol:g}: products − oracle (min..max over seeds) · worst error ÷ tol")
        print(f"{'':22}" + "".join(f"{name[:20]:>22}" for name in RULES))
        for group, entries in runs.items():
            cells = []
            for rule, window in RULES.values():
                extra, worst = [], 0.0
                for lam, rows in entries:
                    oracle = next((j + 1 for j, (ritz, _) in enumerate(rows) if lam - ritz[-1] <= tol * abs(lam)), len(rows))
                    n, theta = replay(rule, window, rows, tol)
                    extra.append(n - oracle)
                    worst = max(worst, (lam - theta) / abs(lam) / tol)
                cells.append(f"{min(extra):+d}..{max(extra):+d} · {worst:5.2f}")
            print(f"{group:22}" + "".join(f"{c:>22}" for c in cells))
    if args.starts:
        print("\nlambda_max(tol=1e-4) from three starts: products (oracle) per seed, worst error")
        for name, (op, lam) in ops.items():
            g = op.gradient()
            for label in ("random", "gradient", "mix"):
                cells, worst = [], 0.0
                for seed in range(3):
                    r = random_vector(op.size, seed, op.device, op.dtype)
                    start = {"random": r, "gradient": g, "mix": g / g.norm() + r / r.norm()}[label]
                    history = lanczos(op, tol=0.0, max_matvecs=45, seed=seed, start=start).history
                    oracle = next((k + 1 for k, t in enumerate(history) if lam - t <= 1e-4 * lam), None)
                    stop = lanczos(op, tol=1e-4, max_matvecs=200, seed=seed, start=start)
                    cells.append(f"{stop.matvecs} ({oracle})")
                    worst = max(worst, (lam - stop.eigenvalues[0]) / lam)
                print(f"  {name:20} {label:9} {', '.join(cells):28} error ≤ {worst:.1e}")


if __name__ == "__main__":
    main()
