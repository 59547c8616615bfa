"""The default throttle's final loss ÷ the best fixed lr of a 3-point grid, seeds 0..9, from
initialisation and from bench_peers' mid-training checkpoint (300 steps, one thread): the spread
that bench_peers' 3 seeds hide. The runs are chaotic, so the distribution is the result, not one
seed's number.

Run one case per process: python benchmarks/bench_throttle_seeds.py gd|mom|adam|sched|tf [init|checkpoint] [A-B]
(about 20–40 s per MLP case and start, ~5 min for the transformer `tf`; prints one line per seed, then median, maximum and the count
above 1.5). Seeds 0–9 by default: those chose the rule, so ``10-19`` runs held-out seeds, where a change
is judged without the selection's bias (today's rule: 2 of 80 MLP runs above 1.5 on seeds 0–9, 8 of 80
on seeds 10–19). ``--engage always`` (anywhere) runs the throttle with the rule from its first step. With ``lrs`` instead of a start (``... gd lrs``), the throttle runs at every lr of
bench_peers' 7-point grid, seeds 0–2, both starts, and each worst ratio is printed beside the fixed
lr's own, against the grid's best in ``benchmarks/peers_results.json``: what a user who does not tune
gets at whatever lr they pick. With ``safe`` (``... mom safe``), seeds 0–4 from both starts at a
third to a half of the tuned lr (:data:`SAFE`, a run that needs no throttle): the throttle's final
loss ÷ the untouched run's at the same lr (the goal: ≤ 1.05), beside the untouched run nudged to
lr·(1 + 10⁻³) ÷ itself (the spread its own chaos gives); ``... tf safe 0.002`` takes another lr. The cases, their failing lr, the checkpoint (100 steps at the case's safe lr) and the
loss on all of data() are bench_peers.py's; each 3-point grid is the neighbourhood of the best lr
that bench_peers' 7-point grid chose on seeds 0–2 (it stayed inside it on seeds 3–9 too).
"""
import json
import math
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_peers  # noqa: E402  (puts the project on sys.path)

torch.set_num_threads(1)
CASES = {"gd": "GD", "mom": "momentum", "adam": "Adam", "sched": "schedule", "tf": "transformer"}
GRIDS = {("GD", "init"): [3, 5, 8], ("GD", "checkpoint"): [2, 3, 5],
         ("momentum", "init"): [1, 2, 3], ("momentum", "checkpoint"): [2, 3, 5],
         ("Adam", "init"): [0.005, 0.01, 0.02], ("Adam", "checkpoint"): [0.01, 0.02, 0.05],
         ("schedule", "init"): [2, 3, 5], ("schedule", "checkpoint"): [2, 3, 5],
         ("transformer", "init"): [0.005, 0.01, 0.02], ("transformer", "checkpoint"): [0.005, 0.01, 0.02]}

# A third to a half of the tuned lr of each case (bench_peers' grids chose 5 / 3–5, 2–3, 0.01–0.02, 3–5, 0.005–0.02).
# The untouched run at a safe lr against itself at lr·(1 + CHAOS_NUDGE): the spread chaos alone gives.
CHAOS_NUDGE = 1e-3
SAFE = {"GD": 2.0, "momentum": 1.0, "Adam": 0.005, "schedule": 1.0, "transformer": 0.003}


