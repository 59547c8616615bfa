"""Recipes: the user's Python file or module that rebuilds the training setup (DESIGN §2.1).

A recipe defines ``model()``, ``data()`` and ``loss(model, batch)``, and optionally
``optimizer(params)``, ``scheduler(optimizer)`` and ``batch_size(batch)``. Loading a recipe
executes its code (that is what a recipe is for). Every failure becomes a one-line
:class:`~curvdiag.errors.BadInput` naming the recipe, the name and what was expected.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

import torch

from curvdiag.errors import BadInput

REQUIRED = ("model", "data", "loss")


@dataclass
class Recipe:
    """A loaded recipe; the call methods validate what the user's functions return."""

    name: str
    module: ModuleType

    def _fn(self, name: str) -> Optional[Callable]:
        return getattr(self.module, name, None)

    def has(self, name: str) -> bool:
        return callable(self._fn(name))

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return self._fn(name)(*args)
        except BadInput:
            raise
        except SystemExit as exc:  # a recipe that ends the program: say so instead of exiting silently
            raise BadInput(f"recipe {self.name}: {name}() called sys.exit({exc.code!r})",
                           hint="a recipe's functions return values; remove the exit") from exc
        except Exception as exc:  # the user's code: report, don't trace back
            raise BadInput(
                f"recipe {self.name}: {name}() raised {type(exc).__name__}: {_first_line(exc)}",
                hint="run the recipe's function by hand, or use --debug for the traceback",
            ) from exc

    def model(self) -> torch.nn.Module:
        model = self._call("model")
        if not isinstance(model, torch.nn.Module):
            raise BadInput(
                f"recipe {self.name}: model() returned {type(model).__name__}, expected a torch.nn.Module"
            )
        return model

    def data(self) -> Any:
        data = self._call("data")
        try:
            iter(data)
        except TypeError:
            raise BadInput(
                f"recipe {self.name}: data() returned {type(data).__name__}, expected an iterable of batches"
            ) from None
        return data

    def batches(self, data: Any) -> Iterator[Any]:
        """The batches of ``data`` (what data() returned); an error raised while iterating it (a
        file gone midway, a sys.exit) as one BadInput naming the recipe."""
        iterator = iter(data)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except BadInput:
                raise
            except (Exception, SystemExit) as exc:
                what = f"sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {_first_line(exc)}"
                raise BadInput(f"recipe {self.name}: iterating data() raised {what}",
                               hint="run the recipe's data() by hand, or use --debug for the traceback") from exc
            yield batch

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Call the recipe's ``loss``; checks that it returns a scalar tensor."""
        value = self._call("loss", model, batch)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            raise BadInput(f"recipe {self.name}: loss(model, batch) returned a {str(value.dtype).replace('torch.', '')} "
                           "tensor, expected a real floating-point scalar")
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise BadInput(
                f"recipe {self.name}: loss(model, batch) returned "
                f"{type(value).__name__ if not isinstance(value, torch.Tensor) else 'a tensor of shape ' + str(tuple(value.shape))}, "
                "expected a scalar tensor (the mean loss of the batch)"
            )
        return value.reshape(())

    def optimizer(self, params: Any) -> Optional[torch.optim.Optimizer]:
        if not self.has("optimizer"):
            return None
        opt = self._call("optimizer", params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise BadInput(
                f"recipe {self.name}: optimizer(params) returned {type(opt).__name__}, expected a torch.optim.Optimizer"
            )
        return opt

    def batch_size(self, batch: Any) -> int:
        """Samples in a batch: the recipe's ``batch_size`` or the leading dimension of the first tensor."""
        if self.has("batch_size"):
            size = self._call("batch_size", batch)
        else:
            size = leading_dimension(batch)
            if size is None:
                raise BadInput(
                    f"recipe {self.name}: found no tensor in a batch to count its samples",
                    hint="define batch_size(batch) in the recipe",
                )
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise BadInput(f"recipe {self.name}: batch_size(batch) returned {size!r}, expected a positive int")
        return size


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def leading_dimension(batch: Any) -> Optional[int]:
    """The leading dimension of the first tensor found in a (nested) batch, or None."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = leading_dimension(item)
            if size is not None:
                return size
    return None


def load_recipe(spec: str) -> Recipe:
    """Load a recipe from a file path (``path/to/recipe.py``) or a module name (``pkg.mod``)."""
    path = Path(spec)
    if spec.endswith(".py") or path.exists():
        if not path.is_file():
            raise BadInput(f"recipe {spec}: no such file", hint="give a path to a .py file or an importable module name")
        module_name = f"curvdiag_recipe_{path.stem}_{uuid.uuid4().hex[:8]}"
        try:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        except SystemExit as exc:
            sys.modules.pop(module_name, None)
            raise BadInput(f"recipe {spec}: importing it called sys.exit({exc.code!r})",
                           hint="guard the script part with if __name__ == \"__main__\":") from exc
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise BadInput(
                f"recipe {spec}: importing it raised {type(exc).__name__}: {exc}",
                hint="fix the recipe file (use --debug for the traceback)",
            ) from exc
    else:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            raise BadInput(
                f"recipe {spec}: no such file or importable module ({exc})",
                hint="give a path to a .py file or a module on PYTHONPATH",
            ) from exc
        except Exception as exc:
            raise BadInput(f"recipe {spec}: importing it raised {type(exc).__name__}: {exc}") from exc
    recipe = Recipe(name=spec, module=module)
    for name in REQUIRED:
        if not recipe.has(name):
            raise BadInput(
                f"recipe {spec}: missing required function {name}()",
                hint="a recipe defines model(), data() and loss(model, batch) at module level",
            )
    return recipe
