"""GELU MLP on digits trained with Adam -- the preconditioned-sharpness sample.

Model: MLP 64 -> 128 -> 128 -> 10 with GELU activations (26,122 parameters).
Data:  the first 1000 scikit-learn ``load_digits`` samples, pixels scaled to
       [0, 1], flattened to 64 features, as 4 consecutive mini-batches of 250.
Loss:  cross-entropy (mean over the batch).
Optimizer: ``torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))``.
       For Adam the relevant stability quantity is the *preconditioned*
       sharpness lambda_max(P^-1 H), P = diag(sqrt(v_hat) + eps), compared with
       the threshold 38/lr (= (2 + 2*beta1) / ((1 - beta1) * lr) for beta1=0.9)
       = 38,000 at lr 1e-3.

Checkpoint ``checkpoints/adam_mlp.pt``: 500 Adam steps (125 epochs of 4 batches);
the saved optimizer state holds exp_avg, exp_avg_sq and step for every parameter.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _digits import batches, digits_flat  # noqa: E402

SEED = 0


def model():
    """Fresh MLP 64-128-128-10 (GELU), deterministically initialised (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return nn.Sequential(
            nn.Linear(64, 128),
            nn.GELU(),
            nn.Linear(128, 128),
            nn.GELU(),
            nn.Linear(128, 10),
        )


def data():
    """4 mini-batches of 250: x (250, 64) float32 in [0,1], y (250,) int64."""
    x, y = digits_flat(1000)
    return batches(x, y, 250)


def loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def optimizer(params):
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
