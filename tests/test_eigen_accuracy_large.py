"""Lanczos and power iteration in float32 at millions of entries: the reductions must not drift.

torch's float32 ``Tensor.norm`` and ``torch.dot`` on CPU come out ~1e-4 low at 5M entries (1e-3 at
25M); Lanczos built on them over-estimated λmax by ~1e-4 here while its own estimate said 1e-7."""

import torch

from curvdiag.curvature.linear_operator import _batched_inner, inner, norm
from curvdiag.probes.eigen import lanczos, power_iteration

N = 5_000_000


class Diagonal:
    """A diagonal operator: eigenvalues 2.0 (once) and uniform in [0, 1)."""

    def __init__(self):
        self.d = torch.rand(N, generator=torch.Generator().manual_seed(0))
        self.d[123] = 2.0
        self.size, self.device, self.dtype = N, self.d.device, self.d.dtype

    def matvec(self, v):
        return self.d * v


def test_float32_inner_products_are_accurate_at_millions_of_entries():
    x = torch.randn(N, generator=torch.Generator().manual_seed(1)) + 0.5
    exact = float(x.double().pow(2).sum())
    assert abs(inner(x, x) / exact - 1) < 1e-6
    assert abs(norm(x) / exact ** 0.5 - 1) < 1e-6
    assert abs(_batched_inner(x, x) / exact - 1) < 1e-6  # the accelerators' path, run here on the CPU
    y = torch.randn(N + 123, generator=torch.Generator().manual_seed(2))  # not a whole number of chunks
    z = torch.randn(N + 123, generator=torch.Generator().manual_seed(3))
    cross = float(y.double() @ z.double())
    scale = float(y.double().norm() * z.double().norm())
    assert abs(inner(y, z) - cross) < 1e-7 * scale and abs(_batched_inner(y, z) - cross) < 1e-7 * scale


def test_lanczos_and_power_iteration_reach_the_top_eigenvalue_of_a_large_float32_operator():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the drift is that of one thread's accumulation
    try:
        op = Diagonal()
        result = lanczos(op, tol=1e-6, max_matvecs=40, seed=0)
        assert abs(result.eigenvalues[0] / 2.0 - 1) < 1e-5, result.eigenvalues[0]
        power = power_iteration(op, tol=1e-6, max_matvecs=60, seed=0)
        assert abs(power.eigenvalues[0] / 2.0 - 1) < 1e-5, power.eigenvalues[0]
    finally:
        torch.set_num_threads(threads)


def test_inner_products_of_mixed_precision_and_strided_vectors():
    a = torch.randn(300_000, generator=torch.Generator().manual_seed(4))
    strided = a[::3]
    exact = float(strided.double().pow(2).sum())
    assert abs(inner(strided, strided) / exact - 1) < 1e-6
    wide = torch.randn(100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert abs(inner(strided, wide) - float(strided.double() @ wide)) < 1e-9 * float(strided.double().norm() * wide.norm())
