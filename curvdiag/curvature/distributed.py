"""Many processes (DESIGN §2.5): the process group, the data shards and the one collective.

``torchrun --nproc-per-node N -m curvdiag probe ...`` (or ``curvdiag probe ... --nproc N``,
which relaunches itself that way) starts N processes; each builds the recipe, takes its shard
of the batches and evaluates its share of every product, and the curvature operator sums the
shares over the ranks (DESIGN §4: the operator is the only place that communicates).

- :func:`init_from_env` joins the process group torchrun describes in ``WORLD_SIZE``/``RANK``
  (gloo on CPU, nccl on CUDA), with a timeout: a rank that hangs makes the others' collective
  fail after ``timeout`` seconds instead of waiting forever, and a rank that dies closes its
  connections, so the others fail at once; torchrun's agent then ends the job.
- :func:`shard`: the recipe's own ``data(rank, world_size)`` when it defines one, else rank r
  takes batches r, r+N, …; with fewer batches than ranks every batch is split along its
  leading dimension (``torch.tensor_split``: shards may differ in size, and a rank may get
  nothing when there are fewer samples than ranks).
- :func:`all_reduce_sum`: the sum over ranks, in place; nothing at all in one process.
- :func:`check_supported`: parameters sharded over ranks (FSDP, DTensor) are refused.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import re
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch

from curvdiag.errors import BadInput, CurvdiagError

DEFAULT_TIMEOUT = 120.0
STATUS_DIR_ENV = "CURVDIAG_STATUS_DIR"  # where ranks leave their failure (set by --nproc)

_initialised_here = False
_timeout = DEFAULT_TIMEOUT


class CommunicationError(CurvdiagError):
    """A collective failed: another rank died, was killed, or did not answer in time. Exit 1."""


# ---------------------------------------------------------------------------- the process group
def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher setting WORLD_SIZE and RANK) asks for > 1 ranks."""
    return "RANK" in os.environ and _env_int("WORLD_SIZE", 1) > 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def env_rank() -> int:
    """This process's rank from the environment (usable before or without a process group)."""
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def init_from_env(device: str = "cpu", timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the process group torchrun describes; return whether this run is distributed.

    Nothing happens in a single process (no ``WORLD_SIZE`` > 1). An already initialised default
    group is reused (and left to its owner). ``timeout`` (seconds) bounds every collective.
    """
    global _initialised_here, _timeout
    if not (timeout > 0):
        raise BadInput(f"--dist-timeout {timeout}: must be a positive number of seconds")
    _timeout = float(timeout)
    if not torch.distributed.is_available():
        if launched_by_torchrun():
            raise BadInput("launched with several processes, but this torch build has no torch.distributed")
        return False
    if torch.distributed.is_initialized():
        return is_distributed()
    if not launched_by_torchrun():
        return False
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise BadInput(f"--device {device}: CUDA is not available on this machine", hint="use --device cpu")
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    backend = "nccl" if cuda else "gloo"
    try:
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=_timeout))
    except Exception as exc:  # a rendezvous that never completes, a missing backend
        raise CommunicationError(f"could not join the process group ({backend}): {_first_line(exc)}",
                                 hint="start the job with torchrun --nproc-per-node N (or curvdiag probe --nproc N)") from exc
    _initialised_here = True
    return True


def shutdown() -> None:
    """Leave the process group if :func:`init_from_env` created it, after a barrier: ranks leave
    together, so none tears its connections down while another still uses the group (a rank whose
    peer vanished mid-teardown can abort inside gloo). Failures here change nothing: the work is done."""
    global _initialised_here
    if _initialised_here and torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()
        except Exception:
            pass
        torch.distributed.destroy_process_group()
    _initialised_here = False


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def device_for(name: str) -> str:
    """``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``) under torchrun; anything else as given."""
    if name == "cuda" and launched_by_torchrun() and torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return name


# ---------------------------------------------------------------------------- collectives
def _first_line(exc: BaseException) -> str:
    """The first line of an error, without gloo's source location and boilerplate advice."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    line = line.split(" This is typically caused by")[0]
    return line[:300]


