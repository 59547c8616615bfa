"""Hessian trace by Hutchinson with an exact Gauss–Newton control variate (DESIGN §3.3).

H = G + R with G the generalized Gauss–Newton matrix (:mod:`curvdiag.curvature.ggn`). Then
tr(H) = tr(G) + E[zᵀ(H − G)z]: tr(G) is computed exactly and Hutchinson runs only on the
residual R, whose probes have a far smaller spread than those of H. The estimate is unbiased
for any G as long as tr(G) and zᵀGz use the same G, which :class:`GaussNewton` guarantees.
Per probe: zᵀHz (one HVP) and zᵀGz (one J z product per batch), each summed over batches and
ranks by the operator, so several processes give the one-process estimate to rounding.

The control enters with a coefficient fitted to the probes (the regression estimator):
tr(H) ≈ c·tr(G) + mean(zᵀHz − c·zᵀGz), c = Cov(zᵀHz, zᵀGz)/Var(zᵀGz) held to [0, 2], unbiased for
any fixed c and never worse than plain Hutchinson (c = 0) or the plain control variate (c = 1)
but for c's own O(1/N) noise. The s.e. is the residuals' s/√N widened by the Student-t factor
(:func:`~curvdiag.probes.hutchinson.t_factor`); tr(G) is exact, so it adds no variance. The
exact tr(G) costs one pass over the data per output direction (C classes × P positions): when
that does not fit the trace's share of the budget the control variate is refused (NotCovered)
and the trace runs on plain Hutchinson.
Where it helps and where not (measured, one thread, 1% relative s.e.): the bundled BN CNN needs
~6,400 plain HVPs and 1–2 residual probes (+ tr(G) ≈ 12 HVPs); the tiny transformer ~1,040 plain,
~80 residual probes; a random-weight ResNet-18 ~1,030 either way — for a piecewise-linear
network (ReLU, max-pool, BatchNorm in eval mode) every diagonal block of R = H − G is zero, so
tr(H) = tr(G) and the residual probes carry only R's cross-layer terms, as large as H's own.

Not covered (:class:`~curvdiag.errors.NotCovered`, raised before any probe; the caller falls
back to plain Hutchinson): see :mod:`curvdiag.curvature.ggn`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from curvdiag.curvature.ggn import PER_SAMPLE, GaussNewton
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.errors import NotCovered
from curvdiag.probes.hutchinson import TraceResult, rademacher, t_factor
from curvdiag.probes.sample_mean import mean_and_stderr

ESTIMATOR = "hutchinson + exact Gauss-Newton control variate"
JZ_PRICE = 1.0  # GE of one zᵀGz: a J z product (a double backward to the outputs) over all the data
PER_SAMPLE_PRICE = 1.3  # GE of one output direction's per-sample gradients over all the data (vmap; measured)
FIT_AFTER = 10  # probes before c is fitted (the default minimum of the control variate)
SETUP_PRICE = 1.0  # GE of the set-up: the output Hessian and the applicability checks


@dataclass
class GGNTraceResult(TraceResult):
    """A :class:`TraceResult` with the control variate's parts and its cost.

    ``value`` = ``ggn_trace`` + ``residual_trace``; ``stderr`` comes from the residual probes
    only (tr(G) is exact). ``hvps``: Hessian-vector products; ``ggn_products``: J z products
    (one per probe and batch); ``ggn_trace_backwards``: backward passes (to layer outputs, no
    weight gradients) spent on the exact tr(G); ``setup_backwards``: backward passes of the
    output Hessian and the applicability checks; ``ggn_rules``: how tr(G) was computed
    ("layers" or "per-sample"); ``per_sample_passes``/``per_sample_vjps``: vmapped
    forward+backward calls and per-sample vector-Jacobian products (sample × direction) spent."""

    estimator: str = ESTIMATOR
    ggn_trace: float = 0.0
    residual_trace: float = 0.0
    probe_sd: float = float("nan")
    hvps: int = 0
    ggn_products: int = 0
    ggn_trace_backwards: int = 0
    setup_backwards: int = 0
    setup_seconds: float = 0.0
    ggn_trace_seconds: float = 0.0
    probe_seconds: float = 0.0
    ggn_trace_by_parameter: Dict[str, float] = field(default_factory=dict, repr=False)
    ggn_rules: str = ""
    per_sample_passes: int = 0
    per_sample_vjps: int = 0
    coefficient: float = 1.0  # c of the control variate (see _controlled_estimate)


def ggn_control_variate_trace(
    op: CurvatureOperator,
    samples: Optional[int] = None,
    target_rel_stderr: Optional[float] = 0.01,
    seed: int = 0,
    min_samples: int = 10,
    max_samples: int = 1000,
    exhausted: Optional[Callable[[], bool]] = None,
) -> GGNTraceResult:
    """tr(H) ≈ tr(G) + mean_k (z_kᵀHz_k − z_kᵀGz_k) with Rademacher z_k (the same z_k as
    :func:`~curvdiag.probes.hutchinson.hutchinson_trace` with this ``seed``). With ``samples`` a fixed
    count; otherwise probes are added until the standard error is at most
    ``target_rel_stderr``·|estimate| (after ``min_samples``), ``max_samples`` is reached or
    ``exhausted()`` says the budget holds no further probe (priced on ``op``: each J z product
    ``JZ_PRICE`` GE, tr(G)'s backward passes to the outputs 1 GE per pass over all the data).
    Raises :class:`~curvdiag.errors.NotCovered` when the model or loss is not covered."""
    started = time.perf_counter()
    ggn = GaussNewton(op)
    op.charge(SETUP_PRICE)
    price = _exact_trace_price(op, ggn)
    if not op.can_afford(price + 2 * (op.hvp_price + JZ_PRICE)):
        raise NotCovered(f"its exact tr(G) costs {price:.3g} gradient-equivalents (one per output direction), "
                         f"more than the trace's share of the budget ({op.budget_left():.3g}) holds with two probes")
    g_trace = ggn.trace()
    op.charge(price)
    probes_started = time.perf_counter()
    hvps_before = op.hvp_count
    quadratics: List[float] = []  # zᵀHz
    gauss_newton: List[float] = []  # zᵀGz, the control

    while True:
        z = rademacher(op, seed, len(quadratics))
        op.charge(JZ_PRICE)
        quadratics.append(float(torch.dot(z.double(), op.hvp(z).double())))
        gauss_newton.append(ggn.quadratic(z))
        n = len(quadratics)
        c, value, stderr = _controlled_estimate(quadratics, gauss_newton, g_trace)
        if samples is not None:
            if n >= samples:
                break
            continue
        if n >= min_samples and target_rel_stderr is not None and stderr <= target_rel_stderr * abs(value):
            break
        if n >= max_samples or (n >= 2 and exhausted is not None and exhausted()):
            break
    sd = stderr / t_factor(n) * math.sqrt(n)  # one probe's spread: s.e. = s.d. / √n · t_factor(n)
    now = time.perf_counter()
    return GGNTraceResult(
        value=value, stderr=stderr, samples=n, seconds=now - started,
        ggn_trace=g_trace, residual_trace=value - g_trace, probe_sd=sd, hvps=op.hvp_count - hvps_before,
        ggn_products=ggn.product_count, ggn_trace_backwards=ggn.trace_backwards,
        setup_backwards=ggn.setup_backwards, setup_seconds=ggn.setup_seconds,
        ggn_trace_seconds=ggn.trace_seconds, probe_seconds=now - probes_started,
        ggn_trace_by_parameter=dict(ggn.trace_by_parameter), ggn_rules=ggn.rules or "",
        per_sample_passes=ggn.per_sample_passes, per_sample_vjps=ggn.per_sample_vjps, coefficient=c)


def _controlled_estimate(h: List[float], g: List[float], g_trace: float) -> Tuple[float, float, float]:
    """(c, estimate, s.e.) of tr(H) = c·tr(G) + E[zᵀHz − c·zᵀGz] with the coefficient c that
    minimises the variance, c = Cov(zᵀHz, zᵀGz) / Var(zᵀGz) from the probes so far, held to
    [0, 2] (c = 1 is the plain control variate, c = 0 plain Hutchinson: where G tracks H poorly — a
    piecewise-linear network, whose R = H − G is all cross-layer — c falls towards 0 instead of
    adding G's noise to H's). Below FIT_AFTER probes c = 1: a c fitted to a handful of probes
    moves the estimate by more than the s.e. says (bn_cnn, 5 probes: 3.6 s.e.). The s.e. is that of the
    residuals zᵀHz − c·zᵀGz, widened by :func:`t_factor`."""
    n = len(h)
    c = 1.0
    if n >= FIT_AFTER:
        mh, mg = sum(h) / n, sum(g) / n
        var_g = sum((x - mg) ** 2 for x in g)
        if var_g > 0.0:
            c = min(2.0, max(0.0, sum((x - mh) * (y - mg) for x, y in zip(h, g)) / var_g))
    residual = [x - c * y for x, y in zip(h, g)]
    mean, se = mean_and_stderr(residual)
    return c, c * g_trace + mean, se * t_factor(n)


def _exact_trace_price(op: CurvatureOperator, ggn: GaussNewton) -> float:
    """GE of the exact tr(G) and its set-up: one pass over all the data per output direction
    (C outputs × P positions; a backward to the layers' outputs under the layer rules, vmapped
    per-sample gradients otherwise), weighted by the batches' share of the samples and summed over
    ranks, so every rank charges the same and stops its probes at the same one."""
    local = sum(b.weight * b.outputs * b.positions for b in ggn.batches)
    directions = float(op.sum_over_ranks(torch.tensor([local], dtype=torch.float64, device=op.device))[0])
    per_direction = PER_SAMPLE_PRICE if ggn.rules == PER_SAMPLE else 1.0
    return directions * per_direction
