"""ReLU MLP on digits, Adam at a learning rate where it diverges.

Model: MLP 64 -> 128 -> 128 -> 10 with ReLU activations (26,122 parameters).
Data:  the first 1000 scikit-learn ``load_digits`` samples, pixels scaled to [0, 1],
       as 4 consecutive mini-batches of 250 (fixed order, cycled).
Loss:  ``F.mse_loss(model(x), onehot(y))``, mean over all entries of the batch.
Optimizer: ``torch.optim.Adam(params, lr=0.1)`` (betas 0.9, 0.999); the threshold on the
       preconditioned sharpness is (2 + 2*0.9)/((1 - 0.9)*lr) = 38/lr = 380.

Why it diverges: Adam's first step moves every parameter by about lr·sign(g) = 0.1, which throws
the ReLU network far off: with ``--controller none`` the loss explodes at step 1. The best fixed
lr of the grid 0.001 / 0.003 / 0.01 / 0.03 is 0.01 (final loss 0.00031 after 300 steps); see
sample_models/README.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _digits import batches, digits_flat  # noqa: E402

LR = 0.1
SEED = 0
WIDTH = 128
BATCH = 250


def model():
    """Fresh MLP 64-128-128-10 (ReLU), deterministically initialised (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return nn.Sequential(
            nn.Linear(64, WIDTH),
            nn.ReLU(),
            nn.Linear(WIDTH, WIDTH),
            nn.ReLU(),
            nn.Linear(WIDTH, 10),
        )


def data():
    """4 mini-batches of 250: x (250, 64) float32 in [0,1], y (250,) int64."""
    x, y = digits_flat(1000)
    return batches(x, y, BATCH)


def loss(model, batch):
    """MSE against one-hot targets, mean over all entries of the batch."""
    x, y = batch
    out = model(x)
    return F.mse_loss(out, F.one_hot(y, 10).to(out.dtype))


def optimizer(params):
    """Adam at lr 0.1 (diverges without a controller)."""
    return torch.optim.Adam(params, lr=LR)
