"""curvdiag.Monitor against the plain training loop (and Cockpit, when installed), in one run.

Workload (issue #13): a ReLU MLP 64-128-128-10 on scikit-learn's digits (1,797 samples), batch
128, SGD lr 0.05 with momentum 0.9, cross-entropy. Printed and written to
``benchmarks/monitor_results.json``:

- wall time of the monitored loop relative to the plain loop, λmax every 10 steps and every step:
  the median over ``--repeats`` interleaved repetitions of each repetition's ratio (and the ratio
  of the fastest runs), one torch thread;
- λmax error against scipy ``eigsh`` (which="LA", tol 1e-10, on the same batch and weights) at
  every measured step of ``--accuracy-steps`` steps (every 10);
- Hessian-vector products per measurement, cold start (random vector) against warm start (the
  previous top eigenvector);
- resident memory (RSS) over ``--rss-steps`` monitored steps with λmax at every step;
- Cockpit (``cockpit-for-pytorch``) "economy" and "full" tracking every 10 steps, when it imports.

Usage: python benchmarks/bench_monitor.py [--steps 200] [--repeats 5] [--threads 1] [--accuracy-steps 600]
[--rss-steps 1000]. Run it on an idle machine (another process on the core makes every step slower).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh

import curvdiag
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.probes.sharpness import lambda_max

MONITOR_TOL = inspect.signature(curvdiag.Monitor).parameters["tol"].default


def workload():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)]
    return batches


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def run(batches, steps, every=None, on_measure=None, cpu=None):
    """Seconds for ``steps`` steps of the loop, monitored every ``every`` steps (None: plain); the
    thread's CPU seconds are appended to the list ``cpu`` when given (time spent waiting for a
    core on a shared machine is not in them)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = curvdiag.Monitor(model, loss_fn, opt, every=every, on_measure=on_measure) if every else None
    started, cpu_started = time.perf_counter(), time.thread_time()
    for step in range(steps):
        batch = batches[step % len(batches)]
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(batch, loss=loss)
    if cpu is not None:
        cpu.append(time.thread_time() - cpu_started)
    return time.perf_counter() - started, monitor


def eigsh_lambda_max(model, batch):
    op = CurvatureOperator(model, [batch], loss_fn, [len(batch[1])], train_mode=True)
    n = op.num_params

    def matvec(v):
        return op.hvp(torch.as_tensor(np.asarray(v).reshape(-1), dtype=torch.float32)).double().numpy()

    value = eigsh(LinearOperator((n, n), matvec=matvec, dtype=np.float64), k=1, which="LA", tol=1e-10,
                  return_eigenvectors=False)[0]
    cold = lambda_max(op, tol=MONITOR_TOL, max_hvps=100)  # a cold start at the same weights and tolerance
    return float(value), cold.hvps


