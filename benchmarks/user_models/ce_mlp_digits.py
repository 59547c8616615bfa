"""A user's model, not designed for curvdiag: a cross-entropy MLP on the first 1,024 digits (a
frozen random first layer, ReLU then SiLU), 4 batches of 256, SGD momentum 0.9 at lr 0.5 (stable:
η·λmax stays near a quarter of the edge 2(1 + β)/η; at lr 1 near a half)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 10))
    m[0].requires_grad_(False)
    return m


def data():
    digits = load_digits()
    x = torch.tensor(digits.data[:1024], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:1024])
    return [(x[i:i + 256], y[i:i + 256]) for i in range(0, 1024, 256)]


def loss(m, batch):
    return F.cross_entropy(m(batch[0]), batch[1])


def optimizer(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)
