"""Issue 12, item 3: progress everywhere, and --timeout / Ctrl-C end a run with the report of the
probes that finished. Plain progress lines when stderr is not a terminal (a heartbeat at least
every interval); interruptions in ``run_probes`` (a deadline checked before each probe and after
each product; KeyboardInterrupt) and through the CLI (exit 124 / 130, partial JSON)."""

from __future__ import annotations

import io
import json
import signal
import textwrap
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import RECIPES
from curvdiag.cli.app import app
from curvdiag.cli.progress import LineProgress, ProbeProgress, RichProgress, StepLines, progress_for
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.loading.target import load_target
from curvdiag.probes import runner
from curvdiag.probes.runner import ProbeDone, ProbeSettings, run_probes
from curvdiag.results.probe_results import ProbeCost, Skipped
from processes import Job

TINY = str(RECIPES / "tiny_mlp.py")


# ---------------------------------------------------------------- the plain lines
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_lines_for_start_finish_and_a_heartbeat_every_interval():
    clock, stream = FakeClock(), io.StringIO()
    progress = LineProgress(stream, started=100.0, interval=10.0, clock=clock, heartbeat=False)
    progress.stage("loading recipe and checkpoint")
    assert stream.getvalue() == ""  # a stage alone prints nothing: a load error stays one line
    clock.now = 102.0
    progress.probe_started("lambda_max")
    for count in range(1, 6):
        progress.hvp(count)
    clock.now = 111.9
    assert not progress.heartbeat_due()  # 9.9 s since the last line
    clock.now = 112.0
    assert progress.heartbeat_due()
    progress.beat()
    clock.now = 113.5
    progress.probe_finished(ProbeDone("lambda_max", 11.5, 5, {}))
    clock.now = 114.0
    progress.probe_finished(ProbeDone("hessian_trace", 0.5, 20, {}, cost=ProbeCost(
        "hessian_trace", planned=40.0, spent=12.5, seconds=0.5, stop="precision",
        precision_name="relative s.e.", precision_target=0.01, precision_reached=0.0093)))
    progress.close()
    assert stream.getvalue().splitlines() == [
        "[probe    2.0 s] lambda_max: started",
        "[probe   12.0 s] lambda_max: running for 10.0 s, 5 HVPs",
        "[probe   13.5 s] lambda_max: finished in 11.5 s, 5 HVPs",
        "[probe   14.0 s] hessian_trace: finished in 0.5 s, 12.5 of 40 gradient-equivalents (precision), "
        "relative s.e. 0.0093",
    ]


def test_train_step_lines_start_every_interval_and_at_the_last_step():
    clock, stream = FakeClock(), io.StringIO()
    lines = StepLines(stream, started=99.5, label="train [throttle]", total=300, completed=100, interval=10.0, clock=clock)
    for step, now in ((101, 101.0), (150, 109.9), (212, 110.0), (250, 115.0), (300, 116.2)):
        clock.now = now
        lines.update(step, f"loss {1 / step:.4g}")
    assert stream.getvalue().splitlines() == [
        "[train    0.5 s] train [throttle]: started at step 100 of 300",
        "[train   10.5 s] train [throttle]: step 212/300 · loss 0.004717",
        "[train   16.7 s] train [throttle]: step 300/300 · loss 0.003333",
    ]


def test_train_off_a_terminal_prints_step_lines_on_stderr(tmp_path):
    """``curvdiag train`` with stderr in a pipe (a log, CI) says when each run starts and ends."""
    result = CliRunner().invoke(app, ["train", TINY, "--steps", "5", "--controller", "throttle", "--compare",
                                      "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[train ")]
    assert [line.split("] ", 1)[1] for line in lines if "started" in line] == [
        "train [none]: started at step 0 of 5", "train [throttle]: started at step 0 of 5"]  # the baseline first
    assert sum(": step 5/5 · loss " in line for line in lines) == 2
    quiet = CliRunner().invoke(app, ["train", TINY, "--steps", "5", "--quiet", "--out", str(tmp_path / "quiet")])
    assert quiet.exit_code == 0 and "[train " not in quiet.stderr


def test_the_heartbeat_thread_prints_while_nothing_else_does():
    stream = io.StringIO()
    progress = LineProgress(stream, started=time.monotonic(), interval=0.05)
    progress.stage("building the curvature operator (2 batches)")
    waited = time.monotonic()
    while "running for" not in stream.getvalue() and time.monotonic() - waited < 20:
        time.sleep(0.01)
    progress.close()
    assert "building the curvature operator (2 batches): running for" in stream.getvalue()


