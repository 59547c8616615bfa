"""Speed benchmark: curvdiag against PyHessian on one edge-of-stability workload.

    python benchmarks/bench_vs_pyhessian.py            # full run, a few minutes on 2 CPU cores
    python benchmarks/bench_vs_pyhessian.py --quick    # one seed, looser trace target, < 1 minute

Workload: ``sample_models/tanh_mlp.py`` (MLP 64-200-200-10, tanh, 55,210 parameters, MSE on
one-hot digits, ONE full batch of 1000 samples) at ``checkpoints/tanh_edge.pt``, where the
top Hessian eigenvalues are crowded (~6.763, 6.712, 6.670, 6.529): the hard case for power
iteration. Both tools run in float32 on ``--threads`` CPU threads in this one process;
PyHessian gets its single-batch ``data=(x, y)`` path (its ``dataloader=`` path weights batch
means equally, which is another matter). Every wall time includes set-up: building the
gradient graph (``hessian(...)`` / ``CurvatureOperator(...)``).

Sections (see benchmarks/README.md for how to read them):
  1. lambda_max at several accuracies, against a float64 Lanczos reference (tol 1e-10),
     cross-checked with scipy's eigsh (ARPACK) in the full run;
  2. trace: time to a 1 % relative standard error, against a variance-reduced reference;
  3. the cost of one HVP over one gradient (forward + backward).

HVPs are counted from outside: PyHessian's ``hessian_vector_product`` (the function its
``hessian`` class calls) and curvdiag's ``CurvatureOperator._exact_hvp`` (which also counts
the one product the operator makes at start-up to check that double backward works) are
wrapped for the duration of the benchmark only. Results go to ``benchmarks/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from curvdiag.probes.hutchinson import hutchinson_trace  # noqa: E402
from curvdiag.curvature.operator import CurvatureOperator  # noqa: E402
from curvdiag.loading.recipe import load_recipe  # noqa: E402
from curvdiag.probes.sharpness import lambda_max  # noqa: E402

try:  # newer curvdiag: Hutchinson with an exact Gauss-Newton control variate
    from curvdiag.probes.ggn_trace import ggn_control_variate_trace  # noqa: E402
except ImportError:
    ggn_control_variate_trace = None

try:
    from pyhessian import hessian as PyHessian  # noqa: E402

    # ``pyhessian.hessian`` the attribute is the class (the package's __init__ re-exports it);
    # the module, whose global ``hessian_vector_product`` the class calls, is in sys.modules.
    _PH_MODULE = importlib.import_module("pyhessian.hessian")
except ImportError as exc:  # pragma: no cover - the benchmark needs it
    sys.exit(f"PyHessian is not installed ({exc}): pip install pyhessian")

RECIPE = ROOT / "sample_models" / "tanh_mlp.py"
CHECKPOINT = ROOT / "sample_models" / "checkpoints" / "tanh_edge.pt"
TARGET_REL_ERR = 1e-4  # "reaches 1e-4 relative error" for lambda_max
PH_MAX_ITER = 1000  # high enough that PyHessian's tol, not maxIter (default 100), stops it


# --------------------------------------------------------------------------- counting
class _Counter:
    def __init__(self) -> None:
        self.n = 0
        self.record: Optional[List[float]] = None  # PyHessian: v·Hv after each product, when set


PH_COUNT = _Counter()
CD_COUNT = _Counter()


@contextlib.contextmanager
def counting_hvps():
    """Wrap both tools' HVP functions with counters (benchmark only; restored afterwards)."""
    ph_original = _PH_MODULE.hessian_vector_product
    cd_original = getattr(CurvatureOperator, "_exact_hvp", None)

    def ph_counted(gradsH, params, v):
        PH_COUNT.n += 1
        hv = ph_original(gradsH, params, v)
        if PH_COUNT.record is not None:  # only in the untimed trajectory runs
            PH_COUNT.record.append(float(sum(torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(hv, v))))
        return hv

    def cd_counted(self, v):
        CD_COUNT.n += 1
        return cd_original(self, v)

    _PH_MODULE.hessian_vector_product = ph_counted
    if cd_original is not None:
        CurvatureOperator._exact_hvp = cd_counted
    try:
        yield
    finally:
        _PH_MODULE.hessian_vector_product = ph_original
        if cd_original is not None:
            CurvatureOperator._exact_hvp = cd_original


