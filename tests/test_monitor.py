"""curvdiag.Monitor inside a user's own loop: it never disturbs training (losses, .grad, buffers,
RNG and optimizer state as without it), its λmax trajectory equals `curvdiag train
--sharpness-every`, its run directory is drawn by `curvdiag plot`, and its outputs (hook,
TensorBoard, warnings, actions) carry the same numbers."""

import copy
import gc
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import curvdiag
from curvdiag.cli.app import app
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.errors import BadArgument
from curvdiag.loading.checkpoint import read_checkpoint
from curvdiag.loading.recipe import load_recipe
from curvdiag.probes.sharpness import lambda_max, preconditioned_lambda_max
from curvdiag.results.run_dir import read_run
from curvdiag.train.adapters import optimizer_preconditioner
from curvdiag.train.loop import Trainer, TrainSettings

TANH = str(Path(__file__).resolve().parent.parent / "sample_models" / "tanh_mlp.py")


def _bn_dropout_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                               torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))


def _data(n_batches=4, size=32):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n_batches * size, 6, generator=generator)
    y = torch.randint(0, 3, (n_batches * size,), generator=generator)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def cross_entropy(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _train(steps, monitor_kwargs=None, optimizer=torch.optim.Adam, check_untouched=False):
    """A user's loop (BatchNorm, dropout drawing from the global RNG, mini-batches); with
    ``monitor_kwargs`` a Monitor watches it. Returns the step losses and the monitor."""
    model = _bn_dropout_model()
    opt = optimizer(model.parameters(), lr=0.01)
    data = _data()
    monitor = curvdiag.Monitor(model, cross_entropy, opt, **monitor_kwargs) if monitor_kwargs is not None else None
    torch.manual_seed(3)
    losses = []
    for step in range(steps):
        batch = data[step % len(data)]
        model.train()
        opt.zero_grad()
        loss = cross_entropy(model, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if monitor is not None:
            before = _snapshot(model, opt) if check_untouched else None
            monitor.step(batch, loss=loss)
            if before is not None:
                _assert_same(before, _snapshot(model, opt))
    return losses, monitor


def _snapshot(model, opt):
    return {"rng": torch.get_rng_state(), "grads": [p.grad.clone() for p in model.parameters()],
            "params": [p.detach().clone() for p in model.parameters()],
            "buffers": {k: v.clone() for k, v in model.named_buffers()},
            "modes": [m.training for m in model.modules()], "optimizer": copy.deepcopy(opt.state_dict())}


def _assert_same(a, b):
    assert torch.equal(a["rng"], b["rng"])
    assert all(torch.equal(x, y) for x, y in zip(a["grads"], b["grads"]))
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert a["buffers"].keys() == b["buffers"].keys()
    assert all(torch.equal(a["buffers"][k], b["buffers"][k]) for k in a["buffers"])
    assert a["modes"] == b["modes"]
    state_a, state_b = a["optimizer"], b["optimizer"]
    assert state_a["param_groups"] == state_b["param_groups"]
    for key, entry in state_a["state"].items():
        assert all(torch.equal(entry[name], state_b["state"][key][name]) for name in entry)


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD], ids=["adam", "sgd"])
def test_monitored_run_equals_unmonitored_step_for_step(optimizer):
    plain, _ = _train(12, optimizer=optimizer)
    watched, monitor = _train(12, {"every": 1, "trace_every": 4, "trace_samples": 2}, optimizer, check_untouched=True)
    assert watched == plain  # identical losses, not merely close
    assert len(monitor.measurements) == 12 and all(m.lambda_max > 0 for m in monitor.measurements)
    assert [m.trace is not None for m in monitor.measurements] == [s % 4 == 0 for s in range(12)]


