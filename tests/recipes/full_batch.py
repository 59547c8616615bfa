"""Full-batch training of a small tanh MLP in float64 (44 samples: shards of 22/22 over 2 ranks,
15/15/14 over 3): the replay under several processes must follow the one-process losses.

For the fault tests, CURVDIAG_TEST_KILL_RANK1_AT=K makes rank 1 kill itself (SIGKILL) at its K-th
loss evaluation, and CURVDIAG_TEST_SLOW=S makes every loss evaluation sleep S seconds.
"""
import os
import signal
import time

import torch
import torch.nn.functional as F

_calls = [0]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(44, 5, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return [(x, y)]


def loss(model, batch):
    _calls[0] += 1
    kill_at = os.environ.get("CURVDIAG_TEST_KILL_RANK1_AT")
    if kill_at and os.environ.get("RANK") == "1" and _calls[0] >= int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("CURVDIAG_TEST_SLOW"):
        time.sleep(float(os.environ["CURVDIAG_TEST_SLOW"]))
    x, y = batch
    return F.mse_loss(model(x), y)


def optimizer(params):
    return torch.optim.SGD(params, lr=0.4, momentum=0.9)
