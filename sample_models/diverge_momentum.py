"""ReLU MLP on digits, mini-batch SGD with momentum 0.9 at a learning rate where it diverges.

Model: MLP 64 -> 128 -> 128 -> 10 with ReLU activations (26,122 parameters). The same
       model and initialisation as diverge_gd.py.
Data:  the first 1000 scikit-learn ``load_digits`` samples, pixels scaled to [0, 1],
       as 4 consecutive mini-batches of 250 (fixed order, cycled).
Loss:  ``F.mse_loss(model(x), onehot(y))``, mean over all entries of the batch.
Optimizer: ``torch.optim.SGD(params, lr=10.0, momentum=0.9)``; the heavy-ball threshold is
       (2 + 2*0.9)/lr = 0.38.

Why it diverges: lambda_max at init is 0.677 on all the data and 0.67-0.70 on each batch, so
lr * lambda_max = 6.8 against the momentum limit 3.8. The first step is a plain GD step (the
momentum buffer is empty), and its lr * lambda_max of 6.8 is far above 2.
``curvdiag train diverge_momentum.py --controller none`` stops at step 5 (loss above
1e3 x the initial 0.1016).

Fixed lr over 300 steps (full-data loss at the end): 0.1 -> 0.0141, 0.2 -> 0.0078,
0.5 -> 0.0032, 1 -> 0.0013, **2 -> 0.00048 (tuned best)**, 3 -> 0.00098, 5 -> diverges
(step 13), 6 -> 0.080 and 8 -> 0.090 (stalled near 0.09, the loss of a constant
prediction), 10 -> diverges.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _digits import batches, digits_flat, onehot_mse, relu_mlp  # noqa: E402

LR = 10.0
MOMENTUM = 0.9
SEED = 0
WIDTH = 128
BATCH = 250


def model():
    """Fresh MLP 64-128-128-10 (ReLU), deterministically initialised (seed SEED)."""
    return relu_mlp(SEED, WIDTH)


def data():
    """4 mini-batches of 250: x (250, 64) float32 in [0,1], y (250,) int64."""
    x, y = digits_flat(1000)
    return batches(x, y, BATCH)


def loss(model, batch):
    """MSE against one-hot targets, mean over all entries of the batch."""
    return onehot_mse(model, batch)


def optimizer(params):
    """SGD with heavy-ball momentum 0.9 at lr 10 (diverges without a controller)."""
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
