"""The generalized Gauss–Newton matrix of a curvature operator's loss, with its exact trace (DESIGN §3.3).

G = Σ_b w_b Σ_i J_iᵀ A_i J_i: J_i the Jacobian of the model output of sample i w.r.t. θ, A_i
the Hessian of the batch loss w.r.t. that output (autograd's A already carries the 1/n_b of a
mean loss, so no extra scaling), truncated to its eigen-decomposition A_i = Σ_c λ_ic u_ic u_icᵀ
(eigenvalues at rounding level dropped). tr(G) and zᵀGz use the same A and the same J, so a
control variate built on them stays unbiased (:mod:`curvdiag.probes.ggn_trace`).

How:
- Output Hessian: :func:`~curvdiag.curvature.output_hessian.output_hessian` per (sample,
  output position) row, C = outputs per row, through the loss head only; batched ``eigh``.
- tr(G) = Σ_b w_b Σ_i Σ_c λ_ic ‖J_iᵀ u_ic‖², the squared norms per sample without per-sample
  gradients: one backward to the covered layers' outputs per (c, output position), then for
  ``nn.Linear`` ‖g_i(W)‖² = ‖x_i‖²‖δ_i‖² (2-D inputs) or ⟨X_i X_iᵀ, Δ_i Δ_iᵀ⟩ (sequence
  inputs), ‖g_i(b)‖² = ‖Σ_t δ_it‖²; for ``nn.LayerNorm``/``nn.RMSNorm`` from the normalized
  input. Cost: C·P backward passes without weight gradients per batch (P output positions).
- Any other model (Conv, BatchNorm in eval mode, embeddings, bare parameters such as a
  positional table, tied or shared weights, a parameter used outside its module): the same sum
  from per-sample gradients of the whole model (:mod:`curvdiag.curvature.per_sample`, rules
  ``"per-sample"``), one vjp per sample and nonzero eigen-direction. Measured (one thread,
  whole tr(G) over all batches, in HVPs of the same operator): bundled BN CNN 12, tiny
  transformer 15, ResNet-18 (11.2M parameters, 8 CIFAR images) 24.5; plus ~1 s of torch.func
  start-up once per process. The per-layer rules stay first where they apply (cheaper).
- zᵀGz = Σ_b w_b Σ_i (J_i z)ᵀ A_i (J_i z) with J z by the double-backward trick on a kept
  graph: one backward per batch. G z adds one more backward per batch (Jᵀ A J z).

Every sum over batches runs over the operator's :meth:`~CurvatureOperator.for_each_batch` and is
summed over ranks by its :meth:`~CurvatureOperator.sum_over_ranks` (one collective per tr(G), per
zᵀGz and per G z), so several processes give the one-process G to rounding.

Not covered (:class:`~curvdiag.errors.NotCovered`): a model forward that runs other than
once per loss call or returns no tensor (Hugging Face ``ModelOutput``), no model input with the
sample dimension first, ops torch.func cannot transform, a loss whose gradient does not factor through the
model output (e.g. a weight-decay term), a model that mixes samples (BatchNorm in train mode),
an output Hessian that couples rows, or kernels without a double backward. Every structural
assumption is checked numerically at set-up, on every rank's batches, and every rank refuses
together (:meth:`~CurvatureOperator.covered_on_every_rank`).

Probing never changes the model: forwards run inside the operator's ``probing()``; hooks are
removed afterwards; ``.grad`` is never written.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from curvdiag.curvature.operator import CurvatureOperator, once_differentiable_in
from curvdiag.curvature.output_hessian import (Recording, model_output_tensor, output_hessian, recording,
                                               rounding_tolerance)
from curvdiag.curvature.per_sample import PerSampleModel
from curvdiag.errors import NotCovered

#: At most this many backward passes (outputs per row × output positions) per batch for tr(G).
MAX_TRACE_BACKWARDS = 4096

#: Entries of the per-sample directions built at once (samples × directions × outputs per sample).
_MAX_DIRECTION_ENTRIES = 2 ** 24

_RMSNorm = getattr(torch.nn, "RMSNorm", None)
_COVERED: Tuple[type, ...] = (torch.nn.Linear, torch.nn.LayerNorm) + ((_RMSNorm,) if _RMSNorm is not None else ())

#: How tr(G) is computed: from the covered layers' inputs and output gradients, or from
#: per-sample gradients of the whole model (torch.func).
LAYERS, PER_SAMPLE = "layers", "per-sample"

#: Refusals of the per-layer rules that the per-sample path may still cover.
_LAYER_RULE = "per-layer rule: "


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
    batch: Any
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
    per_sample: Optional[PerSampleModel] = None
    sample_shape: Tuple[int, ...] = ()  # one sample's output: out.shape[1:]


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


class GaussNewton:
    """The Gauss–Newton matrix G of a :class:`CurvatureOperator`'s loss, with its exact trace.

    An operator (``size``, ``device``, ``dtype``, ``matvec``) over the same flat parameter
    vector as ``op``. Raises :class:`NotCovered` at construction when not covered
    (on every rank together).
    The graphs of all batches are kept when ``op`` keeps its own (kept-graph HVPs); otherwise
    each product re-runs the forward of each batch.
    """

    def __init__(self, op: CurvatureOperator, keep_graphs: Optional[bool] = None, rules: Optional[str] = None):
        started = time.perf_counter()
        self.op = op
        self.size, self.device, self.dtype = op.num_params, op.device, op.dtype
        self.keep_graphs = op.keeps_graph if keep_graphs is None else keep_graphs
        self.tol = rounding_tolerance(op.dtype)
        self.product_count = 0  # J z products (each batch counts once)
        self.setup_backwards = 0
        self.trace_backwards = 0
        self._trace: Optional[float] = None
        self.trace_by_parameter: Dict[str, float] = {}
        self.batches: List[_Batch] = []
        self.rules = rules
        if rules not in (None, LAYERS, PER_SAMPLE):
            raise ValueError(f"rules must be None, {LAYERS!r} or {PER_SAMPLE!r}, not {rules!r}")
        self._layers_spec: List[Tuple[str, torch.nn.Module, str, List[Tuple[str, str, torch.nn.Parameter]]]] = []
        if rules != PER_SAMPLE:
            try:
                self._layers_spec = self._covered_layers()
                self.rules = LAYERS
            except NotCovered:
                if rules == LAYERS:
                    raise
                self.rules = PER_SAMPLE
        try:
            self._set_up_batches()
        except NotCovered as exc:
            if self.rules != LAYERS or rules == LAYERS or not exc.reason.startswith(_LAYER_RULE):
                raise
            self.rules, self._layers_spec = PER_SAMPLE, []  # every rank got the same reason: all retry
            self._set_up_batches()
        self.setup_seconds = time.perf_counter() - started
        self.trace_seconds = 0.0

    def _set_up_batches(self) -> None:
        self.batches = []
        try:
            with self.op.covered_on_every_rank():
                for weight, batch in self.op.for_each_batch():
                    self.batches.append(self._set_up_batch(weight, batch))
        except NotCovered:
            self.batches = []
            raise

    @property
    def per_sample_passes(self) -> int:
        """Vmapped forward+backward calls spent on per-sample gradients (checks and tr(G))."""
        return sum(b.per_sample.passes for b in self.batches if b.per_sample is not None)

    @property
    def per_sample_vjps(self) -> int:
        """Per-sample vector-Jacobian products (sample × direction) spent (checks and tr(G)); on
        this rank. A pass over a batch of n samples with D directions holds n·D of them."""
        return sum(b.per_sample.vjps for b in self.batches if b.per_sample is not None)

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
                    raise NotCovered(f"tied weights ({owners[id(p)][1]} is also {full(pname)}) not covered")
                owners.setdefault(id(p), (key, full(pname)))
            if id(module) in seen_modules:
                continue
            seen_modules.add(id(module))
            if not isinstance(module, _COVERED):
                raise NotCovered(f"{type(module).__name__} not covered (parameter {full(own[0][0])})")
            names = {pname for pname, _ in own}
            if not names <= {"weight", "bias"}:
                raise NotCovered(f"{type(module).__name__} with parameter {full(sorted(names)[0])} not covered")
            kind = "linear" if isinstance(module, torch.nn.Linear) else "norm"
            params = [(full(pname), pname, p) for pname, p in own]
            params.sort(key=lambda t: t[1] != "weight")
            spec.append((mname, module, kind, params))
        covered = {id(p) for _, _, _, ps in spec for _, _, p in ps}
        missing = [n for n, p in zip(self.op.names, self.op.params) if id(p) not in covered]
        if missing:  # cannot happen with named_parameters, kept as a guard
            raise NotCovered(f"parameter {missing[0]} not covered")
        return spec

    def _forward(self, batch: Any, capture: bool) -> Tuple[torch.Tensor, torch.Tensor, Recording]:
        """(loss, model output, what the covered layers saw when ``capture``) of one batch; call
        inside the operator's probing()."""
        layers = [module for _, module, _, _ in self._layers_spec] if capture else []
        with recording(self.op.model, layers) as seen:
            loss = self.op.batch_loss(batch)
        if len(seen.outputs) != 1:
            raise NotCovered(f"the model's forward ran {len(seen.outputs)} times in one loss call (needs exactly once)")
        out = model_output_tensor(seen.outputs[0])
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise NotCovered(f"the model returns {type(out).__name__}, not a floating-point tensor")
        if out.dim() == 0:
            raise NotCovered("the model returns a scalar: no per-sample outputs")
        if not out.requires_grad:
            raise NotCovered("the model output does not depend on the parameters")
        return loss, out, seen

    def _set_up_batch(self, weight: float, batch: Any) -> _Batch:
        """One batch's output Hessian, eigen-decomposed, and its kept graph; every structural
        assumption checked (inside the operator's probing())."""
        loss, out, seen = self._forward(batch, capture=self.rules == LAYERS)
        n = out.shape[0]
        c = out.shape[-1] if out.dim() >= 2 else 1
        p = out.numel() // max(n * c, 1)
        if c * p > MAX_TRACE_BACKWARDS:
            raise NotCovered(f"output of shape {tuple(out.shape)}: {c * p} backward passes per batch for tr(G)")
        per_sample = None
        if self.rules == LAYERS:
            layers = self._captured_layers(seen, out)
            self._check_jacobian_factors(out, layers)
        else:
            layers = []
            args, kwargs = seen.inputs[0]
            per_sample = PerSampleModel(self.op.model, self.op.names, self.op.params, args, kwargs, n)
            self.setup_backwards += per_sample.check(out, self.op.params, self.tol)
        hessian = output_hessian(loss, out, per_position=True)
        self.setup_backwards += hessian.backwards
        self._check_loss_factors(loss, out, hessian.gradient)
        del loss
        lam, vec = torch.linalg.eigh(hessian.blocks.reshape(n, p, c, c).double())
        # Eigenvalues at the rounding level of the batch's largest (the zero one of softmax
        # cross-entropy; those of confidently classified samples, noise in float32) are dropped
        # from A itself: tr(G) skips their backward passes and zᵀGz stays consistent with tr(G).
        eps = torch.finfo(out.dtype).eps
        cutoff = 10 * c * eps * float(lam.abs().max()) if lam.numel() else 0.0
        lam = torch.where(lam.abs() <= cutoff, torch.zeros_like(lam), lam)
        a_used = torch.einsum("npcd,npd,nped->npce", vec, lam, vec)
        state = _Batch(weight, batch, n, p, c, a_used.to(out.dtype), lam, vec.to(out.dtype), out=out, layers=layers,
                       per_sample=per_sample, sample_shape=tuple(out.shape[1:]))
        self._prepare_jvp(state, out, check=not self.batches)
        if not self.keep_graphs:  # drop the graphs; products and tr(G) re-run the forward
            state.out, state.u, state.gj = None, None, None
            for layer in layers:
                layer.x = layer.y = layer.xx = layer.gram = None
        return state

    def _captured_layers(self, seen: Recording, out: torch.Tensor) -> List[_Layer]:
        """The covered layers this forward ran, each once on a batched input; the parameters of
        layers that did not run must not reach the output at all."""
        n = out.shape[0]
        layers: List[_Layer] = []
        unused: List[Tuple[str, torch.nn.Parameter]] = []
        for index, (mname, module, kind, params) in enumerate(self._layers_spec):
            calls = seen.calls.get(index, [])
            label = f"{type(module).__name__} {mname!r}"
            if len(calls) > 1:
                raise NotCovered(_LAYER_RULE + f"{label} runs {len(calls)} times per forward (weight sharing) not covered")
            if not calls:
                unused.extend((full, pp) for full, _, pp in params)
                continue
            x, y = calls[0].input, calls[0].output
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() < 2 or x.shape[0] != n:
                raise NotCovered(_LAYER_RULE + f"{label}: its input's first dimension is not the sample dimension ({n})")
            layers.append(self._layer(mname, module, kind, params, x.detach(), y))
        if unused:
            g = torch.autograd.grad(out, [pp for _, pp in unused], torch.ones_like(out), retain_graph=True,
                                    allow_unused=True)
            self.setup_backwards += 1
            for (full, _), t in zip(unused, g):
                if t is not None and bool(t.ne(0).any()):
                    raise NotCovered(_LAYER_RULE + f"parameter {full} is used outside its module's forward (not covered)")
        return layers

    def _check_jacobian_factors(self, out: torch.Tensor, layers: List[_Layer]) -> None:
        """(1) Jᵀv rebuilt from the covered layers' inputs and output gradients equals autograd's
        (no parameter used outside its module); (2) output row 0 reaches only row 0 of every
        layer output (no mixing between samples)."""
        op, tol, n = self.op, self.tol, out.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(20240607)
        v = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        ys = [layer.y for layer in layers]
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
                raise NotCovered(_LAYER_RULE + f"parameter {name} is used outside its module's forward (not covered)")
        if n > 1 and layers:
            v0 = torch.zeros_like(v)
            v0[0] = v[0]
            d0 = torch.autograd.grad(out, ys, v0, retain_graph=True, allow_unused=True)
            self.setup_backwards += 1
            inside = sum(float(d[:1].double().pow(2).sum()) for d in d0 if d is not None)
            leak = sum(float(d[1:].double().pow(2).sum()) for d in d0 if d is not None)
            if leak > tol * tol * inside:
                raise NotCovered("the model mixes samples (e.g. BatchNorm in train mode): no per-sample Jacobians")

    def _check_loss_factors(self, loss: torch.Tensor, out: torch.Tensor, gout: torch.Tensor) -> None:
        """(3) The loss's gradient factors through the output: ∇L − Jᵀ(∂L/∂out) = 0."""
        op = self.op
        zero = [torch.zeros_like(pp) for pp in op.params]
        g_loss = torch.autograd.grad(loss, op.params, retain_graph=True, allow_unused=True)
        diff = torch.autograd.grad([loss, out], op.params, [torch.ones_like(loss), -gout],
                                   retain_graph=True, allow_unused=True)
        self.setup_backwards += 2
        err = _norm([z if g is None else g for g, z in zip(diff, zero)])
        scale = _norm([z if g is None else g for g, z in zip(g_loss, zero)])
        if err > self.tol * scale:
            raise NotCovered("the loss depends on the parameters other than through the model output "
                             f"(relative gradient mismatch {err / max(scale, 1e-300):.1e}, e.g. a weight-decay term)")

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
            raise NotCovered(f"no double backward through the model ({str(exc).splitlines()[0][:120]})") from exc
        index = [k for k, g in enumerate(gj) if g is not None and g.requires_grad]
        if check and once_differentiable_in([gj[k] for k in index]):  # J z through it would be silently 0
            raise NotCovered("no double backward through the model (a backward is marked once_differentiable)")
        state.u, state.gj, state.gj_index = u, [gj[k] for k in index], index
        if check and index:
            try:  # one product now, so a missing double backward is refused at set-up
                torch.autograd.grad(state.gj, u, [torch.zeros_like(g) for g in state.gj], retain_graph=True)
            except RuntimeError as exc:
                raise NotCovered(f"no double backward through the model ({str(exc).splitlines()[0][:120]})") from exc

    def _live(self, state: _Batch) -> _Batch:
        """``state`` with a graph to differentiate: its kept one, or a fresh forward of its batch."""
        if state.out is not None:
            return state
        with self.op.probing():
            _, out, _ = self._forward(state.batch, capture=False)
        fresh = _Batch(state.weight, state.batch, state.rows, state.positions, state.outputs, state.a,
                       state.eigenvalues, state.eigenvectors, out=out)
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
        """zᵀGz = Σ_b w_b Σ_i (J_i z)ᵀ A_i (J_i z): one J z product per batch, summed over ranks."""
        pieces = self._pieces(z)
        total = torch.zeros(1, device=self.device, dtype=torch.float64)
        for state in map(self._live, self.batches):
            jz = self._jvp(state, pieces).double()
            total += state.weight * torch.einsum("npc,npcd,npd->", jz, state.a.double(), jz)
        return float(self.op.sum_over_ranks(total)[0])

    def matvec(self, z: torch.Tensor) -> torch.Tensor:
        """G z, flat (num_params,): J z, then A, then Jᵀ (one more backward per batch), summed over ranks."""
        pieces = self._pieces(z)
        total = torch.zeros(self.size, device=self.device, dtype=self.dtype)
        for state in map(self._live, self.batches):
            ajz = torch.einsum("npcd,npd->npc", state.a, self._jvp(state, pieces))
            grads = self.op.parameter_gradients(state.out, ajz.reshape(state.out.shape), retain_graph=True)
            total.add_(self.op.flatten(grads), alpha=state.weight)
        return self.op.sum_over_ranks(total)

    # ------------------------------------------------------------------ tr(G)
    def trace(self) -> float:
        """tr(G) exactly: Σ_b w_b Σ_i Σ_c λ_ic ‖J_iᵀ u_ic‖² (computed once, then cached), with its
        share per parameter tensor; one collective for all of them."""
        if self._trace is not None:
            return self._trace
        started = time.perf_counter()
        index = {name: k for k, name in enumerate(self.op.names)}
        parts = torch.zeros(len(index) + 1, device=self.device, dtype=torch.float64)  # last: the total
        for state in self.batches:
            if state.per_sample is not None:
                self._add_per_sample_trace(state, index, parts)
            elif state.layers:
                self._add_batch_trace(state, index, parts)
        parts = self.op.sum_over_ranks(parts).tolist()
        self._trace = parts[-1]
        self.trace_by_parameter = dict(zip(self.op.names, parts[:-1]))
        self.trace_seconds = time.perf_counter() - started
        return self._trace

    def _add_batch_trace(self, state: _Batch, index: Dict[str, int], parts: torch.Tensor) -> None:
        """Add w_b Σ_i Σ_c λ_ic ‖J_iᵀ u_ic‖² of one batch to ``parts`` (per parameter and in total)."""
        if state.out is None:  # graphs not kept: one more forward with layer capture
            with self.op.probing():
                _, out, seen = self._forward(state.batch, capture=True)
            spec_index = {id(m): i for i, (_, m, _, _) in enumerate(self._layers_spec)}
            layers = []
            for layer in state.layers:
                call = seen.calls[spec_index[id(layer.module)]][0]
                layers.append(self._layer(layer.name, layer.module, layer.kind, layer.params, call.input.detach(),
                                          call.output))
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
                        part = state.weight * (lam * squares.double()).sum()
                        parts[-1] += part
                        if name in index:
                            parts[index[name]] += part

    def _add_per_sample_trace(self, state: _Batch, index: Dict[str, int], parts: torch.Tensor) -> None:
        """Add w_b Σ_i Σ_(p,c) λ_ipc ‖J_iᵀ u_ipc‖² from per-sample gradients: the directions
        √|λ_ipc| u_ipc at output position p (all samples at once, kept where some λ is nonzero),
        signed by λ."""
        n, npos, c = state.rows, state.positions, state.outputs
        lam = state.eigenvalues
        kept = [(pos, col) for pos in range(npos) for col in range(c) if bool(lam[:, pos, col].ne(0).any())]
        if not kept:
            return
        rows = max(1, _MAX_DIRECTION_ENTRIES // max(n * npos * c, 1))
        totals = torch.zeros(len(self.op.names), dtype=torch.float64, device=self.device)
        with self.op.probing():
            for start in range(0, len(kept), rows):
                block = kept[start:start + rows]
                directions = torch.zeros(n, len(block), npos, c, dtype=torch.float64, device=self.device)
                signs = torch.empty(n, len(block), dtype=torch.float64, device=self.device)
                for d, (pos, col) in enumerate(block):
                    directions[:, d, pos, :] = lam[:, pos, col].abs().sqrt().unsqueeze(-1) * \
                        state.eigenvectors[:, pos, :, col].double()
                    signs[:, d] = lam[:, pos, col].sign()
                directions = directions.reshape(n, len(block), *state.sample_shape)
                squares = state.per_sample.squares(directions.to(self.dtype))
                totals += torch.einsum("nd,ndt->t", signs, squares)
        totals *= state.weight
        for name, value in zip(self.op.names, totals):
            parts[index[name]] += value
        parts[-1] += totals.sum()

