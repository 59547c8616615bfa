"""Checkpoints (DESIGN §2.2): read safely, find the model and optimizer state, load strictly.

Accepted: a bare ``state_dict``; a dict with the model state under ``model``,
``model_state_dict`` or ``state_dict`` and optionally the optimizer state under ``optimizer``
or ``optimizer_state_dict`` and ``step``/``epoch``; a ``.safetensors`` file. Always read with
``torch.load(..., weights_only=True)``: a checkpoint never runs code.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from curvdiag.errors import BadInput

MODEL_KEYS = ("model", "model_state_dict", "state_dict")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


@dataclass
class Checkpoint:
    path: str
    model_state: Dict[str, torch.Tensor]
    optimizer_state: Optional[Dict[str, Any]] = None
    step: Optional[int] = None
    extras: Dict[str, Any] = field(default_factory=dict)  # the file's other entries (a train checkpoint's loop state)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file without executing any code in it."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return Checkpoint(str(path), dict(load_file(str(path))))
        except Exception as exc:
            raise BadInput(f"checkpoint {path}: not a readable safetensors file ({exc})") from exc
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling refused"
        raise BadInput(
            f"checkpoint {path}: refused by the safe loader (weights_only=True): {first}",
            hint="the file holds Python objects beyond tensors; re-save it with torch.save(model.state_dict(), ...)",
        ) from exc
    except Exception as exc:
        raise BadInput(
            f"checkpoint {path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            hint="is it a file written by torch.save or safetensors?",
        ) from exc
    return _interpret(path, raw)


def _interpret(path: Path, raw: Any) -> Checkpoint:
    if not isinstance(raw, dict):
        raise BadInput(f"checkpoint {path}: holds a {type(raw).__name__}, expected a state_dict or a dict of them")
    for key in MODEL_KEYS:
        if isinstance(raw.get(key), dict):
            optimizer = next((raw[k] for k in OPTIMIZER_KEYS if isinstance(raw.get(k), dict)), None)
            step = _step_of(path, raw.get("step", raw.get("epoch")))
            used = {key, "step", "epoch", *OPTIMIZER_KEYS}
            extras = {k: v for k, v in raw.items() if k not in used}
            return Checkpoint(str(path), _model_state(path, raw[key]), optimizer, step, extras)
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return Checkpoint(str(path), _model_state(path, raw))
    raise BadInput(
        f"checkpoint {path}: found no model state (keys: {', '.join(map(str, list(raw)[:8]))})",
        hint=f"save the model's state_dict, alone or under one of {', '.join(MODEL_KEYS)}",
    )


def _step_of(path: Path, step: Any) -> Optional[int]:
    """The checkpoint's step (or epoch): a whole number ≥ 0; None when absent; BadInput when malformed."""
    if step is None:
        return None
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex():
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) \
            or step != int(step) or step < 0:
        raise BadInput(f"checkpoint {path}: malformed step {step!r} (expected a whole number ≥ 0)")
    return int(step)


def _model_state(path: Path, state: Dict[Any, Any]) -> Dict[str, torch.Tensor]:
    """The model state, checked: names (str) to tensors."""
    for key, value in state.items():
        if not isinstance(key, str):
            raise BadInput(f"checkpoint {path}: malformed model state: key {key!r} is not a parameter name")
        if not isinstance(value, torch.Tensor):
            raise BadInput(f"checkpoint {path}: malformed model state: {key} holds a {type(value).__name__}, "
                           "expected a tensor")
    return state


def _strip_wrapper_prefix(state: Dict[str, torch.Tensor], expected: set) -> Dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _listing(names: list, limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_model_state(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Load ``checkpoint.model_state`` into ``model`` strictly; list every mismatch in one error."""
    expected = model.state_dict()
    state = _strip_wrapper_prefix(checkpoint.model_state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    # A float weight loaded from integers would be rounded silently (every weight in (−1, 1) becomes 0).
    dtypes = [
        f"{k} {str(state[k].dtype).replace('torch.', '')} vs model {str(expected[k].dtype).replace('torch.', '')}"
        for k in expected
        if k in state and state[k].dtype != expected[k].dtype
        and not (state[k].is_floating_point() and expected[k].is_floating_point())
    ]
    problems = []
    if dtypes:
        problems.append(f"weights of the wrong type (must be floating point like the model's): {_listing(dtypes)}")
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if problems:
        raise BadInput(
            f"checkpoint {checkpoint.path} does not match the recipe's model: " + "; ".join(problems),
            hint="is this the checkpoint of this recipe's model (same architecture and sizes)?",
        )
    model.load_state_dict(state, strict=True)
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise BadInput(
            f"checkpoint {checkpoint.path}: non-finite values (nan/inf) in {_listing(bad)}",
            hint="the run had already diverged at this checkpoint; probe an earlier one",
        )
