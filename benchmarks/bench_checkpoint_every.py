"""What ``--checkpoint-every K`` costs: seconds per step of ``curvdiag train`` on the sample
models with K = 0 (final.pt only), 1, 10 and 50, and the cost of one checkpoint (an atomic
write: torch.save, fsync, rename, fsync, then run.json likewise).

    python benchmarks/bench_checkpoint_every.py [--steps 60] [--out benchmarks/checkpoint_every_results.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from curvdiag.train.loop import Trainer, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["sample_models/tanh_mlp.py", "sample_models/bn_cnn.py", "sample_models/tiny_transformer.py"]


def seconds_per_step(recipe: str, steps: int, every: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(str(ROOT / recipe), None, Path(out) / "run", TrainSettings(steps=steps, checkpoint_every=every))
        started = time.perf_counter()
        trainer.run()
        return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "checkpoint_every_results.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for recipe in RECIPES:
        row = {"recipe": recipe}
        for every in (0, 1, 10, 50):
            row[f"every_{every}"] = min(seconds_per_step(recipe, args.steps, every) for _ in range(2))
        row["seconds_per_checkpoint"] = row["every_1"] - row["every_0"]
        row["overhead_every_10"] = row["every_10"] / row["every_0"] - 1
        row["overhead_every_50"] = row["every_50"] / row["every_0"] - 1
        results.append(row)
        print(json.dumps(row))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
