"""HesScale: cost in gradients and error against reference diagonals, beside Hutchinson.

One process; prints tables and writes benchmarks/hesscale_results.json.

Targets:
- ``tanh_mlp`` (sample_models/tanh_mlp.py + checkpoints/tanh_early.pt if present, else the
  recipe's fresh model): 64-200-200-10 tanh, 55,210 parameters, 1000 samples, MSE. The exact
  diagonal would take 55k products. Two references: (a) the exact diagonal on a random subset
  of ``--subset`` coordinates per parameter tensor (all of it when smaller), one product e_iᵀHe_i
  each: relative errors on the subset estimate those of the whole tensor without noise from
  the reference; (b) a long Hutchinson run (``--probes``, default 2000) over all coordinates,
  whose own relative standard error is reported, with errors against it noise-corrected as
  sqrt(max(err² − ref_noise², 0)). (a) is the one to quote; (b) shows how weak a 2000-probe
  reference is at this size.
- ``tanh_mlp_w16``: the same depth, data and loss at width 16 (1,482 parameters), trained from
  the same seed for 100 full-batch GD steps at the recipe's lr: its exact diagonal (one Hessian-
  vector product per coordinate) is affordable, so every error there is exact.
- ``bn_cnn`` (eval mode), timing only: the CNN rules (conv, eval BatchNorm, max pooling).

Timing: the machine is shared, so every figure is a ratio to one gradient measured in the same
round (gradient, HesScale, HVP interleaved), median over rounds; wall and process-CPU time both.
Hutchinson "at equal time" uses k = (HesScale cost)/(HVP cost) probes (at least 1).

Run: /work/venv/bin/python benchmarks/bench_hesscale.py [--probes 2000] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from curvdiag.probes.hesscale import hesscale_diag  # noqa: E402
from curvdiag.probes.hutchinson import hutchinson_diag, rademacher_products  # noqa: E402
from curvdiag.loading.target import load_target  # noqa: E402
from curvdiag.curvature.operator import CurvatureOperator  # noqa: E402

SAMPLES = ROOT / "sample_models"


def clock(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def gradient(op):
    """One loss and gradient over the operator's batches: the unit of cost."""
    total = torch.zeros(op.num_params, dtype=op.dtype, device=op.device)
    for weight, batch in op.for_each_batch():
        total.add_(op.flatten(op.parameter_gradients(op.batch_loss(batch))), alpha=weight)
    return op.sum_over_ranks(total)


def cost_ratios(op, rounds):
    """Median over interleaved rounds of (HesScale, HVP) time / gradient time, wall and CPU."""
    z = torch.ones(op.num_params, dtype=op.dtype)
    fns = {"gradient": lambda: gradient(op), "hesscale": lambda: hesscale_diag(op),
           "hvp": lambda: op.hvp(z)}
    for fn in fns.values():  # warm-up
        fn()
    per = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            per[k].append(clock(fn))
    out = {"gradient_ms_wall_median": 1e3 * statistics.median(w for w, _ in per["gradient"])}
    for k in ("hesscale", "hvp"):
        out[f"{k}_per_gradient_wall"] = statistics.median(a[0] / b[0] for a, b in zip(per[k], per["gradient"]))
        out[f"{k}_per_gradient_cpu"] = statistics.median(a[1] / max(b[1], 1e-9) for a, b in zip(per[k], per["gradient"]))
    return out


def rel(est, ref):
    return float((est - ref).norm() / ref.norm())


def layer_errors(op, est, ref, index=None):
    """Relative error per parameter tensor and overall; with ``index`` only on those coordinates
    (``ref`` then holds their values, in index order)."""
    if index is None:
        out = {name: rel(est[a:b], ref[a:b]) for name, a, b in op.layer_slices()}
        out["all"] = rel(est, ref)
        return out
    out = {}
    for name, a, b in op.layer_slices():
        mask = (index >= a) & (index < b)
        out[name] = rel(est[index[mask]], ref[mask])
    out["all"] = rel(est[index], ref)
    return out


