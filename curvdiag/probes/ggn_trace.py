"""Hessian trace by Hutchinson with an exact Gauss–Newton control variate (DESIGN §3.3).

H = G + R with G = Σ_b w_b Σ_i J_iᵀ A_i J_i the generalized Gauss–Newton matrix: J_i the
Jacobian of the model output of sample i w.r.t. θ, A_i the Hessian of the batch loss w.r.t.
that output (autograd's A already carries the 1/n_b of a mean loss, so no extra scaling).
Then tr(H) = tr(G) + E[zᵀ(H − G)z]: tr(G) is computed exactly and Hutchinson runs only on
the residual R, whose probes have a far smaller spread than those of H. The estimate is
unbiased for any G as long as tr(G) and zᵀGz use the same G — here the same A (truncated to
its eigen-decomposition) and the same J.

How:
- Output Hessian: C double-backward products through the loss head only (C = outputs per
  row), giving A_i for all rows at once; a random product checks that A is block diagonal per
  row (no coupling between samples or positions). Batched ``eigh``: A_i = Σ_c λ_ic u_ic u_icᵀ.
- tr(G) = Σ_b w_b Σ_i Σ_c λ_ic ‖J_iᵀ u_ic‖², the squared norms per sample without per-sample
  gradients: one backward to the covered layers' outputs per (c, output position), then for
  ``nn.Linear`` ‖g_i(W)‖² = ‖x_i‖²‖δ_i‖² (2-D inputs) or ⟨X_i X_iᵀ, Δ_i Δ_iᵀ⟩ (sequence
  inputs), ‖g_i(b)‖² = ‖Σ_t δ_it‖²; for ``nn.LayerNorm``/``nn.RMSNorm`` from the normalized
  input. Cost: C·P backward passes without weight gradients per batch (P output positions).
- zᵀGz = Σ_b w_b Σ_i (J_i z)ᵀ A_i (J_i z) with J z by the double-backward trick on a kept
  graph: one backward per probe and batch. The per-probe value is zᵀHz − zᵀGz (one HVP).

Not applicable (:class:`GGNNotApplicable`, the caller falls back to plain Hutchinson): a
trainable parameter in a module other than Linear/LayerNorm/RMSNorm, tied weights, a covered
module that runs more than once per forward or whose parameters are used outside its forward,
a model forward that runs other than once per loss call or returns no tensor, a loss whose
gradient does not factor through the model output (e.g. a weight-decay term), a model that
mixes samples (BatchNorm in train mode), an output Hessian that couples rows, or kernels
without a double backward. Every structural assumption is checked numerically at set-up.

Probing never changes the model: forwards run inside ``CurvatureOperator._probing()``; hooks
are removed afterwards; ``.grad`` is never written.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from curvdiag.probes.hutchinson import TraceResult, rademacher, sequential_mean
from curvdiag.curvature.operator import CurvatureOperator

ESTIMATOR = "hutchinson + exact Gauss-Newton control variate"

#: At most this many backward passes (outputs per row × output positions) per batch for tr(G).
MAX_TRACE_BACKWARDS = 4096
#: At most this many entries in the per-row output Hessians of one batch (n·P·C²).
MAX_OUTPUT_HESSIAN_ENTRIES = 50_000_000

_RMSNorm = getattr(torch.nn, "RMSNorm", None)
_COVERED: Tuple[type, ...] = (torch.nn.Linear, torch.nn.LayerNorm) + ((_RMSNorm,) if _RMSNorm is not None else ())


class GGNNotApplicable(Exception):
    """The Gauss–Newton control variate does not cover this model or loss; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class GGNTraceResult(TraceResult):
    """A :class:`TraceResult` with the control variate's parts and its cost.

    ``value`` = ``ggn_trace`` + ``residual_trace``; ``stderr`` comes from the residual probes
    only (tr(G) is exact). ``hvps``: Hessian-vector products; ``ggn_products``: J z products
    (one per probe and batch); ``ggn_trace_backwards``: backward passes (to layer outputs, no
    weight gradients) spent on the exact tr(G); ``setup_backwards``: backward passes of the
    output Hessian and the applicability checks."""

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


