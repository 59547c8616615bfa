"""Directional curvature C_t: the curvature along the step the optimizer just took (seed 000,
DESIGN §3.4).

Between θ_{t−1} and θ_t with gradients G_{t−1}, G_t on the *same* batches:

    C_t = ‖G_t − G_{t−1}‖ / (‖θ_t − θ_{t−1}‖ + ε),     rayleigh_t = ⟨Δθ, ΔG⟩ / ‖Δθ‖².

For a quadratic ΔG = HΔθ, so C_t = ‖HΔθ‖/‖Δθ‖ ≤ max|λ_i| and rayleigh_t ∈ [λmin, λmax]
(negative: the step ran along negative curvature). Per layer ℓ the same with θ_ℓ, G_ℓ; the
global values come from the per-layer sums of squares and inner products, never from ratios.

Batch noise: inside a training loop the free estimate uses consecutive mini-batches B_t ≠ B_{t−1}.
Then ΔG = HΔθ + (ξ_t − ξ_{t−1}) with ξ the batch's gradient noise (covariance Σ/b at batch size
b), so E‖ΔG‖² ≈ ‖HΔθ‖² + 2 tr(Σ)/b: the estimate is biased *upwards* by a factor
√(1 + 2 tr(Σ)/(b‖HΔθ‖²)), worst when steps are small. Same-batch gradients (what ``probe`` uses,
and what :class:`DirectionalCurvatureTracker` gets when consecutive steps share a batch, as in
full-batch GD) have no such bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

EPS = 1e-12


@dataclass
class LayerCurvature:
    name: str
    value: float
    rayleigh: Optional[float]  # None when the layer did not move
    step_norm: float


@dataclass
class DirectionalCurvature:
    value: float  # C_t
    rayleigh: float
    step_norm: float  # ‖Δθ‖
    gradient_change_norm: float  # ‖ΔG‖
    layers: List[LayerCurvature] = field(default_factory=list)


def directional_curvature(
    theta_prev: torch.Tensor,
    theta: torch.Tensor,
    grad_prev: torch.Tensor,
    grad: torch.Tensor,
    slices: Optional[Sequence[Tuple[str, int, int]]] = None,
    eps: float = EPS,
) -> DirectionalCurvature:
    """C_t and the Rayleigh form from flat vectors (all shape (n,)); ``slices`` are (name, start,
    stop) per layer (default: one layer, "all")."""
    d_theta = (theta - theta_prev).double()
    d_grad = (grad - grad_prev).double()
    slices = slices or [("all", 0, d_theta.numel())]
    layers = []
    step_sq = change_sq = inner = 0.0
    for name, a, b in slices:
        s_sq = float(d_theta[a:b].pow(2).sum())
        c_sq = float(d_grad[a:b].pow(2).sum())
        dot = float(torch.dot(d_theta[a:b], d_grad[a:b]))
        step_sq, change_sq, inner = step_sq + s_sq, change_sq + c_sq, inner + dot
        layers.append(LayerCurvature(name, math.sqrt(c_sq) / (math.sqrt(s_sq) + eps),
                                     dot / s_sq if s_sq > 0 else None, math.sqrt(s_sq)))
    step, change = math.sqrt(step_sq), math.sqrt(change_sq)
    return DirectionalCurvature(
        value=change / (step + eps),
        rayleigh=inner / step_sq if step_sq > 0 else 0.0,
        step_norm=step,
        gradient_change_norm=change,
        layers=layers,
    )


class DirectionalCurvatureTracker:
    """C_t inside a training loop at no extra gradient cost: remembers the previous (θ, G).

    Usage, after ``loss.backward()`` and before ``optimizer.step()``::

        tracker = DirectionalCurvatureTracker(model)
        ...
        c = tracker.update()   # None on the first call; a DirectionalCurvature afterwards

    It reads the parameters and their ``.grad``; it never writes them. With mini-batches the
    estimate carries the batch-noise bias described in the module docstring.
    """

    def __init__(self, model: torch.nn.Module, eps: float = EPS):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.eps = eps
        self._previous: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.slices, start = [], 0
        for n, p in named:
            self.slices.append((n, start, start + p.numel()))
            start += p.numel()

    def _flat(self, grads: bool) -> torch.Tensor:
        pieces = []
        for p in self.params:
            t = p.grad if grads else p
            pieces.append(torch.zeros_like(p).reshape(-1) if t is None else t.detach().reshape(-1))
        return torch.cat(pieces).clone()

    def state(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """What the next :meth:`update` compares with: the previous (θ, G) flattened, or None."""
        return self._previous

    def load_state(self, state: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Continue from a :meth:`state` (a resumed training run)."""
        if state is not None:
            n = self.slices[-1][2] if self.slices else 0
            if len(state) != 2 or any(not isinstance(t, torch.Tensor) or t.shape != (n,) for t in state):
                raise ValueError(f"a directional-curvature state holds two vectors of {n} numbers")
        self._previous = None if state is None else (state[0], state[1])

    def update(self) -> Optional[DirectionalCurvature]:
        theta, grad = self._flat(grads=False), self._flat(grads=True)
        previous, self._previous = self._previous, (theta, grad)
        if previous is None:
            return None
        return directional_curvature(previous[0], theta, previous[1], grad, self.slices, self.eps)
