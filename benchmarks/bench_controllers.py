"""Learning-rate controllers of ``curvdiag train``: what each does on the divergence samples, and
what it costs per step.

One process, 1 torch thread (``--threads``), everything through the real ``Trainer`` API
(``curvdiag.train.loop``), each run from ``model()`` initialisation. Writes
``benchmarks/controllers_results.md`` (``--out``) and prints the same tables. Text in that file
below the line ``NOTES_MARKER`` is hand-written and kept when the tables are regenerated.

1. Outcome table: controllers none / throttle / newton / clip × cases
   - ``diverge_gd.py``        full-batch GD, lr 10 (diverges without a controller)
   - ``diverge_momentum.py``  SGD + momentum 0.9 on 4 mini-batches, lr 10 (diverges)
   - ``diverge_adam.py``      Adam on 4 mini-batches, lr 0.1 (diverges)
   - ``tanh_mlp.py``          full-batch GD at its own safe lr 0.3 (the "already safe" case)
   - ``tiny_transformer.py`` at lr 0.1 (AdamW too high: fails, does not diverge) with ``--transformer``
   For every case also the best fixed lr on a small grid (controller none), the yardstick of the
   DESIGN §3.8 target (throttle within 1.5× of it). "final" is the loss over ALL of data() at the
   last finite state (final.pt), not the last mini-batch's loss.
2. Overhead table: seconds per step of each controller relative to a plain step
   (zero_grad, loss, backward, optimizer.step in a bare loop) and to ``Trainer`` with controller
   none, on one workload (``--workload``, default tanh_mlp.py at lr 0.3, where the throttle stays at
   1 so every controller does the same arithmetic): the mean step time of each run over the plain
   step's, median over interleaved rounds.
3. ``--knobs``: the throttle's κ × floor_every × floor_jump on every case (slower, ~5 min).
   Table 1 also runs the throttle at each case's tuned fixed lr: what it costs where nothing
   needs saving.
4. ``--seeds 0,1,2``: repeat the divergence cases with model() initialised from other seeds
   (temporary copies of the recipes with SEED changed), to see how much one seed says.

Counts per step: "floor HVPs" are the throttle's power-iteration products (RunSummary
``extra_hvps_per_step``); "extra grads" are the additional forward+backward passes on top of the
training step's own: the throttle's same-batch closure (1 per step) plus one per floor estimate
(building its operator), Newton's lookahead (1 per step).

Run: /work/venv/bin/python benchmarks/bench_controllers.py [--steps 300] [--rounds 5]
     [--transformer] [--knobs] [--seeds 0,1,2] [--out benchmarks/controllers_results.md]
The default run takes about 75 s on one idle core; with --seeds 0,1,2 --knobs --transformer
about 8 minutes (that is how controllers_results.md was made).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES = ROOT / "sample_models"

import torch  # noqa: E402

from curvdiag.loading.recipe import load_recipe  # noqa: E402
from curvdiag.train.loop import Trainer, TrainSettings  # noqa: E402

CONTROLLERS = ("none", "throttle", "newton", "clip")
NOTES_MARKER = "<!-- notes: everything from this line on is hand-written and kept by bench_controllers.py -->"

# name, recipe, lr (None: the recipe's), the fixed-lr grid, kind
CASES = [
    ("GD", "diverge_gd.py", None, [0.5, 1, 2, 3, 5, 8, 10], "diverges"),
    ("momentum", "diverge_momentum.py", None, [0.2, 0.5, 1, 2, 3, 5, 10], "diverges"),
    ("Adam", "diverge_adam.py", None, [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1], "diverges"),
    ("safe (tanh_mlp)", "tanh_mlp.py", None, [], "safe"),
]
TRANSFORMER = ("transformer (AdamW)", "tiny_transformer.py", 0.1, [0.003, 0.01, 0.03, 0.1], "fails")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def full_data_loss(recipe_path: str, state: Dict[str, Any]) -> float:
    recipe = load_recipe(recipe_path)
    model = recipe.model()
    model.load_state_dict(state["model"])
    model.train()
    with torch.no_grad():
        batches = list(recipe.data())
        return sum(float(recipe.loss(model, b)) for b in batches) / len(batches)


def train(recipe_path: str, controller: str, steps: int, lr: Optional[float], **kw: Any) -> Dict[str, Any]:
    """One Trainer run; the summary plus the loss on all of data() at final.pt and step timings.
    A run that raises is reported as such (``error``), not fatal to the benchmark."""
    try:
        return _train(recipe_path, controller, steps, lr, **kw)
    except Exception as exc:  # noqa: BLE001 -- a controller failing on a case is a result
        message = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        log(f"  {controller} on {Path(recipe_path).name}: {type(exc).__name__}: {message}")
        return {"controller": controller, "lr": lr, "error": f"{type(exc).__name__}: {message}", "diverged": False,
                "steps": 0, "initial": None, "last_batch": None, "best": None, "final": None, "mean_throttle": None,
                "floor_hvps": None, "extra_grads": None, "floors": 0, "step_s": None, "cpu_per_step": None}


def _train(recipe_path: str, controller: str, steps: int, lr: Optional[float], **kw: Any) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        records: List[Dict[str, Any]] = []
        settings = TrainSettings(steps=steps, lr=lr, controller=controller, **kw)
        trainer = Trainer(recipe_path, None, Path(tmp), settings)
        cpu = time.process_time()
        summary = trainer.run(on_step=records.append)
        cpu = time.process_time() - cpu
        state = torch.load(Path(tmp) / "final.pt", weights_only=True)
    seconds = [r["seconds"] for r in records[1:]]  # step 0 includes loading data()
    floors = sum(1 for r in records if "lambda_floor" in r)
    grads = 0.0
    if controller == "throttle":
        grads = (len(records) + floors) / max(len(records), 1)
    elif controller == "newton":
        grads = 1.0
    return {
        "controller": controller, "lr": lr, "diverged": summary.diverged, "steps": summary.steps_completed,
        "initial": summary.initial_loss, "last_batch": summary.final_loss, "best": summary.best_loss,
        "final": None if summary.diverged else full_data_loss(recipe_path, state),
        "mean_throttle": summary.mean_throttle, "floor_hvps": summary.extra_hvps_per_step,
        "extra_grads": grads, "floors": floors,
        "step_s": statistics.fmean(seconds) if seconds else None,  # mean: floor steps included
        "cpu_per_step": cpu / max(len(records), 1),
    }


def fmt(x: Optional[float], spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def recipe_with_seed(name: str, seed: int, tmp: Path) -> str:
    """A temporary copy of a sample recipe whose model() uses another initialisation seed."""
    if seed == 0:
        return str(SAMPLES / name)
    text = (SAMPLES / name).read_text()
    text, n = re.subn(r"^SEED = 0$", f"SEED = {seed}", text, flags=re.M)
    assert n == 1, name
    text = text.replace("os.path.dirname(os.path.abspath(__file__))", repr(str(SAMPLES)))
    path = tmp / f"{Path(name).stem}_seed{seed}.py"
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- 1. outcomes
def outcome_table(cases, steps: int, seed_paths: Dict[str, str]) -> Dict[str, Any]:
    results = {}
    for label, recipe, lr, grid, kind in cases:
        path = seed_paths.get(recipe, str(SAMPLES / recipe))
        log(f"[outcomes] {label}")
        runs = {c: train(path, c, steps, lr) for c in CONTROLLERS}
        fixed = {g: train(path, "none", steps, g) for g in grid}
        ok = {g: r for g, r in fixed.items() if not r["diverged"] and r["final"] is not None}
        if not grid and not runs["none"]["diverged"] and runs["none"]["final"] is not None:
            ok = {lr if lr is not None else "recipe's": runs["none"]}  # safe case: its own lr is the yardstick
        best_lr = min(ok, key=lambda g: ok[g]["final"]) if ok else None
        at_best = None
        if best_lr is not None and kind != "safe":  # the "already safe" check at the tuned lr
            at_best = train(path, "throttle", steps, best_lr)
        results[label] = {"recipe": recipe, "lr": lr, "kind": kind, "runs": runs, "throttle_at_best": at_best,
                          "grid": {str(g): r for g, r in fixed.items()}, "best_lr": best_lr,
                          "best_fixed": ok[best_lr]["final"] if best_lr is not None else None,
                          "best_fixed_step_s": ok[best_lr]["step_s"] if best_lr is not None else None}
    return results


def render_outcomes(results: Dict[str, Any], steps: int) -> str:
    lines = ["| case | controller | diverged | final loss (all data) | final / initial | best batch loss | "
             "÷ best fixed lr | mean throttle | floor HVPs/step | extra grads/step | s/step ÷ none |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, res in results.items():
        runs = res["runs"]
        ref_s = runs["none"]["step_s"] if not runs["none"]["diverged"] else res["best_fixed_step_s"]
        for c in CONTROLLERS:
            r = runs[c]
            if r.get("error"):
                lines.append(f"| {label} | {c} | **error**: {r['error']} |" + " |" * 8)
                continue
            div = f"yes (step {r['steps']})" if r["diverged"] else "no"
            ratio = r["final"] / res["best_fixed"] if r["final"] is not None and res["best_fixed"] else None
            rel_init = r["final"] / r["initial"] if r["final"] is not None and r["initial"] else None
            t = r["step_s"] / ref_s if r["step_s"] and ref_s and r["steps"] > 20 else None
            lines.append(f"| {label} | {c} | {div} | {fmt(r['final'])} | {fmt(rel_init, '.3f')} | {fmt(r['best'])} | "
                         f"{fmt(ratio, '.2f')} | {fmt(r['mean_throttle'], '.3f')} | {fmt(r['floor_hvps'], '.3f')} | "
                         f"{fmt(r['extra_grads'], '.2f')} | {fmt(t, '.2f')} |")
    grid_lines = ["| case | lr as run | grid: lr → final loss (all data; ✗ diverged) | best fixed lr | its final loss |",
                  "|---|---|---|---|---|"]
    for label, res in results.items():
        if not res["grid"]:
            continue
        cells = ", ".join(f"{g}: {'✗' if r['diverged'] else fmt(r['final'], '.3g')}"
                          + (f" (stalled at {r['final'] / r['initial']:.2f}× initial)"
                             if r["final"] and r["initial"] and r["final"] > 0.5 * r["initial"] else "")
                          for g, r in res["grid"].items())
        grid_lines.append(f"| {label} | {res['lr'] or 'recipe'} | {cells} | {res['best_lr']} | {fmt(res['best_fixed'])} |")
    safe_lines = ["| case | tuned fixed lr | none: final loss | throttle: final loss | throttle ÷ none | mean throttle | "
                  "floor HVPs/step |", "|---|---|---|---|---|---|---|"]
    for label, res in results.items():
        r = res.get("throttle_at_best")
        if r is None:
            continue
        if r.get("error"):
            safe_lines.append(f"| {label} | {res['best_lr']} | {fmt(res['best_fixed'])} | **error**: {r['error']} | | | |")
            continue
        ratio = r["final"] / res["best_fixed"] if r["final"] is not None else None
        safe_lines.append(f"| {label} | {res['best_lr']} | {fmt(res['best_fixed'])} | "
                          f"{'diverged' if r['diverged'] else fmt(r['final'])} | {fmt(ratio, '.2f')} | "
                          f"{fmt(r['mean_throttle'], '.3f')} | {fmt(r['floor_hvps'], '.3f')} |")
    return ("\n".join(lines) + "\n\nBest fixed learning rate (controller none, same steps):\n\n" + "\n".join(grid_lines)
            + "\n\nThe throttle started at that tuned lr instead, where nothing needs saving (goal: at most +10%):\n\n"
            + "\n".join(safe_lines))


# --------------------------------------------------------------------------- 2. overhead
def plain_steps(recipe_path: str, lr: Optional[float], steps: int) -> List[float]:
    recipe = load_recipe(recipe_path)
    torch.manual_seed(0)
    model = recipe.model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = recipe.optimizer(params)
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    batches = list(recipe.data())
    out = []
    for step in range(steps):
        t = time.perf_counter()
        batch = batches[step % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = recipe.loss(model, batch)
        loss.backward()
        opt.step()
        out.append(time.perf_counter() - t)
    return out[1:]


def overhead_table(workload: str, lr: Optional[float], steps: int, rounds: int) -> Dict[str, Any]:
    path = str(SAMPLES / workload)
    per_round: Dict[str, List[float]] = {c: [] for c in ("trainer none",) + CONTROLLERS[1:]}
    cpu_round: Dict[str, List[float]] = {c: [] for c in per_round}
    counts: Dict[str, Any] = {}
    plain_abs = []
    for k in range(rounds):
        log(f"[overhead] round {k + 1}/{rounds}")
        plain_t0 = time.process_time()
        plain = statistics.fmean(plain_steps(path, lr, steps))
        plain_cpu = (time.process_time() - plain_t0) / steps
        plain_abs.append(plain)
        for c in CONTROLLERS:
            r = train(path, c, steps, lr)
            name = "trainer none" if c == "none" else c
            per_round[name].append(r["step_s"] / plain)
            cpu_round[name].append(r["cpu_per_step"] / plain_cpu)
            counts[name] = (r["floor_hvps"], r["extra_grads"], r["mean_throttle"])
    return {"workload": workload, "lr": lr, "steps": steps, "rounds": rounds,
            "plain_step_ms": 1e3 * statistics.median(plain_abs),
            "wall": {c: statistics.median(v) for c, v in per_round.items()},
            "wall_range": {c: (min(v), max(v)) for c, v in per_round.items()},
            "cpu": {c: statistics.median(v) for c, v in cpu_round.items()},
            "counts": counts}


def render_overhead(o: Dict[str, Any]) -> str:
    lines = [f"Workload `{o['workload']}` at lr {o['lr'] or 'of the recipe'}, {o['steps']} steps per run, "
             f"{o['rounds']} interleaved rounds; a plain step took {o['plain_step_ms']:.1f} ms (for scale only; "
             "the machine is shared, read the ratios).",
             "",
             "| controller | mean step time ÷ plain step (median over rounds [min, max]) | ÷ Trainer none | "
             "process CPU per step ÷ plain | floor HVPs/step | extra grads/step | mean throttle |",
             "|---|---|---|---|---|---|---|"]
    base = o["wall"]["trainer none"]
    for c, v in o["wall"].items():
        lo, hi = o["wall_range"][c]
        hv, gr, th = o["counts"][c]
        lines.append(f"| {c} | {v:.2f} [{lo:.2f}, {hi:.2f}] | {v / base:.2f} | {o['cpu'][c]:.2f} | {hv:.3f} | {gr:.2f} | {th:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- 3. knobs
KNOB_GRID = [(k, fe, fj) for k in (0.3, 0.5, 0.8, 1.0) for fe in (10, 25, 10**9) for fj in (0.1, math.inf)]


def knob_table(cases, steps: int, best_fixed: Dict[str, float]) -> str:
    cols = [label for label, *_ in cases]
    lines = ["| κ | floor_every | floor_jump | " + " | ".join(f"{c}: final (÷ best fixed) [floor HVPs/step]" for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for k, fe, fj in KNOB_GRID:
        cells = []
        for label, recipe, lr, _grid, _kind in cases:
            log(f"[knobs] κ={k} floor_every={fe} floor_jump={fj} {label}")
            r = train(str(SAMPLES / recipe), "throttle", steps, lr, kappa=k, floor_every=fe, floor_jump=fj)
            if r.get("error"):
                cells.append("error")
                continue
            if r["diverged"]:
                cells.append(f"✗ step {r['steps']}")
                continue
            ref = best_fixed.get(label)
            cells.append(f"{r['final']:.3g} ({r['final'] / ref:.2f}) [{r['floor_hvps']:.2f}]" if ref else
                         f"{r['final']:.3g} [{r['floor_hvps']:.2f}]")
        fe_s = "never (first 3 steps only)" if fe >= 10**9 else str(fe)
        fj_s = "off" if math.isinf(fj) else str(fj)
        lines.append(f"| {k} | {fe_s} | {fj_s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the overhead table")
    ap.add_argument("--overhead-steps", type=int, default=100)
    ap.add_argument("--workload", default="tanh_mlp.py")
    ap.add_argument("--workload-lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--transformer", action="store_true", help="also the tiny transformer at lr 0.1 (slow)")
    ap.add_argument("--knobs", action="store_true", help="also the throttle's knob grid (~5 min)")
    ap.add_argument("--seeds", default="0", help="comma-separated init seeds for the divergence cases")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "controllers_results.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cases = list(CASES) + ([TRANSFORMER] if args.transformer else [])
    seeds = [int(s) for s in args.seeds.split(",")]

    sections = []
    load = os.getloadavg()
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "curvdiag"], capture_output=True,
                               text=True, check=False).stdout.strip()
    except OSError:
        commit, dirty = "?", ""
    header = (f"# curvdiag train: controllers on the divergence samples\n\n"
              f"Generated by `benchmarks/bench_controllers.py` (curvdiag at {commit}{' + local changes' if dirty else ''}; "
              f"torch {torch.__version__}, {args.threads} thread(s), load average at start "
              f"{load[0]:.1f}). {args.steps} steps per run from model() initialisation; default settings "
              f"(κ 0.5, decay 0.95, floor_every 10, floor_jump 0.1, clip norm 1, Newton γ 1e-3) unless stated.\n")
    all_outcomes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            seed_paths = {recipe: recipe_with_seed(recipe, seed, Path(tmp)) for _l, recipe, *_ in cases
                          if recipe.startswith("diverge_")}
            use = cases if seed == 0 else [c for c in cases if c[1].startswith("diverge_")]
            outcomes = outcome_table(use, args.steps, seed_paths)
            all_outcomes[seed] = outcomes
            title = "## 1. Outcomes" + ("" if seed == 0 else f" — model() initialised with seed {seed}")
            sections.append(f"{title}\n\n{render_outcomes(outcomes, args.steps)}\n")
    if len(seeds) > 1:
        lines = ["## Summary over seeds: throttle final ÷ best fixed lr (and final ÷ initial)\n",
                 "| case | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
        for label in all_outcomes[seeds[0]]:
            if label not in all_outcomes[seeds[-1]]:
                continue
            cells = []
            for s in seeds:
                res = all_outcomes[s][label]
                r = res["runs"]["throttle"]
                if r["final"] is None:
                    cells.append("diverged")
                else:
                    cells.append(f"{r['final'] / res['best_fixed']:.2f} ({r['final'] / r['initial']:.3f})")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines) + "\n")

    overhead = overhead_table(args.workload, args.workload_lr, args.overhead_steps, args.rounds)
    sections.append("## 2. Per-step overhead\n\n" + render_overhead(overhead) + "\n")
    if args.knobs:
        best = {label: res["best_fixed"] for label, res in all_outcomes[seeds[0]].items()}
        # a case whose throttle run raised would only fill the grid with the same error
        knob_cases = [c for c in cases if not all_outcomes[seeds[0]][c[0]]["runs"]["throttle"].get("error")]
        sections.append("## 3. Throttle knobs (seed 0)\n\nEach cell: final loss on all data, its ratio to the best "
                        "fixed lr (safe case: to controller none at lr 0.3), and floor HVPs per step.\n\n"
                        + knob_table(knob_cases, args.steps, best) + "\n")
    elapsed = time.perf_counter() - started
    text = header + f"Wall time of this run: {elapsed:.0f} s.\n\n" + "\n".join(sections)
    if args.out.exists():  # keep the hand-written interpretation below the marker
        previous = args.out.read_text()
        if NOTES_MARKER in previous:
            text += "\n" + previous[previous.index(NOTES_MARKER):]
    args.out.write_text(text)
    print(text)
    log(f"wrote {args.out} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
