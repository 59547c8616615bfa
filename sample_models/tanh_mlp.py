"""tanh MLP on digits, trained by full-batch gradient descent -- the edge-of-stability sample.

Model: MLP 64 -> 200 -> 200 -> 10 with tanh activations (55,210 parameters).
Data:  the first 1000 scikit-learn ``load_digits`` samples, pixels scaled to
       [0, 1], as ONE full batch (``data()`` is a one-element list).
Loss:  ``F.mse_loss(model(x), onehot(y))`` -- MSE averaged over ALL entries
       (1000 samples x 10 classes).  (The sum-over-classes variant is 10x
       sharper: its initial lambda_max is ~23 > 2/0.3, so GD at lr 0.3 would
       diverge at once instead of sharpening progressively into the edge.)
Optimizer: plain full-batch GD, ``torch.optim.SGD(params, lr=0.3)``;
       stability threshold 2/lr = 6.667.

Checkpoints (``checkpoints/``, both from the same run, see make_checkpoints.py):
  tanh_early.pt  step 100   -- stable,          lambda_max ~2.8, lr*lambda_max/2 ~0.42
  tanh_edge.pt   step 3000  -- edge of stability, lambda_max ~6.74, lr*lambda_max/2 ~1.01
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _digits import digits_flat  # noqa: E402

LR = 0.3
SEED = 0


def model():
    """Fresh MLP 64-200-200-10 (tanh), deterministically initialised (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return nn.Sequential(
            nn.Linear(64, 200),
            nn.Tanh(),
            nn.Linear(200, 200),
            nn.Tanh(),
            nn.Linear(200, 10),
        )


def data():
    """One full batch: x (1000, 64) float32 in [0,1], y (1000,) int64 class labels."""
    x, y = digits_flat(1000)
    return [(x, y)]


def loss(model, batch):
    """MSE against one-hot targets, mean over all 1000 x 10 entries."""
    x, y = batch
    out = model(x)
    return F.mse_loss(out, F.one_hot(y, 10).to(out.dtype))


def optimizer(params):
    """Plain full-batch gradient descent at lr 0.3."""
    return torch.optim.SGD(params, lr=LR)
