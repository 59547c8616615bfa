"""Torch adapters for the controllers: each wraps any ``torch.optim`` optimizer.

:class:`ControlledOptimizer` drives any controller of :mod:`curvdiag.train.controllers`: before
each step it measures what the controller observes, updates the controller's state, then steps
with each group's learning rate multiplied by the state's ``factor`` by writing
``param_group["lr"]`` around ``optimizer.step()`` and putting the scheduled value back afterwards
(so schedulers keep working); it never patches ``optimizer.step`` and never changes the update
direction (only clipping, whose state carries ``gradient_scale``, rescales the gradient).
:class:`CurvatureThrottle` and :class:`NewtonLearningRate` are the two named adapters of the
public API. For a user's own loop::

    throttle = CurvatureThrottle(optimizer)          # family, threshold and κ read off the optimizer
    for x, y in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        throttle.step()                              # C_t from the last step, then optimizer.step()
        print(throttle.factor, throttle.curvature)   # s_t and Ĉ_t

Without a closure the directional curvature comes from consecutive mini-batch gradients at no
cost (biased upwards by batch noise, see :mod:`curvdiag.probes.directional`; the throttle counts it
up to twice its latest λmax floor); ``step(closure)`` with a closure
that returns the loss *of the current batch* evaluates the gradient at the new parameters on the
same batch (one extra forward and backward) and uses that instead.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from curvdiag.errors import BadArgument
from curvdiag.loading import optimizer as optimizer_state
from curvdiag.stability import family_of_group, stability_constant, throttle_kappa
from curvdiag.train import controllers
from curvdiag.train.controllers import Controller, Lookahead, Observation

Reduce = Callable[[torch.Tensor], torch.Tensor]
Closure = Callable[[], torch.Tensor]


def optimizer_preconditioner(optimizer: torch.optim.Optimizer, params: List[torch.Tensor],
                             grads: Optional[Sequence[torch.Tensor]] = None, flat: bool = False):
    """Adam's P = sqrt(v̂) + ε (:func:`curvdiag.loading.optimizer.adam_preconditioner`) read off a
    live optimizer, one tensor per parameter (``flat``: one flat vector of shape (n,)); None for a
    family without a preconditioner.

    Without ``grads``: from the optimizer's state (the P its last step used; None before the first
    step). With ``grads`` (per parameter, or one flat vector): the P the *next* step will use,
    v' = β2·v + (1 − β2)·g² bias-corrected with step + 1 — defined from the very first step, where
    Adam's update is about lr·sign(g). Computed on the concatenation (a handful of ops, not a
    handful per parameter tensor: the throttle asks every step), elementwise as per parameter."""
    group = optimizer.param_groups[0]
    family = family_of_group(group)
    if family is None or not family.preconditioned:
        return None
    beta2 = group["betas"][1]
    moments, steps = [], []
    for p in params:
        state = optimizer.state.get(p, {})
        v = state.get("exp_avg_sq")
        if v is None and grads is None:
            return None
        moments.append(torch.zeros_like(p) if v is None else v)  # β2·0 + (1 − β2)·g² is (1 − β2)·g², exactly
        steps.append((float(state["step"]) if "step" in state else 0.0) + (grads is not None))
    v = _flat(moments)
    if grads is not None:
        g = grads if isinstance(grads, torch.Tensor) else _flat(grads)
        v = beta2 * v + (1 - beta2) * g * g
    if len(set(steps)) == 1:
        result = optimizer_state.adam_preconditioner([v], steps[:1], beta2, group["eps"])[0]
    else:  # parameters that joined later: each its own bias correction
        result = _flat(optimizer_state.adam_preconditioner(_unflat(v, params), steps, beta2, group["eps"]))
    # Per parameter in its own dtype (the concatenation promotes a mixed bf16/fp32 model to fp32).
    return result if flat else [t.to(p.dtype) for t, p in zip(_unflat(result, params), params)]


def closure_gradient(closure: Closure, params: List[torch.Tensor],
                     reduce: Optional[Reduce] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(loss, ∇loss) of ``closure()`` at the parameters as they are, by ``torch.autograd.grad`` (no
    ``.grad`` is touched).

    Not the operator's ``gradient_at(θ)``: that one writes θ into the model and sums over the
    operator's batches; here the user's loop owns the batch, and the closure (this step's batch,
    at the weights the optimizer just wrote) is all there is. With ``reduce`` (data parallelism:
    the closure returns this rank's share of the global mean loss) loss and gradient are summed
    over the ranks in one collective on the flat [gradient, loss] buffer."""
    with torch.enable_grad():
        loss = closure()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    if reduce is None:
        return loss.detach(), grads
    flat = reduce(torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)]))
    return flat[-1], _unflat(flat[:-1], params)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