def _communication_error(exc: BaseException) -> CommunicationError:
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():
        message = f"no answer from another rank within {_timeout:g} s (a rank hung or is much slower)"
        hint = "see the other ranks' lines; raise --dist-timeout if a rank is legitimately slow"
    else:
        message = "lost contact with another rank (it failed or was killed)"
        hint = "the failing rank's own 'rank R:' line says why"
    return CommunicationError(f"{message}: {_first_line(exc)}", hint=hint)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place, and return it; the identity in one process."""
    return all_reduce(tensor, "sum")


_COMMUNICATION_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "peer")


def as_communication_error(exc: BaseException) -> BaseException:
    """A collective's failure raised inside torch (DDP's gradient all-reduce in backward) as the
    one-line :class:`CommunicationError` that :func:`all_reduce_sum` raises; other errors as they are."""
    if isinstance(exc, CurvdiagError) or not is_distributed() or not isinstance(exc, RuntimeError):
        return exc
    text = str(exc).lower()
    return _communication_error(exc) if any(m in text for m in _COMMUNICATION_MARKERS) else exc


def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """Elementwise ``op`` ("sum", "max" or "min") over the ranks, in place; the identity in one process."""
    if not is_distributed():
        return tensor
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    try:
        torch.distributed.all_reduce(tensor, op=ops[op])
    except Exception as exc:
        raise _communication_error(exc) from exc
    return tensor


def all_gather_rows(row: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-d ``row`` stacked in rank order, shape (world_size, len(row))."""
    if not is_distributed():
        return row.reshape(1, -1)
    rows = [torch.empty_like(row) for _ in range(world_size())]
    try:
        torch.distributed.all_gather(rows, row)
    except Exception as exc:
        raise _communication_error(exc) from exc
    return torch.stack(rows)


# ---------------------------------------------------------------------------- same model everywhere
def model_fingerprint(model: torch.nn.Module) -> float:
    """A number that differs, in practice, between two sets of weights: Σ_k (k+1)(Σ t_k + ½ Σ t_k²)
    over the trainable parameters and floating-point buffers, in float64."""
    fingerprint = 0.0
    with torch.no_grad():
        tensors = [p for p in model.parameters() if p.requires_grad] + [b for b in model.buffers() if b.is_floating_point()]
        for k, t in enumerate(tensors):
            t = t.detach().double()
            fingerprint += (k + 1) * float(t.sum() + 0.5 * t.square().sum())
    return fingerprint


def agree_on_model(model: torch.nn.Module, counts: Sequence[float] = ()) -> List[List[float]]:
    """All-gather (trainable parameters, weight fingerprint, *counts) from every rank: the table,
    one row per rank, after raising the same BadInput on every rank when the models differ."""
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = next(model.parameters()).device
    row = torch.tensor([num_params, model_fingerprint(model), *counts], dtype=torch.float64, device=device)
    table = all_gather_rows(row).cpu().tolist()
    first = table[0]
    for r, entry in enumerate(table):
        if int(entry[0]) != int(first[0]):
            raise BadInput(f"the ranks built different models: rank 0 has {int(first[0]):,} trainable "
                           f"parameters, rank {r} {int(entry[0]):,}", hint="model() must build the same model on every rank")
        if abs(entry[1] - first[1]) > 1e-9 * max(1.0, abs(first[1])):
            raise BadInput(f"rank {r}'s weights differ from rank 0's: model() is not deterministic and no "
                           "checkpoint sets the weights",
                           hint="pass --checkpoint, or seed model() (torch.manual_seed) so every rank builds the same weights")
    return table