def test_lambda_max_trajectory_equals_curvdiag_train_and_is_plotted(tmp_path):
    """Full-batch GD on the tanh MLP at η = 0.3: the monitor in a hand-written loop gives
    `curvdiag train --sharpness-every 10`'s λmax and EoS ratio at the same steps."""
    Trainer(TANH, None, tmp_path / "train", TrainSettings(steps=21, sharpness_every=10)).run()
    reference = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    recipe = load_recipe(TANH)
    model = recipe.model()
    opt = recipe.optimizer(model.parameters())
    (batch,) = recipe.data()
    # tol=1e-3: the tolerance `curvdiag train` uses; the monitor's default 1e-2 is tested below.
    with curvdiag.Monitor(model, recipe.loss, opt, every=10, out=tmp_path / "monitor", tol=1e-3,
                          norms_every=1) as monitor:
        monitor.watch()
        for _ in range(21):
            opt.zero_grad()
            loss = recipe.loss(model, batch)
            loss.backward()
            opt.step()
            monitor.step(batch, loss=loss)
    run = read_run(tmp_path / "monitor")
    assert run.summary.steps_completed == 21 and (tmp_path / "monitor" / "final.pt").is_file()
    assert [r.loss for r in run.records] == [r["loss"] for r in reference]
    measured = [(a, b) for a, b in zip(reference, run.records) if a.get("lambda_max") is not None]
    assert [a["step"] for a, _ in measured] == [b.step for b in run.records if b.lambda_max is not None] == [0, 10, 20]
    for a, b in measured:  # both Ritz values are below λmax and within tol of it: within tol of each other
        assert b.lambda_max == pytest.approx(a["lambda_max"], rel=1e-3)
        assert b.eos_ratio == pytest.approx(a["eos_ratio"], rel=1e-3)
    for a, b in zip(reference[1:], run.records[1:]):
        assert b.directional_curvature == pytest.approx(a["directional_curvature"], rel=1e-5)
    cold, *warm = monitor.measurements
    assert not cold.warm_start and all(m.warm_start and m.hvps < cold.hvps for m in warm)
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "monitor"), "--out", str(tmp_path / "plots"), "--dpi", "40"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plots" / "sharpness.png").stat().st_size > 1000


def test_norms_by_default_at_the_measured_steps_equal_every_steps_norms(tmp_path):
    """Without ``norms_every`` only the measured steps log ‖G‖, ‖Δθ‖ and C_t, and they are the
    numbers an every-step monitor logs there (copies kept over the two steps before suffice)."""
    logs = {}
    for label, kwargs in (("default", {}), ("every", {"norms_every": 1})):
        _, monitor = _train(13, {"every": 5, "max_hvps": 2, "out": tmp_path / label, **kwargs}, torch.optim.SGD)
        monitor.close()
        records = [json.loads(line) for line in (tmp_path / label / "metrics.jsonl").read_text().splitlines()]
        logs[label] = [(r.get("grad_norm"), r.get("update_norm"), r.get("directional_curvature")) for r in records]
    assert len(logs["every"]) == 13 and None not in logs["every"][2]  # C_t from step 1 on
    for step, (default, every) in enumerate(zip(logs["default"], logs["every"])):
        if step % 5 == 0 and step > 0:
            assert default == every and None not in default
        elif step != 0:
            assert default == (None, None, None)
    assert logs["default"][0][0] == logs["every"][0][0] and logs["default"][0][2] is None


def test_on_measure_gets_the_preconditioned_lambda_max_of_adam():
    seen = []

    def on_measure(step, measurement):
        seen.append((step, measurement))
        model, opt, batch = state["model"], state["opt"], state["batch"]
        op = CurvatureOperator(model, [batch], cross_entropy, [32], train_mode=True)
        params = [p for p in model.parameters()]
        exact = preconditioned_lambda_max(op, op.flatten(optimizer_preconditioner(opt, params)), tol=1e-8, max_hvps=300)
        assert measurement.lambda_max == pytest.approx(exact.value, rel=1e-3)
        assert measurement.eos_ratio == pytest.approx(0.01 * exact.value / 38.0, rel=1e-3)

    model = _bn_dropout_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    state = {"model": model, "opt": opt}
    monitor = curvdiag.Monitor(model, cross_entropy, opt, every=3, on_measure=on_measure)
    for step, batch in enumerate(_data() * 2):
        state["batch"] = batch
        opt.zero_grad()
        cross_entropy(model, batch).backward()
        opt.step()
        monitor.step(batch)
    assert [s for s, _ in seen] == [0, 3, 6]
    assert all(m.preconditioned and m.batch == "step" and m.threshold == pytest.approx(38.0 / 0.01) for _, m in seen)


