"""Torch adapters for the controllers: each wraps any ``torch.optim`` optimizer.

:class:`ControlledOptimizer` scales each step's learning rate by the controller's factor by
writing ``param_group["lr"]`` around ``optimizer.step()`` and putting the scheduled value back
afterwards (so schedulers keep working); it never patches ``optimizer.step`` and never changes
the update direction. Public API for a user's own loop::

    throttle = CurvatureThrottle(optimizer)          # family and threshold read off the optimizer
    for x, y in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        throttle.step()                              # C_t from the last step, then optimizer.step()
        print(throttle.factor, throttle.curvature)   # s_t and Ĉ_t

Without a closure the directional curvature comes from consecutive mini-batch gradients (free,
biased upwards by batch noise: see :mod:`curvdiag.probes.directional`); ``step(closure)`` with a closure
that returns the loss *of the current batch* evaluates the gradient at the new parameters on the
same batch (one extra forward and backward) and uses that instead.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch

from curvdiag.loading import optimizer as optimizer_state
from curvdiag.train import controllers
from curvdiag.stability import stability_constant


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: List[torch.Tensor],
                        grads: Optional[List[torch.Tensor]] = None) -> Optional[List[torch.Tensor]]:
    """P = sqrt(v̂) + ε per parameter for an Adam-family optimizer; None for other optimizers.

    Without ``grads``: from the optimizer's state (the P its last step used; None before the first
    step). With ``grads``: the P the *next* step will use, v' = β2·v + (1 − β2)·g² bias-corrected
    with step + 1 — defined from the very first step, where Adam's update is about lr·sign(g).
    """
    group = optimizer.param_groups[0]
    if "betas" not in group:
        return None
    beta2, eps = group["betas"][1], group["eps"]
    out = []
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        v = state.get("exp_avg_sq")
        step = float(state["step"]) if "step" in state else 0.0
        if grads is not None:
            g = grads[i]
            v = (1 - beta2) * g * g if v is None else beta2 * v + (1 - beta2) * g * g
            step += 1
        elif v is None:
            return None
        out.append((v / (1 - beta2 ** step)).sqrt() + eps)
    return out


Reduce = Callable[[torch.Tensor], torch.Tensor]


def gradient_at(closure: Callable[[], torch.Tensor], params: List[torch.Tensor],
                reduce: Optional[Reduce] = None) -> "tuple[torch.Tensor, List[torch.Tensor]]":
    """(loss, ∇loss) of ``closure()`` at the current parameters, by ``torch.autograd.grad`` (no
    ``.grad`` is touched). With ``reduce`` (data parallelism: the closure returns this rank's share
    of the global mean loss) loss and gradient are summed over the ranks in one collective on
    the flat [gradient, loss] buffer."""
    with torch.enable_grad():
        loss = closure()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    if reduce is None:
        return loss.detach(), grads
    flat = reduce(torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)]))
    pieces = list(torch.split(flat[:-1], [p.numel() for p in params]))
    return flat[-1], [piece.view_as(p) for piece, p in zip(pieces, params)]


def metric_curvature(d_theta: List[torch.Tensor], d_grad: List[torch.Tensor], preconditioner: Optional[List[torch.Tensor]]) -> float:
    """‖ΔG‖/‖Δθ‖, or for Adam ‖P^{-1/2}ΔG‖/‖P^{1/2}Δθ‖ (the curvature of P^{-1/2}HP^{-1/2})."""
    if preconditioner is None:
        num = sum(float(g.double().pow(2).sum()) for g in d_grad)
        den = sum(float(t.double().pow(2).sum()) for t in d_theta)
    else:
        num = sum(float((g.double().pow(2) / p.double()).sum()) for g, p in zip(d_grad, preconditioner))
        den = sum(float((t.double().pow(2) * p.double()).sum()) for t, p in zip(d_theta, preconditioner))
    return math.sqrt(num) / (math.sqrt(den) + 1e-30)


class CurvatureThrottle:
    """Wraps a torch optimizer with the curvature throttle (DESIGN §3.8)."""

    def __init__(self, optimizer: torch.optim.Optimizer, kappa: float = 0.5, decay: float = 0.95,
                 constant: Optional[float] = None, reduce: Optional[Reduce] = None):
        self.optimizer = optimizer
        self.reduce = reduce  # data parallelism: sums the closure's loss and gradient over ranks
        info = optimizer_state.from_optimizer(optimizer)
        if constant is None:
            if info.family is None:
                raise ValueError(f"no stability threshold known for {type(optimizer).__name__}: pass constant=T")
            constant = stability_constant(info.family, info.momentum, info.betas[0] if info.betas else 0.9)
        self.constant = constant
        self.kappa, self.decay = kappa, decay
        self.adaptive = info.is_adaptive
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.state = controllers.throttle_init()
        self.floor: Optional[float] = None  # an external λmax estimate may be set here
        self._previous: Optional[tuple] = None
        self.curvature: Optional[float] = None

    @property
    def factor(self) -> float:
        return self.state.factor

    def _lr(self) -> float:
        return max(float(g["lr"]) for g in self.optimizer.param_groups)

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]
        theta = [p.detach().clone() for p in self.params]
        # The metric of the step about to be taken (Adam: the P this step will use).
        preconditioner = adam_preconditioner(self.optimizer, self.params, grads) if self.adaptive else None
        if self._previous is not None and closure is None:
            prev_theta, prev_grads = self._previous
            self.curvature = metric_curvature([a - b for a, b in zip(theta, prev_theta)],
                                              [a - b for a, b in zip(grads, prev_grads)], preconditioner)
        self.state = controllers.throttle_update(self.state, self.curvature, self._lr(), self.constant,
                                                 self.kappa, self.decay, self.floor)
        apply_factor(self.optimizer, self.state.factor)
        self._previous = (theta, grads)
        if closure is not None:
            loss, new_grads = gradient_at(closure, self.params, self.reduce)
            self.curvature = metric_curvature([p.detach() - t for p, t in zip(self.params, theta)],
                                              [a - b for a, b in zip(new_grads, grads)], preconditioner)
            return loss
        return None


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


class NewtonLearningRate:
    """Wraps a torch optimizer with the Newton-like learning rate of seed 001 (DESIGN §3.9).

    ``step(loss, closure)``: ``loss`` is L(θ_t) on the current batch with gradients in ``.grad``;
    the optimizer steps with lr α_t to θ' = θ_t − α_t ω_t, ``closure()`` re-evaluates the loss of
    the same batch at θ' (one extra forward and backward), and α is updated for the next step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float = 1e-3, eps: float = 1e-9,
                 alpha_min: float = 1e-8, alpha_max: float = 10.0, form: str = "loss",
                 reduce: Optional[Reduce] = None):
        self.optimizer = optimizer
        self.reduce = reduce  # data parallelism: sums the closure's loss and gradient over ranks
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.state = controllers.newton_init(max(float(g["lr"]) for g in optimizer.param_groups))
        self.settings = dict(gamma=gamma, eps=eps, alpha_min=alpha_min, alpha_max=alpha_max, form=form)
        self.curvature: Optional[float] = None  # ω-direction curvature (c0 − c1)/(α‖ω‖²)

    @property
    def factor(self) -> float:
        """α_t relative to the optimizer's (scheduled) learning rate."""
        base = max(float(g["lr"]) for g in self.optimizer.param_groups)
        return self.state.alpha / base if base > 0 else 1.0

    def step(self, loss: float, closure: Callable[[], torch.Tensor]) -> float:
        alpha = self.state.alpha
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]
        theta = [p.detach().clone() for p in self.params]
        apply_factor(self.optimizer, self.factor)
        omega = [(t - p.detach()) / alpha for t, p in zip(theta, self.params)]
        look, new_grads = gradient_at(closure, self.params, self.reduce)
        c0 = sum(float(torch.dot(g.reshape(-1).double(), w.reshape(-1).double())) for g, w in zip(grads, omega))
        c1 = sum(float(torch.dot(g.reshape(-1).double(), w.reshape(-1).double())) for g, w in zip(new_grads, omega))
        omega_sq = sum(float(w.double().pow(2).sum()) for w in omega)
        self.curvature = (c0 - c1) / (alpha * omega_sq) if omega_sq > 0 else None
        look_value = float(look.detach())
        self.state = controllers.newton_update(self.state, float(loss), look_value, c0, c1, **self.settings)
        return look_value
