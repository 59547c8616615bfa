"""A small tanh MLP in float64 over 4 mini-batches of 11 (6/5 per rank under 2 processes), SGD with
momentum 0.9 at a rate the throttle holds: the throttle's batch-noise samples (a gradient of the
previous batch on each floor step, summed over ranks) must follow one process's."""
import torch
import torch.nn.functional as F


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(44, 5, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return [(x[i:i + 11], y[i:i + 11]) for i in range(0, 44, 11)]


def loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def optimizer(params):
    return torch.optim.SGD(params, lr=2.0, momentum=0.9)