@dataclass
class _Layer:
    name: str
    module: torch.nn.Module
    kind: str  # "linear" or "norm"
    params: List[Tuple[str, str, torch.nn.Parameter]]  # (full name, "weight"/"bias", parameter), trainable only
    x: Optional[torch.Tensor] = None  # (n, S, d_in) input (linear) or normalized input (norm), detached
    y: Optional[torch.Tensor] = None  # output, in the graph
    xx: Optional[torch.Tensor] = None  # (n,) ‖x_i‖² when S == 1
    gram: Optional[torch.Tensor] = None  # (n, S, S) X Xᵀ for sequence inputs when cheaper


@dataclass
class _Batch:
    weight: float
    rows: int  # samples n
    positions: int  # output positions P per sample
    outputs: int  # C
    a: torch.Tensor  # (n, P, C, C) output Hessian as used (truncated eigen-decomposition)
    eigenvalues: torch.Tensor  # (n, P, C)
    eigenvectors: torch.Tensor  # (n, P, C, C), columns
    out: Optional[torch.Tensor] = None  # kept graph
    layers: List[_Layer] = field(default_factory=list)
    u: Optional[torch.Tensor] = None
    gj: Optional[List[torch.Tensor]] = None
    gj_index: Optional[List[int]] = None


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 2e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