# Taking the batch noise out lowers C_t at most to this fraction of ‖ΔG‖/‖Δθ‖: one pair of batches is one
# draw of ‖ξ − ξ'‖², which can exceed its mean, and a C_t of 0 leaves the throttle blind until the next
# floor (on bench_peers' transformer, C_t came out 0 on many steps). With the floor's cap on C_t
# (controllers.NOISE_CAP) 1/2 changed no benchmark run. Without the cap, which `curvdiag train` drops,
# what the guard keeps of a noise-dominated C_t counts whole: at a safe rate, the schedule case from
# its checkpoint (lr 1, seeds 0–4) went from 1.00 to 1.08–1.09× the untouched run with 1/2 (mean
# factor 0.94) and stays at 1.00 with 1/4; the failing-rate runs (10 seeds, every case, both starts)
# and the transformer at safe rates came out the same with 1/4 as with 1/2.
NOISE_KEEPS = 0.25


def metric_curvature(d_theta: torch.Tensor, d_grad: torch.Tensor, preconditioner: Optional[torch.Tensor],
                     noise: float = 0.0, noise_gain: float = 0.0) -> float:
    """‖ΔG‖/‖Δθ‖, or for Adam ‖P^{-1/2}ΔG‖/‖P^{1/2}Δθ‖ (the curvature of P^{-1/2}HP^{-1/2}); flat
    vectors of shape (n,), summed in float64. ``noise``: E‖ξ − ξ'‖² in the same metric, the part of
    ‖ΔG‖² that two batches' gradients differ by at equal weights; ``noise_gain`` = c·ρ: the step Δθ was
    made from the previous batch's gradient, so it carries −c·ξ' (c the rate times the optimizer's
    weight on that gradient) and HΔθ correlates with ξ − ξ': E‖ΔG‖² = E‖HΔθ‖² + (1 + c·ρ)·E‖ξ − ξ'‖²
    with ρ = E[ξ'ᵀHξ'] / E‖ξ'‖² ≤ λmax. Only what exceeds (1 + noise_gain)·noise counts, down to
    :data:`NOISE_KEEPS` of the noisy value: sqrt(max(‖ΔG‖² − (1 + noise_gain)·noise, NOISE_KEEPS²·‖ΔG‖²))/‖Δθ‖."""
    g, t = d_grad.double(), d_theta.double()
    if preconditioner is None:
        squares = torch.stack([g.dot(g), t.dot(t)])
    else:
        p = preconditioner.double()
        squares = torch.stack([(g * g / p).sum(), (t * t * p).sum()])
    num, den = squares.tolist()
    return math.sqrt(max(num - (1.0 + noise_gain) * noise, NOISE_KEEPS ** 2 * num)) / (math.sqrt(den) + 1e-30)


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors as one new flat vector (a copy)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """A flat vector as views shaped like ``params``, one per parameter (the inverse of :func:`_flat`)."""
    return [piece.view_as(p) for piece, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


def scheduled_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the optimizer's schedule set for the next step: the largest over its groups
    (a controller's factor is applied inside :func:`apply_factor` only, so the groups hold this)."""
    return max(float(g["lr"]) for g in optimizer.param_groups)


def apply_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """optimizer.step() with every group's lr multiplied by ``factor``, then the lr put back."""
    base = [g["lr"] for g in optimizer.param_groups]
    try:
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * factor
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr


class ControlledOptimizer:
    """Any controller of :data:`curvdiag.train.controllers.CONTROLLERS` applied to a torch optimizer.

    ``step(closure, loss)``: ``.grad`` holds ∇L_t(θ_t); ``closure()`` returns the loss of the same
    batch at the current weights (needed by controllers that observe ``curvature`` on the same
    batch or the ``lookahead``: one extra forward and backward after the step), ``loss`` is
    L_t(θ_t) (the ``lookahead``). ``floor`` may be set from outside (a λmax estimate): the next
    step reads it once (the throttle's Ĉ then decays from it like from any C). So may
    ``batch_noise`` (E‖ξ_t − ξ_{t−1}‖², the batch noise in two consecutive batches' gradients, in
    the step's metric): the consecutive C_t then counts only the part of ‖ΔG‖² above it.
    After a step, ``curvature`` is what the step measured along itself: C_t in the optimizer's
    metric when the controller observes it, else ⟨Δθ, ΔG⟩/‖Δθ‖² from the lookahead, else None.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, controller: Controller, reduce: Optional[Reduce] = None):
        self.optimizer, self.controller = optimizer, controller
        self.reduce = reduce  # data parallelism: sums the closure's loss and gradient over ranks
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.state = controller.init(self._lr())
        self.floor: Optional[float] = None  # an external λmax estimate for the next step may be set here
        self.batch_noise = 0.0  # an external E‖ξ_t − ξ_{t−1}‖² in the metric: consecutive C_t counts what exceeds it
        self.noise_free = False  # set from outside: batch_noise is all the noise in C_t (the controller counts C_t whole)
        self.curvature: Optional[float] = None
        self._previous: Optional[tuple] = None
        # The last step's rate on its newest gradient, max over groups of η_g·s·w_g (:meth:`_noise_gain`).
        self.step_rate = 0.0

    def memory(self) -> Optional[tuple]:
        """The previous step's (θ, G) per parameter that the next consecutive C_t compares with, or None."""
        if self._previous is None or self._previous[0] is None:
            return None
        return tuple(_unflat(flat, self.params) for flat in self._previous)

    def load_memory(self, memory: Optional[tuple]) -> None:
        """Continue from a :meth:`memory` (a resumed run): the first step then measures C_t as the
        uninterrupted run would."""
        if memory is not None:
            theta, grads = memory
            if len(theta) != len(self.params) or len(grads) != len(self.params) or any(
                    not isinstance(t, torch.Tensor) or t.shape != p.shape for t, p in zip(list(theta) + list(grads), self.params + self.params)):
                raise ValueError("a controller memory holds (θ, G) shaped like the optimizer's parameters")
            memory = (_flat(theta), _flat(grads))
        self._previous = memory

    @property
    def factor(self) -> float:
        """The factor on the scheduled learning rate of the last step."""
        return self.state.factor

    @property
    def measures_step(self) -> bool:
        """Whether the controller observes the step on its batch (``curvature`` is then set)."""
        return bool(self.controller.observes & {"curvature", "lookahead"})

    def _lr(self) -> float:
        return scheduled_lr(self.optimizer)

    def step(self, closure: Optional[Closure] = None, loss: Optional[float] = None) -> Optional[torch.Tensor]:
        """Observe, update the controller, step; then, with a closure, measure the step."""
        observes, measures_step = self.controller.observes, self.measures_step
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in self.params] if measures_step else None
        # Flat copies (one op each, not one per parameter: this runs every step of a tiny model too).
        flat_grads = _flat(grads) if measures_step else None
        flat_theta = _flat([p.detach() for p in self.params]) if measures_step else None
        # The metric of the step about to be taken (Adam: the P this step will use).
        metric = optimizer_preconditioner(self.optimizer, self.params, flat_grads, flat=True) if "curvature" in observes else None
        if "curvature" in observes and self._previous is not None and closure is None:
            prev_theta, prev_grads = self._previous
            self.curvature = metric_curvature(flat_theta - prev_theta, flat_grads - prev_grads, metric, self.batch_noise,
                                              self._noise_gain())
        lr = self._lr()
        self.state = self.controller.update(self.state, self._observe(lr, observes))
        self._scale_gradients(getattr(self.state, "gradient_scale", 1.0))
        step_rate = self._newest_gradient_rate(self.state.factor) if measures_step else 0.0
        apply_factor(self.optimizer, self.state.factor)
        self.step_rate = step_rate
        self._previous = (flat_theta, flat_grads)
        if closure is None or not measures_step:
            return None
        new_loss, new_grads = closure_gradient(closure, self.params, self.reduce)
        d_theta = _flat([p.detach() for p in self.params]) - flat_theta
        new_flat_grads = _flat(new_grads)
        if "curvature" in observes:
            self.curvature = metric_curvature(d_theta, new_flat_grads - flat_grads, metric)
        else:  # a lookahead is folded in as soon as it is measured (controllers module docstring)
            self.state = self.controller.update(self.state, self._lookahead(lr, loss, float(new_loss), flat_grads,
                                                                            new_flat_grads, d_theta))
        return new_loss

    def _newest_gradient_rate(self, factor: float) -> float:
        """c of :meth:`_noise_gain` for the step about to be taken: max over the param groups of η_g·s·w_g,
        w_g the weight of the newest gradient in torch's SGD update (1 without momentum; with momentum β
        and dampening d, 1 − d, or 1 + β(1 − d) under Nesterov, and 1 or 1 + β on a group's first step,
        whose buffer torch sets to the gradient undamped); the largest, so the noise is not taken out
        short. 0 for a family other than SGD's."""
        rate = 0.0
        for group in self.optimizer.param_groups:
            family = family_of_group(group)
            if family is None or family.preconditioned:
                return 0.0
            beta, dampening = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
            params = group["params"]
            first = not params or "momentum_buffer" not in self.optimizer.state.get(params[0], {})
            damped = 1.0 if first else 1.0 - dampening
            weight = 1.0 if beta == 0 else (1.0 + beta * damped if group.get("nesterov") else damped)
            rate = max(rate, float(group["lr"]) * factor * weight)
        return rate

    def _noise_gain(self) -> float:
        """c·ρ̂ of :func:`metric_curvature` for the last step, under SGD (with or without momentum): c =
        :attr:`step_rate`, the rate that step put on its newest gradient (:meth:`_newest_gradient_rate`,
        taken when the step was: a scheduler has moved the lr since), and ρ̂ the
        throttle's latest floor, the bound ρ ≤ λmax (ρ = λmax where the noise lies along the top
        eigenvector; for a cross-entropy loss, whose noise covariance is about its Hessian, ρ ≈
        tr H²/tr H). 0 without a floor yet and for the Adam family: there, with ρ̂ the preconditioned
        floor, bench_peers' Adam case from its checkpoint at the failing lr went from 0.38 to 0.58×
        the tuned loss (geometric mean of 20 seeds, 2 above 1.5 against none), and at its safe lr
        from 0.96 to 1.04× the untouched run (seeds 0–4, both starts)."""
        floor = getattr(self.state, "floor", math.inf)
        return self.step_rate * floor if math.isfinite(floor) and floor > 0 else 0.0

    def _observe(self, lr: float, observes: frozenset) -> Observation:
        grad_norm = None
        if "grad_norm" in observes:
            grad_norm = float(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                                         for p in self.params]).norm())
        floor, self.floor = self.floor, None  # a floor is one measurement: it enters Ĉ once, then decays with it
        return Observation(lr=lr, grad_norm=grad_norm, curvature=self.curvature, floor=floor, noise_free=self.noise_free)

    def _scale_gradients(self, scale: float) -> None:
        if scale != 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.detach().mul_(scale)

    def _lookahead(self, lr: float, loss: Optional[float], new_loss: float, grads: torch.Tensor,
                   new_grads: torch.Tensor, d_theta: torch.Tensor) -> Observation:
        """The step's lookahead (flat vectors), ω = −Δθ/α with α the lr the step took; sets
        ``curvature`` to the Rayleigh form ⟨Δθ, ΔG⟩/‖Δθ‖² = (c0 − c1)/(α‖ω‖²)."""
        if loss is None:
            raise BadArgument("loss", loss, "the lookahead needs L(θ_t) of the step's batch")
        alpha = lr * self.state.factor
        omega = -d_theta / alpha
        c0, c1 = _dot(grads, omega), _dot(new_grads, omega)
        omega_sq = _dot(omega, omega)
        self.curvature = (c0 - c1) / (alpha * omega_sq) if omega_sq > 0 else None
        return Observation(lr=lr, lookahead=Lookahead(float(loss), new_loss, c0, c1))


