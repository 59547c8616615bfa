"""Tiny transformer on digits, AdamW at a learning rate where the fixed-lr run fails.

Model: the pre-LN transformer of ``tiny_transformer.py`` (rows of an 8x8 image as 8 tokens,
       d_model 32, 2 blocks of 4-head SDPA attention and a GELU MLP, mean-pool, Linear(32, 10);
       26,346 parameters), initialised with seed ``SEED``.
Data:  the first 1000 scikit-learn ``load_digits`` samples, pixels scaled to [0, 1], shaped
       (N, 8, 8), as 4 consecutive mini-batches of 250 (fixed order, cycled).
Loss:  cross-entropy, mean over the batch (ln 10 = 2.303 for a uniform prediction).
Optimizer: ``torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)`` (betas 0.9, 0.999).

Why it fails: Adam's first update is about lr * sign(g) on every weight, 0.1 at once, which
throws the attention and LayerNorm gains far from their initial values. The run never diverges
(the loss stays finite and far below 1e3 x its initial 2.43), but it does not recover from those
first steps within 300: ``curvdiag train diverge_transformer.py --controller none`` ends with a
batch loss of 0.75.

Fixed lr over 300 steps (full-data loss at the end, seed 0): 0.001 -> 0.017, 0.002 -> 0.0046,
0.005 -> 0.0013, 0.01 -> 0.00083, **0.02 -> 0.00055 (tuned best)**, 0.05 -> 0.071, 0.1 -> 0.80
(1,450 x the tuned loss), 0.3 -> 1.44. Seeds 1 and 2: lr 0.1 ends at 0.44 and 0.38, the best
fixed lr at 0.0011 (lr 0.05) and 0.00056 (lr 0.02). One step takes about 11 ms on one thread.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _digits import batches, digits_rows  # noqa: E402
from tiny_transformer import TinyTransformer, loss  # noqa: E402,F401

LR = 0.1
WEIGHT_DECAY = 0.01
SEED = 0
BATCH = 250


def model():
    """Fresh tiny transformer (26,346 parameters), deterministically initialised (seed SEED)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return TinyTransformer()


def data():
    """4 mini-batches of 250: x (250, 8, 8) float32 in [0,1], y (250,) int64."""
    x, y = digits_rows(1000)
    return batches(x, y, BATCH)


def optimizer(params):
    """AdamW at lr 0.1, weight decay 0.01 (fails without a controller)."""
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