def test_default_tolerance_is_within_one_percent_at_every_measurement_with_fewer_products():
    """The default tol=1e-2 bounds the Ritz residual, hence the distance to an eigenvalue: every
    warm-started λmax of a mini-batch SGD run is within 1e-2 of a tight Lanczos (tol 1e-8) on the
    same batch and weights, for fewer products than cold starts at the same weights."""
    rows = []

    def on_measure(step, m):
        op = CurvatureOperator(state["model"], [state["batch"]], cross_entropy, [32], train_mode=True)
        rows.append((m, lambda_max(op, tol=1e-8, max_hvps=300).value, lambda_max(op, tol=1e-2, max_hvps=100).hvps))

    model = _bn_dropout_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {"model": model}
    monitor = curvdiag.Monitor(model, cross_entropy, opt, every=2, on_measure=on_measure)
    for batch in _data() * 5:
        state["batch"] = batch
        opt.zero_grad()
        cross_entropy(model, batch).backward()
        opt.step()
        monitor.step(batch)
    assert len(rows) == 10 and [m.warm_start for m, _, _ in rows] == [False] + [True] * 9
    for m, exact, _ in rows:
        assert abs(m.lambda_max - exact) <= 1e-2 * exact
    warm = [(m.hvps, cold) for m, _, cold in rows[1:]]
    assert sum(h for h, _ in warm) < sum(c for _, c in warm)


def test_warm_start_survives_the_top_two_eigenvectors_trading_places():
    """H = diag(batch): the first batch's top eigenvector e1 is the second batch's second one. From
    the converged e1 alone Lanczos converges to 2 (e1 is an eigenvector there too); from the sum of
    the previous top two Ritz vectors, e1 + e2, it finds 3."""
    model = torch.nn.Linear(50, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def quadratic(model, batch):
        return 0.5 * (batch * model.weight[0] ** 2).sum()

    rest = torch.linspace(0.1, 1.0, 48, dtype=torch.float64)
    monitor = curvdiag.Monitor(model, quadratic, opt, every=1, tol=1e-8)
    for top in ([3.0, 2.0], [2.0, 3.0]):
        batch = torch.cat([torch.tensor(top, dtype=torch.float64), rest])
        opt.zero_grad()
        quadratic(model, batch).backward()
        opt.step()
        monitor.step(batch[None])
    assert [m.lambda_max for m in monitor.measurements] == pytest.approx([3.0, 3.0], rel=1e-6)
    assert monitor.measurements[1].warm_start


def test_held_batches_measure_the_fixed_batches():
    model = _bn_dropout_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = _data()
    monitor = curvdiag.Monitor(model, cross_entropy, opt, every=1, held_batches=data[:2], tol=1e-6, max_hvps=200)
    opt.zero_grad()
    cross_entropy(model, data[3]).backward()
    opt.step()
    m = monitor.step(data[3])
    op = CurvatureOperator(model, data[:2], cross_entropy, [32, 32], train_mode=True)
    assert m.batch == "held" and m.lambda_max == pytest.approx(lambda_max(op, tol=1e-8).value, rel=1e-5)
    assert m.loss == pytest.approx(op.loss(), rel=1e-6)


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install curvdiag[test])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, monitor = _train(7, {"every": 3, "tensorboard": tmp_path / "tb"})
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("curvdiag/lambda_max")]
    assert [s for s, _ in logged] == [0, 3, 6]
    for (_, value), m in zip(logged, monitor.measurements):
        assert value == pytest.approx(m.lambda_max, rel=1e-6)  # TensorBoard stores float32
    assert [e.step for e in events.Scalars("curvdiag/loss")] == list(range(7))
    assert len(events.Scalars("curvdiag/eos_ratio")) == 3


def test_warning_saves_a_checkpoint_and_engages_the_throttle(tmp_path, caplog):
    model = _bn_dropout_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = curvdiag.Monitor(model, cross_entropy, opt, every=2, warn_ratio=1e-3, out=tmp_path,
                               actions=("checkpoint", "throttle"))
    floors = []
    with caplog.at_level(logging.WARNING, logger="curvdiag.monitor"):
        for batch in _data():
            opt.zero_grad()
            cross_entropy(model, batch).backward()
            if monitor.throttle is not None:
                floors.append(monitor.throttle.floor)
            monitor.optimizer_step()
            monitor.step(batch)
    # every measurement after engaging hands its λmax to the throttle's next step, which reads it once
    assert floors[0] == monitor.measurements[0].lambda_max and floors[1] is None
    assert floors[2::2] == [m.lambda_max for m in monitor.measurements[1:len(floors[2::2]) + 1]]
    crossings = [r for r in caplog.records if "crossed" in r.getMessage()]
    assert len(crossings) == 1 and "step 0" in crossings[0].getMessage()  # once, when it crosses
    checkpoint = read_checkpoint(str(tmp_path / "checkpoints" / "warning_step_1.pt"))
    assert checkpoint.step == 1 and checkpoint.optimizer_state is not None
    assert monitor.throttle is not None and monitor.throttle.factor <= 1.0
    monitor.close()
    assert read_run(tmp_path).summary.controller == "throttle"


