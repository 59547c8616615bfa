"""Large models on CPU (issue #16, item 6): λmax at 1M–124M parameters, and HVP ÷ gradient by batch count.

    python benchmarks/bench_large.py            # full (~26 min on one thread, 11 of them GPT-2's reference run)
    python benchmarks/bench_large.py --quick    # smoke run, smaller sizes (~1 min)
    python benchmarks/bench_large.py --models mlp_1m,resnet50 --no-peers --no-ratio

Every model is built from code with random weights (nothing is downloaded), in float32:
- ``mlp_1m`` / ``mlp_5m``: tanh MLPs 64-h-h-10 (h 960 / 2200) on one batch of 512 digits (sklearn's
  bundled copy), mean cross-entropy;
- ``resnet50``: torchvision's ResNet-50 rewritten by hand (:class:`ResNet50`: bottleneck blocks
  [3, 4, 6, 3], BatchNorm, 1000 classes, 25,557,032 parameters) on one batch of 16 random 3×64×64
  images; the BatchNorm running statistics are first calibrated on that batch (train-mode forwards
  without gradients), then the model is probed in eval mode, as curvdiag and PyHessian both do;
- ``gpt2``: ``transformers.GPT2LMHeadModel(GPT2Config())`` (12 layers, d 768, 12 heads, vocab
  50257, tied embeddings: 124,439,808 parameters) on one batch of 1 × 128 random tokens (2 × 128 took ~10 s a
  product here with the Lanczos overheads, 808 s for λmax), mean
  next-token cross-entropy (``labels=``); eval mode, so dropout is off.

Each model runs in its own child process (its peak RSS is then its own) on one torch thread:

1. **λmax by the default path**: ``curvdiag.CurvatureOperator(model, batches, loss, sizes)`` (``auto``:
   kept graph or double backward chosen by bytes against the default ``memory``) and
   ``curvdiag.lambda_max(op, tol=1e-4)`` (Lanczos, its default Krylov basis budget). The
   operator's ``matvec`` is wrapped to time every product, and ``LanczosProcess.step`` to time the
   reorthogonalisation inside it (step − product); the rest of the bookkeeping (the tridiagonal's
   ``eigh``, the error estimates, restarts) is total − step. Peak RSS (``VmHWM``, reset through
   ``/proc/self/clear_refs``) over the set-up and over λmax, against the RSS with the model loaded
   and against the model's own footprint (parameters + gradients = 2 × parameter bytes).
2. **The reference**: the MLPs: scipy ``eigsh`` (which="LA", tol 1e-8) over the same float32
   product. ResNet-50 and GPT-2 (eigsh's 20-vector basis does not fit): a second Lanczos run from
   another start (seed 1), tol 1e-8, capped at twice the products of the measured run, with the
   basis budget raised to hold all of them unrestarted where memory allows (``REFERENCE_BASIS``);
   the larger of the two top Ritz values is the reference (a Ritz value never exceeds λmax).
3. **HVP ÷ gradient** on the 1M MLP at batch 32 and 1, 16, 64, 256 batches: time per product of the
   operator ``auto`` builds (and, beside it, forced ``double-backward``, and ``auto`` under a
   ``memory`` budget of half the estimated graph: ``partial-kept-graph``) over time per gradient
   (forward + ``autograd.grad`` over every batch), medians of interleaved repetitions, with the
   kept graph's estimated bytes and the RSS it actually added.
4. **PyHessian** 0.1 (when installed) on the MLPs and ResNet-50: one recorded power iteration
   (its Rayleigh quotient after every product, capped in products and seconds) is replayed for
   tol 1e-3 … 1e-7 (PyHessian's iterates do not depend on tol); the cheapest tol whose answer is
   within 1e-4 of the reference is then run for real, timed with its set-up, against curvdiag's
   set-up + λmax. GPT-2 is skipped for peers: one product takes ~6 s, and power iteration's
   hundreds would take far more than 10 minutes.

Results go to ``benchmarks/large_results.json``; the tables are printed as markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import curvdiag  # noqa: E402
from curvdiag.curvature.operator import CurvatureOperator  # noqa: E402
from curvdiag.probes import eigen  # noqa: E402

TOL = 1e-4
PEER_TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
MiB = 2**20
REFERENCE_BASIS = 3 << 30  # bytes of Krylov basis the long reference run may hold (restarts past it)


# --------------------------------------------------------------------------- memory
def _status(field: str) -> float:
    """A VmXXX field of /proc/self/status in MiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def rss() -> float:
    return _status("VmRSS")


