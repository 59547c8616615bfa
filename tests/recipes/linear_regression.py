"""Least squares (a quadratic loss): GD diverges exactly when lr > 2/λmax, λmax = 2·λmax(XᵀX/n)."""
import torch
import torch.nn.functional as F


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 1)


def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=g) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2])
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0], [3.0]]) + 0.1 * torch.randn(64, 1, generator=g)
    return [(x, y)]


def loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def optimizer(params):
    return torch.optim.SGD(params, lr=0.01)
