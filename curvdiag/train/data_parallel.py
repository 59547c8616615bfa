"""Data-parallel replay (DESIGN §2.5): what ``curvdiag train`` does differently under torchrun.

Every rank holds the whole model and takes a share of each step's batch; the replicas must stay
identical, so every number a controller uses is the global one:

- **device**: the model and every batch (this rank's share, moved after the split) on ``device``;
  the collectives' own tensors too, since nccl reduces GPU tensors only.
- **data**: the recipe's ``data(rank, world_size)`` stream when it defines one; otherwise each
  step's batch is split along its leading dimension (``torch.tensor_split``), so N ranks take the
  very step one process would take.
- **loss**: rank r with n_r of the step's N samples has mean loss L_r; the global loss
  L = Σ_r n_r L_r / N comes from one all_reduce of (n_r, n_r L_r) per step.
- **gradient**: the model runs inside ``DistributedDataParallel``, which *averages* gradients
  over the W ranks during backward; backpropagating L_r · n_r W / N makes that average the
  gradient of L (exact for unequal shards).
- **extra gradients** (the throttle's and the Newton rate's second gradient on the same batch):
  ``torch.autograd.grad`` bypasses DDP's hooks, so :meth:`sum_over_ranks` sums each rank's
  share (L_r n_r / N) explicitly, gradient and loss in one collective.

In one process the same object is the identity: no wrapper, no collective.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

import torch

from curvdiag.curvature import distributed
from curvdiag.errors import BadInput
from curvdiag.loading import shards
from curvdiag.loading.recipe import Recipe
from curvdiag.loading.target import move_batch


class _TransparentDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP whose attribute lookups fall through to the wrapped module, so a recipe's
    ``loss(model, batch)`` that reads ``model.config`` or calls ``model.encoder`` keeps working."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


class DataParallel:
    """The replicas of one replay; ``world_size == 1`` is the single-process identity."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, max_batches: Optional[int] = None,
                 device: torch.device = torch.device("cpu")):
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.recipe, self.max_batches, self.device = recipe, max_batches, device
        self.model = model
        self.module: torch.nn.Module = model  # what the recipe's loss sees for the step's backward
        self.recipe_shards = self.world_size > 1 and shards.recipe_shards_data(recipe)
        if self.world_size > 1:
            distributed.check_supported(model)
            distributed.agree_on_model(model)
            self.module = _TransparentDDP(model, find_unused_parameters=self._has_unused_parameters())

    @property
    def is_writer(self) -> bool:
        """Only rank 0 prints and writes files."""
        return self.rank == 0

    def _has_unused_parameters(self) -> bool:
        """Whether the loss of the first batch leaves a trainable parameter without a gradient
        (DDP must then be told, or its next step fails); the same answer on every rank."""
        from curvdiag.model_state import preserved_state

        batch, _ = next(self.batches())
        params = [p for p in self.model.parameters() if p.requires_grad]
        with preserved_state(self.model, train_mode=True):  # BatchNorm statistics stay as they are
            loss = self.recipe.loss(self.model, batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        unused = torch.tensor([float(any(g is None for g in grads))], dtype=torch.float64, device=self.device)
        return float(distributed.all_reduce_sum(unused)[0]) > 0

    # ------------------------------------------------------------------ data
    def batches(self, skip: int = 0) -> Iterator[Tuple[Any, int]]:
        """(this rank's share of the step's batch, its sample count), for every step, epoch after
        epoch, starting after ``skip`` steps (resume: the data order of an uninterrupted run)."""
        stream = self._stream()
        for _ in range(skip):
            next(stream)
        for batch in stream:
            if self.world_size > 1 and not self.recipe_shards:
                batch = shards.split_batch(batch, self.world_size)[self.rank]
            size = self.recipe.batch_size(batch)
            batch = self._on_device(batch)
            if size < 1:
                raise BadInput(f"a batch has fewer samples than the {self.world_size} ranks: rank {self.rank} got none",
                               hint="use batches of at least as many samples as processes, or fewer processes")
            yield batch, size

    def _stream(self) -> Iterator[Any]:
        """The recipe's batches (or this rank's, with data(rank, world_size)), cycled over epochs."""
        while True:
            count = 0
            data = self.recipe._call("data", self.rank, self.world_size) if self.recipe_shards else self.recipe.data()
            for batch in self.recipe.batches(data):
                if self.max_batches is not None and count >= self.max_batches:
                    break
                count += 1
                yield batch
            if count == 0:
                raise BadInput(f"recipe {self.recipe.name}: data() yielded no batches")

    def sharpness_batches(self) -> Tuple[List[Any], List[int]]:
        """This rank's shard of all batches (for λmax under the probe's sharding rules) and sizes."""
        batches = shards.shard(self.recipe, self.rank, self.world_size, self.max_batches)
        return [self._on_device(b) for b in batches], [self.recipe.batch_size(b) for b in batches]

    def _on_device(self, batch: Any) -> Any:
        """``batch`` with its tensors on the device; on the CPU the recipe's own object, untouched."""
        return batch if self.device.type == "cpu" else move_batch(batch, self.device, None)

    # ------------------------------------------------------------------ reductions
    def global_loss(self, local_loss: float, size: int) -> Tuple[float, int]:
        """(L = Σ n_r L_r / N, N) from this rank's mean loss and sample count; one collective."""
        if self.world_size == 1:
            return local_loss, size
        both = distributed.all_reduce_sum(torch.tensor([float(size), size * local_loss], dtype=torch.float64,
                                                       device=self.device))  # nccl reduces GPU tensors only
        total = float(both[0])
        return float(both[1]) / total, int(round(total))

    def share(self, size: int, total: int) -> float:
        """This rank's weight n_r / N in the global mean loss."""
        return size / total

    def backward_scale(self, size: int, total: int) -> float:
        """Multiplier of L_r before backward so that DDP's average over W ranks is ∇L: n_r W / N."""
        return size * self.world_size / total

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over ranks, in place (one collective); the tensor itself in one process."""
        return distributed.all_reduce_sum(tensor) if self.world_size > 1 else tensor

    def replica_spread(self) -> float:
        """max_i (max_r θ_i − min_r θ_i): 0.0 when every replica holds the same weights."""
        if self.world_size == 1:
            return 0.0
        theta = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).double()
        return float((distributed.all_reduce(theta.clone(), "max") - distributed.all_reduce(theta.clone(), "min")).max())