# --------------------------------------------------------------------------- workload
class Workload:
    """The recipe, checkpoint, batch and fresh model copies in a given dtype."""

    def __init__(self) -> None:
        self.recipe = load_recipe(str(RECIPE))
        self.state = torch.load(CHECKPOINT, weights_only=True)["model"]
        batches = list(self.recipe.data())
        if len(batches) != 1:
            raise SystemExit(f"expected the recipe to give one batch, got {len(batches)}")
        self.batch = batches[0]
        self.n_samples = int(self.batch[0].shape[0])

    def model(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        m = self.recipe.model()
        m.load_state_dict(self.state)
        return m.to(dtype)

    def batch_in(self, dtype: torch.dtype):
        x, y = self.batch
        return (x.to(dtype), y)

    def loss(self, model, batch):
        return self.recipe.loss(model, batch)

    def operator(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> CurvatureOperator:
        return CurvatureOperator(model, [self.batch_in(dtype)], self.loss, batch_sizes=[self.n_samples])


def pyhessian_criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The recipe's loss as PyHessian's ``criterion(outputs, targets)`` (checked at start-up)."""
    return F.mse_loss(out, F.one_hot(y, 10).to(out.dtype))


def make_pyhessian(model: torch.nn.Module, batch) -> Any:
    # hessian() runs loss.backward(create_graph=True) INTO .grad: a .grad left over from an
    # earlier hessian() would be added to the new gradient (graph included), doubling H.
    model.zero_grad(set_to_none=True)
    return PyHessian(model, pyhessian_criterion, data=batch, cuda=False)


def release(model: torch.nn.Module) -> None:
    """Drop PyHessian's create_graph .grad (it keeps the whole double-backward graph alive)."""
    model.zero_grad(set_to_none=True)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def median(xs: List[float]) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------- 1. lambda_max
def reference_lambda_max(work: Workload, full: bool) -> Dict[str, Any]:
    m64 = work.model(torch.float64)
    t0 = time.perf_counter()
    op64 = work.operator(m64, torch.float64)
    res = lambda_max(op64, method="lanczos", tol=1e-10, top_k=4, seed=12345, max_hvps=400)
    out = {
        "method": "curvdiag Lanczos, float64, tol 1e-10, top 4",
        "value": res.value,
        "top4": list(res.eigenvalues),
        "residuals": list(res.residuals),
        "converged": bool(res.converged),
        "hvps": int(res.hvps),
        "seconds": time.perf_counter() - t0,
    }
    if full:
        try:
            import scipy.sparse.linalg as sla

            n = op64.num_params
            matvec = lambda v: op64.hvp(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).ravel())).numpy()  # noqa: E731
            A = sla.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
            t1 = time.perf_counter()
            w = np.sort(sla.eigsh(A, k=4, which="LA", tol=0, v0=np.ones(n))[0])[::-1]
            out["scipy_eigsh_top4"] = [float(x) for x in w]
            out["scipy_eigsh_seconds"] = time.perf_counter() - t1
            out["scipy_vs_lanczos_rel_diff"] = max(rel(a, b) for a, b in zip(res.eigenvalues, w))
        except Exception as exc:  # scipy missing or failing: the Lanczos reference stands alone
            out["scipy_eigsh_error"] = repr(exc)
    return out, m64, op64


def run_pyhessian_eig(work: Workload, model, tol: float, seed: int, max_iter: int = PH_MAX_ITER) -> Dict[str, Any]:
    batch = work.batch_in(torch.float32)
    PH_COUNT.n = 0
    torch.manual_seed(seed)  # PyHessian draws its start vector from the global RNG
    t0 = time.perf_counter()
    H = make_pyhessian(model, batch)
    eigenvalues, _ = H.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
    seconds = time.perf_counter() - t0
    del H
    release(model)
    return {"seed": seed, "seconds": seconds, "hvps": PH_COUNT.n, "value": float(eigenvalues[0])}


def run_curvdiag_eig(work: Workload, model, tol: float, seed: int) -> Dict[str, Any]:
    CD_COUNT.n = 0
    t0 = time.perf_counter()
    op = work.operator(model)
    res = lambda_max(op, method="lanczos", tol=tol, top_k=1, seed=seed)
    seconds = time.perf_counter() - t0
    return {"seed": seed, "seconds": seconds, "hvps": CD_COUNT.n, "hvps_reported": int(res.hvps),
            "value": float(res.value), "converged": bool(res.converged)}


def summarise(tool: str, setting: str, tol: float, runs: List[Dict[str, Any]], ref: float) -> Dict[str, Any]:
    errors = [rel(r["value"], ref) for r in runs]
    hvps = [r["hvps"] for r in runs]
    return {
        "tool": tool, "setting": setting, "tol": tol, "runs": runs,
        "seconds_median": median([r["seconds"] for r in runs]),
        "seconds_min": min(r["seconds"] for r in runs),
        "hvps_median": median(hvps), "hvps_min": min(hvps), "hvps_max": max(hvps),
        "rel_err_worst": max(errors), "rel_err_median": median(errors),
        "value_seed0": runs[0]["value"],
        "reaches_target": max(errors) <= TARGET_REL_ERR,
    }