class GaussNewton:
    """The Gauss–Newton matrix G of a :class:`CurvatureOperator`'s loss, with its exact trace.

    An operator (``size``, ``device``, ``dtype``, ``matvec``) over the same flat parameter
    vector as ``op``. Raises :class:`GGNNotApplicable` at construction when not covered.
    The graphs of all batches are kept when ``op`` keeps its own (kept-graph HVPs); otherwise
    each product re-runs the forward of each batch.
    """

    def __init__(self, op: CurvatureOperator, keep_graphs: Optional[bool] = None):
        started = time.perf_counter()
        self.op = op
        self.size, self.device, self.dtype = op.num_params, op.device, op.dtype
        self.keep_graphs = op._kept_gradient is not None if keep_graphs is None else keep_graphs
        self.tol = _tolerance(op.dtype)
        self.product_count = 0  # J z products (each batch counts once)
        self.setup_backwards = 0
        self.trace_backwards = 0
        self._trace: Optional[float] = None
        self.trace_by_parameter: Dict[str, float] = {}
        self._layers_spec = self._covered_layers()
        self._param_index = {id(p): k for k, p in enumerate(op.params)}
        self.batches: List[_Batch] = []
        try:
            for weight, batch in zip(op.weights, op.batches):
                self.batches.append(self._set_up_batch(weight, batch))
        except GGNNotApplicable:
            self.batches = []
            raise
        self.setup_seconds = time.perf_counter() - started
        self.trace_seconds = 0.0

    # ------------------------------------------------------------------ structure
    def _covered_layers(self) -> List[Tuple[str, torch.nn.Module, str, List[Tuple[str, str, torch.nn.Parameter]]]]:
        """The covered modules holding the trainable parameters; refuse anything else."""
        trainable = {id(p) for p in self.op.params}
        owners: Dict[int, Tuple[Tuple[int, str], str]] = {}
        spec = []
        seen_modules = set()
        for mname, module in self.op.model.named_modules(remove_duplicate=False):
            own = [(pname, p) for pname, p in module.named_parameters(recurse=False, remove_duplicate=False)
                   if p is not None and id(p) in trainable]
            if not own:
                continue
            full = lambda pname: f"{mname}.{pname}" if mname else pname  # noqa: E731
            for pname, p in own:
                key = (id(module), pname)
                if id(p) in owners and owners[id(p)][0] != key:
                    raise GGNNotApplicable(f"tied weights ({owners[id(p)][1]} is also {full(pname)}) not covered")
                owners.setdefault(id(p), (key, full(pname)))
            if id(module) in seen_modules:
                continue
            seen_modules.add(id(module))
            if not isinstance(module, _COVERED):
                raise GGNNotApplicable(f"{type(module).__name__} not covered (parameter {full(own[0][0])})")
            names = {pname for pname, _ in own}
            if not names <= {"weight", "bias"}:
                raise GGNNotApplicable(f"{type(module).__name__} with parameter {full(sorted(names)[0])} not covered")
            kind = "linear" if isinstance(module, torch.nn.Linear) else "norm"
            params = [(full(pname), pname, p) for pname, p in own]
            params.sort(key=lambda t: t[1] != "weight")
            spec.append((mname, module, kind, params))
        covered = {id(p) for _, _, _, ps in spec for _, _, p in ps}
        missing = [n for n, p in zip(self.op.names, self.op.params) if id(p) not in covered]
        if missing:  # cannot happen with named_parameters, kept as a guard
            raise GGNNotApplicable(f"parameter {missing[0]} not covered")
        return spec

    def _forward(self, batch: Any, capture: bool) -> Tuple[torch.Tensor, torch.Tensor, Dict[int, list]]:
        outs: List[Any] = []
        records: Dict[int, list] = {}
        handles = [self.op.model.register_forward_hook(lambda m, a, o: outs.append(o))]
        if capture:
            for index, (_, module, _, _) in enumerate(self._layers_spec):
                def hook(m, args, kwargs, output, index=index):
                    x = args[0] if args else next(iter(kwargs.values()), None)
                    records.setdefault(index, []).append((x, output))
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        try:
            with self.op._probing():
                loss = self.op._batch_loss(batch)
        finally:
            for h in handles:
                h.remove()
        if len(outs) != 1:
            raise GGNNotApplicable(f"the model's forward ran {len(outs)} times in one loss call (needs exactly once)")
        out = outs[0]
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise GGNNotApplicable(f"the model returns {type(out).__name__}, not a floating-point tensor")
        if out.dim() == 0:
            raise GGNNotApplicable("the model returns a scalar: no per-sample outputs")
        if not out.requires_grad:
            raise GGNNotApplicable("the model output does not depend on the parameters")
        return loss, out, records

    def _set_up_batch(self, weight: float, batch: Any) -> _Batch:
        op, tol = self.op, self.tol
        loss, out, records = self._forward(batch, capture=True)
        n = out.shape[0]
        c = out.shape[-1] if out.dim() >= 2 else 1
        p = out.numel() // max(n * c, 1)
        if c * p > MAX_TRACE_BACKWARDS:
            raise GGNNotApplicable(f"output of shape {tuple(out.shape)}: {c * p} backward passes per batch for tr(G)")
        if n * p * c * c > MAX_OUTPUT_HESSIAN_ENTRIES:
            raise GGNNotApplicable(f"output of shape {tuple(out.shape)}: its output Hessian has {n * p * c * c} entries")

        layers: List[_Layer] = []
        unused: List[Tuple[str, torch.nn.Parameter]] = []
        for index, (mname, module, kind, params) in enumerate(self._layers_spec):
            calls = records.get(index, [])
            label = f"{type(module).__name__} {mname!r}"
            if len(calls) > 1:
                raise GGNNotApplicable(f"{label} runs {len(calls)} times per forward (weight sharing) not covered")
            if not calls:
                unused.extend((full, pp) for full, _, pp in params)
                continue
            x, y = calls[0]
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() < 2 or x.shape[0] != n:
                raise GGNNotApplicable(f"{label}: its input's first dimension is not the sample dimension ({n})")
            layers.append(self._layer(mname, module, kind, params, x.detach(), y))

        # Unused parameters: not in the output's graph at all.
        if unused:
            g = torch.autograd.grad(out, [pp for _, pp in unused], torch.ones_like(out), retain_graph=True,
                                    allow_unused=True)
            self.setup_backwards += 1
            for (full, _), t in zip(unused, g):
                if t is not None and bool(t.ne(0).any()):
                    raise GGNNotApplicable(f"parameter {full} is used outside its module's forward (not covered)")

        gen = torch.Generator(device="cpu").manual_seed(20240607)
        v = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        ys = [layer.y for layer in layers]
        # (1) the output's Jacobian factors through the covered layers' outputs.
        grads = torch.autograd.grad(out, op.params + ys, v, retain_graph=True, allow_unused=True)
        self.setup_backwards += 1
        auto, deltas = grads[:len(op.params)], grads[len(op.params):]
        total = _norm([g for g in auto if g is not None])
        rebuilt: Dict[int, torch.Tensor] = {}
        for layer, delta in zip(layers, deltas):
            for full, kind, pp, g in self._layer_gradients(layer, delta):
                rebuilt[id(pp)] = g
        for name, pp, g in zip(op.names, op.params, auto):
            r = rebuilt.get(id(pp))
            a = torch.zeros_like(pp) if g is None else g
            r = torch.zeros_like(pp) if r is None else r
            err = _norm([a - r])
            if err > tol * (_norm([a]) + _norm([r])) + tol * 1e-3 * total:
                raise GGNNotApplicable(f"parameter {name} is used outside its module's forward (not covered)")
        # (2) no mixing between samples: output row 0 reaches only row 0 of every layer output.
        if n > 1 and layers:
            v0 = torch.zeros_like(v)
            v0[0] = v[0]
            d0 = torch.autograd.grad(out, ys, v0, retain_graph=True, allow_unused=True)
            self.setup_backwards += 1
            inside = sum(float(d[:1].double().pow(2).sum()) for d in d0 if d is not None)
            leak = sum(float(d[1:].double().pow(2).sum()) for d in d0 if d is not None)
            if leak > tol * tol * inside:
                raise GGNNotApplicable("the model mixes samples (e.g. BatchNorm in train mode): no per-sample Jacobians")

        # (3) the loss's gradient factors through the output: ∇L − Jᵀ(∂L/∂out) = 0.
        gout = torch.autograd.grad(loss, out, create_graph=True)[0]
        zero = [torch.zeros_like(pp) for pp in op.params]
        g_loss = torch.autograd.grad(loss, op.params, retain_graph=True, allow_unused=True)
        diff = torch.autograd.grad([loss, out], op.params, [torch.ones_like(loss), -gout.detach()],
                                   retain_graph=True, allow_unused=True)
        self.setup_backwards += 3
        err = _norm([z if g is None else g for g, z in zip(diff, zero)])
        scale = _norm([z if g is None else g for g, z in zip(g_loss, zero)])
        if err > tol * scale:
            raise GGNNotApplicable("the loss depends on the parameters other than through the model output "
                                   f"(relative gradient mismatch {err / max(scale, 1e-300):.1e}, e.g. a weight-decay term)")

        # (4) output Hessian, (n, P, C, C): C double-backward products through the loss head only.
        shape3 = (n, p, c)
        a = torch.zeros(n, p, c, c, device=out.device, dtype=torch.float64)
        if gout.requires_grad:
            for col, h in enumerate(self._output_hessian_columns(gout, out, shape3)):
                if h is not None:
                    a[..., col] = h.reshape(shape3).double()
            w = torch.randn(shape3, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
            (h,) = torch.autograd.grad(gout, out, w.view_as(out), allow_unused=True)
            self.setup_backwards += 1
            h = torch.zeros(shape3, dtype=torch.float64, device=out.device) if h is None else h.reshape(shape3).double()
            expected = torch.einsum("npcd,npd->npc", a, w.double())
            if float((h - expected).norm()) > tol * (float(h.norm()) + float(expected.norm())) + 1e-300:
                raise GGNNotApplicable("the loss couples the outputs of different samples or positions "
                                       "(its output Hessian is not block diagonal per row)")
        del gout, loss
        a = (a + a.transpose(-1, -2)) / 2
        lam, vec = torch.linalg.eigh(a)
        # Eigenvalues at the rounding level of the batch's largest (the zero one of softmax
        # cross-entropy; those of confidently classified samples, noise in float32) are dropped
        # from A itself: tr(G) skips their backward passes and zᵀGz stays consistent with tr(G).
        eps = torch.finfo(out.dtype).eps
        cutoff = 10 * c * eps * float(lam.abs().max()) if lam.numel() else 0.0
        lam = torch.where(lam.abs() <= cutoff, torch.zeros_like(lam), lam)
        a_used = torch.einsum("npcd,npd,nped->npce", vec, lam, vec)
        state = _Batch(weight, n, p, c, a_used.to(out.dtype), lam, vec.to(out.dtype), out=out, layers=layers)
        self._prepare_jvp(state, out, check=not self.batches)
        if not self.keep_graphs:  # drop the graphs; products and tr(G) re-run the forward
            state.out, state.u, state.gj = None, None, None
            for layer in layers:
                layer.x = layer.y = layer.xx = layer.gram = None
        return state

    def _output_hessian_columns(self, gout: torch.Tensor, out: torch.Tensor, shape3: Tuple[int, int, int]):
        """∂²L/∂out² e_c (all rows at once) for every output column c: one batched double
        backward through the loss head, or C of them when the loss does not vmap."""
        c = shape3[-1]
        eye = torch.eye(c, device=out.device, dtype=out.dtype)
        basis = eye.view(c, 1, 1, c).expand(c, *shape3).reshape(c, *out.shape)
        try:
            (h,) = torch.autograd.grad(gout, out, basis, retain_graph=True, allow_unused=True, is_grads_batched=True)
            self.setup_backwards += 1
            return [None] * c if h is None else list(h.unbind(0))
        except Exception:  # noqa: BLE001 -- no batching rule for some op of the loss: one column at a time
            columns = []
            for col in range(c):
                (h,) = torch.autograd.grad(gout, out, basis[col], retain_graph=True, allow_unused=True)
                self.setup_backwards += 1
                columns.append(h)
            return columns

    def _layer(self, name: str, module: torch.nn.Module, kind: str, params, x: torch.Tensor, y: torch.Tensor) -> _Layer:
        n = x.shape[0]
        layer = _Layer(name, module, kind, params, y=y)
        if kind == "linear":
            x = x.reshape(n, -1, x.shape[-1])
            layer.x = x
            if x.shape[1] == 1:
                layer.xx = x[:, 0].pow(2).sum(-1)
            else:
                s, d_in, d_out = x.shape[1], x.shape[2], module.weight.shape[0]
                if s * (d_in + d_out) <= d_in * d_out:
                    layer.gram = x @ x.transpose(1, 2)
        else:
            shape = tuple(module.normalized_shape)
            eps = module.eps
            if isinstance(module, torch.nn.LayerNorm):
                xhat = F.layer_norm(x, shape, None, None, eps)
            else:
                xhat = F.rms_norm(x, shape, None, eps)
            d = math.prod(shape)
            layer.x = xhat.reshape(n, -1, d)
        return layer

    def _layer_gradients(self, layer: _Layer, delta: Optional[torch.Tensor]):
        """(full name, kind, parameter, summed gradient) rebuilt from the layer's input and δ."""
        n, x = layer.x.shape[0], layer.x
        for full, kind, pp in layer.params:
            if delta is None:
                yield full, kind, pp, torch.zeros_like(pp)
                continue
            d = delta.reshape(n, -1, x.shape[-1] if layer.kind == "norm" else delta.shape[-1])
            if kind == "bias":
                g = d.sum((0, 1))
            elif layer.kind == "linear":
                g = torch.einsum("nso,nsi->oi", d, x)
            else:
                g = (d * x).sum((0, 1))
            yield full, kind, pp, g.reshape(pp.shape)

    def _per_sample_squares(self, layer: _Layer, delta: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """{parameter name: (n,) ‖g_i‖²} of the per-sample gradients Σ_t δ_it ⊗ x_it."""
        n, x = layer.x.shape[0], layer.x
        result: Dict[str, torch.Tensor] = {}
        if delta is None:
            return result
        if layer.kind == "norm":
            d = delta.reshape(n, -1, x.shape[-1])
            for full, kind, _ in layer.params:
                g = d.sum(1) if kind == "bias" else (d * x).sum(1)
                result[full] = g.pow(2).sum(-1)
            return result
        d = delta.reshape(n, -1, delta.shape[-1])
        for full, kind, _ in layer.params:
            if kind == "bias":
                result[full] = (d[:, 0] if d.shape[1] == 1 else d.sum(1)).pow(2).sum(-1)
            elif layer.xx is not None:
                result[full] = layer.xx * d[:, 0].pow(2).sum(-1)
            elif layer.gram is not None:
                result[full] = (layer.gram * (d @ d.transpose(1, 2))).sum((1, 2))
            else:
                parts = []
                for start in range(0, n, 64):
                    g = torch.einsum("nso,nsi->noi", d[start:start + 64], x[start:start + 64])
                    parts.append(g.pow(2).sum((1, 2)))
                result[full] = torch.cat(parts)
        return result

    # ------------------------------------------------------------------ J z
    def _prepare_jvp(self, state: _Batch, out: torch.Tensor, check: bool = False) -> None:
        u = torch.zeros_like(out, requires_grad=True)
        try:
            gj = torch.autograd.grad(out, self.op.params, u, create_graph=True, allow_unused=True)
        except RuntimeError as exc:
            raise GGNNotApplicable(f"no double backward through the model ({str(exc).splitlines()[0][:120]})") from exc
        index = [k for k, g in enumerate(gj) if g is not None and g.requires_grad]
        state.u, state.gj, state.gj_index = u, [gj[k] for k in index], index
        if check and index:
            try:  # one product now, so a missing double backward is refused at set-up
                torch.autograd.grad(state.gj, u, [torch.zeros_like(g) for g in state.gj], retain_graph=True)
            except RuntimeError as exc:
                raise GGNNotApplicable(f"no double backward through the model ({str(exc).splitlines()[0][:120]})") from exc

    def _state(self, k: int) -> _Batch:
        state = self.batches[k]
        if state.out is not None:
            return state
        _, out, _ = self._forward(self.op.batches[k], capture=False)
        fresh = _Batch(state.weight, state.rows, state.positions, state.outputs, state.a, state.eigenvalues,
                       state.eigenvectors, out=out)
        self._prepare_jvp(fresh, out)
        return fresh

    def _jvp(self, state: _Batch, pieces: List[torch.Tensor]) -> torch.Tensor:
        """J z for one batch, shaped (n, P, C)."""
        self.product_count += 1
        shape3 = (state.rows, state.positions, state.outputs)
        if not state.gj:
            return torch.zeros(shape3, device=self.device, dtype=state.a.dtype)
        (jz,) = torch.autograd.grad(state.gj, state.u, [pieces[k] for k in state.gj_index], retain_graph=True)
        return jz.reshape(shape3)

    def _pieces(self, z: torch.Tensor) -> List[torch.Tensor]:
        if z.shape != (self.size,):
            raise ValueError(f"expected a vector of shape ({self.size},), got {tuple(z.shape)}")
        return self.op.unflatten(z.to(device=self.device, dtype=self.dtype))

    def quadratic(self, z: torch.Tensor) -> float:
        """zᵀGz = Σ_b w_b Σ_i (J_i z)ᵀ A_i (J_i z): one J z product per batch."""
        pieces = self._pieces(z)
        total = 0.0
        for k in range(len(self.batches)):
            state = self._state(k)
            jz = self._jvp(state, pieces).double()
            total += state.weight * float(torch.einsum("npc,npcd,npd->", jz, state.a.double(), jz))
        return total

    def matvec(self, z: torch.Tensor) -> torch.Tensor:
        """G z, flat (num_params,): J z, then A, then Jᵀ (one more backward per batch)."""
        pieces = self._pieces(z)
        total = torch.zeros(self.size, device=self.device, dtype=self.dtype)
        for k in range(len(self.batches)):
            state = self._state(k)
            ajz = torch.einsum("npcd,npd->npc", state.a, self._jvp(state, pieces))
            grads = self.op._grad(state.out, self.op.params, ajz.reshape(state.out.shape), retain_graph=True)
            total.add_(self.op.flatten(grads), alpha=state.weight)
        return total

    # ------------------------------------------------------------------ tr(G)
    def trace(self) -> float:
        """tr(G) exactly: Σ_b w_b Σ_i Σ_c λ_ic ‖J_iᵀ u_ic‖² (computed once, then cached)."""
        if self._trace is not None:
            return self._trace
        started = time.perf_counter()
        total = 0.0
        by_param: Dict[str, float] = {}
        for k, state in enumerate(self.batches):
            if not state.layers:
                continue
            if state.out is None:  # graphs not kept: one more forward with layer capture
                _, out, records = self._forward(self.op.batches[k], capture=True)
                layers = []
                spec_index = {id(m): i for i, (_, m, _, _) in enumerate(self._layers_spec)}
                for layer in state.layers:
                    x, y = records[spec_index[id(layer.module)]][0]
                    layers.append(self._layer(layer.name, layer.module, layer.kind, layer.params, x.detach(), y))
            else:
                out, layers = state.out, state.layers
            ys = [layer.y for layer in layers]
            shape3 = (state.rows, state.positions, state.outputs)
            for pos in range(state.positions):
                for col in range(state.outputs):
                    lam = state.eigenvalues[:, pos, col]
                    if not bool(lam.ne(0).any()):
                        continue
                    direction = torch.zeros(shape3, device=self.device, dtype=out.dtype)
                    direction[:, pos, :] = state.eigenvectors[:, pos, :, col]
                    deltas = torch.autograd.grad(out, ys, direction.view_as(out), retain_graph=True, allow_unused=True)
                    self.trace_backwards += 1
                    for layer, delta in zip(layers, deltas):
                        for name, squares in self._per_sample_squares(layer, delta).items():
                            part = state.weight * float((lam * squares.double()).sum())
                            by_param[name] = by_param.get(name, 0.0) + part
                            total += part
        self._trace = total
        self.trace_by_parameter = {n: by_param.get(n, 0.0) for n in self.op.names}
        self.trace_seconds = time.perf_counter() - started
        return total


def _mean_and_sd(values: List[float]) -> Tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("inf")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def ggn_control_variate_trace(
    op: CurvatureOperator,
    samples: Optional[int] = None,
    target_rel_stderr: Optional[float] = 0.01,
    seed: int = 0,
    min_samples: int = 3,
    max_samples: int = 1000,
) -> GGNTraceResult:
    """tr(H) ≈ tr(G) + mean_k (z_kᵀHz_k − z_kᵀGz_k) with Rademacher z_k (the same z_k as
    :func:`~curvdiag.probes.hutchinson.hutchinson_trace` with this ``seed``). With ``samples`` a fixed
    count; otherwise probes are added until the standard error is at most
    ``target_rel_stderr``·|estimate| (after ``min_samples``) or ``max_samples`` is reached.
    Raises :class:`GGNNotApplicable` when the model or loss is not covered."""
    started = time.perf_counter()
    ggn = GaussNewton(op)
    g_trace = ggn.trace()
    probes_started = time.perf_counter()
    hvps_before = op.hvp_count
    spread: List[float] = []

    def draw(k: int) -> float:
        z = rademacher(op, seed, k)
        value = float(torch.dot(z.double(), op.hvp(z).double())) - ggn.quadratic(z)
        spread.append(value)
        return value

    mean, stderr, n = sequential_mean(draw, samples, target_rel_stderr, min_samples, max_samples, offset=g_trace)
    _, sd = _mean_and_sd(spread)
    now = time.perf_counter()
    return GGNTraceResult(
        value=g_trace + mean, stderr=stderr, samples=n, seconds=now - started,
        ggn_trace=g_trace, residual_trace=mean, probe_sd=sd, hvps=op.hvp_count - hvps_before,
        ggn_products=ggn.product_count, ggn_trace_backwards=ggn.trace_backwards,
        setup_backwards=ggn.setup_backwards, setup_seconds=ggn.setup_seconds,
        ggn_trace_seconds=ggn.trace_seconds, probe_seconds=now - probes_started,
        ggn_trace_by_parameter=dict(ggn.trace_by_parameter))
