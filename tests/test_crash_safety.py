"""Crash safety of ``curvdiag train`` (issue 15): a run killed at any moment — SIGKILL, SIGINT,
SIGTERM, mid-step or inside a checkpoint write — and resumed, again and again, ends with the very
metrics of an uninterrupted run, step for step; run.json exists from the first step; a failing
disk is reported, not fatal, and leaves no ``*.tmp``.

The kills are exact, not timed: the recipe's fault hook (``tests/recipes/resumable.py``) stops the
process at the K-th loss() or os.fsync() call and waits there; the test then signals it."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import RECIPES, ROOT
from curvdiag.cli.app import app
from curvdiag.errors import BadInput
from curvdiag.results.run_dir import RunDirectoryError
from curvdiag.train.loop import Trainer, TrainSettings, resume_point

RESUMABLE = str(RECIPES / "resumable.py")
STEPS = 16


def _records(run_dir):
    """metrics.jsonl without the wall-clock field."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the throttled run, straight through, in this process."""
    run_dir = tmp_path_factory.mktemp("straight")
    Trainer(RESUMABLE, None, run_dir, TrainSettings(steps=STEPS, controller="throttle", checkpoint_every=3)).run()
    return _records(run_dir)


def _train(args, halt=None, halted_file=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if halt:
        env.update(RESUMABLE_HALT=halt, RESUMABLE_HALTED=str(halted_file))
    return subprocess.Popen([sys.executable, "-m", "curvdiag", "train", *args, "-q"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_until_halted_then_signal(args, halt, signum, tmp_path):
    """Start ``train``; once it halts at ``halt``, send ``signum``; its exit status and stderr
    (None when it finished before reaching ``halt``)."""
    halted = tmp_path / "halted"
    halted.unlink(missing_ok=True)
    process = _train(args, halt, halted)
    deadline = time.monotonic() + 120
    while not halted.exists() and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"train {args} neither halted at {halt} nor finished")
        time.sleep(0.02)
    if halted.exists():
        process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


# Each plan: the moments at which successive processes are stopped, then one more --resume to finish.
# loss:K is the K-th loss() call of that process (the throttle calls it twice a step, once more
# for the floor in a few steps); fsync:K the K-th fsync (run.json at the start: 1–2; each checkpoint:
# the log, step_N.pt.tmp, the directory, run.json.tmp, the directory).
KILL_PLANS = {
    "sigkill_mid_step_repeatedly": [("loss:9", signal.SIGKILL), ("loss:5", signal.SIGKILL), ("loss:8", signal.SIGKILL)],
    "sigkill_inside_checkpoint_writes": [("fsync:4", signal.SIGKILL), ("fsync:6", signal.SIGKILL),
                                          ("fsync:2", signal.SIGKILL)],
    "sigint_then_sigkill_then_sigterm": [("loss:8", signal.SIGINT), ("loss:10", signal.SIGKILL),
                                         ("fsync:9", signal.SIGTERM)],
}


@pytest.mark.parametrize("plan", list(KILL_PLANS))
def test_any_kill_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path, uninterrupted, plan):
    run_dir = tmp_path / "run"
    first = [RESUMABLE, "--steps", str(STEPS), "--controller", "throttle", "--checkpoint-every", "3",
             "--out", str(run_dir)]
    for number, (halt, signum) in enumerate(KILL_PLANS[plan]):
        args = first if number == 0 else ["--resume", str(run_dir)]
        status, err = _run_until_halted_then_signal(args, halt, signum, tmp_path)
        expected = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 130}[signum]
        assert status == expected, (halt, signum, err)
        assert (run_dir / "run.json").is_file()  # from the first step on, whatever stopped the run
        records = _records(run_dir)
        assert records == uninterrupted[:len(records)]  # a prefix: no repeated, missing or changed step
    finished = _train(["--resume", str(run_dir)])
    _, err = finished.communicate(timeout=120)
    assert finished.returncode == 0, err
    assert _records(run_dir) == uninterrupted
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["steps_completed"] == STEPS and summary["in_progress"] is False
    assert not list(run_dir.rglob("*.tmp"))


def _gone(pids, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.05)
    return False


