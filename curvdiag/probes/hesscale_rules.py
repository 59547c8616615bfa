"""HesScale's per-layer rules (DESIGN §3.10), a registry keyed by the exact module type.

The recursion of :mod:`curvdiag.probes.hesscale` carries the per-sample Hessian w.r.t. a layer's
output in one of three representations — :class:`Full` (dense (N, D, D), from the output
Hessian), :class:`LowRank` (Σ_r sign_r v_r v_rᵀ + diag(d), exact) and :class:`Diag` (the
diagonal only) — and a :class:`Rule` per layer type says how the layer takes part: the diagonal
of its parameters' Hessian (``param_diagonals``) and the state w.r.t. its input
(``backpropagate``). The formulas are in :mod:`curvdiag.probes.hesscale`'s docstring; a new layer
type is one rule class plus one line in :data:`RULES` (as BackPACK's per-layer extensions).
A subclass of a covered module may override ``forward`` and is therefore not covered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


# ---------------------------------------------------------------------------- representations
@dataclass
class LowRank:
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
class Full:
    """Per-sample Hessian w.r.t. a layer output as dense matrices a: (N, D, D), D = shape.numel().

    The output Hessian starts so; it stays dense through elementwise maps and reshapes (cheap
    while D is the model's output size) and becomes a ``LowRank`` before any other layer."""

    a: Tensor
    shape: torch.Size
    exact: bool = True
    _low_rank: Optional[LowRank] = None

    def diagonal(self) -> Tensor:
        return torch.diagonal(self.a, dim1=1, dim2=2).reshape((self.a.shape[0],) + tuple(self.shape))

    def low_rank(self) -> LowRank:
        if self._low_rank is None:
            self._low_rank = eigen_factors(self.a, self.shape, self.exact)
        return self._low_rank


@dataclass
class Diag:
    """Diagonal of the per-sample Hessian w.r.t. a layer output: (N, *shape)."""

    h: Tensor
    exact: bool


State = Union[Full, LowRank, Diag]


def _signed_squares(sign: Tensor, t: Tensor) -> Tensor:
    """Σ_r sign[n, r] t[n, r, ...]² → (N, ...)."""
    s = sign.reshape(sign.shape + (1,) * (t.dim() - 2))
    return (s * t * t).sum(1)


class Record:
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
class Rule:
    """How one layer type takes part in the recursion."""

    param_names: Tuple[str, ...] = ()
    handles_full = False  # whether the rule takes a Full state (else it gets the LowRank form)

    def static_reason(self, m: nn.Module) -> Optional[str]:
        return None

    def runtime_reason(self, m: nn.Module, rec: Record) -> Optional[str]:
        return None

    def needs_grad(self, m: nn.Module) -> bool:
        return False

    def params(self, m: nn.Module) -> List[Tuple[str, Tensor]]:
        return [(n, m._parameters[n]) for n in self.param_names if m._parameters.get(n) is not None]

    def param_diagonals(self, m: nn.Module, rec: Record, h: State) -> Tuple[Dict[str, Tensor], bool]:
        return {}, True

    def backpropagate(self, m: nn.Module, rec: Record, h: State) -> State:
        raise NotImplementedError


# -------------------------------------------------------------- elementwise activations
class _Elementwise(Rule):
    """a = σ(z) entry by entry: exact for both representations."""

    piecewise_linear = False
    handles_full = True

    def derivatives(self, m: nn.Module, z: Tensor, y: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """σ'(z) and σ''(z) (None where it is zero everywhere); y = σ(z) as recorded."""
        raise NotImplementedError

    def needs_grad(self, m: nn.Module) -> bool:
        return not self.piecewise_linear

    def backpropagate(self, m: nn.Module, rec: Record, h: State) -> State:
        d1, d2 = self.derivatives(m, rec.x, rec.y.detach())
        if isinstance(h, Diag):
            out = (d1 * d1).mul_(h.h)
            if d2 is not None and rec.g is not None:
                out.addcmul_(d2, rec.g)
            return Diag(out, h.exact)
        curvature = None if d2 is None or rec.g is None else d2 * rec.g
        if isinstance(h, Full):  # D d1 A d1 D + diag(σ'' g)
            n = h.a.shape[0]
            s = d1.reshape(n, -1)
            a = h.a * s.unsqueeze(2) * s.unsqueeze(1)
            if curvature is not None:
                a.diagonal(dim1=1, dim2=2).add_(curvature.reshape(n, -1))
            return Full(a, h.shape, h.exact)
        d = None if h.d is None else h.d * d1 * d1
        if curvature is not None:
            d = curvature if d is None else d + curvature
        return LowRank(h.v * d1.unsqueeze(1), h.sign, d, h.exact)


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
class _LinearMap(Rule):
    """y = J x with J fixed given the recorded input (possibly data-dependent, as for max pooling).

    ``vjp`` applies Jᵀ to t of shape (N, K, *out) per sample; ``vjp_squared`` applies (J∘J)ᵀ;
    ``keeps_diagonal`` says whether Jᵀ diag(h) J is diagonal, i.e. nothing is dropped."""

    use_graph = False  # a single vector goes back through the recorded node (pooling: saved argmax)

    def vjp(self, m: nn.Module, rec: Record, t: Tensor) -> Tensor:
        raise NotImplementedError

    def transpose(self, m: nn.Module, rec: Record, t: Tensor) -> Tensor:
        """Jᵀ t like ``vjp``; for one vector per sample through autograd where ``use_graph``."""
        if (self.use_graph and t.shape[1] == 1 and rec.x_graph is not None and rec.x_graph.requires_grad
                and isinstance(rec.y, Tensor) and rec.y.grad_fn is not None):
            (g,) = torch.autograd.grad(rec.y, rec.x_graph, t.squeeze(1), retain_graph=True)
            return g.unsqueeze(1)
        return self.vjp(m, rec, t)

    def vjp_squared(self, m: nn.Module, rec: Record, t: Tensor) -> Tensor:
        return self.transpose(m, rec, t)  # maps whose entries are 0 or 1

    def keeps_diagonal(self, m: nn.Module, rec: Record) -> bool:
        return True

    def backpropagate(self, m: nn.Module, rec: Record, h: State) -> State:
        keeps = self.keeps_diagonal(m, rec)
        if isinstance(h, LowRank):
            d = None if h.d is None else self.vjp_squared(m, rec, h.d.unsqueeze(1)).squeeze(1)
            exact = h.exact and (h.d is None or keeps)
            return LowRank(self.vjp(m, rec, h.v), h.sign, d, exact)
        return Diag(self.vjp_squared(m, rec, h.h.unsqueeze(1)).squeeze(1), h.exact and keeps)


class _IdentityMap(_LinearMap):  # Identity, Dropout in eval mode
    handles_full = True

    def backpropagate(self, m, rec, h):
        return Full(h.a, rec.x.shape[1:], h.exact) if isinstance(h, Full) else super().backpropagate(m, rec, h)

    def runtime_reason(self, m, rec):
        if rec.training and getattr(m, "p", 0) > 0:
            return f"{type(m).__name__} in train mode"
        return None

    def vjp(self, m, rec, t):
        return t


class _Flatten(_LinearMap):
    handles_full = True

    def backpropagate(self, m, rec, h):
        return Full(h.a, rec.x.shape[1:], h.exact) if isinstance(h, Full) else super().backpropagate(m, rec, h)

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


def _pool_reason(m: nn.Module, rec: Record) -> Optional[str]:
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
class _Linear(Rule):
    param_names = ("weight", "bias")
    handles_full = True
    MAX_PAIR_ENTRIES = 2 ** 24  # (W_kj W_lj) for all k, l, j: used below this size

    def param_diagonals(self, m, rec, h):
        if isinstance(h, Full) and rec.x.dim() > 2:
            h = h.low_rank()
        n = rec.x.shape[0]
        a = rec.x.reshape(n, -1, m.in_features)  # (N, T, in): T positions share W
        t = a.shape[1]
        out: Dict[str, Tensor] = {}
        if isinstance(h, LowRank) and t > 1:
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
        hz = (h.h if isinstance(h, Diag) else h.diagonal()).reshape(n * t, m.out_features)
        out["weight"] = hz.T @ (a * a).reshape(n * t, m.in_features)
        out["bias"] = hz.sum(0)
        return out, h.exact and (not isinstance(h, Diag) or t == 1)

    def backpropagate(self, m, rec, h):
        w = m.weight.detach()
        if isinstance(h, Full) and rec.x.dim() > 2:
            h = h.low_rank()
        if isinstance(h, Full):  # diag(Wᵀ A_n W) = Σ_kl A_n[k, l] W_kj W_lj
            n, k, j = h.a.shape[0], m.out_features, m.in_features
            if k * (k + 1) // 2 * j <= self.MAX_PAIR_ENTRIES:  # pairs k ≤ l, A symmetric
                rows, cols = torch.triu_indices(k, k, device=w.device)
                pairs = w[rows] * w[cols]
                coeff = h.a[:, rows, cols] * (1.0 + (rows != cols).to(h.a.dtype))
                return Diag(coeff @ pairs, h.exact)
            aw = (h.a.reshape(n * k, k) @ w).reshape(n, k, j)
            return Diag((aw * w).sum(1), h.exact)
        if isinstance(h, LowRank):
            hx = _signed_squares(h.sign, h.v @ w)  # diag(Wᵀ A W), per position
            if h.d is not None:
                hx = hx + h.d @ (w * w)
            return Diag(hx, h.exact)
        # W has one row: W^T diag(h) W is then exactly h w w^T at a single position.
        single = m.out_features == 1 and rec.x.dim() == 2
        return Diag(h.h @ (w * w), h.exact and single)


class _Conv2d(Rule):
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

        if isinstance(h, Diag):
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
        if isinstance(h, LowRank):
            n, r = h.v.shape[:2]
            jv = self._vjp(m, rec, h.v.reshape((n * r,) + tuple(h.v.shape[2:])), w)
            hx = _signed_squares(h.sign, jv.reshape((n, r) + tuple(jv.shape[1:])))
            if h.d is not None:
                hx = hx + self._vjp(m, rec, h.d, w * w)
            return Diag(hx, h.exact)
        return Diag(self._vjp(m, rec, h.h, w * w), False)


class _BatchNorm(Rule):
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
        if isinstance(h, LowRank):
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
        if isinstance(h, LowRank):
            d = None if h.d is None else h.d * (scale * scale)
            return LowRank(h.v * scale.unsqueeze(1), h.sign, d, h.exact)
        return Diag(h.h * (scale * scale), h.exact)


ACTIVATIONS: Dict[type, Rule] = {
    nn.Tanh: _Tanh(), nn.Sigmoid: _Sigmoid(), nn.LogSigmoid: _LogSigmoid(), nn.ReLU: _ReLU(),
    nn.LeakyReLU: _LeakyReLU(), nn.ReLU6: _Hardtanh(), nn.Hardtanh: _Hardtanh(), nn.ELU: _ELU(),
    nn.SELU: _SELU(), nn.CELU: _CELU(), nn.Softplus: _Softplus(), nn.SiLU: _SiLU(), nn.GELU: _GELU(),
    nn.Softsign: _Softsign(),
}

RULES: Dict[type, Rule] = {
    **ACTIVATIONS,
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


def eigen_factors(a: Tensor, shape: torch.Size, exact: bool = True) -> LowRank:
    """A_n = Σ_r sign_r v_r v_rᵀ from the eigendecomposition; directions zero for all samples dropped."""
    n, dim = a.shape[:2]
    if dim == 0 or n == 0:
        return LowRank(a.new_zeros((n, 0) + tuple(shape)), a.new_zeros(n, 0), None, exact)
    lam, q = torch.linalg.eigh(a)
    scale = float(lam.abs().max())
    keep = (lam.abs() > dim * torch.finfo(a.dtype).eps * scale).any(0)
    if not bool(keep.all()):
        lam, q = lam[:, keep], q[:, :, keep]
    v = (q * lam.abs().sqrt().unsqueeze(1)).transpose(1, 2)  # (N, R, D)
    return LowRank(v.reshape((n, v.shape[1]) + tuple(shape)), torch.sign(lam), None, exact)
