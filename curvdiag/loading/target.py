"""Recipe + checkpoint → Target: the model with its weights, the batches, the loss, the optimizer.

The one entry point the CLI uses to turn user input into something the operator can probe
(DESIGN §4). Every problem with the input is a :class:`~curvdiag.errors.BadInput`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

from curvdiag.loading import optimizer as optimizer_state
from curvdiag.loading.checkpoint import Checkpoint, load_model_state, read_checkpoint
from curvdiag.errors import BadArgument, BadInput
from curvdiag.loading.optimizer import OptimizerInfo
from curvdiag.loading.recipe import Recipe, load_recipe
from curvdiag.loading.shards import shard_batches, split_batch
from curvdiag.model_state import preserved_state


@dataclass
class Target:
    """What is probed: the model (weights loaded, on the device), its batches and loss."""

    recipe: Recipe
    model: torch.nn.Module
    batches: List[Any]
    batch_sizes: List[int]
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]
    optimizer: OptimizerInfo
    checkpoint: Optional[Checkpoint]
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    sharding: Optional[str] = None  # how this rank's batches were chosen (curvdiag.loading.shards)
    total_batches: Optional[int] = None  # the recipe's batches over all ranks, when known

    @property
    def num_samples(self) -> int:
        """Samples in this rank's batches (all of them in one process)."""
        return sum(self.batch_sizes)


def move_batch(batch: Any, device: torch.device, dtype: Optional[torch.dtype]) -> Any:
    """Move every tensor of a (nested) batch to ``device``; floating tensors to ``dtype`` if given."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_batch(v, device, dtype) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


def resolve_device(name: str) -> torch.device:
    """The device ``name`` when it is ``cpu`` or a CUDA device this machine has (``cuda``, ``cuda:N``);
    BadArgument otherwise: meta, mps, xla and absent GPUs would fail later with a torch error, or
    give no numbers."""
    kind, _, index = str(name).partition(":")
    if kind == "cpu" and not index:
        return torch.device("cpu")
    if kind != "cuda" or (index and not index.isdigit()):
        raise BadArgument("device", name, "unsupported device", hint="choose cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise BadArgument("device", name, "CUDA is not available on this machine", hint="use the cpu device")
    if index and int(index) >= torch.cuda.device_count():
        raise BadArgument("device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_target(
    recipe_spec: str,
    checkpoint_path: Optional[str] = None,
    *,
    max_batches: Optional[int] = None,
    device: str = "cpu",
    dtype: Optional[str] = None,
    lr: Optional[float] = None,
    optimizer_family: Optional[str] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Target:
    """Build the recipe's model, load the checkpoint into it, collect the batches.

    Optimizer settings come from flags, else the checkpoint's optimizer state, else the
    recipe's ``optimizer(params)``. With ``world_size`` > 1 only this rank's shard of the batches
    is kept (:func:`curvdiag.loading.shards.shard_batches`; ``max_batches`` counts the whole stream).
    """
    if max_batches is not None and max_batches < 1:
        raise BadArgument("max_batches", max_batches, "must be at least 1")
    if dtype is not None and dtype not in DTYPES:
        raise BadArgument("dtype", dtype, "unknown", hint=f"choose one of {', '.join(DTYPES)}")
    torch_device = resolve_device(device)
    recipe = load_recipe(recipe_spec)
    model = recipe.model()
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None:
        load_model_state(model, checkpoint)
    torch_dtype = DTYPES[dtype] if dtype else None
    model.to(device=torch_device, dtype=torch_dtype) if torch_dtype else model.to(torch_device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise BadInput(f"recipe {recipe.name}: the model has no trainable parameters", hint="does model() freeze everything?")
    shard, sharding, total_batches = shard_batches(recipe, rank, world_size, max_batches=max_batches)
    batches, sizes = [], []
    for batch in shard:
        sizes.append(recipe.batch_size(batch))
        batches.append(move_batch(batch, torch_device, torch_dtype))
    if not batches and world_size == 1:  # a rank may have no share; the operator checks the total
        raise BadInput(f"recipe {recipe.name}: data() yielded no batches")
    if batches:
        check_mean_loss(model, recipe.loss, batches[0], recipe.batch_size, what=f"recipe {recipe.name}: ")
    info = _optimizer_info(recipe, model, checkpoint)
    info = optimizer_state.apply_flags(info, lr, optimizer_family)
    return Target(recipe, model, batches, sizes, recipe.loss, info, checkpoint, torch_device,
                  trainable[0].dtype, rank=rank, world_size=world_size, sharding=sharding,
                  total_batches=total_batches)


def _optimizer_info(recipe: Recipe, model: torch.nn.Module, checkpoint: Optional[Checkpoint]) -> OptimizerInfo:
    params = [p for p in model.parameters() if p.requires_grad]
    if checkpoint is not None and checkpoint.optimizer_state is not None:
        info = optimizer_state.from_state_dict(checkpoint.optimizer_state, params)
        if info.family is None and recipe.has("optimizer"):
            # The state says little (e.g. RMSprop keys); the recipe names the class.
            info.name = type(recipe.optimizer(params)).__name__
        return info
    if recipe.has("optimizer"):
        # A throwaway optimizer on copies: constructing one must not touch the model.
        optimizer = recipe.optimizer([torch.nn.Parameter(p.detach().clone()) for p in params])
        return optimizer_state.from_optimizer(optimizer)
    return OptimizerInfo(family=None, lr=None)


def load_previous_parameters(target: Target, path: str) -> torch.Tensor:
    """θ_{t−1} from another checkpoint of the same model, flat in the operator's layout."""
    model = target.recipe.model()
    load_model_state(model, read_checkpoint(path))
    model.to(device=target.device, dtype=target.dtype)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