class CurvatureThrottle(ControlledOptimizer):
    """Wraps a torch optimizer with the curvature throttle (DESIGN §3.8)."""

    def __init__(self, optimizer: torch.optim.Optimizer, kappa: Optional[float] = None, decay: float = 0.95,
                 constant: Optional[float] = None, reduce: Optional[Reduce] = None, engage: str = "edge"):
        """``kappa`` None: κ = √(1 − β) for the optimizer's momentum β (:func:`curvdiag.stability.throttle_kappa`);
        ``engage``: "edge" leaves the optimizer's rate alone until η·λ̂ first exceeds T, "always" holds
        κ of the edge from the first step (:data:`curvdiag.train.controllers.ENGAGE_MODES`)."""
        info = optimizer_state.from_optimizer(optimizer)
        if constant is None and info.family is not None:
            constant = stability_constant(info.family, info.momentum, info.betas[0] if info.betas else 0.9)
        if constant is None:
            raise BadArgument("constant", None, f"no stability threshold known for {type(optimizer).__name__}",
                              hint="pass constant=T")
        self.constant, self.kappa, self.decay = constant, throttle_kappa(info.beta) if kappa is None else kappa, decay
        super().__init__(optimizer, controllers.throttle(constant, self.kappa, decay, engage=engage), reduce)

    def step(self, closure: Optional[Closure] = None) -> Optional[torch.Tensor]:
        return super().step(closure)


class NewtonLearningRate(ControlledOptimizer):
    """Wraps a torch optimizer with the Newton-like learning rate of seed 001 (DESIGN §3.9).

    ``step(loss, closure)``: ``loss`` is L(θ_t) on the current batch with gradients in ``.grad``;
    α_t is updated from the previous step's lookahead, the optimizer steps with lr α_t to
    θ' = θ_t − α_t ω_t, and ``closure()`` re-evaluates the loss of the same batch at θ' (one extra
    forward and backward): the lookahead the next step's α reads. Returns L(θ').
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float = 1e-3, eps: float = 1e-9,
                 alpha_min: float = 1e-8, alpha_max: float = 10.0, form: str = "loss",
                 reduce: Optional[Reduce] = None):
        controller = controllers.newton(gamma=gamma, eps=eps, alpha_min=alpha_min, alpha_max=alpha_max, form=form)
        super().__init__(optimizer, controller, reduce)

    def step(self, loss: float, closure: Closure) -> float:
        return float(super().step(closure, loss))
