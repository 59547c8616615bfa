"""HesScale: a backward recursion of Hessian diagonals (seed 002; DESIGN §3.10).

Becker & LeCun (1989) passed the diagonal of the Hessian w.r.t. each layer's output backwards,
dropping off-diagonal terms; HesScale (Elsayed, Mahmood, Dangel, Farrahi) starts it from the
*full* per-sample Hessian A_n of the loss w.r.t. the model output, so the last layer is exact.
Cost (benchmarks/bench_hesscale.py): about 2 gradients (1.8–2.0× on the tanh MLP and the BN CNN
samples, close to one Hessian-vector product): one forward, D products through the loss alone
(D = outputs per sample), one backward for the activations' gradients, one backward-like sweep.

Per batch (weighted by ``op.weights``, like every probe):

1. ``loss_fn(model, batch)`` runs inside ``op._probing()`` with hooks recording every layer's
   input and output. A_n[:, c] for all samples n comes from one double-backward product of the
   loss w.r.t. the output per output entry c. That the loss is a sum of per-sample terms (A block
   diagonal over dim 0) is checked with one more product along a random direction; that it
   reaches the parameters only through the output, by walking its autograd graph.
2. The per-sample matrices travel backwards *exactly* (dense while they are D×D: through
   elementwise activations A ← diag(σ') A diag(σ') + diag(σ'' ⊙ g), Flatten, Identity, Dropout;
   as eigen-factors Σ_r s_r v_r v_rᵀ + diag(d) through pooling and eval BatchNorm) down to the
   last Linear/Conv2d layer, whose weights and bias therefore get their exact diagonal, and whose
   input gets the exact diagonal of Jᵀ A J (Linear: Σ_kl A[k, l] W_kj W_lj).
3. Below it only diagonals h travel (off-diagonal terms dropped):
   - elementwise a = σ(z): h_z = σ'(z)² h_a + σ''(z) g_a (g_a = ∂L/∂a from ordinary backprop)
   - Linear z = W a + b: diag H_W = Σ_n h_z a², diag H_b = Σ_n h_z; h_a = h_z (W∘W)
   - Conv2d: diag H_W is the weight gradient of a convolution of x∘x with output gradient h
     (Σ over positions of h ⊙ patch²); h_in the transposed convolution of h with W∘W
   - a parameter-free linear map y = P x (pooling, Flatten): h_x[m] = Σ_r P_rm² h_y[r]; for max
     pooling P is a 0/1 selection (h goes to the argmax), for average pooling every entry of row
     r equals 1/(its divisor), so h_x is the pooling's transpose applied to h_y/divisor.
   - BatchNorm (eval): h_x = (γ/√(var+ε))² h_y; diag H_γ = Σ h_y x̂², diag H_β = Σ h_y.
   A layer's diagonal is exact as long as no dropped off-diagonal term mattered: with one
   activation between the last two Linear layers both are exact; convolutions fed by a diagonal
   get an approximation (their weights are shared across positions).
   ``HesScaleResult.exact_parameters`` names the parameters whose diagonal is exact by this
   reasoning (tests check every such claim against dense Hessians).

Covered: an ``nn.Sequential`` (nested ones flattened) of Linear, Conv2d (zero padding), the
elementwise activations in ``_ACTIVATIONS``, Identity, Flatten, Dropout (eval), MaxPool2d,
AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d and BatchNorm1d/2d/3d in eval mode. Parameter-
free layers without a rule after the last layer with parameters (LogSoftmax, Softmax, ...) are
folded into the loss: A is then taken w.r.t. that layer's output. Anything else raises
:class:`HesScaleNotApplicable` naming it, rather than returning a wrong number. The rules form a
registry keyed by the exact module type (as BackPACK's per-layer second-order extensions do): a
subclass may override ``forward`` and is not covered.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from curvdiag.curvature.operator import CurvatureOperator

Tensor = torch.Tensor

# Output Hessians beyond this many numbers per batch (N·D·D) are refused.
MAX_OUTPUT_HESSIAN_ENTRIES = 2 ** 26


class HesScaleNotApplicable(Exception):
    """The model or loss is outside what the recursion covers; ``str(exc)`` is
    ``"not applicable: <module type or reason>"``."""

    def __init__(self, reason: str):
        super().__init__(f"not applicable: {reason}")
        self.reason = reason


@dataclass
class HesScaleResult:
    diagonal: torch.Tensor  # flat (op.num_params,), same layout as op.layer_slices()
    seconds: float
    # Names (op.names) whose diagonal is exact up to rounding (see the module docstring).
    exact_parameters: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- representations
@dataclass
class _LowRank:
    """Per-sample Hessian w.r.t. a layer output: Σ_r sign_r v_r v_rᵀ + diag(d), held exactly.

    v: (N, R, *shape), sign: (N, R), d: (N, *shape) or None. ``exact`` is False once a diagonal
    part has passed a map that does not keep diagonals diagonal."""

    v: Tensor
    sign: Tensor
    d: Optional[Tensor]
    exact: bool = True

    def diagonal(self) -> Tensor:
        out = _signed_squares(self.sign, self.v)
        return out if self.d is None else out + self.d


@dataclass
class _Full:
    """Per-sample Hessian w.r.t. a layer output as dense matrices a: (N, D, D), D = shape.numel().

    The output Hessian starts so; it stays dense through elementwise maps and reshapes (cheap
    while D is the model's output size) and becomes a ``_LowRank`` before any other layer."""

    a: Tensor
    shape: torch.Size
    exact: bool = True
    _low_rank: Optional[_LowRank] = None

    def diagonal(self) -> Tensor:
        return torch.diagonal(self.a, dim1=1, dim2=2).reshape((self.a.shape[0],) + tuple(self.shape))

    def low_rank(self) -> _LowRank:
        if self._low_rank is None:
            self._low_rank = _eigen_factors(self.a, self.shape, self.exact)
        return self._low_rank


@dataclass
class _Diag:
    """Diagonal of the per-sample Hessian w.r.t. a layer output: (N, *shape)."""

    h: Tensor
    exact: bool


_State = Union[_Full, _LowRank, _Diag]


def _signed_squares(sign: Tensor, t: Tensor) -> Tensor:
    """Σ_r sign[n, r] t[n, r, ...]² → (N, ...)."""
    s = sign.reshape(sign.shape + (1,) * (t.dim() - 2))
    return (s * t * t).sum(1)


class _Record:
    """What the hooks saw of one layer in one forward pass."""

    def __init__(self) -> None:
        self.calls = 0
        self.x: Optional[Tensor] = None  # input, detached
        self.x_graph: Optional[Tensor] = None  # input as in the graph
        self.y: Optional[Tensor] = None  # output, in the graph
        self.g: Optional[Tensor] = None  # ∂L/∂y where a rule needs it
        self.training = False
        self.cache: Dict[str, Any] = {}


# ---------------------------------------------------------------------------- rule registry
class _Rule:
    """How one layer type takes part in the recursion."""

    param_names: Tuple[str, ...] = ()
    handles_full = False  # whether the rule takes a _Full state (else it gets the _LowRank form)

    def static_reason(self, m: nn.Module) -> Optional[str]:
        return None

    def runtime_reason(self, m: nn.Module, rec: _Record) -> Optional[str]:
        return None

    def needs_grad(self, m: nn.Module) -> bool:
        return False

    def params(self, m: nn.Module) -> List[Tuple[str, Tensor]]:
        return [(n, m._parameters[n]) for n in self.param_names if m._parameters.get(n) is not None]

    def param_diagonals(self, m: nn.Module, rec: _Record, h: _State) -> Tuple[Dict[str, Tensor], bool]:
        return {}, True

    def backpropagate(self, m: nn.Module, rec: _Record, h: _State) -> _State:
        raise NotImplementedError


# -------------------------------------------------------------- elementwise activations
class _Elementwise(_Rule):
    """a = σ(z) entry by entry: exact for both representations."""

    piecewise_linear = False
    handles_full = True

    def derivatives(self, m: nn.Module, z: Tensor, y: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """σ'(z) and σ''(z) (None where it is zero everywhere); y = σ(z) as recorded."""
        raise NotImplementedError

    def needs_grad(self, m: nn.Module) -> bool:
        return not self.piecewise_linear

    def backpropagate(self, m: nn.Module, rec: _Record, h: _State) -> _State:
        d1, d2 = self.derivatives(m, rec.x, rec.y.detach())
        if isinstance(h, _Diag):
            out = (d1 * d1).mul_(h.h)
            if d2 is not None and rec.g is not None:
                out.addcmul_(d2, rec.g)
            return _Diag(out, h.exact)
        curvature = None if d2 is None or rec.g is None else d2 * rec.g
        if isinstance(h, _Full):  # D d1 A d1 D + diag(σ'' g)
            n = h.a.shape[0]
            s = d1.reshape(n, -1)
            a = h.a * s.unsqueeze(2) * s.unsqueeze(1)
            if curvature is not None:
                a.diagonal(dim1=1, dim2=2).add_(curvature.reshape(n, -1))
            return _Full(a, h.shape, h.exact)
        d = None if h.d is None else h.d * d1 * d1
        if curvature is not None:
            d = curvature if d is None else d + curvature
        return _LowRank(h.v * d1.unsqueeze(1), h.sign, d, h.exact)


def _where(cond: Tensor, a: Union[Tensor, float], b: Union[Tensor, float], like: Tensor) -> Tensor:
    a = a if isinstance(a, Tensor) else torch.full_like(like, a)
    b = b if isinstance(b, Tensor) else torch.full_like(like, b)
    return torch.where(cond, a, b)


class _Tanh(_Elementwise):
    def derivatives(self, m, z, y):
        d1 = (y * y).neg_().add_(1)
        return d1, (y * d1).mul_(-2)


class _Sigmoid(_Elementwise):
    def derivatives(self, m, z, y):
        s = y
        d1 = s * (1 - s)
        return d1, d1 * (1 - 2 * s)


class _LogSigmoid(_Elementwise):
    def derivatives(self, m, z, y):
        s = torch.sigmoid(z)
        return 1 - s, -s * (1 - s)


class _ReLU(_Elementwise):
    piecewise_linear = True

    def derivatives(self, m, z, y):
        return (z > 0).to(z.dtype), None


class _LeakyReLU(_Elementwise):
    piecewise_linear = True

    def derivatives(self, m, z, y):
        return _where(z > 0, 1.0, float(m.negative_slope), z), None


class _Hardtanh(_Elementwise):  # also ReLU6 (a Hardtanh(0, 6))
    piecewise_linear = True

    def derivatives(self, m, z, y):
        return ((z > m.min_val) & (z < m.max_val)).to(z.dtype), None


class _ELU(_Elementwise):
    def derivatives(self, m, z, y):
        e = float(m.alpha) * torch.exp(torch.clamp(z, max=0))
        return _where(z > 0, 1.0, e, z), _where(z >= 0, 0.0, e, z)  # at 0: as autograd


class _SELU(_Elementwise):
    ALPHA, SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946

    def derivatives(self, m, z, y):
        e = self.SCALE * self.ALPHA * torch.exp(torch.clamp(z, max=0))
        return _where(z > 0, self.SCALE, e, z), _where(z >= 0, 0.0, e, z)


class _CELU(_Elementwise):
    def derivatives(self, m, z, y):
        alpha = float(m.alpha)
        e = torch.exp(torch.clamp(z, max=0) / alpha)
        return _where(z > 0, 1.0, e, z), _where(z >= 0, 0.0, e / alpha, z)


class _Softplus(_Elementwise):
    def derivatives(self, m, z, y):
        beta, threshold = float(m.beta), float(m.threshold)
        s = torch.sigmoid(beta * z)
        linear = beta * z > threshold
        return _where(linear, 1.0, s, z), _where(linear, 0.0, beta * s * (1 - s), z)


class _SiLU(_Elementwise):
    def derivatives(self, m, z, y):
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s)), s * (1 - s) * (2 + z * (1 - 2 * s))


