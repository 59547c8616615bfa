"""One script for a session that is lent a GPU (issue 16 item 6): correctness, then the GPU figures.

    python benchmarks/gpu_check.py                         # on the GPU machine (~3–6 min on an H100/H200)
    python benchmarks/gpu_check.py --device cpu --small    # the same path on this CPU, to check the script

1. **The CUDA tests**: ``pytest -q tests/test_training.py -k cuda`` (train on the GPU follows the CPU
   run and resumes exactly), run in a subprocess.
2. **Probe agreement**: λmax (tol 1e-6) of the sample checkpoints on the device against the CPU, TF32
   off (cuDNN convolutions use TF32 by default, which moves λmax by ~1e-3): relative difference
   ≤ 1e-4 required.
3. **train --device**: ``Trainer`` on ``diverge_gd.py`` with the throttle, 50 steps, on the device
   against the CPU: the final losses (full-batch GD; a difference is rounding that the run amplifies,
   so it is printed, not asserted) and the time per step.
4. **GPT-2 small** (124M, random weights from code, 8 × 256 tokens; ``--small``: 2 layers, 2 × 32):
   curvdiag's λmax to 1e-4 (products, seconds, set-up), one HVP ÷ one gradient, peak device memory;
   the batch a row a batch under a memory budget of half its graph (``partial-kept-graph``: its
   product against the kept graph's, ≤ 1e-4 required); then PyHessian (``eigenvalues(tol=1e-4)``: the largest *magnitude* eigenvalue, which on random
   weights can be a negative one) and hessian-eigenthings v1 (``lanczos(max_iter=12)``)
   on the same model and batch when they are installed (benchmark-only: ``pip install pyhessian==0.1
   hessian-eigenthings==1.0.0a5`` after torch). The prototype's H100 figures to beat: PyHessian
   4.03 s and still 2.9e-4 off, eig-v1 3.26 s at 12 hand-set iterations, a kept-graph Lanczos
   1.35–1.73 s at ≤ 1.1e-7, HVP 1.86× a gradient.
Results print as one JSON object at the end (paste it into the closing note); exit status 1 when a
check of 1, 2 or 4's partly kept graph fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict

import torch

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from curvdiag.curvature.operator import CurvatureOperator  # noqa: E402
from curvdiag.loading.target import load_target  # noqa: E402
from curvdiag.probes.sharpness import lambda_max  # noqa: E402
from curvdiag.train.loop import Trainer, TrainSettings  # noqa: E402

SAMPLES = [("tanh_mlp", "tanh_edge.pt"), ("bn_cnn", "bn_cnn.pt"), ("tiny_transformer", "tiny_transformer.pt")]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], Any]) -> tuple:
    synchronize(device)
    started = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - started


def cuda_tests() -> Dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_training.py", "-k", "cuda"], cwd=ROOT,
                          capture_output=True, text=True)
    return {"exit": done.returncode, "tail": done.stdout.strip().splitlines()[-1:] if done.stdout else []}


def probe_agreement(device: str) -> Dict[str, Any]:
    out = {}
    for recipe, checkpoint in SAMPLES:
        values = {}
        for where in ("cpu", device):
            t = load_target(str(ROOT / "sample_models" / f"{recipe}.py"),
                            str(ROOT / "sample_models" / "checkpoints" / checkpoint), device=where)
            op = CurvatureOperator(t.model, t.batches, t.loss_fn, t.batch_sizes)
            values[where] = (lambda_max(op, tol=1e-6).value, op.describe_method())
        cpu, dev = values["cpu"][0], values[device][0]
        out[checkpoint] = {"cpu": cpu, device: dev, "relative": abs(dev - cpu) / abs(cpu), "method": values[device][1]}
    return out


def train_on_device(device: str, steps: int, tmp: Path) -> Dict[str, Any]:
    out = {}
    for where in ("cpu", device):
        records = []
        summary = Trainer(str(ROOT / "sample_models" / "diverge_gd.py"), None, tmp / where.replace(":", "_"),
                          TrainSettings(steps=steps, controller="throttle", checkpoint_every=0, device=where)
                          ).run(on_step=records.append)
        out[where] = {"final_loss": summary.final_loss, "diverged": summary.diverged,
                      "ms_per_step": 1000 * sorted(r["seconds"] for r in records)[len(records) // 2]}
    return out


def gpt2(device: str, small: bool) -> Dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=2000) if small else GPT2Config()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval().to(device)
    rows, length = (2, 32) if small else (8, 256)
    ids = torch.randint(0, config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1)).to(device)
    batch = {"input_ids": ids, "labels": ids}

    def loss(m: torch.nn.Module, b: Dict[str, torch.Tensor]) -> torch.Tensor:
        return m(**b).loss

    params = [p for p in model.parameters() if p.requires_grad]
    out: Dict[str, Any] = {"parameters": sum(p.numel() for p in params), "batch": f"{rows} × {length}"}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    op, out["setup_s"] = timed(device, lambda: CurvatureOperator(model, [batch], loss, [rows]))
    result, out["lambda_max_s"] = timed(device, lambda: lambda_max(op, tol=1e-4))
    out.update(lambda_max=result.value, hvps=result.hvps, converged=result.converged, method=op.describe_method(),
               error_estimate=result.error_estimates[0] if result.error_estimates else None)
    v = torch.randn(op.size, device=op.device)
    hvp_s = min(timed(device, lambda: op.hvp(v))[1] for _ in range(3))
    grad_s = min(timed(device, lambda: torch.autograd.grad(loss(model, batch), params))[1] for _ in range(3))
    out.update(hvp_s=hvp_s, gradient_s=grad_s, hvp_over_gradient=hvp_s / grad_s)
    if device.startswith("cuda"):
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["partial"] = partly_kept(device, model, batch, rows, loss)
    with contextlib.suppress(ImportError):
        from pyhessian import hessian as PyHessian
        from torch.nn.attention import SDPBackend, sdpa_kernel

        class Logits(torch.nn.Module):  # PyHessian calls criterion(model(x), y)
            def __init__(self, inner: torch.nn.Module):
                super().__init__()
                self.inner = inner

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.inner(input_ids=x).logits[:, :-1].reshape(-1, config.vocab_size)

        def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits, y[:, 1:].reshape(-1))

        with sdpa_kernel(SDPBackend.MATH):
            (values, _), seconds = timed(device, lambda: PyHessian(Logits(model), criterion, data=(ids, ids),
                                                                   cuda=device.startswith("cuda")).eigenvalues(tol=1e-4))
        out["pyhessian"] = {"lambda_max": float(values[0]), "s": seconds,
                            "relative_to_curvdiag": (result.value - float(values[0])) / abs(result.value)}
    with contextlib.suppress(ImportError):
        import hessian_eigenthings as he
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run() -> float:  # the v1 API: HessianOperator(model, batches, loss_fn), lanczos(...).eigenvalues
            return float(he.lanczos(he.HessianOperator(model, [batch], loss), k=1, max_iter=12, which="LA",
                                    seed=0).eigenvalues[0])

        with sdpa_kernel(SDPBackend.MATH):
            value, seconds = timed(device, run)
        out["hessian_eigenthings"] = {"lambda_max": value, "s": seconds,
                                      "relative_to_curvdiag": (result.value - value) / abs(result.value)}
    return out


def partly_kept(device: str, model: torch.nn.Module, batch: Dict[str, torch.Tensor], rows: int,
                loss: Callable[[torch.nn.Module, Any], torch.Tensor]) -> Dict[str, Any]:
    """The batch as one batch a row, under a memory budget of half the whole graph
    (``partial-kept-graph``): its product against the kept graph's (relative difference, ≤ 1e-4
    required), the time of each and the device's peak memory while the partial operator is built."""
    batches = [{k: t[i:i + 1] for k, t in batch.items()} for i in range(rows)]
    whole = CurvatureOperator(model, batches, loss, [1] * rows)  # auto within the default budget: the reference
    v = torch.randn(whole.size, generator=torch.Generator().manual_seed(2)).to(whole.device)
    expected, graph, reference = whole.hvp(v), whole.graph_bytes, whole.hvp_method
    del whole
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    op = CurvatureOperator(model, batches, loss, [1] * rows, memory=max(1, graph // 2))
    product, seconds = timed(device, lambda: op.hvp(v))
    out = {"method": op.describe_method(), "reference": reference, "kept_batches": op.kept_batches, "hvp_s": seconds,
           "relative": float((product - expected).norm() / expected.norm())}
    if device.startswith("cuda"):
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a 2-layer GPT-2 and short runs (to check the script)")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    import tempfile

    report: Dict[str, Any] = {"device": args.device, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    report["cuda_tests"] = cuda_tests()
    report["probe_agreement"] = probe_agreement(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        report["train"] = train_on_device(args.device, 10 if args.small else 50, Path(tmp))
    report["gpt2"] = gpt2(args.device, args.small)
    print(json.dumps(report, indent=1, default=str))
    bad = report["cuda_tests"]["exit"] not in (0, 5) or any(r["relative"] > 1e-4 for r in report["probe_agreement"].values()) \
        or report["gpt2"]["partial"]["relative"] > 1e-4
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