def test_progress_kind_follows_quiet_and_the_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert type(progress_for(True, 0.0, io.StringIO())) is ProbeProgress
    plain = progress_for(False, 0.0, io.StringIO())
    rich = progress_for(False, 0.0, Terminal())
    plain.close(), rich.close()
    assert isinstance(plain, LineProgress) and isinstance(rich, RichProgress)


# ---------------------------------------------------------------- run_probes' interruptions
@pytest.fixture()
def tiny():
    target = load_target(TINY)
    op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes)
    return target, op


class ShiftedClock:
    """time for the runner: the real one, plus ``offset`` once a test moves it past the deadline."""

    def __init__(self):
        self.offset = 0.0

    def monotonic(self):
        return time.monotonic() + self.offset

    def perf_counter(self):
        return time.perf_counter()


def test_a_deadline_between_probes_keeps_the_finished_ones(tiny, monkeypatch):
    target, op = tiny
    clock = ShiftedClock()
    monkeypatch.setattr(runner, "time", clock)
    done = []

    def finished(event):
        done.append(event.name)
        clock.offset = 1e6  # the deadline passes as the first probe ends

    settings = ProbeSettings(probes=["lambda_max", "hessian_trace", "hessian_diag"], samples=10)
    report = run_probes(target, op, settings, finished=finished, deadline=time.monotonic() + 3600)
    assert done == ["lambda_max"]
    assert report.interrupted and report.interrupted_by == "timeout"
    assert report.probes["lambda_max"].value > 0 and not isinstance(report.probes["eos"], Skipped)
    for name in ("hessian_trace", "hessian_diag"):
        assert report.probes[name] == Skipped("not run: interrupted by the timeout")
    assert report.to_json()["interrupted"] is True


def test_a_deadline_inside_a_probe_stops_it_at_the_next_product(tiny, monkeypatch):
    target, op = tiny
    clock = ShiftedClock()
    monkeypatch.setattr(runner, "time", clock)

    def caller_hook(count):
        if count == 3:
            clock.offset = 1e6

    op.on_hvp = caller_hook
    settings = ProbeSettings(probes=["lambda_max", "hessian_trace"])
    report = run_probes(target, op, settings, deadline=time.monotonic() + 3600)
    assert op.hvp_count == 3 and op.on_hvp is caller_hook  # stopped at once; the caller's hook back
    for name in ("lambda_max", "preconditioned_lambda_max", "eos"):
        assert report.probes[name].reason.startswith("interrupted after ")
    assert report.probes["hessian_trace"] == Skipped("not run: interrupted by the timeout")
    assert report.interrupted_by == "timeout" and report.loss == op.loss()


def test_keyboard_interrupt_gives_a_report_only_when_asked(tiny, monkeypatch):
    target, op = tiny
    original = runner.run_hessian_trace

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_hessian_trace", interrupted)
    settings = ProbeSettings(probes=["lambda_max", "hessian_trace", "glass", "power_law"])
    with pytest.raises(KeyboardInterrupt):
        run_probes(target, op, settings)
    report = run_probes(target, op, settings, keyboard_interrupt_ends_run=True)
    assert report.interrupted and report.interrupted_by == "keyboard"
    assert report.probes["lambda_max"].value > 0
    assert report.probes["hessian_trace"].reason.startswith("interrupted after ")
    assert report.probes["glass"] == report.probes["power_law"] == Skipped("not run: interrupted by Ctrl-C")
    monkeypatch.setattr(runner, "run_hessian_trace", original)
    assert not run_probes(target, op, ProbeSettings(probes=["lambda_max"])).interrupted


def test_a_glass_run_cut_short_marks_power_law_too(tiny, monkeypatch):
    target, op = tiny

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_glass_and_power_law", interrupted)
    report = run_probes(target, op, ProbeSettings(probes=["glass", "power_law"]), keyboard_interrupt_ends_run=True)
    assert report.probes["glass"].reason.startswith("interrupted after ")
    assert report.probes["power_law"].reason.startswith("interrupted after ")