class _GELU(_Elementwise):
    def static_reason(self, m):
        return None if m.approximate in ("none", "tanh") else f"GELU(approximate={m.approximate!r})"

    def derivatives(self, m, z, y):
        if m.approximate == "tanh":
            c, k = math.sqrt(2 / math.pi), 0.044715
            t = torch.tanh(c * (z + k * z ** 3))
            u1, u2 = c * (1 + 3 * k * z * z), 6 * c * k * z
            sech2 = 1 - t * t
            return 0.5 * (1 + t) + 0.5 * z * sech2 * u1, sech2 * (u1 + 0.5 * z * (u2 - 2 * t * u1 * u1))
        phi = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        return cdf + z * phi, phi * (2 - z * z)


class _Softsign(_Elementwise):
    def derivatives(self, m, z, y):
        q = 1 / (1 + z.abs())
        return q * q, -2 * torch.sign(z) * q ** 3


# -------------------------------------------------------------- parameter-free linear maps
class _LinearMap(_Rule):
    """y = J x with J fixed given the recorded input (possibly data-dependent, as for max pooling).

    ``vjp`` applies Jᵀ to t of shape (N, K, *out) per sample; ``vjp_squared`` applies (J∘J)ᵀ;
    ``keeps_diagonal`` says whether Jᵀ diag(h) J is diagonal, i.e. nothing is dropped."""

    use_graph = False  # a single vector goes back through the recorded node (pooling: saved argmax)

    def vjp(self, m: nn.Module, rec: _Record, t: Tensor) -> Tensor:
        raise NotImplementedError

    def transpose(self, m: nn.Module, rec: _Record, t: Tensor) -> Tensor:
        """Jᵀ t like ``vjp``; for one vector per sample through autograd where ``use_graph``."""
        if (self.use_graph and t.shape[1] == 1 and rec.x_graph is not None and rec.x_graph.requires_grad
                and isinstance(rec.y, Tensor) and rec.y.grad_fn is not None):
            (g,) = torch.autograd.grad(rec.y, rec.x_graph, t.squeeze(1), retain_graph=True)
            return g.unsqueeze(1)
        return self.vjp(m, rec, t)

    def vjp_squared(self, m: nn.Module, rec: _Record, t: Tensor) -> Tensor:
        return self.transpose(m, rec, t)  # maps whose entries are 0 or 1

    def keeps_diagonal(self, m: nn.Module, rec: _Record) -> bool:
        return True

    def backpropagate(self, m: nn.Module, rec: _Record, h: _State) -> _State:
        keeps = self.keeps_diagonal(m, rec)
        if isinstance(h, _LowRank):
            d = None if h.d is None else self.vjp_squared(m, rec, h.d.unsqueeze(1)).squeeze(1)
            exact = h.exact and (h.d is None or keeps)
            return _LowRank(self.vjp(m, rec, h.v), h.sign, d, exact)
        return _Diag(self.vjp_squared(m, rec, h.h.unsqueeze(1)).squeeze(1), h.exact and keeps)


