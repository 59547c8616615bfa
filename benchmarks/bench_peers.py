"""The throttle and its peers, side by side, on the failing cases (issue 14 item 4).

Every number is a ratio: the final loss on ALL of data() after the run (sample-weighted mean of the
recipe's loss over its batches) divided by the loss of the best fixed learning rate of a 7-point grid,
same steps, same seed, same starting state. Below 1 beats the tuned fixed lr; the throttle's target
is ≤ 1.5 on every case.

Cases (sample_models/): GD (diverge_gd.py), momentum (diverge_momentum.py), Adam (diverge_adam.py),
transformer (diverge_transformer.py, AdamW), schedule (diverge_schedule.py, momentum SGD under
warm-up + cosine). Each case is run
- from initialisation (model() with init seed 0, 1, 2: ``recipe_with_seed`` of bench_controllers), and
- from a mid-training checkpoint: 100 steps of ``Trainer`` (controller none) at the case's safe lr
  (``CKPT_LR``), its final.pt (model and optimizer state); every method then continues from it at
  the case's failing lr. The throttle and clipping get it through the Trainer's checkpoint path;
  the plain loop loads the same file the way the Trainer does (optimizer state, then lr and
  initial_lr set, then a fresh scheduler). Peers with an optimizer of their own start it fresh on
  the checkpoint's weights.

Methods
- ``fixed``: the recipe's optimizer at each lr of the grid (the plain loop; its final loss equals
  ``Trainer`` controller none, checked once per run: see ``consistency`` in the json). The best is the
  yardstick, and its median step time the unit of the time column.
- ``throttle``: ``Trainer(controller="throttle")`` at the case's lr with the defaults of
  ``TrainSettings`` as they are in the checkout the script runs in (the rule being redesigned).
- ``clip``: ``Trainer(controller="clip")``, gradient norm clipped at 1, at the case's lr.
- ``prodigy``: ``prodigyopt.Prodigy(lr=1.0)``, its defaults (weight decay as the recipe's AdamW).
- ``schedulefree``: ``SGDScheduleFree(lr, momentum)`` with the case's lr and momentum (GD: the
  package's default 0.9, since it refuses momentum 0), or
  ``AdamWScheduleFree(lr)`` at the case's lr; ``train()`` before the steps, ``eval()`` before the
  final loss is measured.
- ``dadaptation``: ``DAdaptSGD(lr=1.0, momentum=the case's)`` or ``DAdaptAdam(lr=1.0)`` (decoupled
  weight decay as the recipe's AdamW).
- ``range_min10`` / ``range_steep``: Smith's LR range test: 100 steps of the recipe's optimizer on the
  same data, lr swept exponentially from 1e-6× to 10× the case's lr; the loss smoothed by an
  exponential average (0.98, bias-corrected); the sweep stops when the smoothed loss passes 4× its
  minimum or the loss diverges. ``range_min10`` picks (lr at the smoothed minimum)/10,
  ``range_steep`` the lr where the smoothed loss falls fastest per log-lr (over the sweep from its
  11th step up to the minimum; fastai skips the first 10 too). Then a fresh 300-step run at the picked lr from the same start. The sweep's 100 steps are
  the extra cost (the ``extra steps`` column).
In the schedule case every method in the plain loop runs under the recipe's scheduler (the peak it
scales is the method's lr: Prodigy's and D-Adaptation's 1.0, the range test's pick); the range test's
sweep itself is unscheduled.

Divergence: the Trainer's rule (non-finite, or above 1e3 × the first step's loss) → "diverged at step
k", no final loss. Time: the median wall time of a step (one torch thread; a Trainer step as it logs
it, the plain loop's zero_grad + forward + backward + step + scheduler step), ÷ the best fixed lr's.

Run:
    nice -n 10 /work/venv/bin/python benchmarks/bench_peers.py              # everything (~15 min)
    python benchmarks/bench_peers.py --only throttle                        # rerun only the throttle rows
    python benchmarks/bench_peers.py --cases transformer --seeds 0 --only throttle,clip
``--only`` reruns the named methods and keeps every other result from the json (``--json``); the
tables (``--out``) are always re-rendered from the json. Text below NOTES_MARKER in the markdown is
hand-written and kept. Needs the bench-only packages: pip install prodigyopt==1.1.2
schedulefree==1.4.1 dadaptation==3.2 (torch is left as it is).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SAMPLES = ROOT / "sample_models"

import torch  # noqa: E402

from bench_controllers import recipe_with_seed  # noqa: E402
from curvdiag.loading.recipe import load_recipe  # noqa: E402
from curvdiag.train.loop import Trainer, TrainSettings  # noqa: E402

NOTES_MARKER = "<!-- notes: everything from this line on is hand-written and kept by bench_peers.py -->"
DIVERGENCE_FACTOR = 1e3  # the Trainer's default rule
RANGE_STEPS, RANGE_LOW, RANGE_HIGH, RANGE_SKIP = 100, 1e-6, 10.0, 10


class Case:
    """One failing case: its recipe, the failing lr (the recipe's), the fixed-lr grid, the optimizer
    family (``sgd`` or ``adam``), its momentum and weight decay, and the safe lr of the checkpoint run."""

    def __init__(self, name: str, recipe: str, lr: float, grid: List[float], family: str, momentum: float,
                 weight_decay: float, ckpt_lr: float):
        self.name, self.recipe, self.lr, self.grid = name, recipe, lr, grid
        self.family, self.momentum, self.weight_decay, self.ckpt_lr = family, momentum, weight_decay, ckpt_lr


CASES = [
    Case("GD", "diverge_gd.py", 10.0, [0.5, 1, 2, 3, 5, 8, 10], "sgd", 0.0, 0.0, 1.0),
    Case("momentum", "diverge_momentum.py", 10.0, [0.2, 0.5, 1, 2, 3, 5, 10], "sgd", 0.9, 0.0, 0.5),
    Case("Adam", "diverge_adam.py", 0.1, [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1], "adam", 0.0, 0.0, 0.002),
    Case("transformer", "diverge_transformer.py", 0.1, [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1], "adam", 0.0,
         0.01, 0.005),
    Case("schedule", "diverge_schedule.py", 20.0, [0.5, 1, 2, 3, 5, 10, 20], "sgd", 0.9, 0.0, 1.0),
]
METHODS = ("throttle", "clip", "prodigy", "schedulefree", "dadaptation", "range_min10", "range_steep")
LABELS = {"fixed": "best fixed lr (grid)", "throttle": "throttle (Trainer defaults)", "clip": "clip at norm 1",
          "prodigy": "Prodigy (lr 1)", "schedulefree": "schedule-free", "dadaptation": "D-Adaptation (lr 1)",
          "range_min10": "LR range test, min/10", "range_steep": "LR range test, steepest"}
PACKAGES = {"prodigy": ("prodigyopt", "prodigyopt==1.1.2"), "schedulefree": ("schedulefree", "schedulefree==1.4.1"),
            "dadaptation": ("dadaptation", "dadaptation==3.2")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def require_packages(methods: List[str]) -> None:
    """Exit with one line naming the missing bench-only package (never a traceback)."""
    for method in methods:
        if method in PACKAGES:
            module, pin = PACKAGES[method]
            try:
                importlib.import_module(module)
            except ImportError:
                raise SystemExit(f"bench_peers: the package {module} is missing (needed for the {method} rows): "
                                 f"pip install {pin}   (or leave the rows out with --only)")


# --------------------------------------------------------------------------- one run
class Start:
    """Where every method of one (case, seed, start) begins: the recipe path and, from a
    checkpoint, the file (model and optimizer state) it continues from."""

    def __init__(self, recipe_path: str, checkpoint: Optional[str]):
        self.recipe_path, self.checkpoint = recipe_path, checkpoint


def full_data_loss(recipe: Any, model: torch.nn.Module) -> float:
    """The sample-weighted mean of the recipe's loss over all of data(), no gradient."""
    model.train()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in recipe.data():
            size = recipe.batch_size(batch)
            total += float(recipe.loss(model, batch)) * size
            count += size
    return total / count


def _result(final: Optional[float], diverged_at: Optional[int], times: List[float], steps: int, **extra: Any):
    return {"final": final, "diverged_at": diverged_at, "steps": steps,
            "step_s": statistics.median(times) if times else None, **extra}


def plain_run(start: Start, steps: int, make_optimizer: Callable[[List[torch.nn.Parameter]], Any],
              lr: Optional[float] = None, scheduled: bool = True, load_optimizer_state: bool = True,
              lr_at: Optional[Callable[[int], float]] = None, schedule_free: bool = False,
              stop: Optional[Callable[[List[float]], bool]] = None) -> Tuple[Dict[str, Any], List[float]]:
    """The plain loop (zero_grad, loss, backward, step, scheduler step) with the Trainer's divergence
    rule. ``make_optimizer(params)`` builds the optimizer; with a checkpoint its state is loaded when
    ``load_optimizer_state`` (the recipe's own optimizer); ``lr`` then sets every group's lr and
    initial_lr (as ``TrainSettings.lr``); ``lr_at(step)`` overrides the rate per step (the range
    test); ``stop(losses)`` ends the run early (not a divergence). Returns the result and the losses."""
    recipe = load_recipe(start.recipe_path)
    torch.manual_seed(0)
    model = recipe.model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params)
    if start.checkpoint is not None:
        state = torch.load(start.checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        if load_optimizer_state and state.get("optimizer") is not None:
            opt.load_state_dict(state["optimizer"])
    if lr is not None:
        for group in opt.param_groups:
            group["lr"] = lr
            group["initial_lr"] = lr
    scheduler = recipe._call("scheduler", opt) if scheduled and recipe.has("scheduler") else None
    if schedule_free:
        opt.train()
    batches = list(recipe.data())
    losses: List[float] = []
    times: List[float] = []
    initial = None
    for step in range(steps):
        started = time.perf_counter()
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = recipe.loss(model, batches[step % len(batches)])
        value = float(loss.detach())
        initial = value if initial is None else initial
        if not math.isfinite(value) or value > DIVERGENCE_FACTOR * max(abs(initial), 1e-12):
            return _result(None, step, times, step), losses
        losses.append(value)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        times.append(time.perf_counter() - started)
        if stop is not None and stop(losses):
            break
    if schedule_free:
        opt.eval()
    final = full_data_loss(recipe, model)
    if not math.isfinite(final):
        return _result(None, len(losses), times, len(losses)), losses
    return _result(final, None, times, len(losses)), losses


def recipe_optimizer(start: Start) -> Callable[[List[torch.nn.Parameter]], Any]:
    recipe = load_recipe(start.recipe_path)
    return recipe.optimizer


# When the throttle takes over (TrainSettings.engage): the default, or "always" to measure the rule
# applied from the first step (bench_throttle_seeds.py ... --engage always).
ENGAGE = TrainSettings().engage


def trainer_run(start: Start, controller: str, steps: int, lr: float, out: Path) -> Dict[str, Any]:
    """``Trainer`` as ``curvdiag train`` runs it (defaults of TrainSettings but lr, controller and
    :data:`ENGAGE`); the final loss on all of data() at final.pt. A run that raises is a result, not fatal."""
    records: List[Dict[str, Any]] = []
    try:
        trainer = Trainer(start.recipe_path, start.checkpoint, out,
                          TrainSettings(steps=steps, lr=lr, controller=controller, checkpoint_every=0, engage=ENGAGE))
        summary = trainer.run(on_step=records.append)
    except Exception as exc:  # noqa: BLE001 -- a controller failing on a case is a result
        message = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        log(f"    {controller}: {type(exc).__name__}: {message}")
        return _result(None, None, [], 0, error=f"{type(exc).__name__}: {message}")
    times = [r["seconds"] for r in records[1:] if r.get("seconds") is not None]  # step 0 loads data()
    extra = {"mean_throttle": summary.mean_throttle, "extra_hvps_per_step": summary.extra_hvps_per_step}
    if summary.diverged:
        return _result(None, summary.steps_completed, times, summary.steps_completed, **extra)
    recipe = load_recipe(start.recipe_path)
    model = recipe.model()
    model.load_state_dict(torch.load(out / "final.pt", weights_only=True)["model"])
    return _result(full_data_loss(recipe, model), None, times, summary.steps_completed, **extra)


# --------------------------------------------------------------------------- peers
def peer_optimizer(method: str, case: Case, lr: float) -> Callable[[List[torch.nn.Parameter]], Any]:
    if method == "prodigy":
        from prodigyopt import Prodigy

        return lambda params: Prodigy(params, lr=1.0, weight_decay=case.weight_decay)
    if method == "schedulefree":
        import schedulefree

        if case.family == "sgd":
            # SGDScheduleFree needs 0 < momentum < 1: full-batch GD (momentum 0) gets the package's default 0.9
            momentum = case.momentum if 0 < case.momentum < 1 else 0.9
            return lambda params: schedulefree.SGDScheduleFree(params, lr=lr, momentum=momentum)
        return lambda params: schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=case.weight_decay)
    if method == "dadaptation":
        import dadaptation

        if case.family == "sgd":
            return lambda params: dadaptation.DAdaptSGD(params, lr=1.0, momentum=case.momentum)
        return lambda params: dadaptation.DAdaptAdam(params, lr=1.0, weight_decay=case.weight_decay,
                                                     decouple=case.weight_decay > 0)
    raise ValueError(method)