# ---------------------------------------------------------------- the command line
def test_a_timeout_through_the_cli_writes_the_partial_report(tmp_path, monkeypatch):
    clock = ShiftedClock()
    monkeypatch.setattr(runner, "time", clock)
    original = runner.run_lambda_max

    def then_late(*args):
        out = original(*args)
        clock.offset = 1e6
        return out

    monkeypatch.setattr(runner, "run_lambda_max", then_late)
    out = tmp_path / "partial.json"
    result = CliRunner().invoke(app, ["probe", TINY, "--probes", "lambda_max,hessian_trace", "--timeout", "3600",
                                      "--json", str(out)])
    assert result.exit_code == 124, result.output
    document = json.loads(out.read_text())
    assert document["interrupted"] is True and document["interrupted_by"] == "timeout"
    assert document["probes"]["lambda_max"]["value"] > 0
    assert document["probes"]["hessian_trace"] == {"skipped": "not run: interrupted by the timeout"}
    assert "interrupted by --timeout 3600" in result.output and "the report holds 1 of 2 probes" in result.output
    assert "Traceback" not in result.output


def test_a_timeout_before_the_probes_still_writes_a_report(tmp_path):
    out = tmp_path / "none.json"
    result = CliRunner().invoke(app, ["probe", TINY, "--probes", "lambda_max", "--timeout", "1e-9",
                                      "--json", str(out)])
    assert result.exit_code == 124, result.output
    document = json.loads(out.read_text())
    assert document["interrupted"] is True
    assert document["probes"]["lambda_max"] == {"skipped": "not run: interrupted by the timeout"}


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_a_bad_timeout_is_one_line(value):
    result = CliRunner().invoke(app, ["probe", TINY, "--timeout", value])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: --timeout {value}") and "Traceback" not in result.output


SLOW = textwrap.dedent('''
    import time

    def loss(model, batch):
        time.sleep(0.01)
        x, y = batch
        return F.cross_entropy(model(x), y)
''')


def test_non_tty_lines_and_ctrl_c_in_a_real_process(tmp_path):
    """stderr to a pipe: the plain lines; SIGINT while hessian_trace runs (a budget large enough
    for its 1,000 probes: ≥ 20 s of sleeping products left): exit 130 and the JSON of lambda_max, marked interrupted."""
    recipe = tmp_path / "slow_mlp.py"
    recipe.write_text((RECIPES / "tiny_mlp.py").read_text() + SLOW)
    out = tmp_path / "partial.json"
    job = Job(["python", "-m", "curvdiag", "probe", str(recipe), "--probes", "lambda_max,hessian_trace,hessian_diag",
               "--hvp-method", "double-backward", "--budget", "100000", "--json", str(out)])
    seen = []
    try:
        while not any("hessian_trace: started" in line for line in seen):
            line = job.process.stderr.readline()
            assert line, f"the run ended before hessian_trace started: {''.join(seen)}"
            seen.append(line)
        job.signal_all(signal.SIGINT)
        code, _, err, _ = job.result(timeout=120)
    finally:
        job.stop()
    lines = "".join(seen).splitlines() + err.splitlines()
    assert lines[0].startswith("[probe ") and " plan: at most " in lines[0] and " gradient-equivalents " in lines[0]
    assert lines[1].startswith("[probe ") and lines[1].endswith("lambda_max: started")
    assert any(line.startswith("[probe ") and " lambda_max: finished in " in line
               and " gradient-equivalents (converged)" in line for line in lines)
    assert code == 130, "\n".join(lines)
    assert lines[-1].startswith("interrupted by Ctrl-C after ") and "the report holds 1 of 3 probes" in lines[-1]
    assert "Traceback" not in err
    document = json.loads(out.read_text())
    assert document["interrupted"] is True and document["interrupted_by"] == "keyboard"
    assert document["probes"]["lambda_max"]["value"] > 0
    assert document["probes"]["hessian_trace"]["skipped"].startswith("interrupted after ")
    assert document["probes"]["hessian_diag"] == {"skipped": "not run: interrupted by Ctrl-C"}



def _deadline_rank(rank, world, out_dir):
    """One gloo rank of tiny_mlp: rank 1's deadline passes as its first probe ends, rank 0's never."""
    import datetime
    from pathlib import Path

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{Path(out_dir, 'store')}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        clock = ShiftedClock()
        runner.time = clock  # a forked child of its own: nothing to restore
        target = load_target(TINY, rank=rank, world_size=world)
        op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes, distributed=True)
        hooks = []

        def finished(done):
            hooks.append(op.on_hvp)  # no per-product check under several ranks
            if rank == 1:
                clock.offset = 1e6

        report = run_probes(target, op, ProbeSettings(probes=["lambda_max", "hessian_trace", "hessian_diag"]),
                            finished=finished, deadline=time.monotonic() + 3600)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
            "hooks": [h is None for h in hooks], "interrupted_by": report.interrupted_by,
            "probes": {name: getattr(e, "reason", "ran") for name, e in report.probes.items()}}))
    finally:
        torch.distributed.destroy_process_group()


