"""One torch thread against torch's default (one per core) for a probe on a shared CPU (issue #12 item 4).

Times ``curvdiag.probe(..., probes="lambda_max")`` on the bundled BatchNorm CNN with its checkpoint,
each measurement in a fresh process (``--worker``), threads 1 and the default interleaved, on an
idle machine and with a second CPU job running (a process multiplying matrices on torch's default
threads, as another user's training would). Prints the medians and writes threads_results.json.

    python benchmarks/bench_threads.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "sample_models"))
    import bn_cnn

    import curvdiag
    from curvdiag.loading.checkpoint import load_model_state, read_checkpoint

    model = bn_cnn.model()
    load_model_state(model, read_checkpoint(str(ROOT / "sample_models/checkpoints/bn_cnn.pt")))
    batches = list(bn_cnn.data())
    started = time.perf_counter()
    report = curvdiag.probe(model, bn_cnn.loss, batches, probes="lambda_max")
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(),
                      "lambda_max": report.probes["lambda_max"].value, "hvps": report.probes["lambda_max"].hvps}))


def busy() -> subprocess.Popen:
    """A second CPU job: matrix products on torch's default threads, until killed."""
    code = ("import torch\na=torch.randn(512,512)\nwhile True:\n    a=(a@a).tanh()\n")
    return subprocess.Popen([sys.executable, "-c", code], env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})


def measure(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "threads_results.json"))
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    results = {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "runs": []}
    for condition in ("idle", "second job"):
        job = busy() if condition == "second job" else None
        try:
            time.sleep(2 if job else 0)
            for repeat in range(args.repeats):
                for threads in (1, 0):  # 0: torch's default
                    row = dict(measure(threads), condition=condition, requested=threads or "default",
                               load=os.getloadavg()[0])
                    results["runs"].append(row)
                    print(row, flush=True)
        finally:
            if job:
                job.kill()
                job.wait()
    summary = {}
    for condition in ("idle", "second job"):
        for requested in (1, "default"):
            times = [r["seconds"] for r in results["runs"] if r["condition"] == condition and r["requested"] == requested]
            summary[f"{condition}, threads {requested}"] = {"median_s": statistics.median(times), "min_s": min(times),
                                                              "max_s": max(times)}
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
