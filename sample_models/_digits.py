"""Shared, deterministic data helpers (and the divergence recipes' model and loss) for the bundled
curvdiag sample models.

All samples use scikit-learn's bundled ``load_digits`` (1797 8x8 grey-scale
images, 10 classes, shipped inside scikit-learn: nothing is downloaded).
Pixels (0..16) are scaled to [0, 1].  Every sample uses the FIRST ``n``
samples in the file's fixed order -- no shuffling, no randomness.
"""
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

N_TRAIN = 1000


@lru_cache(maxsize=None)
def _load():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0  # (1797, 64) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)  # (1797,)
    return x, y


def digits_flat(n=N_TRAIN):
    """First ``n`` samples as ``(x, y)``: x float32 (n, 64) in [0,1], y int64 (n,)."""
    x, y = _load()
    return x[:n].clone(), y[:n].clone()


def digits_images(n=N_TRAIN):
    """First ``n`` samples as ``(x, y)``: x float32 (n, 1, 8, 8), y int64 (n,)."""
    x, y = digits_flat(n)
    return x.view(n, 1, 8, 8), y


def digits_rows(n=N_TRAIN):
    """First ``n`` samples as token sequences: x float32 (n, 8, 8) = 8 rows of 8 pixels."""
    x, y = digits_flat(n)
    return x.view(n, 8, 8), y


def batches(x, y, batch_size):
    """Split ``(x, y)`` into a list of consecutive ``(x, y)`` batches (fixed order)."""
    n = x.shape[0]
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def relu_mlp(seed, width=128):
    """Fresh MLP 64-width-width-10 with ReLU (26,122 parameters at width 128), initialised from
    ``seed`` without touching the global RNG: the model of every ``diverge_*.py`` recipe."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )


def onehot_mse(model, batch):
    """MSE of ``model(x)`` (n, 10) against one-hot targets of y (n,), mean over all n x 10 entries."""
    x, y = batch
    out = model(x)
    return F.mse_loss(out, F.one_hot(y, 10).to(out.dtype))
