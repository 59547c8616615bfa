"""Which batches a rank loads (DESIGN §2.5): the recipe's own ``data(rank, world_size)`` when it
defines one, else rank r takes batches r, r+N, …; with fewer batches than ranks every batch is
split along its leading dimension (``torch.tensor_split``: shards may differ in size, and a rank
may get nothing when there are fewer samples than ranks). The sample counts travel with the
shards, and the curvature operator weights every batch by them, so the sums are the global ones.
"""

from __future__ import annotations

import inspect
from typing import Any, List, Optional, Tuple

import torch

from curvdiag.errors import BadInput
from curvdiag.loading.recipe import Recipe, leading_dimension


def recipe_shards_data(recipe: Any) -> bool:
    """Whether the recipe defines ``data(rank, world_size)`` (and so shards its data itself)."""
    return recipe.has("data") and _takes_rank(recipe._fn("data"))


def _takes_rank(fn: Any) -> bool:
    """Whether a recipe's data() is ``data(rank, world_size)``: two positional parameters that
    are required, or named ``rank`` first; everything after them optional."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2:
        return False
    first, second = positional[:2]
    required = first.default is first.empty and second.default is second.empty
    named = first.name == "rank"
    rest_optional = all(p.default is not p.empty for p in positional[2:])
    return (required or named) and rest_optional


def split_batch(batch: Any, pieces: int) -> List[Any]:
    """Split a batch (tensor, tuple, list, namedtuple or dict of them, nested) into ``pieces``
    along the leading dimension with ``torch.tensor_split`` (sizes differ by at most one; later
    pieces are empty when the batch has fewer samples). Tensors of that leading size are split,
    0-d tensors and non-tensor values go to every piece unchanged."""
    n = leading_dimension(batch)
    if n is None:
        raise BadInput(f"cannot split a batch of type {type(batch).__name__} over {pieces} ranks: it holds no "
                       "tensor with a leading (sample) dimension",
                       hint="give at least as many batches as ranks, or define data(rank, world_size) in the recipe")

    def split(x: Any) -> List[Any]:
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                return [x] * pieces
            if x.shape[0] != n:
                raise BadInput(f"cannot split a batch over {pieces} ranks: it holds a tensor of shape {tuple(x.shape)} "
                               f"whose leading dimension is not the batch's {n} samples",
                               hint="give at least as many batches as ranks, or define data(rank, world_size) in the recipe")
            return list(torch.tensor_split(x, pieces))
        if isinstance(x, dict):
            parts = {k: split(v) for k, v in x.items()}
            return [type(x)((k, parts[k][i]) for k in x) if type(x) is not dict else {k: parts[k][i] for k in x}
                    for i in range(pieces)]
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            parts = [split(v) for v in x]
            return [type(x)(*(p[i] for p in parts)) for i in range(pieces)]
        if isinstance(x, (list, tuple)):
            parts = [split(v) for v in x]
            return [type(x)(p[i] for p in parts) for i in range(pieces)]
        return [x] * pieces

    return split(batch)


def shard_batches(source: Any, rank: int, world_size: int,
                  max_batches: Optional[int] = None) -> Tuple[List[Any], Optional[str], Optional[int]]:
    """(this rank's batches, how they were chosen, the number of batches of the whole stream or
    None when the recipe shards itself). How: ``"recipe"`` (its ``data(rank, world_size)``),
    ``"round-robin"`` (batches r, r+N, …), ``"split"`` (fewer batches than ranks: each batch
    split along its leading dimension), or None in one process with a plain ``data()``.

    ``source`` is a :class:`~curvdiag.loading.recipe.Recipe` or a list of batches. ``max_batches``
    keeps the first N batches of the whole stream (with ``data(rank, world_size)``: of each
    rank's own stream, since the global order is the recipe's business).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    recipe = source if isinstance(source, Recipe) else None
    if recipe is not None and recipe_shards_data(recipe):
        data = recipe._call("data", rank, world_size)
        try:
            iterator = iter(data)
        except TypeError:
            raise BadInput(f"recipe {recipe.name}: data(rank, world_size) returned {type(data).__name__}, "
                           "expected an iterable of batches") from None
        mine = []
        for batch in recipe.batches(iterator):
            if max_batches is not None and len(mine) >= max_batches:
                break
            mine.append(batch)
        return mine, "recipe", None
    stream = recipe.batches(recipe.data()) if recipe is not None else source
    if world_size == 1:
        batches = []
        for batch in stream:
            if max_batches is not None and len(batches) >= max_batches:
                break
            batches.append(batch)
        return batches, None, len(batches)
    mine, first, total = [], [], 0
    for batch in stream:
        if max_batches is not None and total >= max_batches:
            break
        if total < world_size:
            first.append(batch)  # kept in case there are fewer batches than ranks
        if total % world_size == rank:
            mine.append(batch)
        total += 1
    if total == 0:
        name = f"recipe {recipe.name}: " if recipe is not None else ""
        raise BadInput(f"{name}data() yielded no batches")
    if total >= world_size:
        return mine, "round-robin", total
    pieces = [split_batch(batch, world_size)[rank] for batch in first]
    return [p for p in pieces if leading_dimension(p) != 0], "split", total


def shard(source: Any, rank: int, world_size: int, max_batches: Optional[int] = None) -> List[Any]:
    """This rank's batches (see :func:`shard_batches`)."""
    return shard_batches(source, rank, world_size, max_batches)[0]
