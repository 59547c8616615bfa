"""Per-step cost of each controller against a plain optimizer step, in one process.

Runs `curvdiag train`'s loop (curvdiag.train.loop.Trainer) for the same number of steps with each
controller on one workload and prints the median and the mean time per step (the mean includes the
steps that measure the throttle's floor: the whole-run cost) and their ratios to `none`, plus
the extra HVPs per step. Usage: python benchmarks/bench_controller_overhead.py [--steps 200]
[--recipe sample_models/tanh_mlp.py] [--lr 0.3]. Run it on an idle machine: with 2 threads, a
core taken by another process makes every step several times slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from curvdiag.train.loop import Trainer, TrainSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="sample_models/tanh_mlp.py")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for controller in ("none", "clip", "newton", "throttle"):
            settings = TrainSettings(steps=args.steps, lr=args.lr, controller=controller)
            summary = Trainer(args.recipe, None, Path(tmp) / controller, settings).run()
            times = [json.loads(line)["seconds"] for line in (Path(tmp) / controller / "metrics.jsonl").open()
                     if "seconds" in json.loads(line)]
            rows[controller] = {"median_ms": 1000 * statistics.median(times[5:] or times),
                                "mean_ms": 1000 * statistics.fmean(times[5:] or times),
                                "extra_hvps_per_step": summary.extra_hvps_per_step, "diverged": summary.diverged}
    base = rows["none"]["median_ms"]
    print(f"{args.recipe}, {args.steps} steps, lr {args.lr or 'recipe'}")
    mean_base = rows["none"]["mean_ms"]
    print(f"{'controller':<10} {'ms/step':>9} {'× none':>8} {'mean ms':>9} {'× none':>8} {'extra HVPs/step':>16}")
    for name, row in rows.items():
        print(f"{name:<10} {row['median_ms']:9.2f} {row['median_ms'] / base:8.2f} {row['mean_ms']:9.2f} "
              f"{row['mean_ms'] / mean_base:8.2f} {row['extra_hvps_per_step']:16.2f}")


if __name__ == "__main__":
    main()