def bench_lambda_max(work: Workload, ref: float, seeds: List[int], ph_tols: List[float], cd_tols: List[float],
                     log: Callable[[str], None]) -> Dict[str, Any]:
    ph_model, cd_model = work.model(), work.model()
    ph_runs: Dict[float, List] = {t: [] for t in ph_tols}
    cd_runs: Dict[float, List] = {t: [] for t in cd_tols}
    # warm-up (allocator, autograd kernels), not recorded
    run_pyhessian_eig(work, ph_model, 1e-2, 99, max_iter=3)
    run_curvdiag_eig(work, cd_model, 1e-2, 99)
    for seed in seeds:  # seeds outermost: slow drifts in machine load hit both tools alike
        for tol in cd_tols:
            r = run_curvdiag_eig(work, cd_model, tol, seed)
            cd_runs[tol].append(r)
            log(f"  curvdiag  lanczos tol={tol:g} seed={seed}: {r['seconds']:.2f}s {r['hvps']} HVPs "
                f"rel.err {rel(r['value'], ref):.1e}")
        for tol in ph_tols:
            r = run_pyhessian_eig(work, ph_model, tol, seed)
            ph_runs[tol].append(r)
            log(f"  PyHessian power tol={tol:g} seed={seed}: {r['seconds']:.2f}s {r['hvps']} HVPs "
                f"rel.err {rel(r['value'], ref):.1e}")
    # Untimed re-runs of the tightest setting (same seed: the same iterates) that record PyHessian's
    # Rayleigh quotient after every HVP: how many HVPs power iteration needs with a perfect stop.
    oracle = []
    for seed in seeds:
        PH_COUNT.record = []
        run_pyhessian_eig(work, ph_model, min(ph_tols), seed)
        quotients, PH_COUNT.record = PH_COUNT.record, None
        first = next((i + 1 for i, q in enumerate(quotients) if rel(q, ref) <= TARGET_REL_ERR), None)
        oracle.append({"seed": seed, "hvps_in_run": len(quotients), "first_hvp_within_target": first,
                       "final_rel_err": rel(quotients[-1], ref)})
        log(f"  PyHessian trajectory seed={seed}: first within {TARGET_REL_ERR:g} after {first} HVPs")
    rows = [summarise("PyHessian", f"eigenvalues(maxIter={PH_MAX_ITER}, tol={t:g})", t, ph_runs[t], ref) for t in ph_tols]
    rows += [summarise("curvdiag", f"lambda_max(tol={t:g})", t, cd_runs[t], ref) for t in cd_tols]

    def fastest(tool: str) -> Optional[Dict[str, Any]]:
        # The cheapest setting that reaches the target: fewest HVPs (deterministic per seed; a
        # tool's wall time follows its HVP count), ties broken by wall time. Choosing by wall
        # time alone would let one run slowed by another process pick the wrong setting.
        ok = [r for r in rows if r["tool"] == tool and r["reaches_target"]]
        return min(ok, key=lambda r: (r["hvps_median"], r["seconds_median"])) if ok else None

    ph_best, cd_best = fastest("PyHessian"), fastest("curvdiag")
    summary: Dict[str, Any] = {
        "target_rel_err": TARGET_REL_ERR,
        "pyhessian_fastest_reaching_target": ph_best and ph_best["setting"],
        "curvdiag_fastest_reaching_target": cd_best and cd_best["setting"],
        "pyhessian_power_iteration_oracle": oracle,
    }
    firsts = [o["first_hvp_within_target"] for o in oracle]
    if firsts and all(f is not None for f in firsts):
        summary["pyhessian_oracle_stop_hvps_median"] = median(firsts)
    if ph_best and cd_best:
        summary["time_ratio_curvdiag_over_pyhessian"] = cd_best["seconds_median"] / ph_best["seconds_median"]
        summary["hvp_ratio_pyhessian_over_curvdiag"] = ph_best["hvps_median"] / cd_best["hvps_median"]
        summary["goal_time_ratio_le_0.5"] = summary["time_ratio_curvdiag_over_pyhessian"] <= 0.5
        summary["goal_hvps_ge_5x_fewer"] = summary["hvp_ratio_pyhessian_over_curvdiag"] >= 5
    default_row = next((r for r in rows if r["tool"] == "PyHessian" and r["tol"] == 1e-3), None)
    if default_row:
        summary["pyhessian_default_tol_rel_err_worst"] = default_row["rel_err_worst"]
    return {"rows": rows, "summary": summary}


