"""ReLU MLP on digits, Adam at a learning rate where it diverges on the first step.

Model: MLP 64 -> 128 -> 128 -> 10 with ReLU activations (26,122 parameters), the same
       initialisation as diverge_gd.py.
Data:  the first 1000 scikit-learn ``load_digits`` samples, pixels scaled to [0, 1],
       as 4 consecutive mini-batches of 250 (fixed order, cycled).
Loss:  ``F.mse_loss(model(x), onehot(y))``, mean over all entries of the batch.
Optimizer: ``torch.optim.Adam(params, lr=0.1)`` (betas 0.9, 0.999); the threshold on the
       preconditioned sharpness is (2 + 2*0.9)/((1 - 0.9)*lr) = 38/lr = 380.

Why it diverges: Adam's first update is lr * sign(g) on every weight (v_hat_1 = g_1^2), so
every weight moves by 0.1 at once. With 64-128 inputs per unit the changes add up, and the
mean |output| goes from about 0.1 to 24.5. The loss after that one step is 871, which is
8.6e3 x the initial 0.1016, so ``curvdiag train diverge_adam.py --controller none`` stops at
step 1. Measured in the metric of that first step (P = |g| + eps), the curvature is far above
380: a throttle that measures in the Euclidean metric before Adam has any state (curvdiag
before commit 3a537b4) lets the step through and diverges too.

Fixed lr over 300 steps (full-data loss at the end): 0.001 -> 0.0036, 0.002 -> 0.0015,
0.005 -> 0.00063, **0.01 -> 0.00027 (tuned best)**, 0.02 -> 0.0045, 0.05 -> 0.090 (the first
steps kill the fit and it stalls at the constant-prediction loss), 0.07 and 0.1 -> diverge at
step 1.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _digits import relu_mlp  # noqa: E402
from diverge_momentum import WIDTH, data, loss  # noqa: E402,F401  (the same data and loss)

LR = 0.1
SEED = 0


def model():
    """Fresh MLP 64-128-128-10 (ReLU), deterministically initialised (seed SEED)."""
    return relu_mlp(SEED, WIDTH)


def optimizer(params):
    """Adam at lr 0.1 (diverges without a controller)."""
    return torch.optim.Adam(params, lr=LR)