def reset_peak() -> None:
    """Reset VmHWM (the peak RSS) to the current RSS (Linux ≥ 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak() -> float:
    return _status("VmHWM")


# --------------------------------------------------------------------------- models
class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5: the stride on the 3×3): 1×1-BN-ReLU, 3×3-BN-ReLU, 1×1-BN, plus
    the (downsampled) input, ReLU; ``expansion`` 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision.models.resnet50 rewritten (module names, shapes and initialisation as there:
    Kaiming normal fan_out on convolutions, BatchNorm 1 and 0): 25,557,032 parameters at 1000
    classes. ``layers`` and ``base`` shrink it for ``--quick``."""

    def __init__(self, num_classes: int = 1000, layers: Tuple[int, ...] = (3, 4, 6, 3), base: int = 64):
        super().__init__()
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(base, layers[0])
        self.layer2 = self._make_layer(base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(base * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(base * 8 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def classification_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss  # mean next-token cross-entropy (labels shifted inside the model)


def digits(samples: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``samples`` rows of sklearn's bundled digits (drawn with replacement past 1,797), standardised."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    index = np.random.default_rng(seed).choice(len(x), samples, replace=samples > len(x))
    return torch.tensor(x[index], dtype=torch.float32), torch.tensor(y[index], dtype=torch.long)


def mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def build(name: str, quick: bool) -> Dict[str, Any]:
    """The model, its batches, loss and a description: {model, batches, sizes, loss, criterion, batch}."""
    if name in ("mlp_1m", "mlp_5m"):
        hidden = {"mlp_1m": 960, "mlp_5m": 2200}[name] // (4 if quick else 1)
        samples = 128 if quick else 512
        x, y = digits(samples, seed=1)
        return dict(model=mlp(hidden), batches=[(x, y)], sizes=[samples], loss=classification_loss,
                    criterion=F.cross_entropy, batch=f"1 × {samples} digits (64 features)",
                    architecture=f"tanh MLP 64-{hidden}-{hidden}-10")
    if name == "resnet50":
        torch.manual_seed(0)
        model = ResNet50(layers=(1, 1, 1, 1), base=16) if quick else ResNet50()
        size, count = (32, 4) if quick else (64, 16)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(count, 3, size, size, generator=g)
        y = torch.randint(0, 1000, (count,), generator=g)
        for m in model.modules():  # running statistics: the cumulative average over a few passes
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(x)
        model.eval()
        return dict(model=model, batches=[(x, y)], sizes=[count], loss=classification_loss,
                    criterion=F.cross_entropy, batch=f"1 × {count} random 3×{size}×{size} images",
                    architecture="ResNet-50 (bottleneck [3,4,6,3], BatchNorm, eval mode)" if not quick
                    else "ResNet-50-shaped, [1,1,1,1] blocks, base width 16")
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        config = GPT2Config() if not quick else GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=2000)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
        rows, length = (2, 32) if quick else (1, 128)
        ids = torch.randint(0, config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))
        return dict(model=model, batches=[{"input_ids": ids, "labels": ids}], sizes=[rows], loss=lm_loss,
                    criterion=None, batch=f"1 × {rows} sequences × {length} random tokens",
                    architecture=(f"GPT2LMHeadModel(GPT2Config()): {config.n_layer} layers, d {config.n_embd}, "
                                  f"{config.n_head} heads, vocab {config.vocab_size}, tied embeddings"))
    raise SystemExit(f"unknown model {name!r}")


# --------------------------------------------------------------------------- timing wrappers
class Timers:
    """Seconds inside the operator's products and inside LanczosProcess.step (benchmark only)."""

    def __init__(self) -> None:
        self.hvp = 0.0
        self.hvps = 0
        self.step = 0.0
        self.step_hvp = 0.0  # the products made inside step()

    def reset(self) -> None:
        self.__init__()


TIMERS = Timers()


def time_products(op: CurvatureOperator) -> None:
    """Wrap ``op.matvec`` (the instance attribute shadows the method) with a timer."""
    inner = op.hvp

    def timed(v: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = inner(v)
        TIMERS.hvp += time.perf_counter() - started
        TIMERS.hvps += 1
        return out

    op.matvec = timed


@contextlib.contextmanager
def timed_lanczos_steps():
    original = eigen.LanczosProcess.step

    def step(self: eigen.LanczosProcess) -> float:
        before, started = TIMERS.hvp, time.perf_counter()
        out = original(self)
        TIMERS.step += time.perf_counter() - started
        TIMERS.step_hvp += TIMERS.hvp - before
        return out

    eigen.LanczosProcess.step = step
    try:
        yield
    finally:
        eigen.LanczosProcess.step = original


def plain_gradient(model: nn.Module, batches: List[Any], sizes: List[int], loss_fn: Callable) -> float:
    """Seconds of one gradient of the sample-weighted mean loss: forward + autograd.grad per batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, n = None, float(sum(sizes))
    started = time.perf_counter()
    for batch, size in zip(batches, sizes):
        grads = torch.autograd.grad(loss_fn(model, batch), params)
        total = [g * (size / n) for g in grads] if total is None else [t.add_(g, alpha=size / n) for t, g in zip(total, grads)]
    seconds = time.perf_counter() - started
    del total
    return seconds


# --------------------------------------------------------------------------- references
def eigsh_reference(op: CurvatureOperator, tol: float) -> Dict[str, Any]:
    from scipy.sparse.linalg import LinearOperator, eigsh

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1)).to(op.dtype)
        return op.hvp(v).double().numpy()

    started, count = time.perf_counter(), op.hvp_count
    value = eigsh(LinearOperator((op.size, op.size), matvec=matvec, dtype=np.float64), k=1, which="LA", tol=tol,
                  v0=np.random.default_rng(0).standard_normal(op.size), return_eigenvectors=False)
    return {"method": f"scipy eigsh (which='LA', tol {tol:g}) over the same float32 product",
            "value": float(value.max()), "hvps": op.hvp_count - count, "seconds": time.perf_counter() - started}


def rayleigh64(op: CurvatureOperator, y: torch.Tensor) -> Tuple[float, float]:
    """(ρ, r): the Rayleigh quotient ρ = yᵀHy / yᵀy and the residual r = ‖Hy − ρy‖ / ‖y‖ of a float32
    vector y, with one float32 product and every reduction in float64. ρ ≤ λmax (to the product's
    rounding, ~1e-7 relative) and some eigenvalue lies within r of ρ, whatever rounding the Lanczos
    run that produced y suffered."""
    hy = op.hvp(y).double()
    y = y.double()
    rho = float(torch.dot(y, hy) / torch.dot(y, y))
    return rho, float((hy - rho * y).norm() / y.norm())


def lanczos_reference(op: CurvatureOperator, products: int, measured: Tuple[float, float]) -> Dict[str, Any]:
    """A second Lanczos run from seed 1, tol 1e-8, at most ``products`` products, basis budget
    REFERENCE_BASIS; the reference is the larger float64 Rayleigh quotient of its Ritz vector and of
    the measured run's (``measured`` = (ρ, r)): a lower bound on λmax to the product's rounding."""
    started, count = time.perf_counter(), op.hvp_count
    bytes_per_vector = op.size * torch.finfo(op.dtype).bits // 8
    r = eigen.lanczos(op, tol=1e-8, max_matvecs=products, seed=1, basis_budget_bytes=REFERENCE_BASIS,
                      want_vectors=True)
    vector = r.eigenvectors[0]
    del r.eigenvectors
    rho, residual = rayleigh64(op, vector)
    del vector
    value, value_residual = max((rho, residual), measured)
    return {"method": (f"Lanczos from seed 1, tol 1e-8, ≤ {products} products (2× the measured run's), basis "
                       f"≤ {REFERENCE_BASIS // bytes_per_vector} vectors; reference = the larger float64 Rayleigh "
                       "quotient of its Ritz vector and of the measured run's"),
            "value": value, "residual": value_residual, "ritz_value": r.eigenvalues[0], "rayleigh64": rho,
            "rayleigh64_residual": residual, "hvps": op.hvp_count - count, "converged": r.converged,
            "restarts": r.restarts, "error_estimate": r.error_estimates[0], "seconds": time.perf_counter() - started}


def restart_cost(op: CurvatureOperator, reference: float, capacities: Tuple[int, ...]) -> List[Dict[str, Any]]:
    """Products of ``lanczos`` at lambda_max's defaults (tol 1e-4, ≤ 500 products, seed 0) when the
    basis budget holds ``capacity`` vectors (GPT-2 small's 2 GiB default holds 4): what the explicit
    restarts cost in products and accuracy."""
    rows = []
    bytes_per_vector = op.size * torch.finfo(op.dtype).bits // 8
    for capacity in capacities:
        count, started = op.hvp_count, time.perf_counter()
        r = eigen.lanczos(op, tol=TOL, max_matvecs=500, seed=0, basis_budget_bytes=capacity * bytes_per_vector)
        rows.append({"capacity": capacity, "hvps": op.hvp_count - count, "restarts": r.restarts,
                     "converged": r.converged, "error": (reference - r.eigenvalues[0]) / abs(reference),
                     "seconds": time.perf_counter() - started})
    return rows


def trimmed_rss() -> float:
    """RSS after glibc's malloc_trim(0): what remains when the allocator returns its free pages."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        return float("nan")
    return rss()


# --------------------------------------------------------------------------- 1 + 2: λmax
def run_lambda_max(name: str, quick: bool, peers: bool, peer_seconds: float) -> Dict[str, Any]:
    torch.set_num_threads(1)
    rss_start = rss()
    spec = build(name, quick)
    model, batches, sizes, loss_fn = spec["model"], spec["batches"], spec["sizes"], spec["loss"]
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)  # model.parameters() yields a tied tensor once
    param_mib = n * 4 / MiB
    print(f"{name}: {n:,} parameters, {spec['batch']}", file=sys.stderr, flush=True)
    gradient_seconds = []
    reset_peak()
    rss_model = rss()
    for _ in range(2):
        gradient_seconds.append(plain_gradient(model, batches, sizes, loss_fn))
    gradient_peak = peak()

    TIMERS.reset()
    reset_peak()
    rss_before = rss()
    started = time.perf_counter()
    op = CurvatureOperator(model, batches, loss_fn, sizes)  # the default: auto, memory=None
    setup_seconds = time.perf_counter() - started
    setup_peak, rss_after_setup = peak(), rss()
    rss_after_setup_trimmed = trimmed_rss()
    time_products(op)
    reset_peak()
    with timed_lanczos_steps():
        started = time.perf_counter()
        result = curvdiag.lambda_max(op, tol=TOL, want_vectors=True)  # as curvdiag.probe asks
        seconds = time.perf_counter() - started
    lam_peak = peak()
    vector = result.eigenvectors[0]
    result.eigenvectors = None
    rss_after_lambda_trimmed = trimmed_rss()
    measured = rayleigh64(op, vector)
    del vector
    timers = dict(vars(TIMERS))
    print(f"  {op.hvp_method}: λmax {result.value:.6g} in {result.hvps} products, {seconds:.1f} s "
          f"(set-up {setup_seconds:.1f} s)", file=sys.stderr, flush=True)
    bytes_per_vector = n * 4
    capacity = max(3, min(n, 501, (2 << 30) // bytes_per_vector))
    row: Dict[str, Any] = {
        "model": name, "architecture": spec["architecture"], "batch": spec["batch"], "parameters": n,
        "parameter_mib": param_mib, "hvp_method": op.hvp_method, "fallback": op.fallback,
        "graph_mib_estimated": None if op.graph_bytes is None else op.graph_bytes / MiB,
        "memory_budget_mib": None if op.memory is None else op.memory / MiB,
        "basis_capacity_vectors": capacity,
        "gradient_seconds": gradient_seconds, "setup_seconds": setup_seconds,
        "setup_gradient_seconds": op.gradient_seconds,
        "lambda_max": result.value, "hvps": result.hvps, "restarts": result.restarts,
        "converged": result.converged, "error_estimate": result.error_estimates[0] / abs(result.value),
        "seconds": seconds, "hvp_seconds": timers["hvp"], "bookkeeping_seconds": seconds - timers["hvp"],
        "reorthogonalisation_seconds": timers["step"] - timers["step_hvp"],
        "other_bookkeeping_seconds": seconds - timers["step"],
        "seconds_per_hvp": timers["hvp"] / max(timers["hvps"], 1),
        "rss_start_mib": rss_start, "rss_model_mib": rss_model, "gradient_peak_mib": gradient_peak,
        "rss_before_setup_mib": rss_before, "setup_peak_mib": setup_peak, "rss_after_setup_mib": rss_after_setup,
        "lambda_max_peak_mib": lam_peak, "rss_after_setup_trimmed_mib": rss_after_setup_trimmed,
        "rss_after_lambda_max_trimmed_mib": rss_after_lambda_trimmed,
        "rayleigh64": measured[0], "rayleigh64_residual": measured[1],
        "overestimate_vs_own_rayleigh64": (result.value - measured[0]) / abs(measured[0]),
        "peak_over_model_mib": max(setup_peak, lam_peak) - rss_model,
        "peak_over_model_and_grads_mib": max(setup_peak, lam_peak) - rss_model - param_mib,
    }
    # the reference
    if name.startswith("mlp"):
        row["reference"] = eigsh_reference(op, 1e-8)
    else:
        row["reference"] = lanczos_reference(op, 2 * result.hvps, measured)
    ref = row["reference"]["value"]
    if name == "mlp_1m":
        row["restart_cost"] = restart_cost(op, ref, (4, 8, 20, 501))
    row["error"] = (ref - result.value) / abs(ref)
    print(f"  reference {ref:.8g} ({row['reference']['hvps']} products, {row['reference']['seconds']:.0f} s): "
          f"error {row['error']:.1e}", file=sys.stderr, flush=True)
    if peers and spec["criterion"] is not None:
        row["pyhessian"] = run_pyhessian(spec, op, ref, peer_seconds)
    del op
    return row


# --------------------------------------------------------------------------- 4: PyHessian
def run_pyhessian(spec: Dict[str, Any], op: CurvatureOperator, ref: float, budget_seconds: float) -> Dict[str, Any]:
    try:
        import pyhessian  # noqa: F401

        module = importlib.import_module("pyhessian.hessian")
        from pyhessian import hessian as PyHessian
    except ImportError as exc:
        return {"skipped": f"PyHessian does not import: {exc}"}
    model, (x, y) = spec["model"], spec["batches"][0]
    original = module.hessian_vector_product
    record: List[float] = []
    started_at: List[float] = []

    def recorded(gradsH, params, v):
        hv = original(gradsH, params, v)
        record.append(float(sum(torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(hv, v))))
        if time.perf_counter() - started_at[0] > budget_seconds:
            raise TimeoutError
        return hv

    # One recorded run at tol 0 (never stops early), capped in products and seconds.
    module.hessian_vector_product = recorded
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    started_at.append(time.perf_counter())
    try:
        H = PyHessian(model, spec["criterion"], data=(x, y), cuda=False)
        H.eigenvalues(maxIter=1000, tol=0.0, top_n=1)
    except TimeoutError:
        pass
    finally:
        module.hessian_vector_product = original
        H = None
        model.zero_grad(set_to_none=True)
    recorded_seconds = time.perf_counter() - started_at[0]
    replay = {}
    for tol in PEER_TOLS:  # PyHessian's rule: stop at i ≥ 1 when |q_{i-1} − q_i| / (|q_{i-1}| + 1e-6) < tol, return q_{i-1}
        stop = next((i for i in range(1, len(record))
                     if abs(record[i - 1] - record[i]) / (abs(record[i - 1]) + 1e-6) < tol), None)
        replay[tol] = None if stop is None else {"hvps": stop + 1, "value": record[stop - 1],
                                                 "error": abs(ref - record[stop - 1]) / abs(ref)}
    cheapest = next((tol for tol in PEER_TOLS if replay[tol] is not None and replay[tol]["error"] <= TOL), None)
    oracle = next((i + 1 for i, q in enumerate(record) if abs(ref - q) <= TOL * abs(ref)), None)
    out: Dict[str, Any] = {"recorded_products": len(record), "recorded_seconds": recorded_seconds,
                           "replay": {f"{t:g}": r for t, r in replay.items()}, "cheapest_tol": cheapest,
                           "perfect_stop_hvps": oracle, "last_quotient_error": abs(ref - record[-1]) / abs(ref)}
    if cheapest is None:
        out["note"] = (f"no tol in {PEER_TOLS} reaches {TOL:g} within the {len(record)} products recorded "
                       f"({recorded_seconds:.0f} s cap)")
        return out
    # Side by side, interleaved: PyHessian at its cheapest tol, then curvdiag's default path, both
    # with set-up; the fastest of each over the repetitions (load from other processes only adds time).
    ph_times: List[float] = []
    cd_times: List[float] = []
    reps = 3 if recorded_seconds * replay[cheapest]["hvps"] / max(len(record), 1) < 10 else 1
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        started = time.perf_counter()
        H = PyHessian(model, spec["criterion"], data=(x, y), cuda=False)
        values, _ = H.eigenvalues(maxIter=1000, tol=cheapest, top_n=1)
        ph_times.append(time.perf_counter() - started)
        H = None
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        op2 = CurvatureOperator(model, spec["batches"], spec["loss"], spec["sizes"])
        cd = curvdiag.lambda_max(op2, tol=TOL)
        cd_times.append(time.perf_counter() - started)
        del op2
    ph_seconds, cd_seconds = min(ph_times), min(cd_times)
    out.update({"pyhessian_seconds": ph_seconds, "pyhessian_value": float(values[0]),
                "pyhessian_error": abs(ref - float(values[0])) / abs(ref),
                "pyhessian_hvps": replay[cheapest]["hvps"],
                "curvdiag_seconds": cd_seconds, "curvdiag_hvps": cd.hvps,
                "curvdiag_error": abs(ref - cd.value) / abs(ref), "ratio": cd_seconds / ph_seconds,
                "repetitions": reps, "pyhessian_all_seconds": ph_times, "curvdiag_all_seconds": cd_times})
    print(f"  PyHessian tol {cheapest:g}: {ph_seconds:.1f} s ({replay[cheapest]['hvps']} products) vs curvdiag "
          f"{cd_seconds:.1f} s: ratio {cd_seconds / ph_seconds:.3f}", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------- 3: HVP ÷ gradient
def ratio_counts(quick: bool) -> Tuple[int, ...]:
    return (1, 4, 16) if quick else (1, 16, 64, 256)


def ratio_model(quick: bool) -> Tuple[int, int]:
    """(hidden width, batch) of the HVP ÷ gradient model."""
    return (240, 32) if quick else (960, 32)


def run_ratio(quick: bool, count: int) -> Dict[str, Any]:
    """One row of the HVP ÷ gradient table, in a fresh process (so the RSS the kept graph adds is
    not memory an earlier operator freed)."""
    torch.set_num_threads(1)
    hidden, batch = ratio_model(quick)
    model = mlp(hidden)
    x, y = digits(batch * max(ratio_counts(quick)), seed=2)
    batches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(count)]
    sizes = [batch] * count
    reps = 7 if count <= 16 else (5 if count <= 64 else 3)
    plain_gradient(model, batches, sizes, classification_loss)  # warm: the allocator holds one gradient's memory
    rss0 = rss()
    reset_peak()
    auto = CurvatureOperator(model, batches, classification_loss, sizes)
    auto_peak, auto_rss = peak() - rss0, rss() - rss0
    auto_trimmed = trimmed_rss() - rss0
    forced = CurvatureOperator(model, batches, classification_loss, sizes, hvp_method="double-backward")
    # auto under a budget of half the estimated graph: the graphs of the first half of the batches
    # are kept, the rest double-backward (partial-kept-graph); with one batch nothing fits.
    half = CurvatureOperator(model, batches, classification_loss, sizes, memory=max(1, auto.graph_bytes // 2))
    v = torch.randn(auto.size, generator=torch.Generator().manual_seed(3))
    times: Dict[str, List[float]] = {"gradient": [], "auto": [], "double-backward": [], "half": []}
    for _ in range(reps):  # interleaved
        times["gradient"].append(plain_gradient(model, batches, sizes, classification_loss))
        for key, op in (("auto", auto), ("double-backward", forced), ("half", half)):
            started = time.perf_counter()
            op.hvp(v)
            times[key].append(time.perf_counter() - started)
    med = {k: statistics.median(t) for k, t in times.items()}
    row = {"batches": count, "batch": batch, "samples": count * batch, "parameters": auto.size,
           "model": f"tanh MLP 64-{hidden}-{hidden}-10",
           "method": auto.hvp_method, "graph_mib_estimated": auto.graph_bytes / MiB,
           "setup_rss_added_mib": auto_rss, "setup_rss_added_trimmed_mib": auto_trimmed,
           "setup_peak_added_mib": auto_peak,
           "gradient_ms": 1e3 * med["gradient"], "hvp_ms": 1e3 * med["auto"],
           "double_backward_ms": 1e3 * med["double-backward"], "ratio": med["auto"] / med["gradient"],
           "double_backward_ratio": med["double-backward"] / med["gradient"], "repetitions": reps,
           "half_budget": {"method": half.hvp_method, "kept_batches": half.kept_batches, "price_ge": half.hvp_price,
                           "hvp_ms": 1e3 * med["half"], "ratio": med["half"] / med["gradient"]},
           "times": times}
    print(f"ratio: {count} batches: {auto.hvp_method} {row['ratio']:.2f}× a gradient, double backward "
          f"{row['double_backward_ratio']:.2f}×, graph {row['graph_mib_estimated']:.1f} MiB est., "
          f"{auto_rss:.0f} MiB added", file=sys.stderr, flush=True)
    return row


# --------------------------------------------------------------------------- float32 reductions
def norm_bias(sizes: Tuple[int, ...]) -> List[Dict[str, Any]]:
    """Relative error of float32 reductions over a unit-variance random vector of n entries, against
    float64, on one thread: ``Tensor.norm`` (what LanczosProcess uses for β and the start), ``torch.dot``
    of the vector with itself (α = qᵀAq is such a sum of mostly positive terms), and
    ``x.pow(2).sum().sqrt()`` (torch's cascade summation)."""
    torch.set_num_threads(1)
    rows = []
    for n in sizes:
        x = torch.randn(n, generator=torch.Generator().manual_seed(0))
        exact = float(torch.linalg.vector_norm(x, dtype=torch.float64))
        rows.append({"n": n, "norm": float(x.norm()) / exact - 1, "dot_self": float(torch.dot(x, x)) / exact**2 - 1,
                     "cascade_sum": float(x.pow(2).sum().sqrt()) / exact - 1})
        del x
    return rows


# --------------------------------------------------------------------------- tables
def _f(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(results: Dict[str, Any]) -> str:
    out = ["**λmax to tol 1e-4 by the default path** (`CurvatureOperator(...)` auto, `lambda_max(op, tol=1e-4)`)", "",
           "| model | parameters | batch | HVP method | HVPs (restarts) | wall s | HVPs s | bookkeeping s "
           "(reorth.) | s / HVP ÷ gradient | set-up s | λmax | error vs reference | above its own float64 "
           "Rayleigh quotient | reference |",
           "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["lambda_max"]:
        grad = min(r["gradient_seconds"])
        ref = r["reference"]
        ref_text = "eigsh 1e-8" if ref["method"].startswith("scipy") else \
            f"Lanczos seed 1, {ref['hvps']} HVPs ({ref['restarts']} restarts), float64 Rayleigh quotient"
        out.append(f"| {r['model']} | {r['parameters']:,} | {r['batch']} | {r['hvp_method']} | {r['hvps']} "
                   f"({r['restarts']}) | {r['seconds']:.1f} | {r['hvp_seconds']:.1f} | "
                   f"{r['bookkeeping_seconds']:.2f} ({r['reorthogonalisation_seconds']:.2f}) | "
                   f"{r['seconds_per_hvp']:.3f} ÷ {grad:.3f} = {r['seconds_per_hvp'] / grad:.2f}× | "
                   f"{r['setup_seconds']:.1f} | {r['lambda_max']:.6g} | {r['error']:.1e} | "
                   f"{r['overestimate_vs_own_rayleigh64']:.1e} | {ref_text} |")
    out += ["", "**Memory** (MiB; peak RSS by VmHWM, reset before each phase; model = RSS with the model built)", "",
            "| model | parameters (MiB) | kept graph est. | memory budget | basis vectors | RSS model | gradient peak "
            "| set-up peak | after set-up (trimmed) | λmax peak | after λmax, trimmed | peak − model | "
            "peak − (model + grads) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["lambda_max"]:
        out.append(f"| {r['model']} | {r['parameter_mib']:.0f} | {_f(r['graph_mib_estimated'], '.0f')} | "
                   f"{_f(r['memory_budget_mib'], '.0f')} | {r['basis_capacity_vectors']} | {r['rss_model_mib']:.0f} | "
                   f"{r['gradient_peak_mib']:.0f} | {r['setup_peak_mib']:.0f} | {r['rss_after_setup_mib']:.0f} "
                   f"({r['rss_after_setup_trimmed_mib']:.0f}) | {r['lambda_max_peak_mib']:.0f} | "
                   f"{r['rss_after_lambda_max_trimmed_mib']:.0f} | {r['peak_over_model_mib']:.0f} | "
                   f"{r['peak_over_model_and_grads_mib']:.0f} |")
    if results.get("ratio"):
        ratio = results["ratio"]
        out += ["", f"**HVP ÷ gradient by batch count** ({ratio['model']}, batch 32, medians of interleaved "
                    "repetitions)", "",
                "| batches | samples | method (auto) | kept graph est. MiB | RSS added by set-up MiB (trimmed) | "
                "gradient ms | HVP ms | HVP ÷ gradient | double backward ÷ gradient | "
                "budget ½ the graph: method (batches kept, price GE) | its HVP ÷ gradient |",
                "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in ratio["rows"]:
            h = r.get("half_budget")
            half = (f"{h['method']} ({h['kept_batches']}, {h['price_ge']:.2f}) | {h['ratio']:.2f}×" if h else "— | —")
            out.append(f"| {r['batches']} | {r['samples']} | {r['method']} | {r['graph_mib_estimated']:.1f} | "
                       f"{r['setup_rss_added_mib']:.0f} ({r['setup_rss_added_trimmed_mib']:.0f}) | {r['gradient_ms']:.1f} | {r['hvp_ms']:.1f} | "
                       f"**{r['ratio']:.2f}×** | {r['double_backward_ratio']:.2f}× | {half} |")
    peers = [r for r in results["lambda_max"] if "pyhessian" in r]
    if peers:
        out += ["", "**PyHessian 0.1 side by side** (its cheapest tol reaching 1e-4, from a replayed recording; "
                    "wall time with set-up)", "",
                "| model | PyHessian tol | PyHessian HVPs (perfect stop) | PyHessian s | its error | curvdiag HVPs | "
                "curvdiag s | its error | curvdiag ÷ PyHessian |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in peers:
            p = r["pyhessian"]
            if "ratio" not in p:
                out.append(f"| {r['model']} | {p.get('note') or p.get('skipped')} | — (perfect stop "
                           f"{_f(p.get('perfect_stop_hvps'), 'd')}) | — | — | {r['hvps']} | "
                           f"{r['setup_seconds'] + r['seconds']:.1f} | {r['error']:.1e} | — |")
                continue
            out.append(f"| {r['model']} | {p['cheapest_tol']:g} | {p['pyhessian_hvps']} "
                       f"({_f(p['perfect_stop_hvps'], 'd')}) | {p['pyhessian_seconds']:.2f} | "
                       f"{p['pyhessian_error']:.1e} | {p['curvdiag_hvps']} | {p['curvdiag_seconds']:.2f} | "
                       f"{p['curvdiag_error']:.1e} | **{p['ratio']:.2f}** |")
    restarts = [r for r in results["lambda_max"] if r.get("restart_cost")]
    for r in restarts:
        out += ["", f"**What the basis budget's restarts cost** ({r['model']}, `lanczos` at lambda_max's defaults, "
                    "tol 1e-4, the basis budget set to hold k vectors)", "",
                "| basis vectors | HVPs | restarts | converged | error vs eigsh |", "|---:|---:|---:|---|---:|"]
        for c in r["restart_cost"]:
            out.append(f"| {c['capacity']} | {c['hvps']} | {c['restarts']} | {c['converged']} | {c['error']:.1e} |")
    if results.get("norm_bias"):
        out += ["", "**float32 reductions over n entries** (relative error against float64, one thread)", "",
                "| n | `x.norm()` | `torch.dot(x, x)` | `x.pow(2).sum().sqrt()` |", "|---:|---:|---:|---:|"]
        for b in results["norm_bias"]:
            out.append(f"| {b['n']:,} | {b['norm']:.1e} | {b['dot_self']:.1e} | {b['cascade_sum']:.1e} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- driver
MODELS = ("mlp_1m", "mlp_5m", "resnet50", "gpt2")


def child(args: argparse.Namespace) -> None:
    if args.child.startswith("ratio-"):
        result: Any = run_ratio(args.quick, int(args.child.split("-")[1]))
    else:
        result = run_lambda_max(args.child, args.quick, not args.no_peers and args.child != "gpt2", args.peer_seconds)
    Path(args.child_out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and batches (a smoke run)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-peers", action="store_true", help="skip PyHessian")
    parser.add_argument("--no-ratio", action="store_true", help="skip the HVP ÷ gradient table")
    parser.add_argument("--peer-seconds", type=float, default=120.0,
                        help="cap on PyHessian's recorded power iteration per model")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--merge", action="store_true", help="keep the other models' rows of an existing --out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    out = args.out or ROOT / "benchmarks" / ("large_results_quick.json" if args.quick else "large_results.json")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    started, load = time.perf_counter(), os.getloadavg()
    results: Dict[str, Any] = {"lambda_max": [], "ratio": None, "norm_bias": None, "runs": []}
    if args.merge and out.exists():  # keep the rows of the models not rerun
        results.update({k: v for k, v in json.loads(out.read_text()).items() if k in results})
        results["runs"] = results["runs"] or [json.loads(out.read_text()).get("environment")]
        results["lambda_max"] = [r for r in results["lambda_max"] if r["model"] not in names]
    jobs = ([] if args.no_ratio else [f"ratio-{c}" for c in ratio_counts(args.quick)]) + names
    for job in jobs:
        path = out.with_name(f".{job}.child.json")
        command = [sys.executable, __file__, "--child", job, "--child-out", str(path),
                   "--peer-seconds", str(args.peer_seconds)] + (["--quick"] if args.quick else []) + \
                  (["--no-peers"] if args.no_peers else [])
        job_started = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        data = json.loads(path.read_text())
        path.unlink()
        if job.startswith("ratio-"):
            if job == jobs[0]:
                results["ratio"] = {"model": data["model"], "rows": []}
            results["ratio"]["rows"].append(data)
        else:
            data["job_seconds"] = time.perf_counter() - job_started
            results["lambda_max"].append(data)
        print(f"[{time.perf_counter() - started:.0f} s] {job} done", file=sys.stderr, flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")  # so far: a failure later loses nothing
    if not args.no_ratio:
        results["norm_bias"] = norm_bias((10**6, 5 * 10**6) if args.quick else (10**6, 5 * 10**6, 25_557_032, 124_439_808))
    results["environment"] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": 1, "dtype": "float32", "quick": args.quick, "models_run": jobs, "cpu_count": os.cpu_count(),
        "loadavg_start": load, "loadavg_end": os.getloadavg(), "total_seconds": time.perf_counter() - started,
        "pyhessian": _version("pyhessian"), "transformers": _version("transformers")}
    results["runs"] = [r for r in results["runs"] if r] + [results["environment"]]
    table = markdown(results)
    results["table"] = table
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table)
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


def _version(package: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


if __name__ == "__main__":
    main()