class _IdentityMap(_LinearMap):  # Identity, Dropout in eval mode
    handles_full = True

    def backpropagate(self, m, rec, h):
        return _Full(h.a, rec.x.shape[1:], h.exact) if isinstance(h, _Full) else super().backpropagate(m, rec, h)

    def runtime_reason(self, m, rec):
        if rec.training and getattr(m, "p", 0) > 0:
            return f"{type(m).__name__} in train mode"
        return None

    def vjp(self, m, rec, t):
        return t


class _Flatten(_LinearMap):
    handles_full = True

    def backpropagate(self, m, rec, h):
        return _Full(h.a, rec.x.shape[1:], h.exact) if isinstance(h, _Full) else super().backpropagate(m, rec, h)

    def runtime_reason(self, m, rec):
        if m.start_dim % rec.x.dim() == 0:
            return "Flatten over the sample dimension"
        return None

    def vjp(self, m, rec, t):
        return t.reshape(t.shape[:2] + rec.x.shape[1:])


def _scatter_to_argmax(t: Tensor, indices: Tensor, in_shape: torch.Size) -> Tensor:
    """(N, K, C, Ho, Wo) values to (N, K, C, H, W), added at the flat argmax positions."""
    n, k, c = t.shape[:3]
    out = t.new_zeros(n, k, c, in_shape[-2] * in_shape[-1])
    index = indices.reshape(n, 1, c, -1).expand(n, k, c, -1)
    out.scatter_add_(3, index, t.reshape(n, k, c, -1))
    return out.reshape((n, k) + tuple(in_shape))


