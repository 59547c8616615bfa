"""What the run's optimizer tells the probes: family, learning rate, momentum, Adam moments.

Sources, in order of precedence: command-line flags, the checkpoint's optimizer state, the
recipe's ``optimizer(params)``. Adam's second moments (``exp_avg_sq``) come only from a
checkpoint; they define the preconditioner P = diag(sqrt(v / (1 - β2^t)) + ε) of DESIGN §3.2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from curvdiag.errors import BadInput

FAMILIES = ("sgd", "momentum", "nesterov", "adam", "adamw")


@dataclass
class OptimizerInfo:
    """The optimizer settings that decide the stability threshold (DESIGN §3.7)."""

    family: Optional[str]  # one of FAMILIES, or None when unknown
    lr: Optional[float]
    momentum: float = 0.0
    betas: Optional[tuple] = None
    eps: float = 1e-8
    source: str = "none"  # "flags", "checkpoint", "recipe", "none", or a combination
    name: Optional[str] = None  # e.g. "SGD", "AdamW" as far as known
    step: Optional[int] = None
    # Adam's exp_avg_sq per trainable parameter (aligned with the operator's parameters).
    second_moments: Optional[List[torch.Tensor]] = field(default=None, repr=False)
    note: Optional[str] = None

    @property
    def is_adaptive(self) -> bool:
        return self.family in ("adam", "adamw")

    def preconditioner_diagonal(self) -> Optional[List[torch.Tensor]]:
        """P = sqrt(v̂) + ε per parameter, v̂ = v / (1 - β2^t); None without second moments."""
        if self.second_moments is None or self.betas is None or not self.step:
            return None
        correction = 1.0 - self.betas[1] ** self.step
        return [(v / correction).sqrt() + self.eps for v in self.second_moments]


def _group_settings(group: Dict[str, Any]) -> Dict[str, Any]:
    if "betas" in group:
        family = "adamw" if group.get("decoupled_weight_decay") else "adam"
        return dict(family=family, betas=tuple(float(b) for b in group["betas"]), eps=float(group.get("eps", 1e-8)),
                    name="AdamW" if family == "adamw" else "Adam")
    if "momentum" in group and "dampening" in group:
        momentum = float(group.get("momentum") or 0.0)
        family = "nesterov" if group.get("nesterov") and momentum > 0 else ("momentum" if momentum > 0 else "sgd")
        return dict(family=family, momentum=momentum, name="SGD")
    return dict(family=None, name=None)


def _lr_of(groups: Sequence[Dict[str, Any]]) -> tuple:
    lrs = [float(g["lr"]) for g in groups if "lr" in g]
    if not lrs:
        return None, None
    note = None
    if len(set(lrs)) > 1:
        note = f"parameter groups have different learning rates ({', '.join(f'{x:g}' for x in lrs)}); the largest is used"
    return max(lrs), note


def from_state_dict(state: Dict[str, Any], params: Sequence[torch.nn.Parameter], source: str = "checkpoint") -> OptimizerInfo:
    """Read an ``optimizer.state_dict()``. ``params`` are the model's trainable parameters in
    ``model.parameters()`` order, which is the order the optimizer saw them in the usual case."""
    groups = state.get("param_groups") or []
    if not groups:
        raise BadInput("checkpoint: the optimizer state has no param_groups", hint="save optimizer.state_dict()")
    settings = _group_settings(groups[0])
    lr, note = _lr_of(groups)
    info = OptimizerInfo(lr=lr, source=source, note=note, **settings)
    if info.is_adaptive:
        _attach_second_moments(info, state, params)
    return info


def _attach_second_moments(info: OptimizerInfo, state: Dict[str, Any], params: Sequence[torch.nn.Parameter]) -> None:
    per_param = state.get("state") or {}
    order = [i for g in state["param_groups"] for i in g.get("params", [])]
    if len(order) != len(params):
        info.note = (f"the optimizer state covers {len(order)} tensors, the model has {len(params)} trainable: "
                     "second moments not used")
        return
    moments, steps = [], []
    for index, param in zip(order, params):
        entry = per_param.get(index, per_param.get(str(index)))
        if not entry or "exp_avg_sq" not in entry:
            return  # no step taken yet: no preconditioner
        v = entry["exp_avg_sq"]
        if v.shape != param.shape:
            info.note = "the optimizer's exp_avg_sq shapes do not match the model's parameters: second moments not used"
            return
        moments.append(v.detach().to(device=param.device, dtype=param.dtype))
        steps.append(int(entry["step"]) if "step" in entry else 0)
    info.second_moments = moments
    info.step = max(steps) if steps else None


def from_optimizer(optimizer: torch.optim.Optimizer) -> OptimizerInfo:
    """Settings of a live optimizer (the recipe's ``optimizer(params)``)."""
    settings = _group_settings(optimizer.param_groups[0])
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.AdamW):
        settings["family"] = "adamw"
    settings["name"] = name
    lr, note = _lr_of(optimizer.param_groups)
    return OptimizerInfo(lr=lr, source="recipe", note=note, **settings)


def apply_flags(info: OptimizerInfo, lr: Optional[float], family: Optional[str], momentum: Optional[float] = None) -> OptimizerInfo:
    """Flags override the other sources."""
    if lr is not None:
        if not lr > 0:
            raise BadInput(f"--lr {lr}: the learning rate must be positive")
        info.lr = float(lr)
        info.source = "flags" if info.source == "none" else f"{info.source}, lr from flags"
    if family is not None:
        family = family.lower()
        if family not in FAMILIES:
            raise BadInput(f"--optimizer {family}: unknown optimizer", hint=f"choose one of {', '.join(FAMILIES)}")
        if family != info.family:
            info.family = family
            info.name = family
            if family in ("momentum", "nesterov") and not info.momentum:
                info.momentum = 0.9
            if family in ("adam", "adamw") and info.betas is None:
                info.betas = (0.9, 0.999)
            info.source = "flags" if info.source == "none" else f"{info.source}, optimizer from flags"
    if momentum is not None:
        info.momentum = float(momentum)
    return info
