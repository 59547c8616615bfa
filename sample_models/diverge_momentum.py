"""tanh MLP on digits, mini-batch SGD with momentum 0.9 at a learning rate where it diverges.

Model: MLP 64 -> 128 -> 128 -> 10 with tanh activations (26,122 parameters).
Data:  the first 1000 scikit-learn ``load_digits`` samples, pixels scaled to [0, 1],
       as 4 consecutive mini-batches of 250 (fixed order, cycled).
Loss:  ``F.mse_loss(model(x), onehot(y))``, mean over all entries of the batch.
Optimizer: ``torch.optim.SGD(params, lr=10.0, momentum=0.9)``; heavy-ball threshold
       (2 + 2*0.9)/lr = 0.38.

Why it diverges: heavy-ball momentum is stable while lr·λmax < 2 + 2β = 3.8, i.e. λmax < 0.38
here, far below the loss's curvature: with ``--controller none`` the run stops at step 5. The best
fixed lr of the grid 0.03 / 0.1 / 0.3 / 1 is 1 (final loss 0.0012 after 300 steps); see
sample_models/README.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _digits import batches, digits_flat  # noqa: E402

LR = 10.0
MOMENTUM = 0.9
SEED = 0
WIDTH = 128
BATCH = 250


def model():
    """Fresh MLP 64-128-128-10 (tanh), deterministically initialised (seed 0)."""
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
    """SGD with heavy-ball momentum 0.9 at lr 10 (diverges without a controller)."""
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
