"""curvdiag probe across processes (DESIGN §2.5): sharding, the reduction in the operator, the CLI.

The numbers: every probe under 2 and 3 ranks equals the single-process report to 1e-5 relative
(float64, same batches, same seed). The processes are real: forked workers in a gloo process
group for the matrix of recipes × world sizes (cheap: no fresh interpreter), and
``python -m torch.distributed.run`` subprocesses for the command line (``--nproc``), a rank
that raises and a rank that hangs. Every process has a timeout and one thread.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import RECIPES
from processes import Job
from curvdiag.curvature import distributed
from curvdiag.cli.app import app
from curvdiag.errors import BadInput, NotCovered
from curvdiag.loading.target import load_target
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.loading import shards as sharding
from curvdiag.loading.recipe import load_recipe
from curvdiag.probes.ggn_trace import ESTIMATOR as GGN_ESTIMATOR

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend")

TINY = str(RECIPES / "tiny_mlp.py")  # two batches: 7 and 3 samples
ONE_BATCH = str(RECIPES / "linear_regression.py")  # one batch of 64
SEVERAL = str(RECIPES / "several_batches.py")  # five batches: 8, 8, 8, 8, 5
RANK_DATA = str(RECIPES / "rank_data.py")  # data(rank, world_size): four batches 6, 6, 6, 4
PROBES = "lambda_max,hessian_trace,hessian_diag,directional_curvature,glass,power_law,hesscale_diag"
ARGS = ["--probes", PROBES, "--dtype", "float64", "--samples", "6", "--glass-samples", "3", "--tol", "1e-6",
        "--seed", "3"]
RTOL = 1e-5
TINY_SOURCE = "import os\n" + Path(TINY).read_text()
runner = CliRunner()


# ---------------------------------------------------------------------------- sharding (in process)
Pair = collections.namedtuple("Pair", "x y")


def test_split_batch_splits_every_tensor_container_along_the_leading_dimension():
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    batch = {"pair": Pair(x, y), "list": [x, (y, "label")], "scale": torch.tensor(2.0), "n": 7}
    pieces = sharding.split_batch(batch, 3)
    assert [len(p["pair"].y) for p in pieces] == [4, 3, 3]  # torch.tensor_split: unequal shards
    assert torch.equal(torch.cat([p["pair"].x for p in pieces]), x)
    assert torch.equal(torch.cat([p["list"][1][0] for p in pieces]), y)
    assert all(isinstance(p["pair"], Pair) and p["list"][1][1] == "label" and p["n"] == 7 for p in pieces)
    assert all(float(p["scale"]) == 2.0 for p in pieces)  # 0-d tensors go to every piece
    assert [len(p) for p in sharding.split_batch(torch.arange(2), 3)] == [1, 1, 0]


def test_split_batch_refuses_what_it_cannot_split():
    with pytest.raises(BadInput, match="leading dimension is not the batch's 10"):
        sharding.split_batch((torch.zeros(10, 3), torch.zeros(4, 4)), 2)
    with pytest.raises(BadInput, match="holds no tensor"):
        sharding.split_batch({"text": "abc"}, 2)


def test_shard_round_robin_split_and_max_batches():
    batches = [torch.full((n, 1), float(i)) for i, n in enumerate((3, 3, 3, 3, 2))]
    assert [float(b[0]) for b in sharding.shard(batches, 0, 2)] == [0, 2, 4]
    assert [float(b[0]) for b in sharding.shard(batches, 1, 2)] == [1, 3]
    assert [float(b[0]) for b in sharding.shard(batches, 1, 2, max_batches=3)] == [1]
    assert sharding.shard_batches(batches, 1, 2)[1:] == ("round-robin", 5)
    # Fewer batches than ranks: every batch is split, rank r takes piece r of each; no sample is lost.
    two = [torch.arange(7), torch.arange(7, 10)]
    shards = [sharding.shard_batches(two, r, 3) for r in range(3)]
    assert {s[1] for s in shards} == {"split"} and {s[2] for s in shards} == {2}
    assert [[len(b) for b in s[0]] for s in shards] == [[3, 1], [2, 1], [2, 1]]
    assert sorted(torch.cat([b for s in shards for b in s[0]]).tolist()) == list(range(10))
    # Fewer samples than ranks: the last rank gets nothing (the operator allows an empty share).
    assert sharding.shard([torch.arange(2)], 2, 3) == []
    with pytest.raises(BadInput, match="no batches"):
        sharding.shard([], 0, 2)


def test_shard_calls_data_rank_world_size_when_the_recipe_defines_it():
    recipe = load_recipe(RANK_DATA)
    mine, how, total = sharding.shard_batches(recipe, 1, 3)
    assert how == "recipe" and total is None and [len(b["x"]) for b in mine] == [6]
    everything, how, _ = sharding.shard_batches(recipe, 0, 1)  # one process: data(0, 1)
    assert how == "recipe" and [len(b["x"]) for b in everything] == [6, 6, 6, 4]
    plain = load_recipe(TINY)
    assert sharding.shard_batches(plain, 0, 1) [1:] == (None, 2)


@pytest.mark.parametrize("source, takes", [
    ("def data(): pass", False), ("def data(rank, world_size): pass", True),
    ("def data(rank=0, world_size=1): pass", True), ("def data(r, n, root='/data'): pass", True),
    ("def data(batch_size=32, shuffle=True): pass", False), ("def data(*args): pass", False)])
def test_data_rank_world_size_is_detected_by_signature(source, takes):
    namespace: dict = {}
    exec(source, namespace)
    assert sharding._takes_rank(namespace["data"]) is takes


def test_one_process_never_communicates(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective in a single process")

    monkeypatch.setattr(distributed, "all_reduce_sum", forbidden)
    monkeypatch.setattr(distributed, "all_gather_rows", forbidden)
    target = load_target(TINY, dtype="float64")
    for method in ("auto", "double-backward", "finite-difference"):
        op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes, hvp_method=method,
                               distributed=True)  # asked for, but there is no process group
        op.hvp(torch.ones(op.num_params, dtype=torch.float64))
        op.gradient_at(op.parameters_vector())
        assert (op.world_size, op.num_batches, op.num_samples) == (1, 2, 10)


def test_sharded_parameters_are_refused(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        model[0].weight = torch.nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(BadInput, match="0.weight is a DTensor") as caught:
            CurvatureOperator(model, [torch.zeros(2, 4)], lambda m, b: m(b).sum(), distributed=True)
        assert "not supported" in caught.value.hint and "data parallelism" in caught.value.hint
        wrapped = torch.nn.Sequential(torch.nn.Linear(4, 3))
        fully_shard(wrapped, mesh=mesh)
        with pytest.raises(BadInput, match="wrapped by FSDP"):
            distributed.check_supported(wrapped)
        with pytest.raises(BadInput, match="DistributedDataParallel") as caught:
            distributed.check_supported(torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3)))
        assert "pass its .module" in caught.value.hint
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------- reports compared
def _compare(single, multi, path="", worst=None):
    """Assert two JSON values agree (floats to RTOL relative); return the largest relative gap."""
    worst = [0.0] if worst is None else worst
    if isinstance(single, dict):
        assert set(single) == set(multi), (path, set(single) ^ set(multi))
        # Wall times differ; so does the glass's relative s.e. on this smooth model, where ρ is at
        # rounding level (its per-layer values agree to the absolute tolerance below).
        skip = ("seconds", "gradient_seconds") + (("precision_reached",) if single.get("name") == "glass" else ())
        for key in single:
            if key not in skip:
                _compare(single[key], multi[key], f"{path}.{key}", worst)
    elif isinstance(single, list):
        assert len(single) == len(multi), path
        for i, (a, b) in enumerate(zip(single, multi)):
            _compare(a, b, f"{path}[{i}]", worst)
    elif isinstance(single, float) or isinstance(multi, float):
        gap = abs(single - multi)
        scale = max(abs(single), abs(multi))
        # The s.e. of p on a quadratic (p = 2 exactly) is rounding noise, ~1e-13: compare it absolutely.
        floor = 1e-9 if path.endswith("p_stderr") else 1e-13
        assert gap <= RTOL * scale + floor, (path, single, multi)
        if scale > 1e3 * floor:
            worst[0] = max(worst[0], gap / scale)
    else:
        assert single == multi, (path, single, multi)
    return worst[0]


def _assert_matches_single_process(single, multi, recipe, world):
    """Every probe of ``multi`` (a report from ``world`` ranks), the Gauss-Newton control variate
    of hessian_trace and hesscale_diag included, equals the one-process ``single``."""
    assert multi["operator"]["world_size"] == world and single["operator"]["world_size"] == 1
    drop = ("hvps", "world_size", "sharding")
    single = dict(single, operator={k: v for k, v in single["operator"].items() if k not in drop})
    multi = dict(multi, operator={k: v for k, v in multi["operator"].items() if k not in drop})
    # Every recipe here is covered by both: the comparison is of their numbers, not of two skips.
    assert multi["probes"]["hessian_trace"]["estimator"] == GGN_ESTIMATOR, multi["probes"]["hessian_trace"]
    assert "skipped" not in multi["probes"]["hesscale_diag"], multi["probes"]["hesscale_diag"]
    return _compare(single, multi)


_SINGLE: dict = {}


def _single(recipe, tmp_path_factory):
    if recipe not in _SINGLE:
        out = tmp_path_factory.mktemp("single") / "report.json"
        result = runner.invoke(app, ["probe", recipe, *ARGS, "--json", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        _SINGLE[recipe] = json.loads(out.read_text())
    return _SINGLE[recipe]


# ---------------------------------------------------------------------------- forked ranks
def _rank_main(rank, world, store_port, jobs, out_dir):
    """One rank, described to it as torchrun would (RANK, WORLD_SIZE, …), running the CLI per job.

    With ``store_port`` the CLI joins the group itself (torchrun's agent store, here the test's);
    without, this function joins one gloo group for all the jobs (cheaper than one per job)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    if store_port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store_port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    if store_port is None:
        torch.distributed.init_process_group("gloo", init_method=f"file://{Path(out_dir, 'store')}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        for name, args in jobs:
            result = runner.invoke(app, ["probe", *args])
            Path(out_dir, f"{name}.rank{rank}.out").write_text(result.output)
            if result.exit_code != 0:
                sys.exit(result.exit_code)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_ranks(world, jobs, out_dir, timeout=60.0, store_port=None, grace=5.0):
    """Fork ``world`` ranks running ``jobs``; return their exit codes. As torchrun's agent does,
    once a rank has failed the others get ``grace`` seconds, then are killed (code -9); everything
    is killed after ``timeout`` (and the test fails)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_rank_main, args=(world, store_port, jobs, str(out_dir)), nprocs=world,
                                 join=False, start_method="fork")
    processes = context.processes
    deadline, failed_at = time.monotonic() + timeout, None
    try:
        while any(p.is_alive() for p in processes):
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"{world} ranks still ran after {timeout} s")
            if failed_at is None and any(p.exitcode not in (None, 0) for p in processes):
                failed_at = now
            if failed_at is not None and now > failed_at + grace:
                break
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)
    return [p.exitcode for p in processes]


RECIPE_CASES = {"tiny_mlp": TINY, "one_batch": ONE_BATCH, "several_batches": SEVERAL, "rank_data": RANK_DATA}
EXPECTED_SHARDING = {  # (world size, recipe) -> how the batches were shared
    (2, "tiny_mlp"): "round-robin", (3, "tiny_mlp"): "split", (2, "one_batch"): "split", (3, "one_batch"): "split",
    (2, "several_batches"): "round-robin", (3, "several_batches"): "round-robin",
    (2, "rank_data"): "recipe", (3, "rank_data"): "recipe"}


@pytest.mark.parametrize("world", [2, 3])
def test_every_probe_under_several_ranks_equals_one_process(world, tmp_path, tmp_path_factory):
    jobs = [(name, [recipe, *ARGS, "--json", str(tmp_path / f"{name}.json")]) for name, recipe in RECIPE_CASES.items()]
    assert _run_ranks(world, jobs, tmp_path) == [0] * world, [
        path.read_text() for path in sorted(tmp_path.glob("*.out"))]
    gaps = {}
    for name, recipe in RECIPE_CASES.items():
        multi = json.loads((tmp_path / f"{name}.json").read_text())
        assert multi["operator"]["sharding"] == EXPECTED_SHARDING[(world, name)]
        gaps[name] = _assert_matches_single_process(_single(recipe, tmp_path_factory), multi, recipe, world)
        # Only rank 0 prints: the other ranks' output is empty.
        assert "JSON report written" in (tmp_path / f"{name}.rank0.out").read_text()
        for r in range(1, world):
            assert (tmp_path / f"{name}.rank{r}.out").read_text() == ""
    print(f"world {world}: largest relative difference from one process per recipe: {gaps}")


def test_ranks_with_different_weights_are_refused_on_every_rank(tmp_path):
    """A model() seeded differently on each rank and no checkpoint: one line, exit 2, on each rank."""
    recipe = tmp_path / "unseeded.py"
    recipe.write_text(TINY_SOURCE.replace("torch.manual_seed(0)", "torch.manual_seed(int(os.environ['RANK']))"))
    assert _run_ranks(2, [("unseeded", [str(recipe), "--probes", "lambda_max"])], tmp_path) == [2, 2]
    for r in range(2):
        lines = (tmp_path / f"unseeded.rank{r}.out").read_text().strip().splitlines()
        assert lines[0] == (f"rank {r}: error: rank 1's weights differ from rank 0's: model() is not deterministic "
                            "and no checkpoint sets the weights"), lines


def _refusal_rank(rank, world, out_dir):
    """One gloo rank: a block that raises NotCovered on rank 1 only, then one that raises nowhere."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{Path(out_dir, 'store')}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        model = torch.nn.Linear(2, 1).double()
        torch.nn.init.ones_(model.weight)  # the same weights on every rank
        op = CurvatureOperator(model, [torch.ones(1, 2, dtype=torch.float64)], lambda m, b: m(b).sum(),
                               distributed=True)
        outcomes = []
        for refusing in ({1}, set()):
            try:
                with op.covered_on_every_rank():
                    if rank in refusing:
                        raise NotCovered(f"a batch of rank {rank} is not covered")
                outcomes.append(None)
            except NotCovered as exc:
                outcomes.append(exc.reason)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
    finally:
        torch.distributed.destroy_process_group()


def test_a_refusal_on_one_rank_is_every_ranks_refusal_with_its_reason(tmp_path):
    """A model that one rank's batches are not covered on (NotCovered raised there only): every
    rank refuses with that rank's reason, so all take the same branch (the fallback estimator)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_refusal_rank, args=(3, str(tmp_path)), nprocs=3, join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, "ranks still ran after 60 s"
    for r in range(3):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == ["a batch of rank 1 is not covered", None]


def test_unequal_shards_three_ranks_over_ten_samples():
    """tiny_mlp's two batches (7 + 3) over 3 ranks: shards of 4, 3 and 3 samples; the sample
    counts travel with the shards, so the loss is the same sample-weighted mean."""
    shards = [load_target(TINY, dtype="float64", rank=r, world_size=3) for r in range(3)]
    assert [t.batch_sizes for t in shards] == [[3, 1], [2, 1], [2, 1]]
    assert sum(t.num_samples for t in shards) == 10


# ---------------------------------------------------------------------------- torchrun processes
@pytest.fixture(scope="module")
def torchrun_jobs():
    """Both torchrun jobs, started together (their interpreters start in parallel: half the wait)."""
    curvdiag = [sys.executable, "-m", "curvdiag", "probe"]
    jobs = {
        "nproc": Job([*curvdiag, TINY, *ARGS, "--json", "-", "--nproc", "2"]),
        "raise": Job([*curvdiag, RANK_DATA, "--probes", "lambda_max", "--nproc", "2", "--dist-timeout", "300"],
                      env_extra={"CURVDIAG_TEST_RANK_FAILURE": "raise"}),
        "teardown": Job([*curvdiag, RANK_DATA, "--probes", "lambda_max", "--json", "-", "--nproc", "2"],
                         env_extra={"CURVDIAG_TEST_RANK_FAILURE": "abort-at-exit"}),
    }
    yield jobs
    for job in jobs.values():
        job.stop()


def test_nproc_relaunches_under_torchrun_and_only_rank_0_writes(torchrun_jobs, tmp_path_factory):
    code, out, err, _ = torchrun_jobs["nproc"].result(timeout=120)
    assert code == 0, err[-3000:]
    report = json.loads(out)  # stdout holds exactly one document: rank 0's
    assert report["operator"]["sharding"] == "round-robin"
    assert report["operator"]["batches"] == 2 and report["operator"]["samples"] == 10
    gap = _assert_matches_single_process(_single(TINY, tmp_path_factory), report, TINY, 2)
    print(f"--nproc 2: largest relative difference from one process: {gap:.1e}")


def test_a_rank_that_raises_ends_the_job_with_its_rank_and_cause(torchrun_jobs):
    code, out, err, seconds = torchrun_jobs["raise"].result(timeout=120)
    assert code == 2, err[-3000:]  # the failing rank's own status: bad input (the recipe's data() raised)
    lines = err.splitlines()
    cause = "data() raised RuntimeError: the shard of rank 1 is unreadable"
    assert any(line.startswith("rank 1: error: ") and cause in line for line in lines), err[-3000:]
    assert lines[-1].startswith("error: rank 1 failed: ") and cause in lines[-1], err[-3000:]
    assert out == ""


def test_a_crash_after_every_rank_finished_is_a_warning_not_a_failure(torchrun_jobs):
    """Rank 1 aborts while its interpreter exits, after both ranks wrote their results: the job's
    results are complete, so --nproc exits 0 with a warning saying what happened."""
    code, out, err, _ = torchrun_jobs["teardown"].result(timeout=120)
    assert code == 0, err[-3000:]
    assert json.loads(out)["probes"]["lambda_max"]["value"] > 0
    assert "warning: every rank finished and wrote its results" in err, err[-3000:]


def test_a_rank_that_hangs_ends_the_job_after_the_timeout(tmp_path, monkeypatch):
    """Rank 1 sleeps for 60 s in data(); rank 0's first collective gives up after --dist-timeout 3 s
    with a line saying so, and its exit ends the job. The CLI joins the group itself here
    (init_from_env, env:// through an agent store as under torchrun) with that timeout."""
    monkeypatch.setenv("CURVDIAG_TEST_RANK_FAILURE", "hang")
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=30))
    started = time.monotonic()
    codes = _run_ranks(2, [("hang", [RANK_DATA, "--probes", "lambda_max", "--dist-timeout", "3"])], tmp_path,
                       timeout=40, store_port=store.port, grace=1.0)
    assert codes == [1, -signal.SIGKILL]  # rank 0 gave up; rank 1, still asleep, was ended for it
    assert time.monotonic() - started < 30  # rank 1 sleeps 60 s: the job ended on rank 0's timeout
    output = (tmp_path / "hang.rank0.out").read_text().strip()
    assert output.startswith("rank 0: error: no answer from another rank within 3 s"), output
    assert "--dist-timeout" in output  # the hint says what to raise
    del store


