"""The Python API: what ``curvdiag probe`` does, on a model, a loss and batches you already hold.

    import curvdiag
    report = curvdiag.probe(model, loss, batches, optimizer=optimizer)   # loss(model, batch) -> scalar
    print(report.probes["eos"]["status"], report.to_json()["probes"]["lambda_max"]["value"])

No recipe file and no checkpoint: the model is probed as it is (on its own device and dtype) and
left exactly as it was (weights, buffers, ``.grad``, modes). The optimizer, when given, supplies
the learning rate, the family's stability threshold, Adam's second moments (the preconditioned
sharpness) and the state for the simulated step of the directional curvature; ``lr`` and
``optimizer_family`` override it, as ``--lr`` and ``--optimizer`` do on the command line.
The report is the same typed report the CLI renders and writes as JSON.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.errors import BadArgument
from curvdiag.loading import optimizer as optimizer_info
from curvdiag.loading.checkpoint import Checkpoint
from curvdiag.loading.recipe import Recipe
from curvdiag.curvature.threads import Threads, torch_threads
from curvdiag.loading.target import Target, check_mean_loss, move_batch
from curvdiag.probes.runner import ProbeSettings, parse_probe_names, run_probes

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def _optimizer_info(optimizer: Optional[torch.optim.Optimizer], params: Sequence[torch.nn.Parameter]):
    """The optimizer's settings and, for Adam, its second moments (from its live state)."""
    if optimizer is None:
        return optimizer_info.OptimizerInfo(family=None, lr=None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BadArgument("optimizer", type(optimizer).__name__, "expected a torch.optim.Optimizer")
    live = optimizer_info.from_optimizer(optimizer)
    info = optimizer_info.from_state_dict(optimizer.state_dict(), params, source="optimizer")
    info.family, info.name, info.source = live.family, live.name, "optimizer"
    return info


def _flat_previous(previous: Union[torch.nn.Module, dict, torch.Tensor], model: torch.nn.Module,
                   reference: torch.Tensor) -> torch.Tensor:
    """θ_{t−1} as a flat vector in the operator's layout, from a module, a state_dict or a flat tensor."""
    if isinstance(previous, torch.Tensor):
        flat = previous.reshape(-1)
    else:
        state = previous.state_dict() if isinstance(previous, torch.nn.Module) else previous
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n in names if n not in state]
        if missing:
            raise BadArgument("previous", f"<{len(state)} tensors>", f"lacks parameter {missing[0]}")
        flat = torch.cat([torch.as_tensor(state[n]).reshape(-1) for n in names])
    if flat.numel() != reference.numel():
        raise BadArgument("previous", f"<{flat.numel()} numbers>", f"the model has {reference.numel()} trainable parameters")
    return flat.to(device=reference.device, dtype=reference.dtype)


