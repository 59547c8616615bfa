"""Per-step cost of each controller against a plain optimizer step, in one process.

Runs `curvdiag train`'s loop (curvdiag.train.loop.Trainer) for the same number of steps with each
controller on one workload and prints the median and the mean time per step (the mean includes the
steps that measure the throttle's floor: the whole-run cost) and their ratios to `none`, plus
the extra HVPs per step. ``--repeats N`` runs the controllers N times, interleaved, and reports the
median over repeats of each time and of each ratio to that repeat's ``none`` (single runs of
millisecond steps moved whole-run ratios by ±30% here). Usage: python
benchmarks/bench_controller_overhead.py [--steps 200] [--recipe sample_models/tanh_mlp.py] [--lr 0.3]
[--repeats 1] [--controllers none,clip,newton,throttle]. Run it on an idle machine: with 2 threads,
a core taken by another process makes every step several times slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import torch

from curvdiag.train.loop import Trainer, TrainSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="sample_models/tanh_mlp.py")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--controllers", default="none,clip,newton,throttle")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.controllers.split(",")
    if names[0] != "none":
        names.insert(0, "none")
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for controller in names:
                out = Path(tmp) / f"{controller}_{repeat}"
                settings = TrainSettings(steps=args.steps, lr=args.lr, controller=controller)
                summary = Trainer(args.recipe, None, out, settings).run()
                times = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").open()
                         if "seconds" in json.loads(line)]
                runs[controller].append({"median_ms": 1000 * statistics.median(times[5:] or times),
                                         "mean_ms": 1000 * statistics.fmean(times[5:] or times),
                                         "extra_hvps_per_step": summary.extra_hvps_per_step,
                                         "diverged": summary.diverged})
    print(f"{args.recipe}, {args.steps} steps, lr {args.lr or 'recipe'}, {args.repeats} interleaved repeat(s)")
    print(f"{'controller':<10} {'ms/step':>9} {'× none':>8} {'mean ms':>9} {'× none':>8} {'extra HVPs/step':>16}")
    for name, rows in runs.items():
        ratio = [r["median_ms"] / b["median_ms"] for r, b in zip(rows, runs["none"])]
        mean_ratio = [r["mean_ms"] / b["mean_ms"] for r, b in zip(rows, runs["none"])]
        print(f"{name:<10} {statistics.median(r['median_ms'] for r in rows):9.2f} {statistics.median(ratio):8.2f} "
              f"{statistics.median(r['mean_ms'] for r in rows):9.2f} {statistics.median(mean_ratio):8.2f} "
              f"{statistics.median(r['extra_hvps_per_step'] for r in rows):16.2f}"
              + (f"   (whole-run ratios {min(mean_ratio):.2f}–{max(mean_ratio):.2f})" if len(rows) > 1 else ""))


if __name__ == "__main__":
    main()
