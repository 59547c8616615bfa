"""The default throttle's final loss ÷ the best fixed lr of a 3-point grid, seeds 0..9, from
initialisation (300 steps, one thread): the spread that 3 seeds hide. The runs are chaotic, so the
distribution is the result, not one seed's number.

Run one case per process: python benchmarks/bench_throttle_seeds.py gd|mom|adam|sched
(about 1–2 minutes each; prints one line per seed, then median, maximum and the count above 1.5).
"""
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from curvdiag.loading.recipe import load_recipe  # noqa: E402
from curvdiag.train.loop import Trainer, TrainSettings  # noqa: E402

torch.set_num_threads(1)
S = str(ROOT / "sample_models") + "/"


def recipe_path(path: str, seed: int) -> str:
    """A copy of the recipe with SEED = seed beside the samples' helpers (seed 0: the recipe itself)."""
    if seed == 0:
        return path
    copy = Path(path).parent / f".seed{seed}_{Path(path).name}"
    copy.write_text(Path(path).read_text().replace("SEED = 0", f"SEED = {seed}"))
    return str(copy)


def full_loss(recipe, model) -> float:
    with torch.no_grad():
        batches = list(recipe.data())
        return sum(float(recipe.loss(model, b)) for b in batches) / len(batches)

CASES = {"gd": (S+"diverge_gd.py", [3, 5, 8]), "mom": (S+"diverge_momentum.py", [1, 2, 3]),
         "adam": (S+"diverge_adam.py", [0.005, 0.01, 0.02]), "sched": (S+"diverge_schedule.py", [2, 3, 5])}
name = sys.argv[1]
path0, grid = CASES[name]
out = []
for seed in range(10):
    path = recipe_path(path0, seed)
    def run(lr, controller):
        with tempfile.TemporaryDirectory() as d:
            t = Trainer(path, None, Path(d), TrainSettings(steps=300, lr=lr, controller=controller, checkpoint_every=0))
            s = t.run()
            return None if s.diverged else full_loss(load_recipe(path), t.model)
    try:
        best = min((run(lr, "none") or float("inf")) for lr in grid)
        r = run(None, "throttle")
    finally:
        if seed:
            os.remove(path)
    out.append(None if r is None else r / best)
    print(name, seed, out[-1], flush=True)
ok = [x for x in out if x is not None]
print(name, "median", statistics.median(ok), "max", max(ok), "n>1.5", sum(x > 1.5 for x in ok), "diverged", out.count(None), json.dumps(out))