def test_lambda_max_jump_warns(caplog):
    model = torch.nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scale = {"value": 1.0}

    def quadratic(model, batch):
        return scale["value"] * model.weight.pow(2).sum()

    monitor = curvdiag.Monitor(model, quadratic, opt, every=1, warn_jump=0.5)
    with caplog.at_level(logging.WARNING, logger="curvdiag.monitor"):
        for value in (1.0, 1.2, 3.0):
            scale["value"] = value
            opt.zero_grad()
            quadratic(model, None).backward()
            opt.step()
            monitor.step(torch.zeros(1))
    jumps = [r.getMessage() for r in caplog.records if "jumped" in r.getMessage()]
    assert len(jumps) == 1 and "step 2" in jumps[0]
    assert [m.lambda_max for m in monitor.measurements] == pytest.approx([2.0, 2.4, 6.0], rel=1e-6)


def test_no_tensor_outlives_a_measurement():
    """Memory stays flat: after a warm-up, 40 more monitored steps (every one measured, with the
    trace) leave exactly as many live tensors as before (no create_graph reference cycles)."""
    model = _bn_dropout_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    monitor = curvdiag.Monitor(model, cross_entropy, opt, every=1, trace_every=2, trace_samples=2)
    data = _data()

    def steps(n):
        for i in range(n):
            opt.zero_grad()
            cross_entropy(model, data[i % 4]).backward()
            opt.step()
            monitor.step(data[i % 4])

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():  # isinstance on every object touches deprecated torch attributes
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    steps(4)
    monitor.measurements.clear()
    before = live_tensors()
    steps(40)
    monitor.measurements.clear()  # the monitor's own list of results: not a leak
    assert live_tensors() == before


@pytest.mark.parametrize("kwargs, match", [
    ({"every": 0}, r"every=0: must be an integer ≥ 1"),
    ({"trace_every": -1}, r"trace_every=-1"),
    ({"tol": 0.0}, r"tol=0.0: must lie in \(0, 1\)"),
    ({"warn_ratio": 0}, r"warn_ratio=0: must be positive"),
    ({"warn_jump": -1}, r"warn_jump=-1: must be positive"),
    ({"actions": ("reboot",)}, r"unknown action 'reboot'"),
    ({"actions": ("checkpoint",)}, r"'checkpoint' needs a run directory"),
    ({"held_batches": []}, r"held_batches=\[\]: must hold at least one batch"),
])
def test_bad_arguments_are_named(kwargs, match):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(BadArgument, match=match):
        curvdiag.Monitor(model, cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_a_closed_monitor_refuses_steps(tmp_path):
    model = torch.nn.Linear(2, 1)
    monitor = curvdiag.Monitor(model, cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1))
    monitor.close()
    with pytest.raises(curvdiag.BadInput, match="closed"):
        monitor.step(torch.zeros(1, 2))


def test_the_readme_monitor_example_runs(tmp_path, capsys):
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"<!-- monitor-example[^>]*-->\n```python\n(.*?)```", readme, re.S).group(1)
    exec(block, {"RUN_DIR": tmp_path})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["0", "10", "20", "30", "40"]
    run = read_run(tmp_path)
    assert run.summary.steps_completed == 50 and len(run.series("lambda_max")[0]) == 5


def test_cost_splits_the_loops_own_time_from_the_monitors(caplog):
    """``Monitor.cost()``: the wall time between ``step`` calls (here at least a 2-ms sleep a step)
    is the loop's, the time inside them the monitor's; slowdown = their sum over the loop's."""
    import time

    model = _bn_dropout_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = _data()
    monitor = curvdiag.Monitor(model, cross_entropy, opt, every=10)
    assert monitor.cost().slowdown is None
    started = time.perf_counter()
    for step in range(30):
        opt.zero_grad()
        cross_entropy(model, data[step % len(data)]).backward()
        opt.step()
        time.sleep(0.002)
        monitor.step(data[step % len(data)])
    elapsed = time.perf_counter() - started
    cost = monitor.cost()
    assert (cost.steps, cost.measurements) == (30, 3)
    assert cost.hvps == sum(m.hvps for m in monitor.measurements) and cost.hvps_per_measurement == cost.hvps / 3
    assert cost.loop_seconds >= 29 * 0.002 and cost.monitor_seconds >= sum(m.seconds for m in monitor.measurements)
    assert cost.loop_seconds + cost.monitor_seconds <= elapsed
    assert cost.slowdown == pytest.approx((cost.loop_seconds + cost.monitor_seconds) / cost.loop_seconds)
    with caplog.at_level(logging.INFO, logger="curvdiag.monitor"):
        monitor.close()
    assert "3 measurements in 30 steps" in caplog.text and "× the loop alone" in caplog.text


