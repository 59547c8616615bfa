"""ReLU MLP on digits, full-batch GD at a learning rate where the fixed-lr run diverges.

Model: MLP 64 -> 128 -> 128 -> 10 with ReLU activations (26,122 parameters).
Data:  the first 1000 scikit-learn ``load_digits`` samples, pixels scaled to [0, 1],
       as ONE full batch (``data()`` is a one-element list).
Loss:  ``F.mse_loss(model(x), onehot(y))``, the MSE averaged over all 1000 x 10 entries.
Optimizer: plain full-batch GD, ``torch.optim.SGD(params, lr=10.0)``; stability threshold
       2/lr = 0.2.

Why it diverges: lambda_max of the loss at init is 0.677 (float64 Lanczos), so
lr * lambda_max / 2 = 3.4 from step 0. The top eigendirections are unstable and the outputs
grow geometrically. ``curvdiag train diverge_gd.py --controller none`` stops at step 5, when
the loss passes 1e3 x its initial 0.1013.

Fixed lr over 300 steps (full-data loss at the end): 0.5 -> 0.0233, 1 -> 0.0130, 2 -> 0.0067,
3 -> 0.0051, **5 -> 0.0040 (tuned best)**, 8 -> 0.021, 10 -> diverges. lr 5 starts at
lr*lambda_max/2 = 1.7 and survives because GD self-stabilises at the edge of stability:
lambda_max falls to 0.43-0.51 from step 100 on (lr*lambda_max/2 = 1.1-1.3), where a
throttle that keeps lr*lambda_max/2 <= kappa < 1 cannot follow.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _digits import digits_flat, onehot_mse, relu_mlp  # noqa: E402

LR = 10.0
SEED = 0
WIDTH = 128


def model():
    """Fresh MLP 64-128-128-10 (ReLU), deterministically initialised (seed SEED)."""
    return relu_mlp(SEED, WIDTH)


def data():
    """One full batch: x (1000, 64) float32 in [0,1], y (1000,) int64 class labels."""
    x, y = digits_flat(1000)
    return [(x, y)]


def loss(model, batch):
    """MSE against one-hot targets, mean over all 1000 x 10 entries."""
    return onehot_mse(model, batch)


def optimizer(params):
    """Plain full-batch gradient descent at lr 10 (diverges without a controller)."""
    return torch.optim.SGD(params, lr=LR)
