"""curvdiag probe across processes: 1 process × 1 thread versus 2 processes × 1 thread.

Measures, on ``sample_models/bn_cnn.py`` (3,866 parameters, 4 batches of 250 digits; eval mode,
kept-graph products: about 0.1 s per HVP in one thread here):

- per-HVP wall time (median), the rank's local share of it (no communication) and, by
  difference, what the one ``all_reduce`` per product costs inside a real product;
- λmax (Lanczos, tol 1e-4, seed 0) wall time and HVP count — the same count in both set-ups,
  since the products agree to rounding;
- the time of one gloo ``all_reduce`` of a parameter-sized buffer (n + 1 floats: the gradient
  with the loss), alone, as the communication share;
- the CPU seconds per HVP of the slowest rank (``time.process_time``): the work each process
  does, which the load of other jobs barely changes — the speed-up idle cores would give.

The two set-ups are run alternately, ``--rounds`` times each, in fresh processes (the 2-process
one under ``python -m torch.distributed.run --standalone``), because this machine is shared with
other work: absolute times drift with the load, so read the ratios, which are taken round by
round, and the spread across rounds. Results go to ``benchmarks/distributed_results.json``.

    python benchmarks/bench_distributed.py [--rounds 3] [--hvps 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "sample_models" / "bn_cnn.py")


def _median_time(fn, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        started = clock()
        fn()
        times.append(clock() - started)
    return statistics.median(times)


def worker(hvps: int) -> None:
    """One rank (or the single process): measure and, on rank 0, print one JSON line."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from curvdiag.curvature import distributed
    from curvdiag.curvature.linear_operator import random_vector
    from curvdiag.loading.target import load_target
    from curvdiag.curvature.operator import CurvatureOperator
    from curvdiag.probes.sharpness import lambda_max

    distributed.init_from_env("cpu", timeout=300)
    rank, world = distributed.rank(), distributed.world_size()
    target = load_target(RECIPE, rank=rank, world_size=world)
    op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes, distributed=world > 1)
    v = random_vector(op.num_params, 0, op.device, op.dtype)
    barrier = torch.distributed.barrier if world > 1 else (lambda: None)
    for _ in range(2):  # warm-up
        op.hvp(v)
    barrier()
    hvp = _median_time(lambda: op.hvp(v), hvps)
    barrier()
    local = _median_time(lambda: op._local_hvp(v), hvps)  # this rank's share, no communication
    # CPU seconds this process spends per product: unlike wall time, barely touched by other
    # jobs on the machine; the slowest rank's is the critical path on otherwise idle cores.
    cpu = torch.tensor([_median_time(lambda: op.hvp(v), hvps, clock=time.process_time),
                        _median_time(lambda: op._local_hvp(v), hvps, clock=time.process_time)])
    if world > 1:
        torch.distributed.all_reduce(cpu, op=torch.distributed.ReduceOp.MAX)
    buffer = torch.zeros(op.num_params + 1)
    barrier()
    for _ in range(5):
        distributed.all_reduce_sum(buffer)
    reduce = _median_time(lambda: distributed.all_reduce_sum(buffer), 50) if world > 1 else 0.0
    barrier()
    started = time.perf_counter()
    result = lambda_max(op, tol=1e-4, seed=0)
    lam_seconds = time.perf_counter() - started
    if rank == 0:
        print(json.dumps({"world_size": world, "parameters": op.num_params, "hvp_method": op.hvp_method,
                          "batches": target.total_batches, "samples": op.num_samples,
                          "local_batches": len(op.batches), "hvp_s": hvp, "local_hvp_s": local,
                          "hvp_cpu_s_slowest_rank": float(cpu[0]), "local_hvp_cpu_s_slowest_rank": float(cpu[1]),
                          "all_reduce_s": reduce, "lambda_max": result.value, "lambda_max_hvps": result.hvps,
                          "lambda_max_s": lam_seconds}), flush=True)
    distributed.shutdown()


def _run(command: list, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hvps", type=int, default=15, help="products timed per measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "distributed_results.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.hvps)
        return
    me = [str(Path(__file__).resolve()), "--worker", "--hvps", str(args.hvps)]
    one = [sys.executable, *me]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *me]
    rounds = []
    for k in range(args.rounds):
        with open("/proc/loadavg") as f:
            load = float(f.read().split()[0])
        single = _run(one, timeout=600)
        double = _run(two, timeout=600)
        rounds.append({"load_average_1min": load, "one_process": single, "two_processes": double,
                       "hvp_speedup": single["hvp_s"] / double["hvp_s"],
                       "lambda_max_speedup": single["lambda_max_s"] / double["lambda_max_s"],
                       "communication_share_of_hvp": double["all_reduce_s"] / double["hvp_s"],
                       "hvp_cpu_ratio": single["hvp_cpu_s_slowest_rank"] / double["hvp_cpu_s_slowest_rank"],
                       "hvp_minus_local_share_of_hvp": (double["hvp_s"] - double["local_hvp_s"]) / double["hvp_s"]})
        print(f"round {k + 1}: load {load:.1f} · HVP {single['hvp_s'] * 1e3:.1f} ms → {double['hvp_s'] * 1e3:.1f} ms "
              f"({rounds[-1]['hvp_speedup']:.2f}×) · λmax {single['lambda_max_s']:.2f} s → {double['lambda_max_s']:.2f} s "
              f"({rounds[-1]['lambda_max_speedup']:.2f}×, {single['lambda_max_hvps']}/{double['lambda_max_hvps']} HVPs) · "
              f"all_reduce of {double['parameters'] + 1} floats {double['all_reduce_s'] * 1e6:.0f} µs "
              f"({100 * rounds[-1]['communication_share_of_hvp']:.2f}% of an HVP) · CPU s per HVP "
              f"{single['hvp_cpu_s_slowest_rank'] * 1e3:.1f} ms → {double['hvp_cpu_s_slowest_rank'] * 1e3:.1f} ms on the "
              f"slowest rank ({rounds[-1]['hvp_cpu_ratio']:.2f}×)", flush=True)

    def median(key):
        return statistics.median(r[key] for r in rounds)

    summary = {
        "hvp_speedup_median": median("hvp_speedup"),
        "lambda_max_speedup_median": median("lambda_max_speedup"),
        "communication_share_of_hvp_median": median("communication_share_of_hvp"),
        "hvp_cpu_ratio_median": median("hvp_cpu_ratio"),
        "lambda_max_relative_difference": max(abs(r["one_process"]["lambda_max"] - r["two_processes"]["lambda_max"])
                                              / abs(r["one_process"]["lambda_max"]) for r in rounds),
    }
    document = {
        "benchmark": "curvdiag probe: 1 process x 1 thread vs 2 processes x 1 thread (gloo, CPU)",
        "recipe": "sample_models/bn_cnn.py (eval mode, all 4 batches)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "shared with other jobs: absolute times drift with the load; compare the per-round ratios"},
        "rounds": rounds,
        "summary": summary,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