def probe(
    model: torch.nn.Module,
    loss: LossFn,
    batches: Iterable[Any],
    *,
    probes: Union[str, Sequence[str]] = "default",
    optimizer: Optional[torch.optim.Optimizer] = None,
    lr: Optional[float] = None,
    optimizer_family: Optional[str] = None,
    previous: Union[torch.nn.Module, dict, torch.Tensor, None] = None,
    batch_size: Optional[Callable[[Any], int]] = None,
    method: str = "lanczos",
    tol: float = 1e-4,
    top_k: int = 1,
    samples: Optional[int] = None,
    max_hvps: int = 500,
    glass_lambda: float = 1e-3,
    glass_samples: Optional[int] = None,
    budget: Optional[float] = None,
    memory: Optional[int] = None,
    train_mode: bool = False,
    hvp_method: str = "auto",
    seed: int = 0,
    threads: Threads = "default",
    timeout: Optional[float] = None,
    name: str = "python",
):
    """Probe the curvature of ``loss`` at ``model``'s current weights over ``batches``.

    Args:
        model: the module; its trainable parameters are θ. Probed on its own device and dtype.
        loss: ``loss(model, batch)`` returns the scalar mean loss of one batch.
        batches: an iterable of batches (moved to the model's device); L is their sample-weighted mean.
        probes: ``"default"`` (λmax with its margin, the trace, the HesScale diagonal, the curvature
            along the next step), ``"all"``, a comma-separated string or a list of probe names (as ``--probes``).
        budget: gradient-equivalents the run may spend (as ``--budget``); default: the probes' asks.
        memory: bytes the kept gradient graph may take (as ``--memory``); default: a quarter of the
            device's available memory.
        optimizer: the live optimizer of the run (lr, family, momentum, Adam state), optional.
        lr, optimizer_family: override what the optimizer says (``sgd|momentum|nesterov|adam|adamw``).
        previous: θ_{t−1} (a module, a state_dict or a flat tensor) for the directional curvature;
            default one simulated optimizer step.
        batch_size: ``batch_size(batch)`` → samples; default the leading dimension of the first tensor.
        method, tol, top_k, samples, max_hvps, glass_lambda, glass_samples, train_mode, hvp_method,
        seed: as the CLI's flags of the same names.
        threads: CPU threads torch uses during the call (torch's setting comes back afterwards):
            ``"default"`` (one thread, measured fastest on a shared machine; ``OMP_NUM_THREADS``
            when set; see :mod:`curvdiag.curvature.threads`), a count, or
            None to leave torch's setting alone.
        timeout: seconds after which the probes stop and the report holds those that finished
            (``report.interrupted``, ``interrupted_by == "timeout"``). Ctrl-C raises
            KeyboardInterrupt as usual, with the model left as it was.
        name: what the report calls the source (the CLI writes the recipe's name there).

    Returns:
        The typed probe report (``.to_json()`` gives the JSON of ``curvdiag probe --json``).

    Raises:
        BadArgument / BadInput: unusable arguments (a ``loss`` that sums over the batch instead
        of averaging is one); ProbeFailed: a probe failed at run time.
    """
    if not isinstance(model, torch.nn.Module):
        raise BadArgument("model", type(model).__name__, "expected a torch.nn.Module")
    if not callable(loss):
        raise BadArgument("loss", type(loss).__name__, "expected a function loss(model, batch)")
    settings = ProbeSettings(probes=parse_probe_names(probes if isinstance(probes, str) else ",".join(probes)),
                             method=method, tol=tol, top_k=top_k, samples=samples, seed=seed, max_hvps=max_hvps,
                             glass_lambda=glass_lambda, glass_samples=glass_samples, budget=budget)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BadArgument("model", type(model).__name__, "has no trainable parameters")
    functions = dict(model=lambda: model, data=lambda: batches, loss=loss)
    if batch_size is not None:
        functions["batch_size"] = batch_size
    recipe = Recipe(name, SimpleNamespace(**functions))
    device, dtype = params[0].device, params[0].dtype
    held = [move_batch(b, device, None) for b in batches]
    if not held:
        raise BadArgument("batches", "[]", "holds no batch")
    sizes = [recipe.batch_size(b) for b in held]
    if timeout is not None and not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                    and math.isfinite(timeout) and timeout > 0):
        raise BadArgument("timeout", timeout, "must be a positive number of seconds")
    deadline = time.monotonic() + timeout if timeout is not None else None
    with torch_threads(threads):
        check_mean_loss(model, recipe.loss, held[0], recipe.batch_size)
        info = optimizer_info.apply_flags(_optimizer_info(optimizer, params), lr, optimizer_family)
        # The live optimizer's state plays the checkpoint's part for the simulated step (no file).
        state = Checkpoint(path=None, model_state={}, optimizer_state=optimizer.state_dict(), step=None) \
            if optimizer is not None else None
        target = Target(recipe, model, held, sizes, recipe.loss, info, state, device, dtype, total_batches=len(held))
        op = CurvatureOperator(model, held, recipe.loss, sizes, train_mode=train_mode, hvp_method=hvp_method,
                               memory=memory)
        if previous is not None:
            settings.previous = _flat_previous(previous, model, op.parameters_vector())
        return run_probes(target, op, settings, deadline=deadline)
