"""A tiny tanh MLP on fixed random data: small enough for dense Hessians in tests."""
import torch
import torch.nn.functional as F


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    # Unequal batches: the mean over samples must weight them by size.
    return [(x[:7], y[:7]), (x[7:], y[7:])]


def loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def optimizer(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)