def smoothed(losses: List[float], beta: float = 0.98) -> List[float]:
    """The exponential average of the losses, bias-corrected (fastai's LR finder)."""
    out, average = [], 0.0
    for k, value in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** k))
    return out


def range_test(start: Start, case: Case) -> Dict[str, Any]:
    """Smith's sweep: the picks by min/10 and by the steepest smoothed descent, and its cost."""
    low, high = RANGE_LOW * case.lr, RANGE_HIGH * case.lr
    rates = [low * (high / low) ** (k / (RANGE_STEPS - 1)) for k in range(RANGE_STEPS)]

    def blown(losses: List[float]) -> bool:
        s = smoothed(losses)
        return len(s) > 10 and s[-1] > 4 * min(s)

    result, losses = plain_run(start, RANGE_STEPS, recipe_optimizer(start), scheduled=False,
                               lr_at=lambda k: rates[k], stop=blown)
    s = smoothed(losses)
    if not s:
        return {"steps": 0, "min10": rates[0], "steep": rates[0]}
    best = min(range(len(s)), key=s.__getitem__)
    first = min(RANGE_SKIP, max(best - 1, 1))  # the first steps' average is a few noisy batches (fastai skips 10)
    slopes = {k: (s[k + 1] - s[k - 1]) / (math.log(rates[k + 1]) - math.log(rates[k - 1])) for k in range(first, best)}
    steep = rates[min(slopes, key=slopes.__getitem__)] if slopes else rates[best]
    return {"steps": len(losses) + (1 if result["diverged_at"] is not None else 0), "min10": rates[best] / 10,
            "steep": steep, "min_at": rates[best], "sweep_step_s": result["step_s"]}