# ---------------------------------------------------------------------------- what is refused
def check_supported(model: torch.nn.Module) -> None:
    """Refuse models whose parameters are sharded over ranks (FSDP, DTensor): every rank must hold
    every parameter, because the operator sums each rank's share of full-length products."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return  # sharded parameters need a process group: none here, nothing to refuse
    fsdp: List[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        fsdp.append(FullyShardedDataParallel)
    except Exception:
        pass
    try:
        from torch.distributed.fsdp import FSDPModule  # fully_shard (FSDP2)
        fsdp.append(FSDPModule)
    except Exception:
        pass
    try:
        from torch.distributed.tensor import DTensor
    except Exception:
        DTensor = None  # type: ignore[assignment]
    hint = ("curvdiag supports data parallelism only (every rank holds the full model, the batches are "
            "sharded); FSDP, DTensor and tensor parallelism are not supported yet: build the unsharded "
            "model in model() and load a consolidated (full) state dict")
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise BadInput("the model is wrapped in DistributedDataParallel",
                       hint="pass its .module: curvdiag sums over the ranks itself (and DDP's forward communicates)")
    for name, module in model.named_modules():
        if fsdp and isinstance(module, tuple(fsdp)):
            raise BadInput(f"module {name or '(root)'} is wrapped by {type(module).__name__}: its parameters are "
                           "sharded over ranks", hint=hint)
    if DTensor is not None:
        for name, p in model.named_parameters():
            if isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor):
                raise BadInput(f"parameter {name} is a DTensor (sharded or replicated over a device mesh)", hint=hint)


# ---------------------------------------------------------------------------- shards
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


def _leading(batch: Any) -> Optional[int]:
    from curvdiag.loading.recipe import leading_dimension

    return leading_dimension(batch)


def split_batch(batch: Any, pieces: int) -> List[Any]:
    """Split a batch (tensor, tuple, list, namedtuple or dict of them, nested) into ``pieces``
    along the leading dimension with ``torch.tensor_split`` (sizes differ by at most one; later
    pieces are empty when the batch has fewer samples). Tensors of that leading size are split,
    0-d tensors and non-tensor values go to every piece unchanged."""
    n = _leading(batch)
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
    from curvdiag.loading.recipe import Recipe

    recipe = source if isinstance(source, Recipe) else None
    if recipe is not None and recipe_shards_data(recipe):
        data = recipe._call("data", rank, world_size)
        try:
            iterator = iter(data)
        except TypeError:
            raise BadInput(f"recipe {recipe.name}: data(rank, world_size) returned {type(data).__name__}, "
                           "expected an iterable of batches") from None
        mine = []
        for batch in iterator:
            if max_batches is not None and len(mine) >= max_batches:
                break
            mine.append(batch)
        return mine, "recipe", None
    stream = recipe.data() if recipe is not None else source
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
    return [p for p in pieces if _leading(p) != 0], "split", total


def shard(source: Any, rank: int, world_size: int, max_batches: Optional[int] = None) -> List[Any]:
    """This rank's batches (see :func:`shard_batches`)."""
    return shard_batches(source, rank, world_size, max_batches)[0]


# ---------------------------------------------------------------------------- failures (--nproc)
def record_failure(rank_: int, code: int, message: str, communication: bool = False) -> None:
    """Leave this rank's failure where the ``--nproc`` launcher looks for it (if it set a place)."""
    where = os.environ.get(STATUS_DIR_ENV)
    if not where:
        return
    try:
        Path(where, f"rank{rank_}.json").write_text(
            json.dumps({"rank": rank_, "code": code, "message": message, "communication": communication,
                        "time": time.time()}))
    except OSError:
        pass


def record_finished(rank_: int) -> None:
    """Say that this rank finished its work (outputs written) before leaving the process group."""
    where = os.environ.get(STATUS_DIR_ENV)
    if where:
        try:
            Path(where, f"finished{rank_}").write_text("")
        except OSError:
            pass


def all_finished(where: Path, world_size_: int) -> bool:
    """Whether every rank recorded :func:`record_finished` (and none a failure) in ``where``."""
    where = Path(where)
    return (all((where / f"finished{r}").exists() for r in range(world_size_))
            and not any(where.glob("rank*.json")))


def first_failure(where: Path) -> Optional[dict]:
    """The earliest failure a rank recorded in ``where``, or None."""
    found = []
    for path in Path(where).glob("rank*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    # A rank that lost contact with the failing one fails too, a moment later: prefer root causes.
    found.sort(key=lambda f: (f.get("communication", False), f.get("time", 0.0)))
    return found[0] if found else None