def _pool_reason(m: nn.Module, rec: _Record) -> Optional[str]:
    return None if rec.x.dim() == 4 else f"{type(m).__name__} on an unbatched input"


def _pair(v: Any) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _MaxPool2d(_LinearMap):
    use_graph = True

    def static_reason(self, m):
        return "MaxPool2d(return_indices=True)" if m.return_indices else None

    def runtime_reason(self, m, rec):
        return _pool_reason(m, rec)

    def _indices(self, m, rec):
        if "indices" not in rec.cache:
            _, rec.cache["indices"] = F.max_pool2d(rec.x, m.kernel_size, m.stride, m.padding, m.dilation,
                                                   ceil_mode=m.ceil_mode, return_indices=True)
        return rec.cache["indices"]

    def vjp(self, m, rec, t):
        return _scatter_to_argmax(t, self._indices(m, rec), rec.x.shape[1:])

    def keeps_diagonal(self, m, rec):  # non-overlapping windows: each input selected at most once
        k, s, d = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.dilation)
        return all(si >= di * (ki - 1) + 1 for ki, si, di in zip(k, s, d))


class _AdaptiveMaxPool2d(_LinearMap):
    use_graph = True

    def static_reason(self, m):
        return "AdaptiveMaxPool2d(return_indices=True)" if m.return_indices else None

    def runtime_reason(self, m, rec):
        return _pool_reason(m, rec)

    def vjp(self, m, rec, t):
        if "indices" not in rec.cache:
            _, rec.cache["indices"] = F.adaptive_max_pool2d(rec.x, rec.y.shape[-2:], return_indices=True)
        return _scatter_to_argmax(t, rec.cache["indices"], rec.x.shape[1:])

    def keeps_diagonal(self, m, rec):
        return all(i % o == 0 for i, o in zip(rec.x.shape[-2:], rec.y.shape[-2:]))


def _linear_vjp(fn: Any, in_shape: torch.Size, t: Tensor) -> Tensor:
    """Jᵀ t for a linear, sample-independent fn: (N, K, *out) → (N, K, *in)."""
    n, k = t.shape[:2]
    with torch.enable_grad():
        zeros = t.new_zeros((n * k,) + tuple(in_shape)).requires_grad_()
        y = fn(zeros)
        (g,) = torch.autograd.grad(y, zeros, t.reshape((n * k,) + tuple(y.shape[1:])))
    return g.reshape((n, k) + tuple(in_shape))


class _AvgPool2d(_LinearMap):
    use_graph = True

    def runtime_reason(self, m, rec):
        return _pool_reason(m, rec)

    def _pool(self, m, x, divisor_override=None):
        return F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                            divisor_override if divisor_override is not None else m.divisor_override)

    def vjp(self, m, rec, t):
        return _linear_vjp(lambda x: self._pool(m, x), rec.x.shape[1:], t)

    def vjp_squared(self, m, rec, t):
        # Row r of P holds one value, 1/divisor_r, on its window's inputs: P∘P = P / divisor.
        if "entry" not in rec.cache:
            ones = rec.x.new_ones((1, 1) + tuple(rec.x.shape[-2:]))
            rec.cache["entry"] = self._pool(m, ones) / self._pool(m, ones, divisor_override=1).clamp_min(1)
        return self.transpose(m, rec, t * rec.cache["entry"])

    def keeps_diagonal(self, m, rec):
        return _pair(m.kernel_size) == (1, 1)


def _adaptive_window_sizes(n_in: int, n_out: int, like: Tensor) -> Tensor:
    i = torch.arange(n_out, device=like.device)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
    return (end - start).to(like.dtype)


class _AdaptiveAvgPool2d(_LinearMap):
    use_graph = True

    def runtime_reason(self, m, rec):
        return _pool_reason(m, rec)

    def vjp(self, m, rec, t):
        size = tuple(rec.y.shape[-2:])
        return _linear_vjp(lambda x: F.adaptive_avg_pool2d(x, size), rec.x.shape[1:], t)

    def vjp_squared(self, m, rec, t):
        (h, w), (oh, ow) = rec.x.shape[-2:], rec.y.shape[-2:]
        count = _adaptive_window_sizes(h, oh, t)[:, None] * _adaptive_window_sizes(w, ow, t)[None, :]
        return self.transpose(m, rec, t / count)

    def keeps_diagonal(self, m, rec):
        return tuple(rec.x.shape[-2:]) == tuple(rec.y.shape[-2:])