@pytest.mark.parametrize("kind", ["attention", "no-double-backward"])
def test_a_fallback_is_found_once_and_later_measurements_reuse_it(kind, monkeypatch):
    """The first measurement tries the kernels (fused attention, then math attention; or double
    backward, then finite differences); later ones build straight on what it found and give the
    same λmax as a fresh operator of that kind."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from models import FusedKernelMLP, TinyAttention, mse, regression_batches, sequence_batches

    if kind == "attention":
        model, data, sizes, expected = TinyAttention().double(), sequence_batches(), [5], ("kept-graph", "math")
    else:
        model, data, sizes, expected = FusedKernelMLP().double(), regression_batches(), [7, 3], ("finite-difference", "auto")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tries = []
    original = CurvatureOperator._try_exact
    monkeypatch.setattr(CurvatureOperator, "_try_exact", lambda self, probe: tries.append(1) or original(self, probe))
    monitor = curvdiag.Monitor(model, mse, opt, every=1, held_batches=data, batch_size=lambda b: b[0].shape[0],
                               tol=1e-6)
    for step in range(3):
        opt.zero_grad()
        sum(mse(model, b) * n for b, n in zip(data, sizes)).backward()
        opt.step()
        monitor.step(data[0])
        if step == 0:
            assert (monitor.hvp_method, monitor._build_options["attention"]) == expected and len(tries) == 2
    assert len(tries) == 2  # none after the first measurement
    monkeypatch.undo()
    fresh = CurvatureOperator(model, data, mse, sizes, train_mode=True)
    assert monitor.measurements[-1].lambda_max == pytest.approx(lambda_max(fresh, tol=1e-8).value, rel=1e-5)


def test_a_partly_kept_graph_is_measured_again_without_a_second_check(monkeypatch):
    """Held batches whose graph is over the memory budget: the monitor's operator keeps part of it
    (partial-kept-graph, recorded as such); an operator built before any measurement has ended
    (a measurement interrupted mid-Lanczos) asks ``auto`` again; after one, later measurements
    choose the kept batches again but make no start-up check (its product is wasted on a
    warm-started Lanczos)."""
    import curvdiag.curvature.operator as operator_module

    model, held = _bn_dropout_model(), _data(n_batches=4)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    whole = CurvatureOperator(model, held, loss, [32] * 4, train_mode=True).graph_bytes
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    told = curvdiag.Monitor(model, loss, opt, held_batches=held, batch_size=lambda b: b[0].shape[0], memory=whole // 4)
    assert told._operator(held[0]).kept_batches == 1  # the memory asked for
    with pytest.raises(BadArgument, match="^memory="):
        curvdiag.Monitor(model, loss, opt, memory=0)
    monkeypatch.setattr(operator_module, "default_memory", lambda device: whole // 2)
    monitor = curvdiag.Monitor(model, loss, opt, every=1, held_batches=held, batch_size=lambda b: b[0].shape[0])
    first = monitor._operator(held[0])
    assert (first.hvp_method, first.kept_batches) == ("partial-kept-graph", 2)
    again = monitor._operator(held[0])  # no measurement ended in between
    assert again.hvp_method == "partial-kept-graph"
    del first, again
    opt.zero_grad()
    loss(model, held[0]).backward()
    opt.step()
    monitor.step(held[0])
    assert monitor._build_options["hvp_method"] == monitor.hvp_method == "partial-kept-graph"
    checks = []
    try_exact = CurvatureOperator._try_exact
    monkeypatch.setattr(CurvatureOperator, "_try_exact", lambda self, probe: checks.append(1) or try_exact(self, probe))
    opt.zero_grad()
    loss(model, held[1]).backward()
    opt.step()
    monitor.step(held[1])
    assert checks == [] and monitor.measurements[-1].warm_start
    fresh = CurvatureOperator(model, held, loss, [32] * 4, train_mode=True, hvp_method="kept-graph")
    assert monitor.measurements[-1].lambda_max == pytest.approx(lambda_max(fresh, tol=1e-8).value, rel=1e-3)