def accuracy(batches, steps, every):
    """λmax error against eigsh and products cold/warm at every measurement (untimed)."""
    rows = []
    holder = {}

    def on_measure(step, m):
        exact, cold_hvps = eigsh_lambda_max(holder["monitor"].model, batches[step % len(batches)])
        rows.append({"step": step, "monitor": m.lambda_max, "eigsh": exact, "relative_error": abs(m.lambda_max - exact) / exact,
                     "hvps": m.hvps, "warm": m.warm_start, "cold_hvps_same_weights": cold_hvps})

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    holder["monitor"] = curvdiag.Monitor(model, loss_fn, opt, every=every, on_measure=on_measure)
    for step in range(steps):
        batch = batches[step % len(batches)]
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        holder["monitor"].step(batch)
    return rows


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def rss_trace(batches, steps):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = curvdiag.Monitor(model, loss_fn, opt, every=1)
    trace = {}
    for step in range(steps):
        batch = batches[step % len(batches)]
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        monitor.step(batch)
        monitor.measurements.clear()  # the results list is the caller's: keep only what leaks
        if step + 1 in (10, 100, steps // 4, steps // 2, steps):
            trace[step + 1] = round(rss_mib(), 1)
    return trace


def _cockpit(quantities):
    """(extend, Cockpit, schedules, configuration, HessMaxEV), or the reason Cockpit is unavailable."""
    try:
        from backpack import extend
        from cockpit import Cockpit, quantities as cockpit_quantities
        from cockpit.utils import schedules
        from cockpit.utils.configuration import configuration
    except Exception as exc:  # not installed, or it does not import with this torch
        return f"cockpit does not import: {type(exc).__name__}: {exc}"[:300]
    return extend, Cockpit, schedules, configuration, cockpit_quantities.HessMaxEV


def _cockpit_loop(batches, steps, quantities, on_step=None):
    """Cockpit's own loop (its README's): the extended model and loss, individual losses, and
    ``backward(create_graph=...)`` as it asks. ``on_step(step, cockpit, model, batch)`` runs after
    the tracked backward and before ``opt.step()`` (untimed callers only)."""
    extend, Cockpit, _, _, _ = _cockpit(None)
    model = extend(make_model())
    loss_mean = extend(torch.nn.CrossEntropyLoss())
    loss_each = torch.nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cockpit = Cockpit(model.parameters(), quantities=quantities)
    started = time.perf_counter()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        outputs = model(x)
        loss = loss_mean(outputs, y)
        losses = loss_each(outputs, y)
        with cockpit(step, info={"batch_size": len(y), "individual_losses": losses, "loss": loss, "optimizer": opt}):
            loss.backward(create_graph=cockpit.create_graph(step))
        if on_step is not None:
            on_step(step, cockpit, model, (x, y))
        opt.step()
    return time.perf_counter() - started


def cockpit_times(batches, steps, plain):
    """Cockpit tracking every 10 steps, relative to plain: its "economy" and "full" configurations
    (economy has no λmax; full adds the Hessian trace, TIC and λmax) and its λmax quantity alone
    (``HessMaxEV``: power iteration, rtol 1e-3), the like-for-like peer of the monitor's λmax."""
    found = _cockpit(None)
    if isinstance(found, str):
        return {"skipped": found}
    _, _, schedules, configuration, HessMaxEV = found
    out = {}
    for name in ("economy", "full", "HessMaxEV"):
        try:
            quantities = ([HessMaxEV(track_schedule=schedules.linear(10))] if name == "HessMaxEV"
                          else configuration(name, track_schedule=schedules.linear(10)))
            out[name] = _cockpit_loop(batches, steps, quantities) / plain
        except Exception as exc:
            out[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
    return out


def cockpit_accuracy(batches, steps, every):
    """Cockpit's λmax (HessMaxEV every ``every`` steps) against eigsh at the same weights and batch
    (the weights of its backward pass, before the optimizer step), untimed."""
    found = _cockpit(None)
    if isinstance(found, str):
        return {"skipped": found}
    _, _, schedules, _, HessMaxEV = found
    rows = []

    def on_step(step, cockpit, model, batch):
        if step % every:
            return
        value = float(cockpit.get_output()[step]["HessMaxEV"])
        plain_model = make_model()
        plain_model.load_state_dict(model.state_dict())
        exact, _ = eigsh_lambda_max(plain_model, batch)
        rows.append({"step": step, "cockpit": value, "eigsh": exact, "relative_error": (value - exact) / exact})

    try:
        _cockpit_loop(batches, steps, [HessMaxEV(track_schedule=schedules.linear(every))], on_step)
    except Exception as exc:
        return {"failed": f"{type(exc).__name__}: {exc}"[:300]}
    errors = [abs(r["relative_error"]) for r in rows]
    return {"measurements": len(rows), "over_1e-2": int(sum(e > 1e-2 for e in errors)), "max_relative_error": max(errors),
            "median_relative_error": statistics.median(errors), "always_below": all(r["relative_error"] <= 0 for r in rows),
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rss-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accuracy-steps", type=int, default=600)
    parser.add_argument("--out", default=str(Path(__file__).with_name("monitor_results.json")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("curvdiag.monitor").setLevel(logging.ERROR)  # early λmax jumps: not the subject here
    batches = workload()
    run(batches, 20)  # warm-up
    # Repeats interleaved: load from other processes slows every configuration alike instead of
    # one of them. Reported: the median of each repetition's ratio, and the ratio of the fastest.
    configurations = (("plain", None), ("every_10", 10), ("every_1", 1))
    samples = {label: [] for label, _ in configurations}
    cpu = {label: [] for label, _ in configurations}
    for _ in range(args.repeats):
        for label, every in configurations:
            samples[label].append(run(batches, args.steps, every, cpu=cpu[label])[0])
    times = {label: min(values) for label, values in samples.items()}
    plain = times["plain"]
    ratios = {label: statistics.median(a / b for a, b in zip(values, samples["plain"])) for label, values in samples.items()}
    cpu_ratios = {label: statistics.median(a / b for a, b in zip(values, cpu["plain"])) for label, values in cpu.items()}
    rows = accuracy(batches, args.accuracy_steps, 10)
    warm = [r["hvps"] for r in rows if r["warm"]]
    results = {
        "workload": "ReLU MLP 64-128-128-10, digits, batch 128, SGD lr 0.05 momentum 0.9",
        "steps": args.steps, "threads": args.threads, "repeats": args.repeats, "monitor_tol": MONITOR_TOL, "loadavg": list(__import__("os").getloadavg()),
        "plain_ms_per_step": 1000 * statistics.median(samples["plain"]) / args.steps,
        "ratio_every_10": ratios["every_10"], "ratio_every_1": ratios["every_1"],
        "ratio_every_10_fastest": times["every_10"] / plain, "ratio_every_1_fastest": times["every_1"] / plain,
        "plain_cpu_ms_per_step": 1000 * statistics.median(cpu["plain"]) / args.steps,
        "cpu_ratio_every_10": cpu_ratios["every_10"], "cpu_ratio_every_1": cpu_ratios["every_1"],
        "accuracy_steps": args.accuracy_steps, "measurements_over_1e-2": sum(r["relative_error"] > 1e-2 for r in rows),
        "max_relative_error": max(r["relative_error"] for r in rows),
        "median_relative_error": statistics.median(r["relative_error"] for r in rows),
        "hvps_cold_first": rows[0]["hvps"], "hvps_warm_median": statistics.median(warm),
        "hvps_cold_median_same_weights": statistics.median(r["cold_hvps_same_weights"] for r in rows),
        "rss_mib_by_step": rss_trace(batches, args.rss_steps),
        "cockpit_ratio_every_10": cockpit_times(batches, args.steps, plain),
        "cockpit_lambda_max_accuracy": cockpit_accuracy(batches, args.accuracy_steps, 10),
        "measurements": rows,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        if key != "measurements":
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