# -------------------------------------------------------------- layers with parameters
class _Linear(_Rule):
    param_names = ("weight", "bias")
    handles_full = True
    MAX_PAIR_ENTRIES = 2 ** 24  # (W_kj W_lj) for all k, l, j: used below this size

    def param_diagonals(self, m, rec, h):
        if isinstance(h, _Full) and rec.x.dim() > 2:
            h = h.low_rank()
        n = rec.x.shape[0]
        a = rec.x.reshape(n, -1, m.in_features)  # (N, T, in): T positions share W
        t = a.shape[1]
        out: Dict[str, Tensor] = {}
        if isinstance(h, _LowRank) and t > 1:
            v = h.v.reshape(n, h.v.shape[1], t, m.out_features)
            q = torch.einsum("nrtk,ntj->nrkj", v, a)
            out["weight"] = torch.einsum("nr,nrkj->kj", h.sign, q * q)
            vb = v.sum(2)
            out["bias"] = torch.einsum("nr,nrk->k", h.sign, vb * vb)
            if h.d is not None:
                d = h.d.reshape(n, t, m.out_features)
                out["weight"] = out["weight"] + torch.einsum("ntk,ntj->kj", d, a * a)
                out["bias"] = out["bias"] + d.sum((0, 1))
            return out, h.exact
        hz = (h.h if isinstance(h, _Diag) else h.diagonal()).reshape(n * t, m.out_features)
        out["weight"] = hz.T @ (a * a).reshape(n * t, m.in_features)
        out["bias"] = hz.sum(0)
        return out, h.exact and (not isinstance(h, _Diag) or t == 1)

    def backpropagate(self, m, rec, h):
        w = m.weight.detach()
        if isinstance(h, _Full) and rec.x.dim() > 2:
            h = h.low_rank()
        if isinstance(h, _Full):  # diag(Wᵀ A_n W) = Σ_kl A_n[k, l] W_kj W_lj
            n, k, j = h.a.shape[0], m.out_features, m.in_features
            if k * (k + 1) // 2 * j <= self.MAX_PAIR_ENTRIES:  # pairs k ≤ l, A symmetric
                rows, cols = torch.triu_indices(k, k, device=w.device)
                pairs = w[rows] * w[cols]
                coeff = h.a[:, rows, cols] * (1.0 + (rows != cols).to(h.a.dtype))
                return _Diag(coeff @ pairs, h.exact)
            aw = (h.a.reshape(n * k, k) @ w).reshape(n, k, j)
            return _Diag((aw * w).sum(1), h.exact)
        if isinstance(h, _LowRank):
            hx = _signed_squares(h.sign, h.v @ w)  # diag(Wᵀ A W), per position
            if h.d is not None:
                hx = hx + h.d @ (w * w)
            return _Diag(hx, h.exact)
        # W has one row: W^T diag(h) W is then exactly h w w^T at a single position.
        single = m.out_features == 1 and rec.x.dim() == 2
        return _Diag(h.h @ (w * w), h.exact and single)


class _Conv2d(_Rule):
    param_names = ("weight", "bias")

    def static_reason(self, m):
        if m.padding_mode != "zeros":
            return f"Conv2d(padding_mode={m.padding_mode!r})"
        return None

    def runtime_reason(self, m, rec):
        return None if rec.x.dim() == 4 else "Conv2d on an unbatched input"

    @staticmethod
    def _pads(m) -> List[int]:
        if isinstance(m.padding, str):
            return list(m._reversed_padding_repeated_twice)
        ph, pw = m.padding
        return [pw, pw, ph, ph]

    def _padded(self, m, rec) -> Tensor:
        pads = self._pads(m)
        return F.pad(rec.x, pads) if any(pads) else rec.x

    def _patches(self, m, rec) -> Tensor:
        """(N, G, C/G·kh·kw, P): the unfolded input, split by group."""
        u = F.unfold(self._padded(m, rec), m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride)
        return u.reshape(u.shape[0], m.groups, -1, u.shape[-1])

    def param_diagonals(self, m, rec, h):
        xp = self._padded(m, rec)

        def squared_patches(hz: Tensor) -> Tensor:
            # Σ_n Σ_p hz[n, o, p] x[n, c, p + k]²: the weight gradient of a convolution of x∘x.
            return torch.nn.grad.conv2d_weight(xp * xp, m.weight.shape, hz, m.stride, 0, m.dilation, m.groups)

        if isinstance(h, _Diag):
            return ({"weight": squared_patches(h.h), "bias": h.h.sum((0, 2, 3))},
                    h.exact and h.h[0, 0].numel() == 1)
        # Σ_r sign_r (Σ_p v_r[n, o, p] x[n, c, p + k])²: per-sample weight gradients, on unfolded patches.
        u = self._patches(m, rec)
        n, g, _, p = u.shape
        og = m.out_channels // g
        v = h.v.reshape(n, h.v.shape[1], g, og, p)
        q = torch.einsum("nrgop,ngjp->nrgoj", v, u)
        weight = torch.einsum("nr,nrgoj->goj", h.sign, q * q).reshape(m.weight.shape)
        vb = v.sum(-1)
        bias = torch.einsum("nr,nrgo->go", h.sign, vb * vb).reshape(-1)
        if h.d is not None:
            weight = weight + squared_patches(h.d)
            bias = bias + h.d.sum((0, 2, 3))
        return {"weight": weight, "bias": bias}, h.exact

    def _vjp(self, m, rec, t: Tensor, weight: Tensor) -> Tensor:
        """Transposed convolution of t (M, O, Ho, Wo) with ``weight`` → (M, C, H, W)."""
        padded = self._padded(m, rec).shape
        g = torch.nn.grad.conv2d_input((t.shape[0],) + tuple(padded[1:]), weight, t, m.stride, 0,
                                       m.dilation, m.groups)
        left, _, top, _ = self._pads(m)
        h, w = rec.x.shape[-2:]
        return g[..., top:top + h, left:left + w]

    def backpropagate(self, m, rec, h):
        w = m.weight.detach()
        if isinstance(h, _LowRank):
            n, r = h.v.shape[:2]
            jv = self._vjp(m, rec, h.v.reshape((n * r,) + tuple(h.v.shape[2:])), w)
            hx = _signed_squares(h.sign, jv.reshape((n, r) + tuple(jv.shape[1:])))
            if h.d is not None:
                hx = hx + self._vjp(m, rec, h.d, w * w)
            return _Diag(hx, h.exact)
        return _Diag(self._vjp(m, rec, h.h, w * w), False)


