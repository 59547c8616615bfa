"""The minimal linear-operator interface the probes run on, so they can be tested on matrices.

Anything with ``size`` (n), ``device``, ``dtype`` and ``matvec(v) -> A v`` for a flat vector
of shape (n,) is an operator; :class:`~curvdiag.curvature.operator.CurvatureOperator` is one (its
``size`` is ``num_params``). :func:`as_operator` also accepts a dense symmetric tensor.
"""

from __future__ import annotations

import math

from typing import Any

import torch


class DenseOperator:
    """A dense symmetric (n, n) matrix as an operator (for tests and references)."""

    def __init__(self, matrix: torch.Tensor):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.device = matrix.device
        self.dtype = matrix.dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v


class SymmetricScaling:
    """D A D for a diagonal D = diag(d): matvec(x) = d ⊙ A(d ⊙ x).

    With d = P^{-1/2} this is Adam's preconditioned Hessian P^{-1/2} H P^{-1/2} (DESIGN §3.2).
    """

    def __init__(self, operator: Any, d: torch.Tensor):
        self.operator = operator
        self.d = d.to(device=operator.device, dtype=operator.dtype)
        self.size = operator.size
        self.device = operator.device
        self.dtype = operator.dtype
        self.product_error = product_error(operator)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.d * self.operator.matvec(self.d * v)


class Shifted:
    """A − σI: matvec(x) = A(x) − σx. With σ ≤ λmin(A) its dominant eigenvalue is λmax(A) − σ, however
    large A's negative eigenvalues; more generally whenever σ < (λmax + λmin)/2."""

    def __init__(self, operator: Any, sigma: float):
        self.operator, self.sigma = operator, float(sigma)
        self.size, self.device, self.dtype = operator.size, operator.device, operator.dtype
        self.product_error = product_error(operator)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.operator.matvec(v) - self.sigma * v


def product_error(operator: Any) -> float:
    """The relative error of one of ``operator``'s products beyond its dtype's rounding: an optional
    ``product_error`` attribute (finite differences set it), 0 for an exact product."""
    return float(getattr(operator, "product_error", 0.0))


def as_operator(a: Any) -> Any:
    """Return ``a`` as an operator: dense tensors are wrapped, operators pass through."""
    if isinstance(a, torch.Tensor):
        return DenseOperator(a)
    for attribute in ("size", "device", "dtype", "matvec"):
        if not hasattr(a, attribute):
            raise TypeError(f"{type(a).__name__} is not an operator: it lacks {attribute!r}")
    return a


# Entries per float32 partial sum of a long reduction (:func:`inner`, Lanczos' projections): each
# chunk's float32 dot is within ~1e-7 of exact, and the partial sums add up in float64.
PARTIAL_SUM_ENTRIES = 1 << 16


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ of two flat vectors, as float32 dots of 65,536 entries summed in float64. Not one
    ``torch.dot`` and not ``Tensor.norm``: in float32 on CPU those accumulate so that ‖x‖ of a
    random vector comes out 1.2e-4 low at 5M entries and 1.2e-3 at 25M, which lifted Lanczos' λmax
    by up to 1% at 124M parameters against its own error estimate of 6e-5
    (benchmarks/large_results.json). Chunked, ‖x‖² of 11M positive entries is within 2e-8, and
    the reduction reads each vector once: 2.5–7 ms at 11M entries where ``(a * b).sum()`` (a
    full-length temporary, the previous way) took 36–44 ms, one thread."""
    if a.dtype != b.dtype:  # an operator may answer in another precision: compare in the wider one
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    if not (a.is_contiguous() and b.is_contiguous()):  # a strided BLAS dot sums sequentially: 2e-6 off at 65k
        a, b = a.contiguous(), b.contiguous()
    n = a.shape[0]
    if n <= PARTIAL_SUM_ENTRIES:
        return float(torch.dot(a, b))
    if a.device.type == "cpu":  # a Python loop of BLAS dots: no temporary, no device round-trips
        return math.fsum(float(torch.dot(a[s:s + PARTIAL_SUM_ENTRIES], b[s:s + PARTIAL_SUM_ENTRIES]))
                         for s in range(0, n, PARTIAL_SUM_ENTRIES))
    return _batched_inner(a, b)


# Entries per dot of :func:`_batched_inner`: a batched product accumulates each dot in one float32
# running sum (on this CPU: ‖x‖² of 5M entries 1.2e-6 off in chunks of 16,384, 1.5e-8 in 1,024).
_BATCHED_CHUNK = 1 << 10


def _batched_inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`inner` on an accelerator: the chunks' dots as one batched product (m, 1, C) @ (m, C, 1),
    summed in float64 on the device, one transfer."""
    n = a.shape[0]
    head = n - n % _BATCHED_CHUNK
    partial = torch.bmm(a[:head].view(-1, 1, _BATCHED_CHUNK), b[:head].view(-1, _BATCHED_CHUNK, 1)).view(-1)
    total = partial.sum(dtype=torch.float64)
    if head < n:
        total = total + torch.dot(a[head:], b[head:]).double()
    return float(total)


def norm(a: torch.Tensor) -> float:
    """‖a‖ of a flat vector, as accurately as :func:`inner`."""
    return math.sqrt(max(inner(a, a), 0.0))


def random_vector(size: int, seed: int, device: Any, dtype: torch.dtype, kind: str = "normal") -> torch.Tensor:
    """A reproducible random vector: drawn on the CPU from ``seed``, then moved, so the same seed
    gives the same numbers on every device and in every process."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "rademacher":
        v = torch.randint(0, 2, (size,), generator=generator, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    else:
        v = torch.randn(size, generator=generator, dtype=torch.float64)
    return v.to(device=device, dtype=dtype)
