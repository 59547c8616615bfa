"""What the run's optimizer tells the probes: family, learning rate, momentum, Adam moments.

Sources, in order of precedence: command-line flags, the checkpoint's optimizer state, the
recipe's ``optimizer(params)``. Which family a param group belongs to and which of its keys hold
β come from the one table :data:`curvdiag.stability.OPTIMIZER_FAMILIES`. Adam's second moments
(``exp_avg_sq``) come only from a checkpoint or a live optimizer; they define the preconditioner
P = diag(sqrt(v / (1 - β2^t)) + ε) of DESIGN §3.2, computed by :func:`adam_preconditioner` alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from curvdiag.errors import BadArgument, BadInput
from curvdiag.stability import OPTIMIZER_FAMILIES, family_of_group

FAMILIES = tuple(OPTIMIZER_FAMILIES)

# How each param-group key of the table's ``group_keys`` is read into OptimizerInfo.
_READ_SETTING: Dict[str, Callable[[Dict[str, Any]], Any]] = {
    "momentum": lambda group: float(group.get("momentum") or 0.0),
    "betas": lambda group: tuple(float(b) for b in group["betas"]),
    "eps": lambda group: float(group.get("eps", 1e-8)),
}


def adam_preconditioner(second_moments: Sequence[torch.Tensor], steps: Sequence[float], beta2: float,
                        eps: float) -> List[torch.Tensor]:
    """Adam's diagonal preconditioner P = sqrt(v̂) + ε per parameter, v̂ = v / (1 − β2^t).

    ``second_moments[i]`` is ``exp_avg_sq`` of parameter i (its shape), ``steps[i]`` its step
    count t ≥ 1; each P has the shape of its parameter. Elementwise: O(n).
    """
    return [(v / (1.0 - beta2 ** step)).sqrt_().add_(eps) for v, step in zip(second_moments, steps)]


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
    def beta(self) -> float:
        """The family's momentum β: heavy-ball momentum, or Adam's β1; 0 when there is none."""
        return float(self.betas[0]) if self.betas else float(self.momentum or 0.0)

    @property
    def is_adaptive(self) -> bool:
        """Whether the family's curvature is the preconditioned λmax(P^{-1/2} H P^{-1/2})."""
        return self.family is not None and OPTIMIZER_FAMILIES[self.family].preconditioned

    def preconditioner_diagonal(self) -> Optional[List[torch.Tensor]]:
        """P = sqrt(v̂) + ε per parameter (:func:`adam_preconditioner`); None without second moments."""
        if self.second_moments is None or self.betas is None or not self.step:
            return None
        return adam_preconditioner(self.second_moments, [self.step] * len(self.second_moments), self.betas[1], self.eps)

    def torch_options(self) -> Dict[str, Any]:
        """Constructor options of the family's torch class (a simulated step): its settings
        (momentum; betas and eps) and its fixed options (nesterov), defaults where unknown."""
        family = OPTIMIZER_FAMILIES[self.family]
        settings = {key: getattr(self, key) for key in family.group_keys}
        settings.update({key: value for key, value in family.defaults.items() if settings.get(key) is None})
        return {**settings, **family.torch_options}


def _number(value: Any) -> Optional[float]:
    """A float from a number or a one-element real tensor; None otherwise."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def check_param_groups(groups: Sequence[Any], source: str) -> None:
    """BadInput unless every group's learning rate is a finite number ≥ 0 and its momentum, β and
    dampening lie in [0, 1) (ε finite ≥ 0): a NaN or negative rate would give a wrong verdict, not an error."""
    for index, group in enumerate(groups):
        if not isinstance(group, dict):
            raise BadInput(f"{source}: param group {index} is a {type(group).__name__}, expected a dict")
        where = f"{source}: param group {index}"
        params = group.get("params")
        if params is not None and not (isinstance(params, (list, tuple))
                                       and all(isinstance(p, (int, torch.Tensor)) and not isinstance(p, bool) for p in params)):
            raise BadInput(f"{where}: params={params!r:.60}, expected a list of parameter indices",
                           hint="save optimizer.state_dict() unchanged")
        checks = [("lr", group.get("lr"), lambda x: math.isfinite(x) and x >= 0, "a finite number ≥ 0")]
        if group.get("momentum") is not None:
            checks.append(("momentum", group["momentum"], lambda x: 0 <= x < 1, "in [0, 1)"))
        if group.get("dampening") is not None:
            checks.append(("dampening", group["dampening"], lambda x: 0 <= x <= 1, "in [0, 1]"))
        if group.get("eps") is not None:
            checks.append(("eps", group["eps"], lambda x: math.isfinite(x) and x >= 0, "a finite number ≥ 0"))
        betas = group.get("betas")
        if betas is not None:
            if not isinstance(betas, (tuple, list)):
                raise BadInput(f"{where}: betas={betas!r}, expected a pair of numbers in [0, 1)")
            checks += [(f"betas[{i}]", b, lambda x: 0 <= x < 1, "in [0, 1)") for i, b in enumerate(betas)]
        for key, raw, ok, expected in checks:
            if key == "lr" and raw is None:
                continue
            value = _number(raw)
            if value is None or not ok(value):
                raise BadInput(f"{where}: {key}={raw!r}, expected {expected}",
                               hint="fix the optimizer's hyperparameters (a NaN or negative rate gives no meaningful verdict)")


def check_hyperparameters(optimizer: torch.optim.Optimizer, source: str) -> None:
    """:func:`check_param_groups` on a live optimizer."""
    check_param_groups(optimizer.param_groups, source)


def _group_settings(group: Dict[str, Any]) -> Dict[str, Any]:
    """Family (from the table), name and settings of one torch param group."""
    family = family_of_group(group)
    if family is None:
        return dict(family=None, name=None)
    settings = {key: _READ_SETTING[key](group) for key in family.group_keys}
    return dict(family=family.name, name=family.torch_class, **settings)


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
    if not isinstance(groups, (list, tuple)) or not groups:
        raise BadInput("checkpoint: the optimizer state has no param_groups", hint="save optimizer.state_dict()")
    check_param_groups(groups, "checkpoint: the optimizer state")
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
    check_hyperparameters(optimizer, "recipe: optimizer(params)")
    settings = _group_settings(optimizer.param_groups[0])
    name = type(optimizer).__name__
    if isinstance(optimizer, torch.optim.AdamW):
        settings["family"] = "adamw"
    settings["name"] = name
    lr, note = _lr_of(optimizer.param_groups)
    return OptimizerInfo(lr=lr, source="recipe", note=note, **settings)


def apply_flags(info: OptimizerInfo, lr: Optional[float], optimizer_family: Optional[str],
                momentum: Optional[float] = None) -> OptimizerInfo:
    """Flags override the other sources."""
    if lr is not None:
        if not (math.isfinite(lr) and lr > 0):
            raise BadArgument("lr", lr, "the learning rate must be a positive finite number")
        info.lr = float(lr)
        info.source = "flags" if info.source == "none" else f"{info.source}, lr from flags"
    if optimizer_family is not None:
        family = optimizer_family.lower()
        if family not in FAMILIES:
            raise BadArgument("optimizer_family", family, "unknown optimizer", hint=f"choose one of {', '.join(FAMILIES)}")
        if family != info.family:
            info.family = family
            info.name = family
            for key, value in OPTIMIZER_FAMILIES[family].defaults.items():
                if not getattr(info, key):
                    setattr(info, key, value)
            info.source = "flags" if info.source == "none" else f"{info.source}, optimizer from flags"
    if momentum is not None:
        info.momentum = float(momentum)
    return info