class _BatchNorm(_Rule):
    """Eval mode: y = γ (x − μ)/√(var+ε) + β per channel (dim 1), a diagonal Jacobian."""

    param_names = ("weight", "bias")

    def runtime_reason(self, m, rec):
        if rec.training or m.running_mean is None or m.running_var is None:
            return f"{type(m).__name__} in train mode (batch statistics couple the samples)"
        if rec.x.dim() < 2:
            return f"{type(m).__name__} on an unbatched input"
        return None

    def _affine(self, m, rec) -> Tuple[Tensor, Tensor]:
        if "affine" not in rec.cache:
            rec.cache["affine"] = self._compute_affine(m, rec)
        return rec.cache["affine"]

    def _compute_affine(self, m, rec) -> Tuple[Tensor, Tensor]:
        x = rec.x
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        inv = torch.rsqrt(m.running_var.detach().to(x.dtype) + m.eps).reshape(shape)
        shift = -m.running_mean.detach().to(x.dtype).reshape(shape) * inv
        xhat = torch.addcmul(shift, x, inv)
        scale = inv if m.weight is None else inv * m.weight.detach().reshape(shape)
        return xhat, scale

    def param_diagonals(self, m, rec, h):
        xhat, _ = self._affine(m, rec)
        n, c = xhat.shape[:2]
        xh = xhat.reshape(n, c, -1)
        p = xh.shape[-1]
        if isinstance(h, _LowRank):
            v = h.v.reshape(n, h.v.shape[1], c, p)
            q = (v * xh.unsqueeze(1)).sum(-1)
            vb = v.sum(-1)
            weight = torch.einsum("nr,nrc->c", h.sign, q * q)
            bias = torch.einsum("nr,nrc->c", h.sign, vb * vb)
            diag, exact = h.d, h.exact
        else:
            weight = bias = 0
            diag, exact = h.h, h.exact and p == 1
        if diag is not None:
            d = diag.reshape(n, c, p)
            weight = weight + (d * xh).mul_(xh).sum((0, 2))
            bias = bias + d.sum((0, 2))
        return {"weight": weight, "bias": bias}, exact

    def backpropagate(self, m, rec, h):
        _, scale = self._affine(m, rec)
        if isinstance(h, _LowRank):
            d = None if h.d is None else h.d * (scale * scale)
            return _LowRank(h.v * scale.unsqueeze(1), h.sign, d, h.exact)
        return _Diag(h.h * (scale * scale), h.exact)


_ACTIVATIONS: Dict[type, _Rule] = {
    nn.Tanh: _Tanh(), nn.Sigmoid: _Sigmoid(), nn.LogSigmoid: _LogSigmoid(), nn.ReLU: _ReLU(),
    nn.LeakyReLU: _LeakyReLU(), nn.ReLU6: _Hardtanh(), nn.Hardtanh: _Hardtanh(), nn.ELU: _ELU(),
    nn.SELU: _SELU(), nn.CELU: _CELU(), nn.Softplus: _Softplus(), nn.SiLU: _SiLU(), nn.GELU: _GELU(),
    nn.Softsign: _Softsign(),
}

RULES: Dict[type, _Rule] = {
    **_ACTIVATIONS,
    nn.Linear: _Linear(),
    nn.Conv2d: _Conv2d(),
    nn.Identity: _IdentityMap(),
    nn.Dropout: _IdentityMap(), nn.Dropout1d: _IdentityMap(), nn.Dropout2d: _IdentityMap(),
    nn.Dropout3d: _IdentityMap(), nn.AlphaDropout: _IdentityMap(), nn.FeatureAlphaDropout: _IdentityMap(),
    nn.Flatten: _Flatten(),
    nn.MaxPool2d: _MaxPool2d(), nn.AdaptiveMaxPool2d: _AdaptiveMaxPool2d(),
    nn.AvgPool2d: _AvgPool2d(), nn.AdaptiveAvgPool2d: _AdaptiveAvgPool2d(),
    nn.BatchNorm1d: _BatchNorm(), nn.BatchNorm2d: _BatchNorm(), nn.BatchNorm3d: _BatchNorm(),
}


# ---------------------------------------------------------------------------- model checks
def _layers(model: nn.Module) -> List[nn.Module]:
    """The leaves of an nn.Sequential, nested Sequentials flattened (exact types only)."""
    if type(model) is not nn.Sequential:
        if type(model) in RULES:
            return [model]
        raise HesScaleNotApplicable(f"{type(model).__name__} (not an nn.Sequential of covered layers)")
    out: List[nn.Module] = []
    for child in model._modules.values():  # not children(): it hides a module listed twice
        if child is None:
            continue
        if type(child) is nn.Sequential:
            out.extend(_layers(child))
        else:
            out.append(child)
    return out


