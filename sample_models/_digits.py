"""Shared, deterministic data helpers for the bundled curvdiag sample models.

All samples use scikit-learn's bundled ``load_digits`` (1797 8x8 grey-scale
images, 10 classes, shipped inside scikit-learn: nothing is downloaded).
Pixels (0..16) are scaled to [0, 1].  Every sample uses the FIRST ``n``
samples in the file's fixed order -- no shuffling, no randomness.
"""
from functools import lru_cache

import torch

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