# ------------------------------------------------------------------ the mean-loss contract
# A sum over a float32 batch agrees with the sum of its halves' to ~1e-6 relative; a mean
# misses that sum by a factor near 2 (equal halves), so the two thresholds are far apart.
SUM_AGREES = 1e-3  # |L − (L₁ + L₂)| / (|L₁| + |L₂|) at most this: L adds up like a sum
MEAN_DISAGREES = 0.05  # |L − (n₁L₁ + n₂L₂)/n| / (|L₁| + |L₂|) above this: L is not the mean


def check_mean_loss(model: torch.nn.Module, loss: Callable[[torch.nn.Module, Any], torch.Tensor], batch: Any,
                    batch_size: Callable[[Any], int], what: str = "") -> None:
    """BadInput when ``loss`` returns the *sum* over a batch rather than the mean the recipe
    contract asks for (every curvature would come out n× too large).

    One forward on ``batch`` and one on each half along the leading dimension (as
    :func:`~curvdiag.loading.shards.split_batch` splits it), in eval mode, without gradients,
    with the model's modes, buffers and the RNG left as they were. With n = n₁ + n₂ samples
    (``batch_size`` of each part) a mean satisfies L = (n₁L₁ + n₂L₂)/n and a sum L = L₁ + L₂;
    it fails only when the sum's equation holds and the mean's does not (:data:`SUM_AGREES`,
    :data:`MEAN_DISAGREES`). Silently nothing when the batch cannot be split (one sample, no
    tensor with a leading dimension, tensors of other leading sizes), when the model or the loss
    fails on a half, or when the losses are not finite: the check never blocks a valid recipe.
    """
    values = _whole_and_halves(model, loss, batch, batch_size)
    if values is None:
        return
    (whole, n), (first, n1), (second, n2) = values
    scale = abs(first) + abs(second)
    if not all(math.isfinite(v) for v in (whole, first, second)) or scale == 0:
        return
    as_mean = (n1 * first + n2 * second) / n
    if abs(whole - (first + second)) <= SUM_AGREES * scale and abs(whole - as_mean) > MEAN_DISAGREES * scale:
        raise BadInput(
            f"{what}loss(model, batch) returns the sum over the batch, not its mean: {whole:.6g} on a batch of {n} "
            f"samples = {first:.6g} + {second:.6g} on its halves (their mean would be {as_mean:.6g})",
            hint=f"return the mean over the batch's samples (reduction=\"mean\", or divide by the batch size): "
                 f"with a sum every curvature comes out about {n}x too large")


def _whole_and_halves(model: torch.nn.Module, loss: Callable, batch: Any,
                      batch_size: Callable[[Any], int]) -> Optional[Tuple[Tuple[float, int], ...]]:
    """((L, n), (L₁, n₁), (L₂, n₂)) for ``batch`` and its two halves, or None when it cannot be split."""
    try:
        halves = split_batch(batch, 2)
        sizes = [batch_size(batch)] + [batch_size(half) for half in halves]
    except Exception:  # no leading dimension, mixed leading sizes, a batch_size() that needs more
        return None
    if sizes[1] < 1 or sizes[2] < 1 or sizes[1] + sizes[2] != sizes[0]:
        return None
    try:
        with _untouched(model):
            values = [float(loss(model, part).detach()) for part in (batch, *halves)]
    except Exception:  # the model refuses a half batch (a fixed batch size): no check
        return None
    return tuple(zip(values, sizes))


@contextlib.contextmanager
def _untouched(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode without gradients; every module's mode, every buffer and the RNG as they were afterwards."""
    tensors = list(model.buffers()) + list(model.parameters())
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with preserved_state(model, train_mode=False), torch.random.fork_rng(devices=devices), torch.no_grad():
        yield
