"""One optimizer step simulated from a checkpoint: θ_{t+1} from θ_t, G_t and the optimizer state.

Used by the directional-curvature probe when no ``--previous`` checkpoint is given. The step is
taken by the run's own optimizer class (the recipe's ``optimizer(params)``, else one built from
the known family: the torch class the table :data:`curvdiag.stability.OPTIMIZER_FAMILIES`
names), with the checkpoint's optimizer state (momentum buffers, Adam moments) when
present and the learning rate in use. The model's parameters, their ``.grad`` and the
checkpoint's state are all left as they were.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch

from curvdiag.loading.target import Target
from curvdiag.stability import OPTIMIZER_FAMILIES


def _build_optimizer(target: Target, params: list) -> Optional[torch.optim.Optimizer]:
    info = target.optimizer
    if target.recipe.has("optimizer") and "optimizer from flags" not in info.source and info.source != "flags":
        return target.recipe.optimizer(params)
    if info.family is None or info.lr is None:
        return None
    optimizer_class = getattr(torch.optim, OPTIMIZER_FAMILIES[info.family].torch_class)
    return optimizer_class(params, lr=info.lr, **info.torch_options())


def simulate_step(target: Target, op) -> Tuple[Optional[torch.Tensor], str]:
    """(θ_{t+1} flat, description) or (None, reason it cannot be simulated)."""
    # The step is taken on copies of the parameters: the model's tensors, their version counters
    # (a graph the caller still holds) and their ``.grad`` objects are never touched.
    params = [torch.nn.Parameter(p.detach().clone()) for p in op.params]
    optimizer = _build_optimizer(target, params)
    if optimizer is None:
        return None, "no optimizer to take a step from (give --previous CKPT, or --optimizer and --lr)"
    note = "optimizer state from the checkpoint"
    state = target.checkpoint.optimizer_state if target.checkpoint else None
    if state is not None:
        try:
            optimizer.load_state_dict(copy.deepcopy(state))
        except (ValueError, KeyError, RuntimeError) as exc:
            note = f"checkpoint optimizer state not usable, fresh state: {str(exc).splitlines()[0][:80]}"
    else:
        note = "fresh optimizer state: the checkpoint has none"
    if target.optimizer.lr is not None and "flags" in target.optimizer.source:
        for group in optimizer.param_groups:  # --lr overrides every group
            group["lr"] = target.optimizer.lr
    for p, g in zip(params, op.unflatten(op.gradient())):
        p.grad = g.clone()
    optimizer.step()
    theta_next = op.flatten([p.detach() for p in params])
    return theta_next, f"one simulated {type(optimizer).__name__} step ({note})"
