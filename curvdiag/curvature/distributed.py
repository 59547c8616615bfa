"""Many processes (DESIGN §2.5): the process group and its collectives.

``torchrun --nproc-per-node N -m curvdiag probe ...`` (or ``curvdiag probe ... --nproc N``,
which relaunches itself that way) starts N processes; each builds the recipe, takes its shard
of the batches and evaluates its share of every product, and the curvature operator sums the
shares over the ranks (DESIGN §4: the operator is the only place that communicates).

- :func:`init_from_env` joins the process group torchrun describes in ``WORLD_SIZE``/``RANK``
  (gloo on CPU, nccl on CUDA), with a timeout: a rank that hangs makes the others' collective
  fail after ``timeout`` seconds instead of waiting forever, and a rank that dies closes its
  connections, so the others fail at once; torchrun's agent then ends the job.
- Which batches a rank loads is :mod:`curvdiag.loading.shards`' business.
- :func:`all_reduce_sum`: the sum over ranks, in place; nothing at all in one process.
- :func:`first_rank_where` and :func:`broadcast_text`: the ranks agree on an outcome (the
  operator's refusal of a model one rank's batches are not covered on) and share its reason.
- :func:`check_supported`: parameters sharded over ranks (FSDP, DTensor) are refused.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Any, List, Optional, Sequence

import torch

from curvdiag.errors import BadArgument, BadInput, CurvdiagError

DEFAULT_TIMEOUT = 120.0

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
        raise BadArgument("timeout", timeout, "must be a positive number of seconds")
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
            raise BadArgument("device", device, "CUDA is not available on this machine", hint="use the CPU")
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


def first_rank_where(condition: bool, device: Any = "cpu") -> Optional[int]:
    """The lowest rank on which ``condition`` holds, or None (one collective, a min over ranks;
    in one process the condition itself). ``device``: where the collective's tensor lives."""
    if not is_distributed():
        return 0 if condition else None
    flag = torch.tensor([float(rank() if condition else world_size())], dtype=torch.float64, device=device)
    first = int(all_reduce(flag, "min")[0])
    return first if first < world_size() else None


def broadcast_text(text: Optional[str], source: int) -> str:
    """Rank ``source``'s ``text`` on every rank (one collective); ``text`` itself in one process."""
    if not is_distributed():
        return text
    box = [text]
    try:
        torch.distributed.broadcast_object_list(box, src=source)
    except Exception as exc:
        raise _communication_error(exc) from exc
    return box[0]


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
