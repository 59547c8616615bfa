"""A recipe that shards its own data: ``data(rank, world_size)`` returns batches rank, rank + N, …
of four dict batches (6, 6, 6, 4 samples); in one process data(0, 1) returns all four.

For the failure tests, CURVDIAG_TEST_RANK_FAILURE=raise makes data() raise on rank 1 and
=hang makes rank 1 sleep for a minute, and =abort-at-exit makes rank 1 abort (SIGABRT) as its
interpreter exits, after its work is done (a crash during teardown, as gloo can have).
"""
import atexit
import os
import time

import torch
import torch.nn.functional as F


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def data(rank, world_size):
    failure = os.environ.get("CURVDIAG_TEST_RANK_FAILURE")
    if rank == 1 and failure == "raise":
        raise RuntimeError("the shard of rank 1 is unreadable")
    if rank == 1 and failure == "hang":
        time.sleep(60)
    if rank == 1 and failure == "abort-at-exit":
        atexit.register(os.abort)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(22, 4, generator=g)
    y = torch.randn(22, 2, generator=g)
    bounds = [0, 6, 12, 18, 22]
    batches = [{"x": x[a:b], "y": y[a:b]} for a, b in zip(bounds, bounds[1:])]
    return batches[rank::world_size]


def loss(model, batch):
    return F.mse_loss(model(batch["x"]), batch["y"])


def optimizer(params):
    return torch.optim.SGD(params, lr=0.2, momentum=0.5)