def test_signals_to_the_nproc_launcher_alone_stop_the_ranks_and_resume_exactly(tmp_path):
    """SIGTERM, then SIGKILL, to the launcher's PID only (what timeout, docker stop and systemd
    send): the ranks stop (exit 130, no process left) and the run resumes under --nproc 2 to the
    metrics of an uninterrupted --nproc 2 run."""
    common = [RESUMABLE, "--steps", "10", "--controller", "throttle", "--checkpoint-every", "3", "--nproc", "2"]
    reference = _train([*common, "--out", str(tmp_path / "straight")])
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    run_dir = tmp_path / "run"
    for args, halt, signum in (([*common, "--out", str(run_dir)], "loss:9", signal.SIGTERM),
                               (["--resume", str(run_dir), "--nproc", "2"], "loss:5", signal.SIGKILL)):
        status, err = _run_until_halted_then_signal(args, halt, signum, tmp_path)
        ranks = [int(line) for line in (tmp_path / "halted").read_text().split()]
        assert _gone(ranks), f"ranks {ranks} still run after {signum!r} to the launcher"
        assert status == (130 if signum == signal.SIGTERM else -signal.SIGKILL), err
        assert "Traceback" not in err and "OMP_NUM_THREADS" not in err and "death signal" not in err, err
        assert json.loads((run_dir / "run.json").read_text())["interrupted"] is True
    finished = _train(["--resume", str(run_dir), "--nproc", "2"])
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    assert _records(run_dir) == _records(tmp_path / "straight")


def test_resume_without_run_json_continues_from_the_newest_checkpoint(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    Trainer(RESUMABLE, None, run_dir, TrainSettings(steps=8, controller="throttle", checkpoint_every=3)).run()
    (run_dir / "run.json").unlink()
    (run_dir / "final.pt").unlink()
    point = resume_point(run_dir)
    assert point.step == 6 and point.recipe == RESUMABLE and point.settings.controller == "throttle"
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--steps", str(STEPS), "-q"])
    assert result.exit_code == 0, result.output
    assert _records(run_dir) == uninterrupted


def test_a_cut_line_and_a_stale_final_pt_resume_from_what_the_log_reaches(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    settings = TrainSettings(steps=10, controller="throttle", checkpoint_every=3)
    Trainer(RESUMABLE, None, run_dir, settings).run()
    log = run_dir / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:7]) + lines[7][:20])  # a kill mid-line after step 6
    (run_dir / "checkpoints" / "step_9.pt.tmp").write_bytes(b"half")
    assert resume_point(run_dir).step == 6  # final.pt (step 10) is beyond the log: the newest usable is step_6
    assert not (run_dir / "checkpoints" / "step_9.pt.tmp").exists()
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--steps", str(STEPS), "-q"])
    assert result.exit_code == 0, result.output
    assert _records(run_dir) == uninterrupted


def test_resuming_a_diverged_run_repeats_no_step(tmp_path):
    run_dir = tmp_path / "div"
    summary = Trainer(str(RECIPES / "linear_regression.py"), None, run_dir, TrainSettings(steps=40, lr=0.2)).run()
    assert summary.diverged
    steps = [r["step"] for r in _records(run_dir)]
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "-q"])
    assert result.exit_code == 0, result.output
    again = [r["step"] for r in _records(run_dir)]
    assert again == steps == list(range(len(steps)))  # it diverges again at the same step, logged once


def test_resume_with_neither_run_json_nor_checkpoint_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "not a curvdiag run directory" in result.output


# ---------------------------------------------------------------- disk full