def run_method(method: str, start: Start, case: Case, steps: int, tmp: Path, cache: Dict[str, Any]) -> Dict[str, Any]:
    if method in ("throttle", "clip"):
        return trainer_run(start, method, steps, case.lr, tmp / method)
    if method in ("range_min10", "range_steep"):
        if "range" not in cache:
            cache["range"] = range_test(start, case)
        sweep = cache["range"]
        picked = sweep["min10" if method == "range_min10" else "steep"]
        result, _ = plain_run(start, steps, recipe_optimizer(start), lr=picked)
        return {**result, "lr": picked, "extra_steps": sweep["steps"], "sweep": sweep}
    schedule_free = method == "schedulefree"
    result, _ = plain_run(start, steps, peer_optimizer(method, case, case.lr), load_optimizer_state=False,
                          schedule_free=schedule_free)
    return result


# --------------------------------------------------------------------------- one (case, start, seed)
def make_checkpoint(recipe_path: str, case: Case, tmp: Path) -> str:
    """100 Trainer steps (controller none) at the case's safe lr; its final.pt."""
    out = tmp / "midpoint"
    summary = Trainer(recipe_path, None, out, TrainSettings(steps=100, lr=case.ckpt_lr, checkpoint_every=0)).run()
    if summary.diverged:
        raise RuntimeError(f"{case.name}: the checkpoint run at lr {case.ckpt_lr} diverged; pick a safer CKPT lr")
    return str(out / "final.pt")


