"""λmax to 1e-4 against PyHessian, curvlinops + eigsh and hessian-eigenthings v1, per model (issue #16).

    python benchmarks/bench_lambda_peers.py            # 4 models, 3 interleaved rounds (~5 min on one core)
    python benchmarks/bench_lambda_peers.py --quick    # 1 repetition, shorter caps (a smoke run)

Models (float32, one torch thread):
- ``bn_cnn``, ``tiny_transformer``, ``tanh_mlp`` (``tanh_edge.pt``): the sample checkpoints, loaded through
  curvdiag's ``load_target`` as ``bench_lanczos_stop.py`` does (the recipe's batches and loss);
- ``mlp_1m86``: a tanh MLP 64-1330-1330-10 (1,869,990 parameters, random weights from seed 0, built by
  ``bench_large.mlp``) on one batch of 512 digits, mean cross-entropy.
GPT-2 small (124M) is not run against the peers on CPU: power iteration's hundreds of ~2.6-s products
would take far more than the 10 minutes; ``bench_large.py`` has curvdiag's own figures there.

Per model:
1. the reference: scipy ``eigsh`` (k=2, which="LA", tol 1e-10) over curvdiag's float32 product; λ2/λ1;
2. curvdiag: ``CurvatureOperator(model, batches, loss, sizes)`` (auto) + ``lambda_max(op, tol=1e-4)``; the
   *oracle*: one long ``LanczosProcess`` run from the same start vector (seed 0), the first product whose
   top Ritz value is within 1e-4 (relative) of the reference (no stopping rule can do better from there);
3. each peer, at its own settings, cheapest first, until one reaches relative error ≤ 1e-4 (a setting
   capped at ``--cap`` seconds counts as not reaching it):
   - PyHessian 0.1: ``hessian(model, criterion, dataloader=batches)`` (or ``data=`` for one batch)
     + ``eigenvalues(maxIter=1000, tol=t)``, t = 1e-3 … 1e-7. One recorded run at tol 0 is replayed for
     every t (its power iterates do not depend on tol; its stop: |q_{i-1} − q_i|/(|q_{i-1}| + 1e-6) < t).
     Where the recipe's batches can be concatenated without changing the loss (eval mode: every
     sample's loss is its own), also its faster single-batch path ``data=(x, y)`` on the concatenation;
   - curvlinops 3.0.1: ``HessianLinearOperator(model, loss_module, params, data)`` (its default
     determinism check included) + ``eigsh(H.to_scipy(), k=1, which="LA", tol=t, v0=fixed)``,
     t = 1e-2 … 1e-6, each run for real;
   - hessian-eigenthings 1.0.0a5 (v1 API): ``HessianOperator(model, batches, loss_fn)`` +
     ``lanczos(H, k=1, which="LA", max_iter=m, seed=0)``: the smallest m (hand-set, as a user would have
     to) whose answer reaches 1e-4, read off one recorded ``lanczos_tridiagonal`` run for m ≤ 50 (the
     prefix of a longer run with full reorthogonalisation, its default up to 50 steps), else m in 60,
     80, 100, 150, 200, 300 run for real (no reorthogonalisation past 50, its default); and
     ``deflated_power_iteration(H, k=1, max_iter=1000, tol=t, seed=0)``, t = 1e-3 … 1e-7, replayed from
     one recorded run (its stop: relative change and relative residual both < t);
4. wall time with set-up, interleaved repetitions (curvdiag, then each peer at its cheapest setting,
   per round), medians; the ratio curvdiag ÷ best peer; and each tool's HVP ÷ gradient (one product
   on a built object against forward + ``autograd.grad`` over every batch, interleaved, medians).
Every peer computes the same loss on the same batches: each tool's own loss value is checked against
``op.loss()`` (relative 1e-6) at start-up. The BatchNorm model is probed in eval mode by every tool
(curvdiag's default; PyHessian sets it itself; ``model.eval()`` for the others). The transformer's fused
CPU attention has no double backward nor forward-mode derivative: every peer fails on it as is and runs
under ``sdpa_kernel(SDPBackend.MATH)``, the kernel curvdiag falls back to by itself.

Products are counted by wrapping each tool's product function for the benchmark only. Results go to
``benchmarks/lambda_peers_results.json`` and a markdown table to ``lambda_peers_results.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from curvdiag.curvature.linear_operator import random_vector  # noqa: E402
from curvdiag.curvature.operator import CurvatureOperator  # noqa: E402
from curvdiag.loading.target import load_target  # noqa: E402
from curvdiag.probes.eigen import LanczosProcess  # noqa: E402
from curvdiag.probes.sharpness import lambda_max  # noqa: E402

TOL = 1e-4
PYHESSIAN_TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
CURVLINOPS_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
POWER_TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
EIG_REORTH_STEPS = 50  # hessian-eigenthings reorthogonalises by default up to this max_iter
EIG_LONG_STEPS = (60, 80, 100, 150, 200, 300)
LOSS_AGREEMENT = 1e-6
MODELS = ("bn_cnn", "tiny_transformer", "tanh_mlp", "mlp_1m86")
HAND_SET = "hessian-eigenthings lanczos"  # a fixed number of steps, no stopping rule


class PeerTimeout(Exception):
    """A peer setting ran past the cap."""


class Enough(Exception):
    """A recorded run has gone past the stop of its tightest setting: every setting can be replayed."""


class Counter:
    """Products made by the wrapped product functions, and the deadline they enforce."""

    def __init__(self) -> None:
        self.count = 0
        self.deadline = float("inf")

    def tick(self) -> None:
        self.count += 1
        if time.perf_counter() > self.deadline:
            raise PeerTimeout

    @contextlib.contextmanager
    def watching(self, cap: float):
        self.count, self.deadline = 0, time.perf_counter() + cap
        try:
            yield
        finally:
            self.deadline = float("inf")


COUNTER = Counter()


# --------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """A model, its batches and one loss, spelled for each tool."""

    name: str
    description: str
    model: nn.Module
    batches: List[Tuple[torch.Tensor, torch.Tensor]]
    sizes: List[int]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]  # curvdiag and hessian-eigenthings: loss(model, batch)
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # PyHessian: criterion(outputs, targets)
    curvlinops_loss: nn.Module  # curvlinops: a loss module with reduction="mean"
    curvlinops_data: List[Tuple[torch.Tensor, torch.Tensor]]
    peer_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    one_batch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # the batches concatenated (same loss)
    notes: List[str] = field(default_factory=list)


def _math_attention() -> contextlib.AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _mse_one_hot(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, F.one_hot(y, 10).to(out.dtype))


def workload(name: str) -> Workload:
    if name == "mlp_1m86":
        import bench_large

        x, y = bench_large.digits(512, seed=1)
        model = bench_large.mlp(1330)
        return Workload(name, "tanh MLP 64-1330-1330-10, random weights (seed 0), 1 × 512 digits, cross-entropy",
                        model, [(x, y)], [512], bench_large.classification_loss, F.cross_entropy,
                        nn.CrossEntropyLoss(), [(x, y)])
    recipe, checkpoint = {"bn_cnn": ("bn_cnn", "bn_cnn.pt"), "tiny_transformer": ("tiny_transformer", "tiny_transformer.pt"),
                          "tanh_mlp": ("tanh_mlp", "tanh_edge.pt")}[name]
    target = load_target(str(ROOT / "sample_models" / f"{recipe}.py"),
                         str(ROOT / "sample_models" / "checkpoints" / checkpoint))
    batches, sizes = list(target.batches), list(target.batch_sizes)
    if name == "tanh_mlp":
        criterion, cl_loss = _mse_one_hot, nn.MSELoss()
        cl_data = [(x, F.one_hot(y, 10).float()) for x, y in batches]
    else:
        criterion, cl_loss, cl_data = F.cross_entropy, nn.CrossEntropyLoss(), batches
    one = None
    if len(batches) > 1:  # eval mode: each sample's loss is its own, so one concatenated batch has the same mean
        one = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    target.model.eval()  # curvdiag's default probing mode, for every tool
    description = f"{checkpoint} ({recipe}.py): {len(batches)} × {sizes[0]}"
    w = Workload(name, description, target.model, batches, sizes, target.loss_fn, criterion, cl_loss, cl_data,
                 one_batch=one)
    if name == "tiny_transformer":
        w.peer_context = _math_attention
    if name == "bn_cnn":
        w.notes.append("eval mode (BatchNorm running statistics) for every tool")
    return w


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- reference and oracle
def reference(op: CurvatureOperator) -> Dict[str, Any]:
    from scipy.sparse.linalg import LinearOperator, eigsh

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1)).to(op.dtype)
        return op.hvp(v).double().numpy()

    started, count = time.perf_counter(), op.hvp_count
    values = eigsh(LinearOperator((op.size, op.size), matvec=matvec, dtype=np.float64), k=2, which="LA", tol=1e-10,
                   v0=np.random.default_rng(0).standard_normal(op.size), return_eigenvectors=False)
    values = sorted(float(v) for v in values)[::-1]
    return {"value": values[0], "lambda_2": values[1], "lambda_2_over_1": values[1] / values[0],
            "hvps": op.hvp_count - count, "seconds": time.perf_counter() - started,
            "method": "scipy eigsh (k=2, which='LA', tol 1e-10) over curvdiag's float32 product"}


def oracle(op: CurvatureOperator, lam: float, cap: int) -> Optional[int]:
    """The first product of a Lanczos run from lambda_max's start (seed 0) whose top Ritz value is
    within TOL·|λ| of the reference; None within ``cap`` products."""
    q = random_vector(op.size, 0, op.device, op.dtype)
    process = LanczosProcess(op, q / q.norm(), cap)
    for step in range(cap):
        process.step()
        if lam - float(np.linalg.eigvalsh(process.tridiagonal_array())[-1]) <= TOL * abs(lam):
            return step + 1
        if step < cap - 1:
            process.advance()
    return None


def relative_error(ref: float, value: float) -> float:
    return (ref - value) / abs(ref)


# --------------------------------------------------------------------------- curvdiag
def run_curvdiag(w: Workload) -> Dict[str, Any]:
    started = time.perf_counter()
    op = CurvatureOperator(w.model, w.batches, w.loss_fn, w.sizes)
    setup = time.perf_counter() - started
    r = lambda_max(op, tol=TOL)
    # The start-up check's product is lambda_max's first (seed 0): then no set-up product is extra.
    return {"value": r.value, "hvps": r.hvps, "setup_hvps": 0 if op.check_reused else 1, "setup_seconds": setup,
            "seconds": time.perf_counter() - started, "method": op.describe_method()}


# --------------------------------------------------------------------------- replayed power iterations
class Replay:
    """The stops of one recorded power iteration under each tol, found product by product.

    ``rule(i)`` is the stopping quantity after product i (0-based; stop when < tol) and ``value(i)``
    the answer a stop there returns. A looser tol stops no later than a tighter one, so once a tol's
    answer is within TOL of ``ref`` the cheaper settings are all known and the recording may end
    (:meth:`add` says so), as may it once the tightest tol has stopped."""

    def __init__(self, tols: Tuple[float, ...], ref: float, rule: Callable[[int], float],
                 value: Callable[[int], float]):
        self.tols, self.ref, self.rule, self.value = tols, ref, rule, value
        self.stops: Dict[float, Optional[int]] = {t: None for t in tols}
        self.products = 0

    def add(self) -> bool:
        """Account for one more recorded product; True when the recording can end."""
        i, self.products = self.products, self.products + 1
        if i >= 1:
            quantity = self.rule(i)
            for tol in self.tols:
                if self.stops[tol] is None and quantity < tol:
                    self.stops[tol] = i
        done = [t for t in self.tols if self.stops[t] is not None]
        return any(abs(relative_error(self.ref, self.value(self.stops[t]))) <= TOL for t in done) or \
            self.stops[self.tols[-1]] is not None

    def settings(self, recorded_seconds: float) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        for tol in self.tols:
            stop = self.stops[tol]
            if stop is None:
                out.append({"setting": f"tol={tol:g}", "tol": tol, "reached": False,
                            "note": f"no stop within the {self.products} products recorded ({recorded_seconds:.0f} s)"})
                break
            err = relative_error(self.ref, self.value(stop))
            out.append({"setting": f"tol={tol:g}", "tol": tol, "hvps": stop + 1, "value": self.value(stop),
                        "error": err, "reached": abs(err) <= TOL})
            if abs(err) <= TOL:
                break
        return out


# --------------------------------------------------------------------------- PyHessian
def _pyhessian_module():
    """The module pyhessian.hessian (the package's attribute of that name is the class)."""
    import importlib

    return importlib.import_module("pyhessian.hessian")


def _pyhessian_patch():
    module = _pyhessian_module()

    original_hvp, original_dl = module.hessian_vector_product, module.hessian.dataloader_hv_product

    def hvp(gradsH, params, v):
        COUNTER.tick()
        return original_hvp(gradsH, params, v)

    def dl(self, v):
        COUNTER.tick()
        return original_dl(self, v)

    module.hessian_vector_product, module.hessian.dataloader_hv_product = hvp, dl


def pyhessian_object(w: Workload, one: bool):
    from pyhessian import hessian

    w.model.zero_grad(set_to_none=True)  # hessian() adds into .grad
    if one:
        data = w.one_batch if w.one_batch is not None else w.batches[0]
        return hessian(w.model, w.criterion, data=data, cuda=False)
    return hessian(w.model, w.criterion, dataloader=w.batches, cuda=False)


def run_pyhessian(w: Workload, one: bool, tol: float, max_iter: int = 1000) -> Dict[str, Any]:
    with w.peer_context():
        torch.manual_seed(0)
        COUNTER.count = 0
        started = time.perf_counter()
        H = pyhessian_object(w, one)
        setup = time.perf_counter() - started
        values, _ = H.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
        seconds = time.perf_counter() - started
    del H
    w.model.zero_grad(set_to_none=True)
    return {"value": float(values[0]), "hvps": COUNTER.count, "setup_hvps": 0, "setup_seconds": setup,
            "seconds": seconds}


def pyhessian_loss(w: Workload, one: bool) -> float:
    with torch.no_grad(), w.peer_context():
        w.model.eval()
        if one:
            x, y = w.one_batch if w.one_batch is not None else w.batches[0]
            return float(w.criterion(w.model(x), y))
        return sum(float(w.criterion(w.model(x), y)) * x.shape[0] for x, y in w.batches) / sum(x.shape[0] for x, _ in w.batches)


def sweep_pyhessian(w: Workload, one: bool, ref: float, cap: float) -> Dict[str, Any]:
    """One recorded power iteration at tol 0 (capped at ``cap`` s), replayed for every tol. PyHessian's
    stop after product i ≥ 1: |q_{i-1} − q_i| / (|q_{i-1}| + 1e-6) < tol, returning q_{i-1}."""
    module = _pyhessian_module()
    from pyhessian.utils import group_product

    quotients: List[float] = []
    wrapped_hvp, wrapped_dl = module.hessian_vector_product, module.hessian.dataloader_hv_product
    replay = Replay(PYHESSIAN_TOLS, ref,
                    lambda i: abs(quotients[i - 1] - quotients[i]) / (abs(quotients[i - 1]) + 1e-6),
                    lambda i: quotients[i - 1])

    def hvp(gradsH, params, v):
        out = wrapped_hvp(gradsH, params, v)
        quotients.append(float(group_product(out, v)))
        if replay.add():
            raise Enough
        return out

    def dl(self, v):
        out = wrapped_dl(self, v)
        quotients.append(out[0])
        if replay.add():
            raise Enough
        return out

    module.hessian_vector_product, module.hessian.dataloader_hv_product = hvp, dl
    started = time.perf_counter()
    try:
        with COUNTER.watching(cap):
            run_pyhessian(w, one, tol=0.0)
    except (PeerTimeout, Enough):
        pass
    finally:
        module.hessian_vector_product, module.hessian.dataloader_hv_product = wrapped_hvp, wrapped_dl
        w.model.zero_grad(set_to_none=True)
    recorded = time.perf_counter() - started
    settings = replay.settings(recorded)
    perfect = next((i + 1 for i, q in enumerate(quotients) if abs(relative_error(ref, q)) <= TOL), None)
    return {"settings": settings, "recorded_products": len(quotients), "recorded_seconds": recorded,
            "perfect_stop_hvps": perfect}


# --------------------------------------------------------------------------- curvlinops
def _curvlinops_patch():
    from curvlinops._torch_base import CurvatureLinearOperator

    original = CurvatureLinearOperator._matmat

    def matmat(self, M):
        for _ in range(M[0].shape[-1]):  # one product per column
            COUNTER.tick()
        return original(self, M)

    CurvatureLinearOperator._matmat = matmat


def run_curvlinops(w: Workload, tol: float) -> Dict[str, Any]:
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    params = [p for p in w.model.parameters() if p.requires_grad]
    v0 = np.random.default_rng(0).standard_normal(sum(p.numel() for p in params))
    with w.peer_context():
        w.model.eval()
        COUNTER.count = 0
        started = time.perf_counter()
        H = HessianLinearOperator(w.model, w.curvlinops_loss, params, w.curvlinops_data)
        setup_hvps, setup = COUNTER.count, time.perf_counter() - started
        value = eigsh(H.to_scipy(), k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        seconds = time.perf_counter() - started
    return {"value": float(value[0]), "hvps": COUNTER.count - setup_hvps, "setup_hvps": setup_hvps,
            "setup_seconds": setup, "seconds": seconds}


def curvlinops_loss(w: Workload) -> float:
    from curvlinops import HessianLinearOperator

    params = [p for p in w.model.parameters() if p.requires_grad]
    with w.peer_context():
        w.model.eval()
        H = HessianLinearOperator(w.model, w.curvlinops_loss, params, w.curvlinops_data, check_deterministic=False)
        return float(H.gradient_and_loss()[1])


def run_until_reached(settings: List[Dict[str, Any]], trials: List[Tuple[Dict[str, Any], Callable[[], Dict[str, Any]]]],
                      ref: float, cap: float, row: Callable[[Dict[str, Any]], Dict[str, Any]]) -> None:
    """Run the (setting's fields, run) trials cheapest first, one row each in ``settings``, until
    one reaches TOL or runs past ``cap`` seconds; ``row`` picks what a finished run's row records."""
    for fields, run in trials:
        try:
            with COUNTER.watching(cap):
                r = run()
        except PeerTimeout:
            settings.append({**fields, "reached": False, "note": f"over {cap:.0f} s"})
            return
        err = relative_error(ref, r["value"])
        settings.append({**fields, **row(r), "value": r["value"], "error": err, "reached": abs(err) <= TOL})
        if abs(err) <= TOL:
            return


def sweep_curvlinops(w: Workload, ref: float, cap: float) -> Dict[str, Any]:
    settings: List[Dict[str, Any]] = []
    run_until_reached(settings, [({"setting": f"tol={tol:g}", "tol": tol}, lambda tol=tol: run_curvlinops(w, tol))
                                 for tol in CURVLINOPS_TOLS], ref, cap,
                      lambda r: {"hvps": r["hvps"], "setup_hvps": r["setup_hvps"], "seconds": r["seconds"]})
    return {"settings": settings}


# --------------------------------------------------------------------------- hessian-eigenthings v1
def _eigenthings_patch():
    from hessian_eigenthings import HessianOperator

    original = HessianOperator.matvec

    def matvec(self, v):
        COUNTER.tick()
        return original(self, v)

    HessianOperator.matvec = matvec


def eigenthings_operator(w: Workload):
    from hessian_eigenthings import HessianOperator

    w.model.eval()
    return HessianOperator(w.model, w.batches, w.loss_fn)  # equal-weight mean over batches: sizes are equal


def run_eig_lanczos(w: Workload, steps: int) -> Dict[str, Any]:
    import hessian_eigenthings as he

    with w.peer_context():
        COUNTER.count = 0
        started = time.perf_counter()
        H = eigenthings_operator(w)
        setup = time.perf_counter() - started
        r = he.lanczos(H, k=1, max_iter=steps, which="LA", seed=0)
        seconds = time.perf_counter() - started
    return {"value": float(r.eigenvalues[0]), "hvps": COUNTER.count, "setup_hvps": 0, "setup_seconds": setup,
            "seconds": seconds}


def run_eig_power(w: Workload, tol: float, max_iter: int = 1000) -> Dict[str, Any]:
    import hessian_eigenthings as he

    with w.peer_context():
        COUNTER.count = 0
        started = time.perf_counter()
        H = eigenthings_operator(w)
        setup = time.perf_counter() - started
        r = he.deflated_power_iteration(H, k=1, max_iter=max_iter, tol=tol, seed=0)
        seconds = time.perf_counter() - started
    return {"value": float(r.eigenvalues[0]), "hvps": COUNTER.count, "setup_hvps": 0, "setup_seconds": setup,
            "seconds": seconds}


def eigenthings_loss(w: Workload) -> float:
    with torch.no_grad(), w.peer_context():
        w.model.eval()
        return sum(float(w.loss_fn(w.model, b)) for b in w.batches) / len(w.batches)


def sweep_eig_lanczos(w: Workload, ref: float, cap: float) -> Dict[str, Any]:
    """m ≤ 50: the leading m×m block of one recorded 50-step tridiagonal (what lanczos(max_iter=m) builds:
    the same start, full reorthogonalisation); past 50 each m is run for real."""
    import hessian_eigenthings as he

    settings: List[Dict[str, Any]] = []
    recorded = None
    try:
        with w.peer_context(), COUNTER.watching(cap):
            H = eigenthings_operator(w)
            gen = torch.Generator(device="cpu").manual_seed(0)
            v0 = torch.randn(H.size, dtype=H.dtype, generator=gen).to(H.device)  # as lanczos() draws it
            td = he.lanczos_tridiagonal(H, v0, min(EIG_REORTH_STEPS, H.size - 1), reorthogonalize=True)
        recorded = (td.alphas.double().numpy(), td.betas.double().numpy())
    except PeerTimeout:
        pass
    if recorded is not None:
        alphas, betas = recorded
        for m in range(1, len(alphas) + 1):
            top = float(np.linalg.eigvalsh(np.diag(alphas[:m]) + np.diag(betas[:m - 1], 1) + np.diag(betas[:m - 1], -1))[-1])
            err = relative_error(ref, top)
            if abs(err) <= TOL:
                settings.append({"setting": f"max_iter={m}", "steps": m, "hvps": m, "value": top, "error": err,
                                 "reached": True, "note": "the smallest hand-set max_iter that reaches 1e-4"})
                return {"settings": settings}
        settings.append({"setting": f"max_iter≤{len(alphas)}", "reached": False, "error": relative_error(ref, top),
                         "note": f"not within 1e-4 after {len(alphas)} steps"})
    else:
        settings.append({"setting": f"max_iter≤{EIG_REORTH_STEPS}", "reached": False, "note": f"over {cap:.0f} s"})
        return {"settings": settings}
    run_until_reached(settings, [({"setting": f"max_iter={m}", "steps": m}, lambda m=m: run_eig_lanczos(w, m))
                                 for m in EIG_LONG_STEPS], ref, cap,
                      lambda r: {"hvps": r["hvps"], "note": "no reorthogonalisation past 50 steps (its default)"})
    return {"settings": settings}


def sweep_eig_power(w: Workload, ref: float, cap: float) -> Dict[str, Any]:
    """One power iteration at tol 0 (capped), replayed for every tol with its rule: stop at it > 0 when
    the relative change and the relative residual are both < tol; the answer is the current quotient."""
    from hessian_eigenthings import HessianOperator
    from hessian_eigenthings.linalg import SingleDeviceBackend

    backend = SingleDeviceBackend()
    rows: List[Tuple[float, float]] = []  # (λ estimate, residual) after each product, as the library computes them
    counted = HessianOperator.matvec

    def rule(i: int) -> float:  # stop when both the relative change and the relative residual are < tol
        denom = max(abs(rows[i][0]), 1e-12)
        return max(abs(rows[i][0] - rows[i - 1][0]) / denom, rows[i][1] / denom)

    replay = Replay(POWER_TOLS, ref, rule, lambda i: rows[i][0])

    def matvec(self, v):
        av = counted(self, v)
        lam = backend.dot(v, av).item()
        rows.append((lam, backend.norm(backend.axpy(-lam, v, av)).item()))
        if replay.add():
            raise Enough
        return av

    HessianOperator.matvec = matvec
    started = time.perf_counter()
    try:
        with COUNTER.watching(cap):
            run_eig_power(w, tol=0.0, max_iter=100000)
    except (PeerTimeout, Enough):
        pass
    finally:
        HessianOperator.matvec = counted
    recorded = time.perf_counter() - started
    settings = replay.settings(recorded)
    perfect = next((i + 1 for i, (q, _) in enumerate(rows) if abs(relative_error(ref, q)) <= TOL), None)
    return {"settings": settings, "recorded_products": len(rows), "recorded_seconds": recorded,
            "perfect_stop_hvps": perfect}


# --------------------------------------------------------------------------- HVP ÷ gradient
def gradient_seconds(w: Workload) -> float:
    params = [p for p in w.model.parameters() if p.requires_grad]
    n = float(sum(w.sizes))
    started = time.perf_counter()
    total = None
    for batch, size in zip(w.batches, w.sizes):
        grads = torch.autograd.grad(w.loss_fn(w.model, batch), params)
        total = [g * (size / n) for g in grads] if total is None else [t.add_(g, alpha=size / n) for t, g in zip(total, grads)]
    return time.perf_counter() - started


def hvp_ratios(w: Workload, reps: int) -> Dict[str, Any]:
    """Seconds of one product on a built object per tool against one gradient (interleaved, medians)."""
    from curvlinops import HessianLinearOperator
    from pyhessian.utils import hessian_vector_product

    w.model.eval()
    op = CurvatureOperator(w.model, w.batches, w.loss_fn, w.sizes)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(3))
    pieces = [p.contiguous() for p in op.unflatten(v)]
    params = [p for p in w.model.parameters() if p.requires_grad]
    with w.peer_context():
        ph_data = pyhessian_object(w, one=True)
        ph_loader = pyhessian_object(w, one=False) if len(w.batches) > 1 else None
        cl = HessianLinearOperator(w.model, w.curvlinops_loss, params, w.curvlinops_data, check_deterministic=False)
        eig = eigenthings_operator(w)
    products: Dict[str, Callable[[], Any]] = {
        "curvdiag": lambda: op.hvp(v),
        "PyHessian (data=one batch)": lambda: hessian_vector_product(ph_data.gradsH, ph_data.params, pieces),
        "curvlinops": lambda: cl @ v,
        "hessian-eigenthings": lambda: eig.matvec(v),
    }
    if ph_loader is not None:
        products["PyHessian (dataloader=batches)"] = lambda: ph_loader.dataloader_hv_product(pieces)
    times: Dict[str, List[float]] = {"gradient": []}
    times.update({k: [] for k in products})
    for rep in range(reps + 1):  # the first round warms up (torch.func's first call, allocator)
        seconds = gradient_seconds(w)
        if rep:
            times["gradient"].append(seconds)
        for key, product in products.items():
            with w.peer_context() if key != "curvdiag" else contextlib.nullcontext():
                started = time.perf_counter()
                product()
                seconds = time.perf_counter() - started
            if rep:
                times[key].append(seconds)
    w.model.zero_grad(set_to_none=True)
    med = {k: statistics.median(t) for k, t in times.items()}
    return {"gradient_ms": 1e3 * med["gradient"], "repetitions": reps,
            "tools": {k: {"hvp_ms": 1e3 * med[k], "ratio": med[k] / med["gradient"]} for k in products},
            "times": times}


# --------------------------------------------------------------------------- one model
def cheapest(sweep: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    return next((s for s in sweep["settings"] if s.get("reached")), None)


def check_losses(w: Workload, lam_loss: float) -> Dict[str, float]:
    losses = {"curvdiag op.loss()": lam_loss, "PyHessian (dataloader=batches)": pyhessian_loss(w, one=False),
              "curvlinops gradient_and_loss()": curvlinops_loss(w), "hessian-eigenthings (mean over batches)": eigenthings_loss(w)}
    if w.one_batch is not None:
        losses["PyHessian (data=one batch)"] = pyhessian_loss(w, one=True)
    for key, value in losses.items():
        if abs(value - lam_loss) > LOSS_AGREEMENT * abs(lam_loss):
            raise SystemExit(f"{w.name}: {key} loss {value!r} differs from curvdiag's {lam_loss!r} by more than "
                             f"{LOSS_AGREEMENT:g} relative")
    return losses


def peer_fails_without_math_attention(w: Workload) -> Dict[str, str]:
    """What each peer says on the fused attention kernel (the transformer only)."""
    out = {}
    v = torch.randn(num_params(w.model), generator=torch.Generator().manual_seed(4))
    from curvlinops import HessianLinearOperator

    params = [p for p in w.model.parameters() if p.requires_grad]
    for key, attempt in (("PyHessian", lambda: pyhessian_object(w, one=False).dataloader_hv_product(
                              [c.reshape(q.shape) for c, q in zip(torch.split(v, [q.numel() for q in params]), params)])),
                         ("curvlinops", lambda: HessianLinearOperator(w.model, w.curvlinops_loss, params, w.curvlinops_data,
                                                                      check_deterministic=False) @ v),
                         ("hessian-eigenthings", lambda: eigenthings_operator(w).matvec(v))):
        try:
            attempt()
            out[key] = "runs"
        except Exception as exc:
            out[key] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
        w.model.zero_grad(set_to_none=True)
    return out


def run_model(name: str, quick: bool, cap: float) -> Dict[str, Any]:
    torch.set_num_threads(1)
    w = workload(name)
    log = lambda text: print(f"[{name}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    op = CurvatureOperator(w.model, w.batches, w.loss_fn, w.sizes)
    entry: Dict[str, Any] = {"model": name, "description": w.description, "parameters": op.size,
                             "hvp_method": op.describe_method(), "notes": list(w.notes)}
    entry["losses"] = check_losses(w, op.loss())
    if name == "tiny_transformer":
        entry["without_math_attention"] = peer_fails_without_math_attention(w)
    ref = reference(op)
    lam = ref["value"]
    entry["reference"] = ref
    log(f"{op.size:,} parameters, λmax {lam:.8g}, λ2/λ1 {ref['lambda_2_over_1']:.4f} ({ref['hvps']} products, "
        f"{ref['seconds']:.1f} s)")
    first = run_curvdiag(w)
    first["error"] = relative_error(lam, first["value"])
    entry["curvdiag"] = first
    entry["oracle"] = oracle(op, lam, max(60, 2 * first["hvps"]))
    log(f"curvdiag {first['hvps']} products (oracle {entry['oracle']}), error {first['error']:.1e}, "
        f"{first['seconds']:.2f} s")
    del op

    # The peers' settings, cheapest first.
    sweeps: Dict[str, Dict[str, Any]] = {}
    if len(w.batches) > 1:
        sweeps["PyHessian (dataloader=batches)"] = dict(sweep_pyhessian(w, False, lam, cap), tool="pyhessian", one=False)
        sweeps["PyHessian (data=one batch)"] = dict(sweep_pyhessian(w, True, lam, cap), tool="pyhessian", one=True)
    else:
        sweeps["PyHessian"] = dict(sweep_pyhessian(w, True, lam, cap), tool="pyhessian", one=True)
    sweeps["curvlinops + eigsh"] = dict(sweep_curvlinops(w, lam, cap), tool="curvlinops")
    sweeps["hessian-eigenthings lanczos"] = dict(sweep_eig_lanczos(w, lam, cap), tool="eig-lanczos")
    sweeps["hessian-eigenthings power"] = dict(sweep_eig_power(w, lam, cap), tool="eig-power")
    for key, sweep in sweeps.items():
        best = cheapest(sweep)
        log(f"{key}: " + (f"{best['setting']} {best['hvps']} products, error {best['error']:.1e}" if best
                          else "no setting reaches 1e-4"))
    entry["sweeps"] = sweeps

    # Timed side by side, interleaved: curvdiag, then each peer at its cheapest setting, per round.
    def runner(sweep: Dict[str, Any]) -> Callable[[], Dict[str, Any]]:
        best = cheapest(sweep)
        if sweep["tool"] == "pyhessian":
            return lambda: run_pyhessian(w, sweep["one"], best["tol"])
        if sweep["tool"] == "curvlinops":
            return lambda: run_curvlinops(w, best["tol"])
        if sweep["tool"] == "eig-lanczos":
            return lambda: run_eig_lanczos(w, best["steps"])
        return lambda: run_eig_power(w, best["tol"])

    contenders: Dict[str, Callable[[], Dict[str, Any]]] = {"curvdiag": lambda: run_curvdiag(w)}
    contenders.update({k: runner(s) for k, s in sweeps.items() if cheapest(s) is not None})
    round_seconds = first["seconds"] + sum(cheapest(s).get("seconds", 0.0) for s in sweeps.values() if cheapest(s))
    reps = 1 if quick else 3
    runs: Dict[str, List[Dict[str, Any]]] = {k: [] for k in contenders}
    for rep in range(reps):
        for key, run in contenders.items():
            runs[key].append(run())
        log(f"round {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]['seconds']:.2f} s" for k, v in runs.items()))
    timed: Dict[str, Any] = {}
    for key, results in runs.items():
        r = results[0]
        timed[key] = {"setting": "lambda_max(tol=1e-4)" if key == "curvdiag" else cheapest(sweeps[key])["setting"],
                      "hvps": r["hvps"], "setup_hvps": r["setup_hvps"], "value": r["value"],
                      "error": relative_error(lam, r["value"]),
                      "seconds": statistics.median(x["seconds"] for x in results),
                      "setup_seconds": statistics.median(x["setup_seconds"] for x in results),
                      "all_seconds": [x["seconds"] for x in results]}
        if key != "curvdiag" and r["hvps"] != cheapest(sweeps[key])["hvps"]:
            timed[key]["note"] = f"the sweep counted {cheapest(sweeps[key])['hvps']} products"
    entry["timed"] = timed
    entry["repetitions"] = reps
    entry["round_seconds_estimate"] = round_seconds
    # hessian-eigenthings' lanczos has no stop: its max_iter was picked knowing the answer, which a user
    # cannot do; the second ratio is against the best peer that stops by a rule of its own.
    for label, exclude in (("", ()), ("_self_stopping", (HAND_SET,))):
        peers = {k: v for k, v in timed.items() if k != "curvdiag" and k not in exclude}
        if peers:
            best = min(peers, key=lambda k: peers[k]["seconds"])
            entry[f"best_peer{label}"] = best
            entry[f"ratio{label}"] = timed["curvdiag"]["seconds"] / peers[best]["seconds"]
            log(f"curvdiag {timed['curvdiag']['seconds']:.2f} s ÷ {best} {peers[best]['seconds']:.2f} s = "
                f"{entry[f'ratio{label}']:.3f}")
    entry["hvp_ratio"] = hvp_ratios(w, 3 if name == "mlp_1m86" else (3 if quick else 9))
    log("HVP ÷ gradient: " + ", ".join(f"{k} {v['ratio']:.2f}×" for k, v in entry["hvp_ratio"]["tools"].items()))
    return entry


# --------------------------------------------------------------------------- tables
def _e(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.1e}"


def markdown(results: Dict[str, Any]) -> str:
    out = ["| model | parameters | λ2/λ1 | reference λmax | oracle | curvdiag HVPs | − oracle | its error | curvdiag s "
           "| best peer | its setting | HVPs | its error | its s | curvdiag ÷ best peer | ÷ best self-stopping peer |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for e in results["models"]:
        c = e["timed"]["curvdiag"]
        b = e["timed"].get(e.get("best_peer", ""), None)
        excess = "—" if e["oracle"] is None else f"{c['hvps'] - e['oracle']:+d}"
        stopping = "—" if "ratio_self_stopping" not in e else \
            f"{e['ratio_self_stopping']:.2f} ({e['best_peer_self_stopping']})"
        peer = "none reaches 1e-4 | | | | | | " if b is None else (
            f"{e['best_peer']} | {b['setting']} | {b['hvps']} | {b['error']:.1e} | {b['seconds']:.2f} | "
            f"**{e['ratio']:.2f}**")
        out.append(f"| {e['model']} | {e['parameters']:,} | {e['reference']['lambda_2_over_1']:.4f} | "
                   f"{e['reference']['value']:.8g} | {e['oracle']} | {c['hvps']} | {excess} | {c['error']:.1e} | "
                   f"{c['seconds']:.2f} | {peer} | {stopping} |")
    out += ["", "Errors are (reference − value) / reference (negative: above the reference, float32 rounding). "
            "Oracle: the first product of curvdiag's own Lanczos run (same start) within 1e-4. "
            f"{HAND_SET}'s max_iter is the smallest that reaches 1e-4, chosen knowing the answer (it has no stop)."]
    for e in results["models"]:
        worst = max(abs(v - e["losses"]["curvdiag op.loss()"]) / abs(e["losses"]["curvdiag op.loss()"])
                    for v in e["losses"].values())
        line = f"- {e['model']} ({e['description']}; {e['hvp_method']}): every tool's loss within {worst:.1e} of curvdiag's"
        if e.get("notes"):
            line += "; " + "; ".join(e["notes"])
        if e.get("without_math_attention"):
            line += "; with the fused attention kernel: " + "; ".join(
                f"{k}: {v}" for k, v in e["without_math_attention"].items())
        out.append(line)
    out += ["", "**Every tool at its cheapest setting that reaches 1e-4** (wall s with set-up, median of the "
            "interleaved rounds; set-up products in brackets: curvdiag's start-up check (0: it was λmax's first product), curvlinops' determinism "
            "check)", "",
            "| model | tool | setting | HVPs (+set-up) | error | wall s | set-up s | ÷ curvdiag |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for e in results["models"]:
        cd = e["timed"]["curvdiag"]["seconds"]
        for key, t in e["timed"].items():
            out.append(f"| {e['model']} | {key} | {t['setting']} | {t['hvps']} (+{t['setup_hvps']}) | {t['error']:.1e} | "
                       f"{t['seconds']:.2f} | {t['setup_seconds']:.2f} | {t['seconds'] / cd:.2f} |")
        for key, s in e["sweeps"].items():
            if cheapest(s) is None:
                tried = ", ".join(x["setting"] + (f" {x['error']:.1e}" if "error" in x else f" ({x.get('note', '')})")
                                  for x in s["settings"])
                out.append(f"| {e['model']} | {key} | none reaches 1e-4: {tried} | — | — | — | — | — |")
    out += ["", "**Each peer's sweep** (cheapest first; products and error of each setting tried; PyHessian and "
            "power iteration replayed from one recorded run, the perfect stop is the first product within 1e-4)", "",
            "| model | tool | settings: HVPs / error | perfect stop |", "|---|---|---|---:|"]
    for e in results["models"]:
        for key, s in e["sweeps"].items():
            parts = [f"{x['setting']}: {x['hvps']} / {_e(x.get('error'))}" if "hvps" in x else
                     f"{x['setting']}: {x.get('note', '—')}" for x in s["settings"]]
            out.append(f"| {e['model']} | {key} | {'; '.join(parts)} | {s.get('perfect_stop_hvps') or '—'} |")
    out += ["", "**HVP ÷ gradient** (one product on a built object against forward + autograd.grad over every "
            "batch; medians of interleaved repetitions)", "",
            "| model | gradient ms | tool | HVP ms | HVP ÷ gradient |", "|---|---:|---|---:|---:|"]
    for e in results["models"]:
        h = e["hvp_ratio"]
        for key, t in h["tools"].items():
            out.append(f"| {e['model']} | {h['gradient_ms']:.2f} | {key} | {t['hvp_ms']:.2f} | {t['ratio']:.2f}× |")
    return "\n".join(out) + "\n"


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, 20-s caps (a smoke run)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--cap", type=float, default=None, help="seconds a peer setting may run (default 60; 20 quick)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _pyhessian_patch()
    _curvlinops_patch()
    _eigenthings_patch()
    cap = args.cap if args.cap is not None else (20.0 if args.quick else 60.0)
    out = args.out or ROOT / "benchmarks" / ("lambda_peers_results_quick.json" if args.quick else "lambda_peers_results.json")
    started, load = time.perf_counter(), os.getloadavg()
    results: Dict[str, Any] = {"models": []}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        results["models"].append(run_model(name, args.quick, cap))
    results["environment"] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": 1, "dtype": "float32", "quick": args.quick, "cap_seconds": cap, "cpu_count": os.cpu_count(),
        "loadavg_start": load, "loadavg_end": os.getloadavg(), "total_seconds": time.perf_counter() - started,
        "pyhessian": _version("pyhessian"), "curvlinops": _version("curvlinops-for-pytorch"),
        "hessian_eigenthings": _version("hessian-eigenthings"), "scipy": _version("scipy")}
    table = markdown(results)
    results["table"] = table
    out.write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(
        "# λmax to 1e-4 against PyHessian, curvlinops + eigsh and hessian-eigenthings v1 (float32, 1 thread)\n\n"
        "Written by `benchmarks/bench_lambda_peers.py`; see benchmarks/README.md for how it measures.\n\n" + table)
    print(table)
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