def _check_model(op: CurvatureOperator) -> Tuple[List[nn.Module], List[_Rule], bool]:
    """The layers the recursion walks, their rules, and whether a tail was folded into the loss.

    Parameter-free layers after the last layer with parameters that have no rule (LogSoftmax,
    Softmax, ...) are left out: the recursion then starts from the Hessian w.r.t. the output
    of the last layer with parameters, of the loss with those layers folded in."""
    layers = _layers(op.model)
    if not layers:
        raise HesScaleNotApplicable("an empty nn.Sequential")
    with_params = [i for i, m in enumerate(layers) if any(True for _ in m.parameters())]
    last = with_params[-1] if with_params else len(layers) - 1
    tail = layers[last + 1:]
    folded = any(type(m) not in RULES for m in tail)
    if folded:
        layers = layers[:last + 1]
    rules = []
    for m in layers:
        rule = RULES.get(type(m))
        if rule is None:
            raise HesScaleNotApplicable(type(m).__name__)
        reason = rule.static_reason(m)
        if reason:
            raise HesScaleNotApplicable(reason)
        rules.append(rule)
    if len({id(m) for m in layers}) != len(layers):
        raise HesScaleNotApplicable("a layer used twice (tied weights)")
    owned: Dict[int, nn.Module] = {}
    for m, rule in zip(layers, rules):
        for _, p in rule.params(m):
            if id(p) in owned:
                raise HesScaleNotApplicable("tied weights (one parameter in two layers)")
            owned[id(p)] = m
    for name, p in zip(op.names, op.params):
        if id(p) not in owned:
            raise HesScaleNotApplicable(f"parameter {name} is not a Linear/Conv2d/BatchNorm weight or bias")
    return layers, rules, folded