def _disk_full_after(monkeypatch, calls_that_succeed, failures):
    """torch.save raises OSError(ENOSPC) after ``calls_that_succeed`` calls, ``failures`` times."""
    real_save, calls = torch.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if calls_that_succeed < len(calls) <= calls_that_succeed + failures:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_failed_periodic_save_is_retried_at_the_next_checkpoint_and_reported(tmp_path, monkeypatch, uninterrupted):
    _disk_full_after(monkeypatch, calls_that_succeed=1, failures=1)  # step_3 saves, step_6 fails, step_9 saves
    run_dir = tmp_path / "run"
    summary = Trainer(RESUMABLE, None, run_dir, TrainSettings(steps=STEPS, controller="throttle", checkpoint_every=3)).run()
    assert summary.steps_completed == STEPS and summary.failure is None
    assert summary.save_failures == [f"{run_dir / 'checkpoints' / 'step_6.pt'}: No space left on device (ENOSPC)"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_12.pt", "step_15.pt", "step_3.pt", "step_9.pt"]
    assert json.loads((run_dir / "run.json").read_text())["save_failures"] == summary.save_failures
    assert not list(run_dir.rglob("*.tmp")) and _records(run_dir) == uninterrupted


def test_a_full_disk_at_the_final_save_ends_with_one_line_exit_1_and_run_json(tmp_path, monkeypatch):
    _disk_full_after(monkeypatch, calls_that_succeed=2, failures=100)  # step_3, step_6 saved; then full
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", RESUMABLE, "--steps", "10", "--checkpoint-every", "3",
                                      "--out", str(run_dir), "-q"])
    assert result.exit_code == 1
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error_lines == [f"error: cannot write {run_dir / 'final.pt'}: No space left on device (ENOSPC)"]
    summary = json.loads((run_dir / "run.json").read_text())  # run.json still fits
    assert summary["failure"].startswith("RunDirectoryError") and len(summary["save_failures"]) == 1
    assert not list(run_dir.rglob("*.tmp"))
    monkeypatch.undo()
    assert resume_point(run_dir).step == 6  # and the run continues from what was kept


def test_a_log_that_cannot_be_written_fails_with_the_path_and_keeps_the_rest(tmp_path, monkeypatch):
    from curvdiag.results import run_dir as run_dir_module

    written = []

    def write(self, record):
        written.append(record["step"])
        if len(written) == 4:
            raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(run_dir_module.MetricsLog, "write", write)
    run_dir = tmp_path / "run"
    with pytest.raises(RunDirectoryError, match=r"metrics.jsonl: Input/output error \(EIO\)"):
        Trainer(RESUMABLE, None, run_dir, TrainSettings(steps=10)).run()
    assert torch.load(run_dir / "final.pt", weights_only=True)["step"] == 3
    assert json.loads((run_dir / "run.json").read_text())["steps_completed"] == 3


def test_an_unwritable_out_is_a_bad_argument(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["train", RESUMABLE, "--steps", "2", "--out", str(blocker / "run")])
    assert result.exit_code == 2
    assert "--out" in result.output and "cannot write the run directory" in result.output


def test_malformed_run_json_is_bad_input(tmp_path):
    run_dir = tmp_path / "run"
    Trainer(RESUMABLE, None, run_dir, TrainSettings(steps=3, checkpoint_every=1)).run()
    for text in ("{not json", "[1, 2]", '{"controller": "none", "steps_completed": 3, "diverged": false, '
                 '"recipe": 5}', '{"controller": "none", "steps_completed": 3, "diverged": false, '
                 '"settings": {"steps": "many"}}'):
        (run_dir / "run.json").write_text(text)
        with pytest.raises(BadInput):
            resume_point(run_dir)
        result = CliRunner().invoke(app, ["train", "--resume", str(run_dir)])
        assert result.exit_code == 2 and "error:" in result.output, (text, result.output)


def _user_namespaces_work():
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


INSPECT = """
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
print(json.dumps({"tmp": [str(p) for p in run.rglob("*.tmp")], "summary": json.loads((run / "run.json").read_text()),
                  "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir())}))
"""


@pytest.mark.skipif(not _user_namespaces_work(),
                    reason="a real full disk needs a small tmpfs, mounted in a user namespace (unshare -rm): not allowed here")
def test_a_real_full_tmpfs_ends_with_one_line_exit_1_no_tmp_and_a_resumable_run(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    script = (f"mount -t tmpfs -o size=48k tmpfs {mount} && "
              f"{sys.executable} -m curvdiag train {RESUMABLE} --steps 40 --checkpoint-every 1 --out {mount}/run -q; "
              f"echo status=$?; {sys.executable} -c '{INSPECT}' {mount}/run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "status=1" in done.stdout, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {mount}/run/"), done.stderr
    assert errors[0].endswith("No space left on device (ENOSPC)") and "Traceback" not in done.stderr
    kept = json.loads(done.stdout.splitlines()[-1])
    assert kept["tmp"] == []  # the full disk holds no half-written file
    assert kept["checkpoints"] and kept["summary"]["steps_completed"] >= 1  # what fitted is a resumable run
