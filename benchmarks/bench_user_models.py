"""The throttle at a user's own, stable learning rate, on models not designed for curvdiag
(``benchmarks/user_models/``): engaged at the edge (``--engage edge``, the default) against engaged
from the first step (``--engage always``).

For each model and lr: the untouched run (controller none), the untouched run at lr·(1 + 10⁻³)
(the spread its own chaos gives), and the throttle in both modes; each is the final loss on all of
data() ÷ the untouched run's (issue 14's goal at a safe lr: ≤ 1.05), with the throttle's mean factor
and its wall time ÷ the untouched run's. One torch thread; one process runs everything in turn.
Usage: python benchmarks/bench_user_models.py [--only resnet,mlp]   (~6 min; the ResNet ~4 of them).
Writes benchmarks/user_models_results.json.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_peers  # noqa: E402  (puts the project on sys.path)
from curvdiag.loading.recipe import load_recipe  # noqa: E402
from curvdiag.train.loop import Trainer, TrainSettings  # noqa: E402

HERE = Path(__file__).resolve().parent
# name: (recipe, steps, the lrs the recipe's user might pick, all of them stable untouched)
MODELS = {"resnet": ("user_models/resnet_digits.py", 150, [0.1]),
          "mlp": ("user_models/ce_mlp_digits.py", 300, [0.25, 0.5, 1.0])}
CHAOS_NUDGE = 1e-3


def run(recipe_path: str, steps: int, lr: float, controller: str, engage: str, out: Path) -> dict:
    """One Trainer run; its final loss on all of data(), mean factor and wall time."""
    records = []
    started = time.perf_counter()
    summary = Trainer(recipe_path, None, out, TrainSettings(steps=steps, lr=lr, controller=controller, engage=engage,
                                                            checkpoint_every=0)).run(on_step=records.append)
    seconds = time.perf_counter() - started
    if summary.diverged:
        return {"final": None, "mean_factor": summary.mean_throttle, "seconds": seconds}
    recipe = load_recipe(recipe_path)
    model = recipe.model()
    model.load_state_dict(torch.load(out / "final.pt", weights_only=True)["model"])
    engaged = next((r["step"] for r in records if r.get("throttle", 1.0) < 1.0), None)
    return {"final": bench_peers.full_data_loss(recipe, model), "mean_factor": summary.mean_throttle,
            "seconds": seconds, "first_held_step": engaged, "hvps_per_step": summary.extra_hvps_per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            recipe, steps, lrs = MODELS[name]
            for lr in lrs:
                key = f"{name} lr {lr:g}"
                rows = {"none": run(str(HERE / recipe), steps, lr, "none", "edge", Path(tmp) / f"{key}-none"),
                        "nudged": run(str(HERE / recipe), steps, lr * (1 + CHAOS_NUDGE), "none", "edge",
                                      Path(tmp) / f"{key}-nudged")}
                for engage in ("edge", "always"):
                    rows[engage] = run(str(HERE / recipe), steps, lr, "throttle", engage, Path(tmp) / f"{key}-{engage}")
                base = rows["none"]
                for row in rows.values():
                    row["ratio"] = None if row["final"] is None else row["final"] / base["final"]
                    row["time_ratio"] = row["seconds"] / base["seconds"]
                results[key] = rows
                print(f"{key}, {steps} steps: chaos {rows['nudged']['ratio']:.3f}; "
                      + "; ".join(f"{engage} {rows[engage]['ratio']:.3f} (mean factor {rows[engage]['mean_factor']:.2f}, "
                                  f"first held step {rows[engage]['first_held_step']}, time ×{rows[engage]['time_ratio']:.2f})"
                                  for engage in ("edge", "always")), flush=True)
    path = HERE / "user_models_results.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved.update(results)
    path.write_text(json.dumps({"torch": torch.__version__, **saved}, indent=1) + "\n")


if __name__ == "__main__":
    main()