@contextlib.contextmanager
def _recording(model: nn.Module, layers: Sequence[nn.Module], records: List[_Record],
               outputs: List[Any]) -> Iterator[None]:
    """Hooks that record each layer's input and output and the model's output; in-place
    activations are made out-of-place meanwhile (recorded tensors must keep their values)."""
    handles = []
    inplace = [m for m in layers if getattr(m, "inplace", False) is True]

    def layer_hook(i: int):
        def hook(module, args, output):
            rec = records[i]
            rec.calls += 1
            rec.x_graph = args[0] if args and isinstance(args[0], Tensor) else None
            rec.x = None if rec.x_graph is None else rec.x_graph.detach()
            rec.y = output
            rec.training = module.training
        return hook

    try:
        for m in inplace:
            m.inplace = False
        for i, m in enumerate(layers):
            handles.append(m.register_forward_hook(layer_hook(i)))
        handles.append(model.register_forward_hook(lambda module, args, output: outputs.append(output)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m in inplace:
            m.inplace = True


def _reaches_parameters_besides(loss: Tensor, out: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether the loss's autograd graph reaches a parameter other than through ``out``."""
    targets = {id(p) for p in params}
    stop = out.grad_fn
    seen: Dict[int, Any] = {}  # id → node: holding the nodes keeps their ids unique
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn is stop or id(fn) in seen:
            continue
        seen[id(fn)] = fn
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) in targets:
            return True
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def _output_hessian(loss: Tensor, out: Tensor) -> Tuple[Tensor, Tensor]:
    """(A, g): A (N, D, D) the per-sample Hessians of the loss w.r.t. out, g = ∂L/∂out."""
    n = out.shape[0]
    dim = out[0].numel() if n else 0
    if n * dim * dim > MAX_OUTPUT_HESSIAN_ENTRIES:
        raise HesScaleNotApplicable(
            f"{dim} model outputs per sample (the per-sample output Hessians of a batch would hold "
            f"{n * dim * dim:.2e} numbers; use smaller batches)")
    (g,) = torch.autograd.grad(loss, out, create_graph=True, allow_unused=True)
    if g is None:
        raise HesScaleNotApplicable("the loss does not depend on the model output")
    if not g.requires_grad:  # loss linear in out
        return out.new_zeros(n, dim, dim), g.detach()
    flat = g.reshape(n, dim)
    columns = []
    for c in range(dim):
        (col,) = torch.autograd.grad(flat[:, c].sum(), out, retain_graph=True, allow_unused=True)
        columns.append(out.new_zeros(n, dim) if col is None else col.detach().reshape(n, dim))
    a = torch.stack(columns, dim=2)
    if n > 1:
        # Block diagonal over samples? One product along a random direction must match.
        gen = torch.Generator(device="cpu").manual_seed(20240531)
        v = torch.randn(n, dim, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        (direct,) = torch.autograd.grad((flat * v).sum(), out, retain_graph=True, allow_unused=True)
        direct = torch.zeros_like(v) if direct is None else direct.detach().reshape(n, dim)
        blocks = (a * v.unsqueeze(2)).sum(1)
        tol = math.sqrt(torch.finfo(out.dtype).eps)
        if float((direct - blocks).norm()) > tol * float(direct.norm() + blocks.norm()) + 1e-30:
            raise HesScaleNotApplicable("the loss couples samples (it is not a sum of per-sample terms)")
    return (a + a.transpose(1, 2)).mul_(0.5), g.detach()


def _eigen_factors(a: Tensor, shape: torch.Size, exact: bool = True) -> _LowRank:
    """A_n = Σ_r sign_r v_r v_rᵀ from the eigendecomposition; directions zero for all samples dropped."""
    n, dim = a.shape[:2]
    if dim == 0 or n == 0:
        return _LowRank(a.new_zeros((n, 0) + tuple(shape)), a.new_zeros(n, 0), None, exact)
    lam, q = torch.linalg.eigh(a)
    scale = float(lam.abs().max())
    keep = (lam.abs() > dim * torch.finfo(a.dtype).eps * scale).any(0)
    if not bool(keep.all()):
        lam, q = lam[:, keep], q[:, :, keep]
    v = (q * lam.abs().sqrt().unsqueeze(1)).transpose(1, 2)  # (N, R, D)
    return _LowRank(v.reshape((n, v.shape[1]) + tuple(shape)), torch.sign(lam), None, exact)


def _initial_state(a: Tensor, out_shape: torch.Size) -> _Full:
    return _Full(a, out_shape)


# ---------------------------------------------------------------------------- the probe
def _accumulate_batch(op: CurvatureOperator, layers: List[nn.Module], rules: List[_Rule], folded: bool,
                      batch: Any, weight: float, total: Tensor, slices: Dict[int, Tuple[int, int]],
                      exact: Dict[int, bool]) -> None:
    records = [_Record() for _ in layers]
    outputs: List[Any] = []
    with op._probing(), torch.enable_grad(), _recording(op.model, layers, records, outputs):
        loss = op._batch_loss(batch)
    if len(outputs) != 1:
        raise HesScaleNotApplicable(f"loss_fn calls the model {len(outputs)} times per batch (once is covered)")
    if not isinstance(outputs[0], Tensor) or outputs[0].dim() < 1:
        raise HesScaleNotApplicable("the model output is not a batched tensor")
    n = outputs[0].shape[0]
    # The Hessian starts at the last walked layer's output: the model output, or before a tail
    # of uncovered parameter-free layers that counts as part of the loss.
    out = records[-1].y
    if not isinstance(out, Tensor) or (not folded and out is not outputs[0]):
        raise HesScaleNotApplicable("the model output is not its last layer's output")
    for m, rule, rec in zip(layers, rules, records):
        if rec.calls != 1 or rec.x is None or not isinstance(rec.y, Tensor):
            raise HesScaleNotApplicable(f"{type(m).__name__} is not called once on a tensor per forward pass")
        if rec.x.dim() < 1 or rec.x.shape[0] != n or rec.y.dim() < 1 or rec.y.shape[0] != n:
            raise HesScaleNotApplicable(f"{type(m).__name__} changes the sample dimension")
        reason = rule.runtime_reason(m, rec)
        if reason:
            raise HesScaleNotApplicable(reason)
    if not loss.requires_grad:
        raise HesScaleNotApplicable("the loss does not depend on the model output")
    if _reaches_parameters_besides(loss, out, op.params):
        raise HesScaleNotApplicable("the loss depends on the parameters other than through the model output")

    a, g_out = _output_hessian(loss, out)
    first = min(i for i, (m, rule) in enumerate(zip(layers, rules)) if any(id(p) in slices for _, p in rule.params(m)))
    needs = [i for i in range(first + 1, len(layers)) if rules[i].needs_grad(layers[i])]
    if needs:
        grads = torch.autograd.grad(out, [records[i].y for i in needs], grad_outputs=g_out, allow_unused=True,
                                    retain_graph=True)  # pooling nodes are reused below
        for i, g in zip(needs, grads):
            records[i].g = torch.zeros_like(records[i].y) if g is None else g.detach()
    del loss, g_out

    with torch.no_grad():
        state: _State = _initial_state(a, out.shape[1:])
        for i in range(len(layers) - 1, first - 1, -1):
            m, rule, rec = layers[i], rules[i], records[i]
            if isinstance(state, _Full) and not rule.handles_full:
                state = state.low_rank()
            named = rule.params(m)
            if named:
                diagonals, is_exact = rule.param_diagonals(m, rec, state)
                for name, p in named:
                    if id(p) in slices:
                        start, stop = slices[id(p)]
                        total[start:stop].add_(diagonals[name].reshape(-1).to(total.dtype), alpha=weight)
                        exact[id(p)] = exact.get(id(p), True) and is_exact
            if i > first:
                state = rule.backpropagate(m, rec, state)


def hesscale_diag(op: CurvatureOperator) -> HesScaleResult:
    """HesScale's approximation of diag(H) of the operator's loss, flat in ``op``'s layout.

    Raises :class:`HesScaleNotApplicable` for models or losses the recursion does not cover."""
    started = time.perf_counter()
    layers, rules, folded = _check_model(op)
    slices = {id(p): (start, stop) for p, (_, start, stop) in zip(op.params, op.layer_slices())}
    total = torch.zeros(op.num_params, device=op.device, dtype=op.dtype)
    exact: Dict[int, bool] = {}
    for weight, batch in zip(op.weights, op.batches):
        _accumulate_batch(op, layers, rules, folded, batch, weight, total, slices, exact)
    names = [name for name, p in zip(op.names, op.params) if exact.get(id(p), False)]
    return HesScaleResult(total, time.perf_counter() - started, names)