# --------------------------------------------------------------------------- 2. trace
def reference_trace(op64: CurvatureOperator, k: int, samples: int) -> Dict[str, Any]:
    """tr H = tr(QᵀHQ) + tr(PHP), P = I − QQᵀ, for ANY orthonormal Q (an exact identity).

    Q = the top-k Lanczos vectors: the first term is exact (k HVPs), and Hutchinson on PHP
    has a far smaller variance than on H, whose variance comes mostly from the top outliers
    (2 Σ_{i≠j} H_ij² ≈ 2 Σ λ_i² here). Unbiased whatever the accuracy of Q."""
    t0 = time.perf_counter()
    CD_COUNT.n = 0
    res = lambda_max(op64, method="lanczos", tol=1e-6, top_k=k, seed=777, max_hvps=400, want_vectors=True)
    Q = res.eigenvectors.to(torch.float64)
    Q, _ = torch.linalg.qr(Q.T)  # (n, k), orthonormal to working precision
    head = sum(float(Q[:, i] @ op64.hvp(Q[:, i])) for i in range(Q.shape[1]))
    gen = torch.Generator().manual_seed(2024)  # probes independent of both tools' seeds
    values = []
    for _ in range(samples):
        z = torch.randint(0, 2, (op64.num_params,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
        z = z - Q @ (Q.T @ z)
        values.append(float(z @ op64.hvp(z)))
    tail, tail_sd = float(np.mean(values)), float(np.std(values, ddof=1))
    return {
        "method": f"float64; exact trace over the top-{k} Lanczos space + {samples} projected Rademacher probes",
        "value": head + tail, "stderr": tail_sd / math.sqrt(samples), "head": head, "tail": tail,
        "tail_per_probe_sd": tail_sd, "deflation_k": k, "probes": samples,
        "lanczos_converged": bool(res.converged), "hvps": CD_COUNT.n, "seconds": time.perf_counter() - t0,
    }


def run_curvdiag_trace(work: Workload, model, target: float, seed: int, cap: int) -> Dict[str, Any]:
    CD_COUNT.n = 0
    kwargs: Dict[str, Any] = {"target_rel_stderr": target, "seed": seed}
    if "max_samples" in inspect.signature(hutchinson_trace).parameters:
        kwargs["max_samples"] = cap  # the default cap (1000) can stop short of 1 % here
    t0 = time.perf_counter()
    op = work.operator(model)
    res = hutchinson_trace(op, **kwargs)
    seconds = time.perf_counter() - t0
    return {"seed": seed, "seconds": seconds, "samples": int(res.samples), "hvps": CD_COUNT.n,
            "value": float(res.value), "stderr": float(res.stderr),
            "rel_stderr": float(res.stderr) / abs(float(res.value))}


def run_curvdiag_ggn_trace(work: Workload, model, target: float, seed: int, cap: int) -> Dict[str, Any]:
    CD_COUNT.n = 0
    t0 = time.perf_counter()
    op = work.operator(model)
    # min_samples=10 as `curvdiag probe` uses it: three probes give an over-optimistic s.e.
    res = ggn_control_variate_trace(op, target_rel_stderr=target, seed=seed, max_samples=cap, min_samples=10)
    seconds = time.perf_counter() - t0
    return {"seed": seed, "seconds": seconds, "samples": int(res.samples), "hvps": CD_COUNT.n,
            "ggn_products": int(getattr(res, "ggn_products", 0)),
            "ggn_trace_backwards": int(getattr(res, "ggn_trace_backwards", 0)),
            "setup_backwards": int(getattr(res, "setup_backwards", 0)),
            "value": float(res.value), "stderr": float(res.stderr),
            "rel_stderr": float(res.stderr) / abs(float(res.value))}


def run_pyhessian_trace_to_target(work: Workload, model, target: float, seed: int, cap: int,
                                  min_samples: int = 10) -> Dict[str, Any]:
    """PyHessian has no standard-error target (its trace() stops on a relative change of the
    running mean), so the benchmark drives it: trace(maxIter=1) returns one z·Hz sample per
    call, and it stops with curvdiag's rule (n ≥ 10 and s.e. ≤ target·|mean|), checked after
    every sample with a running (Welford) mean and variance."""
    batch = work.batch_in(torch.float32)
    PH_COUNT.n = 0
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    H = make_pyhessian(model, batch)
    n, mean, m2 = 0, 0.0, 0.0
    while True:
        x = H.trace(maxIter=1)[0]
        n += 1
        delta = x - mean
        mean += delta / n
        m2 += delta * (x - mean)
        se = math.sqrt(m2 / (n - 1) / n) if n > 1 else math.inf
        if (n >= min_samples and se <= target * abs(mean)) or n >= cap:
            break
    seconds = time.perf_counter() - t0
    del H
    release(model)
    return {"seed": seed, "seconds": seconds, "samples": n, "hvps": PH_COUNT.n, "value": mean,
            "stderr": se, "rel_stderr": se / abs(mean)}


def run_pyhessian_trace_default(work: Workload, model, seed: int) -> Dict[str, Any]:
    batch = work.batch_in(torch.float32)
    PH_COUNT.n = 0
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    H = make_pyhessian(model, batch)
    values = H.trace()  # maxIter=100, tol=1e-3
    seconds = time.perf_counter() - t0
    del H
    release(model)
    n = len(values)
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return {"seed": seed, "seconds": seconds, "samples": n, "hvps": PH_COUNT.n, "value": mean,
            "stderr": se, "rel_stderr": se / abs(mean)}


def per_probe_blocks(work: Workload, blocks: int, block: int) -> Dict[str, Any]:
    """Per-probe cost of both tools from short interleaved blocks (curvdiag ``hutchinson_trace(op,
    samples=block)`` then PyHessian ``trace(maxIter=block)`` that cannot stop early, on objects
    built once). Medians over the blocks: a burst of load from another process spoils a few
    blocks of both tools, not one tool's whole run."""
    batch = work.batch_in(torch.float32)
    cd_model, ph_model = work.model(), work.model()
    t0 = time.perf_counter()
    op = work.operator(cd_model)
    cd_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    H = make_pyhessian(ph_model, batch)
    ph_setup = time.perf_counter() - t0
    cd, ph = [], []
    for i in range(blocks):
        t0 = time.perf_counter()
        hutchinson_trace(op, samples=block, seed=100 + i)
        cd.append((time.perf_counter() - t0) / block)
        torch.manual_seed(100 + i)
        t0 = time.perf_counter()
        values = H.trace(maxIter=block, tol=-1.0)  # tol < 0: its relative-change stop never fires
        ph.append((time.perf_counter() - t0) / len(values))
    del H
    release(ph_model)
    return {"blocks": blocks, "block": block, "curvdiag_s_per_probe": median(cd), "pyhessian_s_per_probe": median(ph),
            "curvdiag_setup_s": cd_setup, "pyhessian_setup_s": ph_setup,
            "curvdiag_blocks_s_per_probe": cd, "pyhessian_blocks_s_per_probe": ph}


def bench_trace(work: Workload, ref: Dict[str, Any], seeds: List[int], target: float, cap: int,
                log: Callable[[str], None], blocks: int = 15, block: int = 20) -> Dict[str, Any]:
    ph_model, cd_model = work.model(), work.model()
    cd_runs, ph_runs, ph_default, ggn_runs = [], [], [], []
    ggn_error = None
    for seed in seeds:
        if ggn_control_variate_trace is not None and ggn_error is None:
            try:
                r = run_curvdiag_ggn_trace(work, cd_model, target, seed, cap)
                ggn_runs.append(r)
                log(f"  curvdiag  ggn_control_variate_trace seed={seed}: {r['seconds']:.2f}s {r['samples']} probes "
                    f"-> {r['value']:.2f} ± {r['stderr']:.2f}")
            except Exception as exc:  # not applicable or not finished: the row is left out
                ggn_error = f"{type(exc).__name__}: {exc}"
                log(f"  curvdiag  ggn_control_variate_trace: {ggn_error}")
        r = run_curvdiag_trace(work, cd_model, target, seed, cap)
        cd_runs.append(r)
        log(f"  curvdiag  hutchinson_trace seed={seed}: {r['seconds']:.2f}s {r['samples']} probes "
            f"-> {r['value']:.2f} ± {r['stderr']:.2f}")
        r = run_pyhessian_trace_to_target(work, ph_model, target, seed, cap)
        ph_runs.append(r)
        log(f"  PyHessian trace (driven to target) seed={seed}: {r['seconds']:.2f}s {r['samples']} probes "
            f"-> {r['value']:.2f} ± {r['stderr']:.2f}")
        r = run_pyhessian_trace_default(work, ph_model, seed)
        ph_default.append(r)
        log(f"  PyHessian trace() defaults seed={seed}: {r['seconds']:.2f}s {r['samples']} probes "
            f"-> {r['value']:.2f} ± {r['stderr']:.2f}")

    def agg(tool: str, setting: str, runs: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {
            "tool": tool, "setting": setting, "runs": runs,
            "seconds_median": median([r["seconds"] for r in runs]),
        "seconds_min": min(r["seconds"] for r in runs),
            "samples_median": median([r["samples"] for r in runs]),
            "hvps_median": median([r["hvps"] for r in runs]),
            "rel_stderr_median": median([r["rel_stderr"] for r in runs]),
            "rel_err_median": median([rel(r["value"], ref["value"]) for r in runs]),
            "rel_err_worst": max(rel(r["value"], ref["value"]) for r in runs),
            "seconds_per_probe_median": median([r["seconds"] / r["samples"] for r in runs]),
        }

    rows = [
        agg("PyHessian", f"trace(maxIter=1) until s.e. <= {target:g}·|mean|", ph_runs),
        agg("PyHessian", "trace() defaults (maxIter=100, tol=1e-3)", ph_default),
        agg("curvdiag", f"hutchinson_trace(target_rel_stderr={target:g})", cd_runs),
    ]
    # Load-robust estimate of the time to target: set-up + (median probes to target) x (median
    # per-probe cost from interleaved blocks). The probe counts are deterministic per seed.
    log(f"  interleaved per-probe blocks ({blocks} x {block} probes each) ...")
    pb = per_probe_blocks(work, blocks, block)
    cd_model_s = pb["curvdiag_setup_s"] + rows[2]["samples_median"] * pb["curvdiag_s_per_probe"]
    ph_model_s = pb["pyhessian_setup_s"] + rows[0]["samples_median"] * pb["pyhessian_s_per_probe"]
    robust = {**pb, "curvdiag_seconds_to_target": cd_model_s, "pyhessian_seconds_to_target": ph_model_s,
              "time_ratio_curvdiag_over_pyhessian": cd_model_s / ph_model_s,
              "per_probe_ratio_curvdiag_over_pyhessian": pb["curvdiag_s_per_probe"] / pb["pyhessian_s_per_probe"]}
    extra: Dict[str, Any] = {}
    if ggn_runs:
        rows.append(agg("curvdiag", f"ggn_control_variate_trace(target_rel_stderr={target:g})", ggn_runs))
        extra["ggn_time_ratio_over_pyhessian"] = rows[3]["seconds_median"] / rows[0]["seconds_median"]
    if ggn_error:
        extra["ggn_error"] = ggn_error
    return {
        **extra,
        "target_rel_stderr": target,
        "rows": rows,
        "time_ratio_curvdiag_over_pyhessian": rows[2]["seconds_median"] / rows[0]["seconds_median"],
        "per_probe_time_ratio_curvdiag_over_pyhessian": rows[2]["seconds_per_probe_median"] / rows[0]["seconds_per_probe_median"],
        "load_robust": robust,
    }


# --------------------------------------------------------------------------- 3. HVP / gradient
def bench_hvp_cost(work: Workload, reps: int) -> Dict[str, Any]:
    batch = work.batch_in(torch.float32)
    m_grad, m_cd, m_ph = work.model(), work.model(), work.model()
    params = [p for p in m_grad.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    op = work.operator(m_cd)
    cd_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    H = make_pyhessian(m_ph, batch)
    ph_setup = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.num_params, generator=gen)
    v_list = [t.clone() for t in op.unflatten(v)]
    ph_hvp = _PH_MODULE.hessian_vector_product

    def grad_once():
        loss = work.loss(m_grad, batch)
        torch.autograd.grad(loss, params)

    tasks = {"gradient": grad_once, "curvdiag_hvp": lambda: op.hvp(v),
             "pyhessian_hvp": lambda: ph_hvp(H.gradsH, H.params, v_list)}
    for _ in range(5):
        for f in tasks.values():
            f()
    times: Dict[str, List[float]] = {k: [] for k in tasks}
    for _ in range(reps):  # interleaved, so load drifts hit all three alike
        for name, f in tasks.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    del H
    release(m_ph)
    med = {k: median(x) for k, x in times.items()}
    return {
        "reps": reps,
        "gradient_ms": 1e3 * med["gradient"],
        "curvdiag_hvp_ms": 1e3 * med["curvdiag_hvp"],
        "pyhessian_hvp_ms": 1e3 * med["pyhessian_hvp"],
        "curvdiag_hvp_over_gradient": med["curvdiag_hvp"] / med["gradient"],
        "pyhessian_hvp_over_gradient": med["pyhessian_hvp"] / med["gradient"],
        "curvdiag_hvp_method": getattr(op, "hvp_method", None),
        "curvdiag_setup_ms": 1e3 * cd_setup,
        "pyhessian_setup_ms": 1e3 * ph_setup,
        "goal_le_1.6": med["curvdiag_hvp"] / med["gradient"] <= 1.6,
    }


# --------------------------------------------------------------------------- output
def print_tables(results: Dict[str, Any], plain: bool) -> None:
    lam, tr, hv = results["lambda_max"], results["trace"], results["hvp_cost"]
    ref = results["reference_lambda_max"]
    tables = []
    rows = [[r["tool"], r["setting"], f"{r['seconds_median']:.3f}",
             f"{r['hvps_median']:.0f}" + (f" ({r['hvps_min']}–{r['hvps_max']})" if r["hvps_min"] != r["hvps_max"] else ""),
             f"{r['value_seed0']:.6f}", f"{r['rel_err_worst']:.1e}", "yes" if r["reaches_target"] else "no"]
            for r in lam["rows"]]
    tables.append((f"1. λmax   reference {ref['value']:.8f} (float64 Lanczos tol 1e-10)   "
                   f"[median over seeds {results['config']['seeds']}]",
                   ["tool", "setting", "wall s (median)", "HVPs median (range)", "value (seed 0)",
                    "rel. err (worst)", f"≤{TARGET_REL_ERR:g}"], rows))
    s = lam["summary"]
    rows = [["PyHessian cheapest reaching ≤1e-4", str(s.get("pyhessian_fastest_reaching_target"))],
            ["curvdiag cheapest reaching ≤1e-4", str(s.get("curvdiag_fastest_reaching_target"))]]
    if "time_ratio_curvdiag_over_pyhessian" in s:
        rows += [["wall-time ratio curvdiag/PyHessian (goal ≤ 0.5)", f"{s['time_ratio_curvdiag_over_pyhessian']:.3f}"],
                 ["HVPs PyHessian/curvdiag (goal ≥ 5)", f"{s['hvp_ratio_pyhessian_over_curvdiag']:.1f}×"]]
    if "pyhessian_oracle_stop_hvps_median" in s:
        rows.append(["PyHessian power iteration, perfect stop: HVPs to ≤1e-4 (median)",
                     f"{s['pyhessian_oracle_stop_hvps_median']:.0f}"])
    if "pyhessian_default_tol_rel_err_worst" in s:
        rows.append(["PyHessian at its default tol 1e-3: worst rel. err", f"{s['pyhessian_default_tol_rel_err_worst']:.1e}"])
    tables.append(("1. λmax summary", ["", ""], rows))
    rt = results["reference_trace"]
    rows = [[r["tool"], r["setting"], f"{r['seconds_median']:.2f}", f"{r['samples_median']:.0f}",
             f"{1e3 * r['seconds_per_probe_median']:.2f}", f"{100 * r['rel_stderr_median']:.2f}%",
             f"{100 * r['rel_err_median']:.2f}%"] for r in tr["rows"]]
    rows.append(["ratio", "hutchinson_trace / PyHessian (driven)", f"{tr['time_ratio_curvdiag_over_pyhessian']:.3f}", "",
                 f"{tr['per_probe_time_ratio_curvdiag_over_pyhessian']:.3f}", "", ""])
    rb = tr["load_robust"]
    rows.append(["load-robust", f"probes to target × ms/probe from {rb['blocks']} interleaved blocks: "
                 f"PyHessian {rb['pyhessian_seconds_to_target']:.2f}s, curvdiag {rb['curvdiag_seconds_to_target']:.2f}s",
                 f"{rb['time_ratio_curvdiag_over_pyhessian']:.3f}", "",
                 f"{1e3 * rb['curvdiag_s_per_probe']:.2f} / {1e3 * rb['pyhessian_s_per_probe']:.2f}", "", ""])
    if "ggn_time_ratio_over_pyhessian" in tr:
        rows.append(["ratio", "ggn_control_variate_trace / PyHessian (driven)",
                     f"{tr['ggn_time_ratio_over_pyhessian']:.3f}", "", "", "", ""])
    tables.append((f"2. trace   reference {rt['value']:.3f} ± {rt['stderr']:.3f} "
                   f"({100 * rt['stderr'] / rt['value']:.2f}% s.e.)",
                   ["tool", "setting", "wall s (median)", "probes", "ms/probe", "rel. s.e.", "rel. err vs ref"], rows))
    rows = [["gradient (forward+backward)", f"{hv['gradient_ms']:.2f}", "1.00"],
            [f"curvdiag HVP ({hv['curvdiag_hvp_method']})", f"{hv['curvdiag_hvp_ms']:.2f}", f"{hv['curvdiag_hvp_over_gradient']:.2f}"],
            ["PyHessian HVP", f"{hv['pyhessian_hvp_ms']:.2f}", f"{hv['pyhessian_hvp_over_gradient']:.2f}"],
            ["curvdiag set-up (operator)", f"{hv['curvdiag_setup_ms']:.1f}", ""],
            ["PyHessian set-up (hessian())", f"{hv['pyhessian_setup_ms']:.1f}", ""]]
    tables.append((f"3. one HVP vs one gradient   [median of {hv['reps']}; goal ≤ 1.6×]", ["", "ms", "× gradient"], rows))

    if not plain:
        try:
            from rich.console import Console
            from rich.table import Table

            console = Console(width=max(Console().width, 150))
            for title, header, body in tables:
                t = Table(title=title, title_justify="left")
                for h in header:
                    t.add_column(h)
                for row in body:
                    t.add_row(*row)
                console.print(t)
            return
        except ImportError:
            pass
    for title, header, body in tables:
        print(f"\n{title}")
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        for row in [header] + body:
            print("  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, fewer settings, 3%% trace target (< 1 min)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both tools (default 2)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    ap.add_argument("--plain", action="store_true", help="plain-text tables instead of rich")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # PyHessian's hessian() calls loss.backward(create_graph=True); torch warns about the
    # .grad <-> graph cycle on every construction. The benchmark breaks it (release()).
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
    started = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    if args.quick:
        seeds, ph_tols, cd_tols = [0], [1e-3, 1e-5, 1e-7], [1e-3, 1e-4, 1e-6]
        trace_target, ref_k, ref_probes, hvp_reps = 0.03, 20, 40, 20
    else:
        seeds, ph_tols, cd_tols = [0, 1, 2], [1e-3, 1e-4, 1e-5, 1e-6, 1e-7], [1e-3, 1e-4, 1e-6]
        trace_target, ref_k, ref_probes, hvp_reps = 0.01, 20, 150, 60
    trace_cap = 5000

    load = _loadavg()
    if load and load[0] > 0.5 * args.threads:
        log(f"warning: load average {load[0]} — other processes share the CPU; timings will be noisy "
            "(2-thread torch degrades badly when a core is taken away)")
    work = Workload()
    with torch.no_grad():
        m = work.model()
        a = float(work.loss(m, work.batch_in(torch.float32)))
        b = float(pyhessian_criterion(m(work.batch[0]), work.batch[1]))
    if abs(a - b) > 1e-7 * max(1.0, abs(a)):
        raise SystemExit(f"PyHessian criterion ({b}) does not match the recipe's loss ({a})")

    results: Dict[str, Any] = {
        "config": {
            "quick": args.quick, "threads": args.threads, "seeds": seeds,
            "recipe": str(RECIPE.relative_to(ROOT)), "checkpoint": str(CHECKPOINT.relative_to(ROOT)),
            "num_params": sum(p.numel() for p in m.parameters()), "batch": work.n_samples,
            "pyhessian_tols": ph_tols, "pyhessian_maxIter": PH_MAX_ITER, "curvdiag_tols": cd_tols,
            "trace_target_rel_stderr": trace_target, "trace_max_samples": trace_cap,
        },
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "pyhessian": _pyhessian_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "loadavg_start": _loadavg(),
        },
    }
    with counting_hvps():
        log("reference λmax (float64) ...")
        ref, m64, op64 = reference_lambda_max(work, full=not args.quick)
        results["reference_lambda_max"] = ref
        log(f"  λmax = {ref['value']:.10f}, top 4 {['%.5f' % x for x in ref['top4']]}, {ref['seconds']:.1f}s")
        log("1. λmax sweep ...")
        results["lambda_max"] = bench_lambda_max(work, ref["value"], seeds, ph_tols, cd_tols, log)
        results["environment"]["loadavg_after_lambda_max"] = _loadavg()
        log("reference trace (float64, deflated Hutchinson) ...")
        rt = reference_trace(op64, ref_k, ref_probes)
        results["reference_trace"] = rt
        log(f"  trace = {rt['value']:.3f} ± {rt['stderr']:.3f}, {rt['seconds']:.1f}s")
        del op64, m64
        log("2. trace ...")
        results["trace"] = bench_trace(work, rt, seeds, trace_target, trace_cap, log,
                                       blocks=6 if args.quick else 15)
        results["environment"]["loadavg_after_trace"] = _loadavg()
        log("3. HVP vs gradient ...")
        results["hvp_cost"] = bench_hvp_cost(work, hvp_reps)
    results["environment"]["loadavg_end"] = _loadavg()
    results["total_seconds"] = time.perf_counter() - started

    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results, args.plain)
    print(f"\ntotal {results['total_seconds']:.0f}s; load average at start/end "
          f"{results['environment']['loadavg_start']} / {results['environment']['loadavg_end']}; wrote {args.out}")


def _pyhessian_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("pyhessian")
    except Exception:
        return None


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    main()
