"""A small CNN with BatchNorm (probed in eval mode) over three batches (8, 8, 5): the Gauss-Newton
control variate's tr(G) comes from torch.func per-sample gradients here (no layer rule covers a
Conv2d), which the several-process test compares with one process."""
import torch
import torch.nn.functional as F


def model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 3))
    with torch.no_grad():  # running statistics away from their initial values
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
    return net


def data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(21, 1, 5, 5, generator=g)
    y = torch.randint(0, 3, (21,), generator=g)
    bounds = [0, 8, 16, 21]
    return [(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]


def loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