def test_the_per_sample_control_variate_under_two_ranks_equals_one_process(tmp_path):
    """Conv2d + BatchNorm (eval): tr(G) from torch.func per-sample gradients on each rank's batches,
    summed over the ranks, gives one process's trace — and the same budget spent, so both stop at
    the same probe."""
    recipe = str(RECIPES / "conv_bn.py")
    args = ["--probes", "hessian_trace", "--dtype", "float64", "--samples", "6", "--seed", "3"]
    single_out = tmp_path / "single.json"
    result = runner.invoke(app, ["probe", recipe, *args, "--json", str(single_out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert _run_ranks(2, [("conv", [recipe, *args, "--json", str(tmp_path / "conv.json")])], tmp_path) == [0, 0], [
        path.read_text() for path in sorted(tmp_path.glob("*.out"))]
    single, multi = (json.loads(path.read_text()) for path in (single_out, tmp_path / "conv.json"))
    trace = multi["probes"]["hessian_trace"]
    assert trace["estimator"] == GGN_ESTIMATOR and "estimator_note" not in trace, trace
    for key in ("value", "stderr", "ggn_trace", "residual_trace"):
        assert trace[key] == pytest.approx(single["probes"]["hessian_trace"][key], rel=RTOL, abs=1e-12), key
    assert multi["budget"]["spent"] == single["budget"]["spent"]
