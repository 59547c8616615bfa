"""HesScale: a backward recursion of Hessian diagonals (seed 002; DESIGN §3.10).

Becker & LeCun (1989) passed the diagonal of the Hessian w.r.t. each layer's output backwards,
dropping off-diagonal terms; HesScale (Elsayed, Mahmood, Dangel, Farrahi) starts it from the
*full* per-sample Hessian A_n of the loss w.r.t. the model output, so the last layer is exact.
Cost (benchmarks/bench_hesscale.py): about 2 gradients (1.8–2.0× on the tanh MLP and the BN CNN
samples, close to one Hessian-vector product): one forward, D products through the loss alone
(D = outputs per sample), one backward for the activations' gradients, one backward-like sweep.

Per batch (the operator's ``for_each_batch``, weighted by w_b; the sum over batches and ranks
goes through the operator's ``sum_over_ranks``, so several processes match one):

1. ``loss_fn(model, batch)`` runs inside the operator's ``probing()`` with hooks recording every
   layer's input and output. A_n, the full per-sample Hessian of the loss w.r.t. the output, comes
   from :func:`~curvdiag.curvature.output_hessian.output_hessian` (double-backward products through
   the loss alone; that the loss is a sum of per-sample terms, A block diagonal over dim 0, is
   checked with one more product along a random direction); that the loss reaches the parameters
   only through the output, by walking its autograd graph.
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
elementwise activations in ``ACTIVATIONS``, Identity, Flatten, Dropout (eval), MaxPool2d,
AvgPool2d, AdaptiveAvgPool2d, AdaptiveMaxPool2d and BatchNorm1d/2d/3d in eval mode. Parameter-
free layers without a rule after the last layer with parameters (LogSoftmax, Softmax, ...) are
folded into the loss: A is then taken w.r.t. that layer's output. Anything else raises
:class:`~curvdiag.errors.NotCovered` naming it, rather than returning a wrong number. The rules
form a registry keyed by the exact module type (:mod:`curvdiag.probes.hesscale_rules`, as
BackPACK's per-layer second-order extensions do): a subclass may override ``forward`` and is
not covered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.curvature.output_hessian import Recording, output_hessian, recording
from curvdiag.errors import NotCovered
from curvdiag.probes.hesscale_rules import RULES, Full, Record, Rule, State

Tensor = torch.Tensor


@dataclass
class HesScaleResult:
    diagonal: torch.Tensor  # flat (op.num_params,), same layout as op.layer_slices()
    seconds: float
    # Names (op.names) whose diagonal is exact up to rounding (see the module docstring).
    exact_parameters: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- model checks
def _layers(model: nn.Module) -> List[nn.Module]:
    """The leaves of an nn.Sequential, nested Sequentials flattened (exact types only)."""
    if type(model) is not nn.Sequential:
        if type(model) in RULES:
            return [model]
        raise NotCovered(f"{type(model).__name__} (not an nn.Sequential of covered layers)")
    out: List[nn.Module] = []
    for child in model._modules.values():  # not children(): it hides a module listed twice
        if child is None:
            continue
        if type(child) is nn.Sequential:
            out.extend(_layers(child))
        else:
            out.append(child)
    return out


def _check_model(op: CurvatureOperator) -> Tuple[List[nn.Module], List[Rule], bool]:
    """The layers the recursion walks, their rules, and whether a tail was folded into the loss.

    Parameter-free layers after the last layer with parameters that have no rule (LogSoftmax,
    Softmax, ...) are left out: the recursion then starts from the Hessian w.r.t. the output
    of the last layer with parameters, of the loss with those layers folded in."""
    layers = _layers(op.model)
    if not layers:
        raise NotCovered("an empty nn.Sequential")
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
            raise NotCovered(type(m).__name__)
        reason = rule.static_reason(m)
        if reason:
            raise NotCovered(reason)
        rules.append(rule)
    if len({id(m) for m in layers}) != len(layers):
        raise NotCovered("a layer used twice (tied weights)")
    owned: Dict[int, nn.Module] = {}
    for m, rule in zip(layers, rules):
        for _, p in rule.params(m):
            if id(p) in owned:
                raise NotCovered("tied weights (one parameter in two layers)")
            owned[id(p)] = m
    for name, p in zip(op.names, op.params):
        if id(p) not in owned:
            raise NotCovered(f"parameter {name} is not a Linear/Conv2d/BatchNorm weight or bias")
    return layers, rules, folded


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


# ---------------------------------------------------------------------------- the probe
def _recorded_batch(op: CurvatureOperator, layers: List[nn.Module], rules: List[Rule], folded: bool,
                    batch: Any) -> Tuple[Tensor, Tensor, List[Record]]:
    """(loss, the tensor the recursion starts at, each layer's record) of one batch, every
    assumption about the forward pass checked (inside the operator's probing())."""
    with torch.enable_grad(), recording(op.model, layers) as seen:
        loss = op.batch_loss(batch)
    if len(seen.outputs) != 1:
        raise NotCovered(f"loss_fn calls the model {len(seen.outputs)} times per batch (once is covered)")
    if not isinstance(seen.outputs[0], Tensor) or seen.outputs[0].dim() < 1:
        raise NotCovered("the model output is not a batched tensor")
    n = seen.outputs[0].shape[0]
    records = _records(seen, len(layers))
    # The Hessian starts at the last walked layer's output: the model output, or before a tail
    # of uncovered parameter-free layers that counts as part of the loss.
    out = records[-1].y
    if not isinstance(out, Tensor) or (not folded and out is not seen.outputs[0]):
        raise NotCovered("the model output is not its last layer's output")
    for m, rule, rec in zip(layers, rules, records):
        if rec.calls != 1 or rec.x is None or not isinstance(rec.y, Tensor):
            raise NotCovered(f"{type(m).__name__} is not called once on a tensor per forward pass")
        if rec.x.dim() < 1 or rec.x.shape[0] != n or rec.y.dim() < 1 or rec.y.shape[0] != n:
            raise NotCovered(f"{type(m).__name__} changes the sample dimension")
        reason = rule.runtime_reason(m, rec)
        if reason:
            raise NotCovered(reason)
    if not loss.requires_grad:
        raise NotCovered("the loss does not depend on the model output")
    if _reaches_parameters_besides(loss, out, op.params):
        raise NotCovered("the loss depends on the parameters other than through the model output")
    return loss, out, records


def _records(seen: Recording, count: int) -> List[Record]:
    """What each of ``count`` layers saw in its (last) call, as the rules read it."""
    records = [Record() for _ in range(count)]
    for i, rec in enumerate(records):
        calls = seen.calls.get(i, [])
        rec.calls = len(calls)
        if calls:
            x, rec.y, rec.training = calls[-1]
            rec.x_graph = x if isinstance(x, Tensor) else None
            rec.x = None if rec.x_graph is None else rec.x_graph.detach()
    return records


def _accumulate_batch(op: CurvatureOperator, layers: List[nn.Module], rules: List[Rule], folded: bool,
                      batch: Any, weight: float, total: Tensor, slices: Dict[int, Tuple[int, int]],
                      inexact: Dict[int, bool]) -> None:
    """Add w_b × this batch's HesScale diagonal to ``total``; mark in ``inexact`` the parameters
    whose diagonal dropped an off-diagonal term on this batch."""
    loss, out, records = _recorded_batch(op, layers, rules, folded, batch)
    hessian = output_hessian(loss, out)
    first = min(i for i, (m, rule) in enumerate(zip(layers, rules)) if any(id(p) in slices for _, p in rule.params(m)))
    needs = [i for i in range(first + 1, len(layers)) if rules[i].needs_grad(layers[i])]
    if needs:
        grads = torch.autograd.grad(out, [records[i].y for i in needs], grad_outputs=hessian.gradient,
                                    allow_unused=True, retain_graph=True)  # pooling nodes are reused below
        for i, g in zip(needs, grads):
            records[i].g = torch.zeros_like(records[i].y) if g is None else g.detach()
    del loss

    with torch.no_grad():
        state: State = Full(hessian.blocks, out.shape[1:])
        for i in range(len(layers) - 1, first - 1, -1):
            m, rule, rec = layers[i], rules[i], records[i]
            if isinstance(state, Full) and not rule.handles_full:
                state = state.low_rank()
            named = rule.params(m)
            if named:
                diagonals, is_exact = rule.param_diagonals(m, rec, state)
                for name, p in named:
                    if id(p) in slices:
                        start, stop = slices[id(p)]
                        total[start:stop].add_(diagonals[name].reshape(-1).to(total.dtype), alpha=weight)
                        inexact[id(p)] = inexact.get(id(p), False) or not is_exact
            if i > first:
                state = rule.backpropagate(m, rec, state)


def hesscale_diag(op: CurvatureOperator) -> HesScaleResult:
    """HesScale's approximation of diag(H) of the operator's loss, flat in ``op``'s layout:
    Σ_b w_b diag_b over the operator's batches and ranks (one collective, with the exactness).

    Raises :class:`~curvdiag.errors.NotCovered` for models or losses the recursion does not
    cover (on every rank together)."""
    started = time.perf_counter()
    layers, rules, folded = _check_model(op)
    slices = {id(p): (start, stop) for p, (_, start, stop) in zip(op.params, op.layer_slices())}
    total = torch.zeros(op.num_params, device=op.device, dtype=op.dtype)
    inexact: Dict[int, bool] = {}
    with op.covered_on_every_rank():
        for weight, batch in op.for_each_batch():
            _accumulate_batch(op, layers, rules, folded, batch, weight, total, slices, inexact)
    # Per parameter: batches seen and batches on which its diagonal was not exact, over all ranks.
    counts = [float(n) for p in op.params for n in (id(p) in inexact, inexact.get(id(p), False))]
    summed = op.sum_over_ranks(torch.cat([total, total.new_tensor(counts)]))
    seen, not_exact = summed[op.num_params:].view(-1, 2).unbind(1)
    names = [name for name, s, x in zip(op.names, seen.tolist(), not_exact.tolist()) if s > 0 and x == 0]
    return HesScaleResult(summed[:op.num_params], time.perf_counter() - started, names)
