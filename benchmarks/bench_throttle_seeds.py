"""The default throttle's final loss ÷ the best fixed lr of a 3-point grid, seeds 0..9, from
initialisation (300 steps, one thread): the spread that 3 seeds hide. The runs are chaotic, so the
distribution is the result, not one seed's number.

Run one case per process: python benchmarks/bench_throttle_seeds.py gd|mom|adam|sched
(about 1–2 minutes each; prints one line per seed, then median, maximum and the count above 1.5).
Seed copies of the recipes and the loss on all of data() are bench_controllers.py's.
"""
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_controllers import full_data_loss, recipe_with_seed  # noqa: E402  (puts the project on sys.path)
from curvdiag.train.loop import Trainer, TrainSettings  # noqa: E402

torch.set_num_threads(1)
CASES = {"gd": ("diverge_gd.py", [3, 5, 8]), "mom": ("diverge_momentum.py", [1, 2, 3]),
         "adam": ("diverge_adam.py", [0.005, 0.01, 0.02]), "sched": ("diverge_schedule.py", [2, 3, 5])}


def final_loss(path: str, lr, controller: str):
    """The loss on all of data() after 300 steps, None when the run diverged."""
    with tempfile.TemporaryDirectory() as out:
        summary = Trainer(path, None, Path(out), TrainSettings(steps=300, lr=lr, controller=controller,
                                                               checkpoint_every=0)).run()
        if summary.diverged:
            return None
        return full_data_loss(path, torch.load(Path(out) / "final.pt", weights_only=True))


def main() -> None:
    name = sys.argv[1]
    recipe, grid = CASES[name]
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(10):
            path = recipe_with_seed(recipe, seed, Path(tmp))
            best = min((final_loss(path, lr, "none") or float("inf")) for lr in grid)
            throttled = final_loss(path, None, "throttle")
            ratios.append(None if throttled is None else throttled / best)
            print(name, seed, ratios[-1], flush=True)
    ok = [x for x in ratios if x is not None]
    print(name, "median", statistics.median(ok), "max", max(ok), "n>1.5", sum(x > 1.5 for x in ok),
          "diverged", ratios.count(None), json.dumps(ratios))


if __name__ == "__main__":
    main()