def run_cell(case: Case, seed: int, from_checkpoint: bool, steps: int, methods: List[str], previous: Dict[str, Any],
             rerun_grid: bool) -> Dict[str, Any]:
    cell = dict(previous)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        recipe_path = recipe_with_seed(case.recipe, seed, tmp)
        checkpoint = make_checkpoint(recipe_path, case, tmp) if from_checkpoint else None
        start = Start(recipe_path, checkpoint)
        if rerun_grid or "grid" not in cell:
            grid = {}
            for lr in case.grid:
                grid[str(lr)], _ = plain_run(start, steps, recipe_optimizer(start), lr=lr)
            cell["grid"] = grid
        ok = {lr: r for lr, r in cell["grid"].items() if r["final"] is not None}
        best = min(ok, key=lambda lr: ok[lr]["final"]) if ok else None
        cell["best_lr"], cell["best_final"] = best, ok[best]["final"] if best else None
        cell["plain_step_s"] = ok[best]["step_s"] if best else None
        results = dict(cell.get("methods", {}))
        cache: Dict[str, Any] = {}
        for method in methods:
            started = time.perf_counter()
            try:
                results[method] = run_method(method, start, case, steps, tmp, cache)
            except Exception as exc:  # noqa: BLE001 -- a peer that raises on a case is a result
                message = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                log(f"    {method}: {type(exc).__name__}: {message}")
                results[method] = _result(None, None, [], 0, error=f"{type(exc).__name__}: {message}")
            results[method]["run_s"] = time.perf_counter() - started
        cell["methods"] = results
    return cell