def ratio(case: "bench_peers.Case", start_name: str, seed: int):
    """Throttle's final loss ÷ the grid's best, None when the throttle diverged."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        recipe = bench_peers.recipe_with_seed(case.recipe, seed, tmp)
        checkpoint = bench_peers.make_checkpoint(recipe, case, tmp) if start_name == "checkpoint" else None
        start = bench_peers.Start(recipe, checkpoint)
        finals = [bench_peers.plain_run(start, 300, bench_peers.recipe_optimizer(start), lr=lr)[0]["final"]
                  for lr in GRIDS[(case.name, start_name)]]
        best = min(f for f in finals if f is not None)
        throttled = bench_peers.trainer_run(start, "throttle", 300, case.lr, tmp / "throttle")["final"]
        return None if throttled is None else throttled / best


def throttle_at_every_lr(case: "bench_peers.Case") -> None:
    """Worst over seeds 0–2 of (final loss at lr ÷ the grid's best), throttled and fixed, per start and lr."""
    cells = json.loads((bench_peers.ROOT / "benchmarks" / "peers_results.json").read_text())["cases"][case.name]
    for start_name in ("init", "checkpoint"):
        for lr in case.grid:
            throttled, fixed = [], []
            for seed in range(3):
                cell = cells[start_name][str(seed)]
                with tempfile.TemporaryDirectory() as tmp_name:
                    tmp = Path(tmp_name)
                    recipe = bench_peers.recipe_with_seed(case.recipe, seed, tmp)
                    checkpoint = bench_peers.make_checkpoint(recipe, case, tmp) if start_name == "checkpoint" else None
                    final = bench_peers.trainer_run(bench_peers.Start(recipe, checkpoint), "throttle", 300, lr,
                                                    tmp / "throttle")["final"]
                throttled.append(math.inf if final is None else final / cell["best_final"])
                own = cell["grid"][str(lr)]["final"]
                fixed.append(math.inf if own is None else own / cell["best_final"])
            print(case.name, start_name, f"lr {lr:g}", "throttle worst", f"{max(throttled):.3g}",
                  "fixed worst", f"{max(fixed):.3g}", flush=True)


def throttle_at_a_safe_lr(case: "bench_peers.Case", lr: Optional[float] = None) -> None:
    """The throttle's final loss ÷ the untouched run's, both at ``lr`` (None: SAFE[case]), seeds 0–4, both starts,
    with their geometric mean (one seed's ratio is mostly chaos); beside it the untouched run at lr·(1 + CHAOS_NUDGE) ÷ the untouched run: how far the run's own
    chaos moves the final loss (Adam's MLP: 0.75–1.41× for a 0.1% change of lr)."""
    lr = SAFE[case.name] if lr is None else lr
    for start_name in ("init", "checkpoint"):
        ratios, factors, chaos = [], [], []
        for seed in range(5):
            with tempfile.TemporaryDirectory() as tmp_name:
                tmp = Path(tmp_name)
                recipe = bench_peers.recipe_with_seed(case.recipe, seed, tmp)
                checkpoint = bench_peers.make_checkpoint(recipe, case, tmp) if start_name == "checkpoint" else None
                start = bench_peers.Start(recipe, checkpoint)
                untouched = bench_peers.trainer_run(start, "none", 300, lr, tmp / "none")["final"]
                throttled = bench_peers.trainer_run(start, "throttle", 300, lr, tmp / "throttle")
                nudged = bench_peers.trainer_run(start, "none", 300, lr * (1 + CHAOS_NUDGE), tmp / "nudged")["final"]
            ratios.append(math.inf if throttled["final"] is None or untouched is None else throttled["final"] / untouched)
            factors.append(throttled.get("mean_throttle") or 0.0)
            chaos.append(math.inf if nudged is None or untouched is None else nudged / untouched)
        print(case.name, start_name, f"lr {lr:g}", "worst", f"{max(ratios):.3g}", "median",
              f"{statistics.median(ratios):.3g}", "geometric mean", f"{_geometric_mean(ratios):.3g}",
              f"(chaos: {_geometric_mean(chaos):.3g})", "ratios", [round(r, 3) for r in ratios],
              "mean factors", [round(f, 3) for f in factors],
              f"untouched at lr x (1 + {CHAOS_NUDGE:g})", [round(c, 3) for c in chaos], flush=True)


def _geometric_mean(values: list) -> float:
    """exp(mean(log v)): the typical ratio over seeds when single runs scatter by their own chaos
    (inf when a run diverged)."""
    return math.inf if any(not math.isfinite(v) or v <= 0 for v in values) else math.exp(statistics.fmean(map(math.log, values)))


def main() -> None:
    if "--engage" in sys.argv:  # --engage always: the rule from the first step (default: TrainSettings')
        at = sys.argv.index("--engage")
        bench_peers.ENGAGE = sys.argv[at + 1]
        del sys.argv[at:at + 2]
    name = sys.argv[1]
    case = next(c for c in bench_peers.CASES if c.name == CASES[name])
    if sys.argv[2:] == ["lrs"]:
        return throttle_at_every_lr(case)
    if sys.argv[2:3] == ["safe"]:
        return throttle_at_a_safe_lr(case, float(sys.argv[3]) if len(sys.argv) > 3 else None)
    seeds = [a for a in sys.argv[2:] if re.fullmatch(r"\d+-\d+", a)]
    low, high = map(int, seeds[-1].split("-")) if seeds else (0, 9)
    starts = [a for a in sys.argv[2:] if a not in seeds] or ["init", "checkpoint"]
    for start_name in starts:
        ratios = []
        for seed in range(low, high + 1):
            ratios.append(ratio(case, start_name, seed))
            print(name, start_name, seed, ratios[-1], flush=True)
        ok = [x for x in ratios if x is not None]
        print(name, start_name, "median", round(statistics.median(ok), 3), "max", round(max(ok), 3),
              "n>1.5", sum(x > 1.5 for x in ok), "diverged", ratios.count(None),
              json.dumps([None if x is None else round(x, 3) for x in ratios]), flush=True)


if __name__ == "__main__":
    main()