def exact_subset(op, per_tensor, seed):
    """Sorted coordinates (at most per_tensor per parameter tensor) and their exact diagonal."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for _, a, b in op.layer_slices():
        n = b - a
        picks.append(a + (torch.arange(n) if n <= per_tensor else torch.randperm(n, generator=gen)[:per_tensor]))
    index = torch.sort(torch.cat(picks)).values
    e = torch.zeros(op.num_params, dtype=op.dtype)
    values = torch.empty(len(index), dtype=op.dtype)
    for k, i in enumerate(index.tolist()):
        e[i] = 1
        values[k] = op.hvp(e)[i]
        e[i] = 0
    return index, values


def hutchinson_curve(op, ks, seed):
    """Relative-error inputs: the running mean of z ⊙ Hz after each k in ks (independent stream)."""
    ks = sorted(set(ks))
    total = torch.zeros(op.num_params, dtype=torch.float64)
    estimates = {}
    products = rademacher_products(op, seed)
    for k in range(1, ks[-1] + 1):
        z, hz = next(products)
        total += (z * hz).to(torch.float64)
        if k in ks:
            estimates[k] = (total / k).to(op.dtype)
    return estimates


def probes_to_match(hut_err_at_k, k, target):
    """Probes Hutchinson needs for error ``target``, from error ∝ 1/√k."""
    return None if target <= 0 else k * (hut_err_at_k / target) ** 2


def width16_target(t):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(100):
        opt.zero_grad()
        sum(t.loss_fn(model, b) for b in t.batches).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model


def exact_diagonal(op):
    eye = torch.zeros(op.num_params, dtype=op.dtype)
    out = torch.empty(op.num_params, dtype=op.dtype)
    for i in range(op.num_params):
        eye[i] = 1
        out[i] = op.hvp(eye)[i]
        eye[i] = 0
    return out


def study(name, op, reference, ref_noise, rounds, seed, note, index=None, costs=None, extra=None):
    costs = costs or cost_ratios(op, rounds)
    result = hesscale_diag(op)
    k_eq = max(1, round(costs["hesscale_per_gradient_wall"] / costs["hvp_per_gradient_wall"]))
    ks = [k_eq, 10, 100]
    huts = hutchinson_curve(op, ks, seed)
    estimators = {"hesscale": result.diagonal, **{str(k): huts[k] for k in sorted(set(ks))}, **(extra or {})}
    errors = {k: layer_errors(op, v, reference, index) for k, v in estimators.items()}
    row = {
        "target": name, "note": note, "parameters": op.num_params, "samples": op.num_samples,
        **costs, "exact_parameters": result.exact_parameters,
        "reference_rel_noise": ref_noise,
        "reference_coordinates": None if index is None else len(index),
        "hesscale_rel_error": errors.pop("hesscale"),
        "hutchinson_equal_time_probes": k_eq,
        "hutchinson_rel_error": {str(k): errors.pop(str(k)) for k in sorted(set(ks))},
        "other_rel_error": errors,
    }
    if ref_noise:
        row["hesscale_rel_error_noise_corrected"] = {
            k: math.sqrt(max(v * v - (ref_noise.get(k, 0.0)) ** 2, 0.0)) for k, v in row["hesscale_rel_error"].items()}
        row["hutchinson_rel_error_noise_corrected"] = {
            str(k): {n: math.sqrt(max(v * v - (ref_noise.get(n, 0.0)) ** 2, 0.0)) for n, v in errs.items()}
            for k, errs in ((int(a), b) for a, b in row["hutchinson_rel_error"].items())}
    hs = row.get("hesscale_rel_error_noise_corrected", row["hesscale_rel_error"])
    hut100 = row.get("hutchinson_rel_error_noise_corrected", row["hutchinson_rel_error"])["100"]
    row["hutchinson_probes_to_match_hesscale"] = {n: probes_to_match(hut100[n], 100, hs[n]) for n in hs}
    return row


def print_row(row):
    print(f"\n== {row['target']} ({row['parameters']} parameters, {row['samples']} samples) — {row['note']}")
    if "hesscale_per_gradient_wall" in row:
        print(f"cost per gradient (gradient {row['gradient_ms_wall_median']:.1f} ms wall): "
              f"HesScale {row['hesscale_per_gradient_wall']:.2f}x wall / {row['hesscale_per_gradient_cpu']:.2f}x CPU; "
              f"one HVP {row['hvp_per_gradient_wall']:.2f}x wall / {row['hvp_per_gradient_cpu']:.2f}x CPU")
    if "hesscale_rel_error" not in row:
        return
    noise = row["reference_rel_noise"]
    k_eq = row["hutchinson_equal_time_probes"]
    corr = row.get("hesscale_rel_error_noise_corrected")
    head = f"{'layer':10s} {'HesScale':>9s}" + (f" {'(corr.)':>8s}" if corr else "") + \
        "".join(f" {'Hutch k=' + str(k):>11s}" for k in row["hutchinson_rel_error"]) + \
        (f" {'ref noise':>9s}" if noise else "") + f" {'k to match':>10s}  exact"
    what = ("the Hutchinson reference" if noise else "the exact diagonal" if not row["reference_coordinates"]
            else f"the exact diagonal on {row['reference_coordinates']} sampled coordinates")
    print(f"relative error ‖d̂ − d‖/‖d‖ against {what}; Hutchinson at equal wall time: k={k_eq}")
    print(head)
    for layer, err in row["hesscale_rel_error"].items():
        line = f"{layer:10s} {err:9.3g}" + (f" {corr[layer]:8.3g}" if corr else "")
        for k, errs in row["hutchinson_rel_error"].items():
            line += f" {errs[layer]:11.3g}"
        if noise:
            line += f" {noise[layer]:9.3g}"
        match = row["hutchinson_probes_to_match_hesscale"][layer]
        line += (f" {match:10.3g}  " if match is not None else f" {'-':>10s}  ") + ("yes" if layer in row["exact_parameters"] else "")
        print(line)
    for other, errs in row.get("other_rel_error", {}).items():
        print(f"{other}: " + ", ".join(f"{k} {v:.3g}" for k, v in errs.items()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=2000, help="Hutchinson probes of the 55k reference")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--subset", type=int, default=200, help="exact coordinates per parameter tensor")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "hesscale_results.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    started = time.perf_counter()

    ckpt = SAMPLES / "checkpoints" / "tanh_early.pt"
    t = load_target(str(SAMPLES / "tanh_mlp.py"), str(ckpt) if ckpt.exists() else None)
    note = "tanh_early.pt" if ckpt.exists() else "fresh weights (no checkpoint)"

    # Width 16, exact reference.
    small = width16_target(t)
    op = CurvatureOperator(small, t.batches, t.loss_fn, t.batch_sizes)
    exact = exact_diagonal(op)
    rows.append(study("tanh_mlp_w16", op, exact, None, args.rounds, seed=2,
                      note="64-16-16-10 tanh, 100 GD steps; exact diagonal"))
    print_row(rows[-1])

    # Width 200, long-Hutchinson reference.
    op = CurvatureOperator(t.model, t.batches, t.loss_fn, t.batch_sizes)
    w = time.perf_counter()
    ref = hutchinson_diag(op, samples=args.probes, seed=1)
    ref_seconds = time.perf_counter() - w
    noise = {name: float(ref.stderr[a:b].norm() / ref.diagonal[a:b].norm()) for name, a, b in op.layer_slices()}
    noise["all"] = float(ref.stderr.norm() / ref.diagonal.norm())
    w = time.perf_counter()
    index, values = exact_subset(op, args.subset, seed=3)
    subset_seconds = time.perf_counter() - w
    costs = cost_ratios(op, args.rounds)
    row = study("tanh_mlp", op, values, None, args.rounds, seed=2, index=index, costs=costs,
                note=f"{note}; exact diagonal on {len(index)} coordinates ({subset_seconds:.0f} s)",
                extra={f"hutchinson_{args.probes}_reference": ref.diagonal})
    rows.append(row)
    print_row(row)
    row = study("tanh_mlp", op, ref.diagonal, noise, args.rounds, seed=2, costs=costs,
                note=f"{note}; reference: {args.probes} Hutchinson probes ({ref_seconds:.0f} s)")
    row["target"] = "tanh_mlp_vs_hutchinson_reference"
    rows.append(row)
    print_row(row)

    # BatchNorm CNN, timing only.
    bn = SAMPLES / "bn_cnn.py"
    if bn.exists():
        ck = SAMPLES / "checkpoints" / "bn_cnn.pt"
        tb = load_target(str(bn), str(ck) if ck.exists() else None)
        op = CurvatureOperator(tb.model, tb.batches, tb.loss_fn, tb.batch_sizes)
        result = hesscale_diag(op)
        rows.append({"target": "bn_cnn", "note": "eval mode, timing only", "parameters": op.num_params,
                     "samples": op.num_samples, **cost_ratios(op, args.rounds),
                     "exact_parameters": result.exact_parameters})
        print_row(rows[-1])

    info = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
            "seconds": time.perf_counter() - started, "rows": rows}
    Path(args.out).write_text(json.dumps(info, indent=1, default=lambda x: None if x != x else x))
    print(f"\nwrote {args.out} ({info['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