def test_under_several_ranks_every_rank_stops_at_the_same_probe(tmp_path):
    import torch.multiprocessing as mp

    context = mp.start_processes(_deadline_rank, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="fork")
    waited = time.monotonic()
    while not context.join(timeout=1):
        assert time.monotonic() - waited < 120, "ranks still ran after 120 s"
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0]["hooks"] == [True] and outcomes[0]["interrupted_by"] == "timeout"
    assert outcomes[0]["probes"]["lambda_max"] == "ran"
    assert outcomes[0]["probes"]["hessian_trace"] == outcomes[0]["probes"]["hessian_diag"] == \
        "not run: interrupted by the timeout"


def test_a_timeout_under_nproc_ends_124_with_the_report(tmp_path):
    out = tmp_path / "nproc.json"
    job = Job(["python", "-m", "curvdiag", "probe", TINY, "--probes", "lambda_max", "--timeout", "1e-9",
               "--nproc", "2", "--json", str(out)])
    try:
        code, _, err, _ = job.result(timeout=120)
    finally:
        job.stop()
    assert code == 124, err
    assert err.strip().splitlines()[-1].startswith("interrupted by --timeout 1e-09 after ") and "Traceback" not in err
    document = json.loads(out.read_text())
    assert document["interrupted_by"] == "timeout" and document["operator"]["world_size"] == 2
    assert document["probes"]["lambda_max"] == {"skipped": "not run: interrupted by the timeout"}


def test_the_api_timeout_returns_the_partial_report():
    import curvdiag
    from curvdiag.errors import BadArgument

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batch = (torch.randn(8, 3), torch.randn(8, 1))

    def loss(model, batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    report = curvdiag.probe(model, loss, [batch], probes="lambda_max,hessian_trace", timeout=1e-9)
    assert report.interrupted and report.interrupted_by == "timeout"
    assert report.probes["hessian_trace"] == Skipped("not run: interrupted by the timeout")
    assert not curvdiag.probe(model, loss, [batch], probes="lambda_max", timeout=3600).interrupted
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(BadArgument, match="timeout"):
            curvdiag.probe(model, loss, [batch], probes="lambda_max", timeout=bad)


def test_a_long_step_prints_its_products_at_the_step_lines_interval():
    clock, stream = FakeClock(), io.StringIO()
    clock.now = 0.0
    lines = StepLines(stream, started=0.0, label="train [throttle]", total=20, completed=0, interval=10.0, clock=clock)
    for now, count in ((4.0, 3), (10.5, 7), (15.0, 9)):
        clock.now = now
        lines.working(f"λmax: {count} HVPs")
    clock.now = 21.0
    lines.update(1, "loss 2.5")
    clock.now = 31.5
    lines.working("throttle floor: 1 HVPs")
    assert [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()] == [
        "train [throttle]: started at step 0 of 20",
        "train [throttle]: in step 1/20: λmax: 7 HVPs",
        "train [throttle]: step 1/20 · loss 2.5",
        "train [throttle]: in step 2/20: throttle floor: 1 HVPs",
    ]


def test_the_trainer_reports_each_product_of_its_floor_and_of_lambda_max(tmp_path):
    """The heartbeat's source: (purpose, products so far) after every product the run makes, and
    the run's own count of extra products agrees with the floor's."""
    from curvdiag.train.loop import Trainer, TrainSettings

    trainer = Trainer(TINY, None, tmp_path / "run", TrainSettings(steps=4, controller="throttle", sharpness_every=3))
    seen = []
    trainer.on_products = lambda purpose, count: seen.append((purpose, count))
    summary = trainer.run()
    purposes = [purpose for purpose, _ in seen]
    assert set(purposes) == {"floor", "sharpness"}
    floor_counts = [count for purpose, count in seen if purpose == "floor"]
    assert all(count >= 1 for count in floor_counts) and len(floor_counts) == round(summary.extra_hvps_per_step * 4)
    previous = {"floor": 0, "sharpness": 0}
    for purpose, count in seen:  # each operator counts from 1, one by one (a new operator starts again)
        assert count in (previous[purpose] + 1, 1), seen
        previous[purpose] = count
    sharpness = [count for purpose, count in seen if purpose == "sharpness"]
    runs = [count for count, following in zip(sharpness, sharpness[1:] + [1]) if following == 1]  # each λmax's total
    logged = [record["lambda_max_hvps"] for record in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
              if "lambda_max" in record]
    assert runs[1:] == logged and len(logged) == 2  # steps 0 and 3, after λmax at the start