# --------------------------------------------------------------------------- tables
def fmt(x: Optional[float], spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def ratio_text(r: Optional[float]) -> str:
    if r is None:
        return "–"
    if r >= 1000:
        return f"{r:.1e}"
    return f"{r:.3g}"


def method_ratios(cells: Dict[str, Any], method: str) -> Tuple[List[str], Optional[float], List[str]]:
    """Per-seed cells (ratio or 'div k'), the worst ratio (None when one diverged), diverged notes."""
    shown, ratios, diverged = [], [], []
    for seed, cell in cells.items():
        best = cell.get("best_final")
        r = cell["methods"].get(method) if method != "fixed" else {"final": best, "diverged_at": None}
        if r is None:
            shown.append("not run")
            continue
        if r.get("error"):
            shown.append("error")
            diverged.append(f"seed {seed}: {r['error']}")
            ratios.append(math.inf)
        elif r["final"] is None:
            shown.append(f"✗ (step {r['diverged_at']})")
            diverged.append(f"seed {seed} at step {r['diverged_at']}")
            ratios.append(math.inf)
        else:
            ratio = r["final"] / best
            shown.append(ratio_text(ratio))
            ratios.append(ratio)
    worst = max(ratios) if ratios else None
    return shown, worst, diverged


def time_ratio(cells: Dict[str, Any], method: str) -> Optional[float]:
    values = []
    for cell in cells.values():
        r = cell["methods"].get(method) if method != "fixed" else {"step_s": cell.get("plain_step_s"), "steps": 100}
        if r and r.get("step_s") and cell.get("plain_step_s") and r.get("steps", 0) >= 20:
            values.append(r["step_s"] / cell["plain_step_s"])
    return statistics.median(values) if values else None


def render(data: Dict[str, Any]) -> str:
    meta = data["meta"]
    header = ["# The throttle and its peers on the failing cases",
              "",
              f"Generated by `benchmarks/bench_peers.py` (curvdiag at {meta.get('commit')}; torch {meta.get('torch')}, "
             f"1 thread; {meta.get('steps')} steps per run; prodigyopt {meta.get('prodigyopt')}, schedulefree "
             f"{meta.get('schedulefree')}, dadaptation {meta.get('dadaptation')}). Throttle rows last rerun at "
             f"{meta.get('throttle_commit', meta.get('commit'))}.",
             "",
             "Every number is the final loss on all of `data()` ÷ the best fixed lr of the 7-point grid (same start, "
             "seed, steps); ✗ = diverged (step); *worst* is over the seeds; s/step is the median step's wall time "
             "÷ the plain loop at the best fixed lr (median over seeds). The range test's 100 sweep steps are extra.",
             ""]
    if meta.get("cut"):
        header += [f"**Cut:** {meta['cut']}", ""]
    if meta.get("wall_s"):
        header += [f"Wall time of the full run: {meta['wall_s']} s (one thread, nice 10, a shared 2-core machine).", ""]
    lines: List[str] = []
    starts = [("init", "from initialisation"), ("checkpoint", "from a mid-training checkpoint")]
    summary_rows: Dict[str, Dict[str, str]] = {}
    for case in CASES:
        for key, title in starts:
            cells = data["cases"].get(case.name, {}).get(key)
            if not cells:
                continue
            seeds = list(cells)
            column = f"{case.name} ({'init' if key == 'init' else 'ckpt'})"
            extra_ckpt = f" (100 steps at lr {case.ckpt_lr} first)" if key == "checkpoint" else ""
            lines += [f"## {case.name} {title}{extra_ckpt}, at lr {case.lr}", "",
                      "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | worst | diverged? | s/step ÷ plain | extra |",
                      "|---|" + "---|" * len(seeds) + "---|---|---|---|"]
            for method in ("fixed",) + METHODS:
                shown, worst, diverged = method_ratios(cells, method)
                if all(s == "not run" for s in shown):
                    continue
                extra = ""
                if method.startswith("range"):
                    picks = [cell["methods"][method].get("lr") for cell in cells.values() if method in cell["methods"]]
                    costs = [cell["methods"][method].get("extra_steps") for cell in cells.values()
                             if method in cell["methods"]]
                    extra = f"lr {', '.join(fmt(p) for p in picks)}; +{', '.join(str(c) for c in costs)} steps"
                if method == "fixed":
                    extra = "lr " + ", ".join(str(cell["best_lr"]) for cell in cells.values())
                if method == "throttle":
                    hv = [cell["methods"]["throttle"].get("extra_hvps_per_step") for cell in cells.values()
                          if "throttle" in cell["methods"]]
                    mt = [cell["methods"]["throttle"].get("mean_throttle") for cell in cells.values()
                          if "throttle" in cell["methods"]]
                    extra = f"mean factor {', '.join(fmt(m, '.2f') for m in mt)}; HVPs/step {', '.join(fmt(h, '.2f') for h in hv)}"
                worst_text = "✗" if worst == math.inf else ratio_text(worst)
                lines.append(f"| {LABELS[method]} | " + " | ".join(shown) + f" | {worst_text} | "
                             f"{'; '.join(diverged) if diverged else 'no'} | {fmt(time_ratio(cells, method), '.2f')} | {extra} |")
                summary_rows.setdefault(method, {})[column] = worst_text
            grid_lines = []
            for seed, cell in cells.items():
                grid = ", ".join(f"{lr}: {'✗' if r['final'] is None else fmt(r['final'])}" for lr, r in cell["grid"].items())
                grid_lines.append(f"- seed {seed}: {grid} → best **{cell['best_lr']}** ({fmt(cell['best_final'])})")
            lines += ["", "Fixed-lr grid (final loss on all data):", ""] + grid_lines + [""]
    columns = [f"{c.name} ({s})" for c in CASES for s in ("init", "ckpt")]
    columns = [c for c in columns if any(c in row for row in summary_rows.values())]
    head = ["## Summary: worst ratio over the seeds (final loss ÷ best fixed lr; ✗ diverged)", "",
            "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    body = [f"| {LABELS[m]} | " + " | ".join(summary_rows[m].get(c, "–") for c in columns) + " |"
            for m in ("fixed",) + METHODS if m in summary_rows]
    sentence = []
    for m in METHODS:
        if m in summary_rows:
            sentence.append(f"{LABELS[m]} " + " / ".join(summary_rows[m].get(c, "–") for c in columns))
    order = " / ".join(columns)
    text = "\n".join(header + head + body + ["", f"In one line ({order}): " + "; ".join(sentence) + ".", ""] + lines)
    consistency = data.get("consistency")
    if consistency:
        text += ("\nPlain loop against `Trainer` controller none, from initialisation (seed 0): the grid's loop does "
                 "the Trainer's arithmetic, and the Trainer's own bookkeeping (a deep copy of the state every step) is "
                 "part of the throttle's and clipping's time column: "
                 + "; ".join(f"{k}: {v}" for k, v in consistency.items()) + ".\n")
    return text


# --------------------------------------------------------------------------- main
def consistency_check() -> Dict[str, str]:
    """The plain loop and Trainer none at one lr from initialisation: the same final loss."""
    out = {}
    for case in (CASES[1], CASES[3], CASES[4]):
        with tempfile.TemporaryDirectory() as tmp:
            start = Start(str(SAMPLES / case.recipe), None)
            plain, _ = plain_run(start, 100, recipe_optimizer(start), lr=case.grid[3])
            trainer = trainer_run(start, "none", 100, case.grid[3], Path(tmp) / "none")
        out[f"{case.name} lr {case.grid[3]}, 100 steps"] = (
            f"final {fmt(plain['final'], '.6g')} vs {fmt(trainer['final'], '.6g')}, a Trainer step "
            f"{fmt(trainer['step_s'] / plain['step_s'], '.2f')}× a plain one ({1e3 * plain['step_s']:.2f} ms)")
    return out


def commit() -> str:
    """HEAD, with +dirty when a tracked file other than this benchmark's results differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line for line in changed if "benchmarks/peers_results." not in line]
    return head + ("+dirty" if changed else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--seeds", default="0,1,2", help="init seeds of the from-initialisation runs")
    parser.add_argument("--checkpoint-seeds", default=None, help="seeds of the mid-training runs (default: --seeds)")
    parser.add_argument("--starts", default="init,checkpoint")
    parser.add_argument("--only", default=None,
                        help=f"rerun only these methods ({','.join(METHODS)}), keeping the rest from --json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "peers_results.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "peers_results.md")
    parser.add_argument("--render", action="store_true", help="only re-render the markdown from the json")
    parser.add_argument("--cut", default=None, help="a sentence for the results file saying what was cut")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    data: Dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {"meta": {}, "cases": {}}
    if not args.render:
        methods = list(METHODS) if args.only is None else [m.strip() for m in args.only.split(",")]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"bench_peers: unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        require_packages(methods)
        if args.only is not None and not data["cases"]:
            raise SystemExit(f"bench_peers: --only needs the cached results in {args.json}; run without --only first")
        wanted = [c for c in CASES if c.name in args.cases.split(",")]
        seeds = {"init": [int(s) for s in args.seeds.split(",")],
                 "checkpoint": [int(s) for s in (args.checkpoint_seeds or args.seeds).split(",")]}
        started, code = time.perf_counter(), commit()
        for case in wanted:
            for key in args.starts.split(","):
                for seed in seeds[key]:
                    log(f"[{case.name} / {key} / seed {seed}] {', '.join(methods)}")
                    t = time.perf_counter()
                    previous = data["cases"].get(case.name, {}).get(key, {}).get(str(seed), {})
                    cell = run_cell(case, seed, key == "checkpoint", args.steps, methods, previous,
                                    rerun_grid=args.only is None)
                    data["cases"].setdefault(case.name, {}).setdefault(key, {})[str(seed)] = cell
                    log(f"    {time.perf_counter() - t:.1f} s")
                    args.json.write_text(json.dumps(data, indent=1))  # partial results survive an interruption
        meta = data["meta"]
        if args.only is None:
            data["consistency"] = consistency_check()
            meta.update({"commit": code, "torch": torch.__version__, "steps": args.steps,
                         "wall_s": round(time.perf_counter() - started)})
            for _, (module, _) in PACKAGES.items():
                meta[module] = getattr(importlib.import_module(module), "__version__", None) or _dist_version(module)
        if args.only is None or "throttle" in methods:
            meta["throttle_commit"] = code
        if args.cut:
            meta["cut"] = args.cut
        args.json.write_text(json.dumps(data, indent=1))
        log(f"done in {time.perf_counter() - started:.0f} s")
    text = render(data)
    if args.out.exists():
        previous = args.out.read_text()
        if NOTES_MARKER in previous:
            text += "\n" + previous[previous.index(NOTES_MARKER):]
    args.out.write_text(text)
    print(text)


def _dist_version(module: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
