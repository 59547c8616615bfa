"""ReLU MLP on digits, SGD with momentum 0.9 under warm-up + cosine, at a peak lr where it diverges.

Model: MLP 64 -> 128 -> 128 -> 10 with ReLU activations (26,122 parameters), the model and
       initialisation of diverge_momentum.py.
Data:  diverge_momentum.py's (imported): the first 1000 ``load_digits`` samples in [0, 1],
       as 4 consecutive mini-batches of 250 (fixed order, cycled).
Loss:  diverge_momentum.py's: ``F.mse_loss(model(x), onehot(y))``, mean over all entries.
Optimizer: ``torch.optim.SGD(params, lr=LR, momentum=0.9)``; LR is the schedule's peak.
Scheduler: ``scheduler(optimizer)``, a ``LambdaLR``: linear warm-up over the first 30 steps
       (factor (k + 1)/30 at step k), then cosine from 1 to 0 over steps 30..300; after step
       300 the factor stays 0. ``curvdiag train`` steps it once per step and the throttle
       multiplies the rate it sets.

Why it diverges: lambda_max at init is 0.677 (0.67-0.70 per batch), so the heavy-ball limit
lr * lambda_max <= 3.8 holds up to lr 5.6. The warm-up passes that at step 8 (lr 6.0) and keeps
rising by 0.67 a step; ``curvdiag train diverge_schedule.py --controller none`` stops at step 12
(lr 8.7; the loss passes 1e3 x the initial 0.1016). The warm-up alone does not save a peak this
high: the schedule reaches the unstable rates long before the cosine brings them down.

Peak lr of the same schedule over 300 steps (full-data loss at the end, seed 0): 0.5 -> 0.0063,
1 -> 0.0029, 2 -> 0.0013, **3 -> 0.0012 (tuned best)**, 5 -> 0.090 and 10 -> 0.090 (stalled at
the loss of a constant prediction), 20 -> diverges (step 12). Seeds 1 and 2: best 3 (0.0010,
0.0013); 10 diverges (steps 23, 40); 20 diverges (steps 22, 12).
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _digits import relu_mlp  # noqa: E402
from diverge_momentum import WIDTH, data, loss  # noqa: E402,F401  (the same data and loss)

LR = 20.0
MOMENTUM = 0.9
SEED = 0
WARMUP = 30
TOTAL = 300


def model():
    """Fresh MLP 64-128-128-10 (ReLU), deterministically initialised (seed SEED)."""
    return relu_mlp(SEED, WIDTH)


def optimizer(params):
    """SGD with heavy-ball momentum 0.9 at the schedule's peak lr."""
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def schedule(step):
    """The factor on the peak lr at step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / (TOTAL - WARMUP))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler(optimizer):
    """Warm-up + cosine as a ``torch.optim.lr_scheduler.LambdaLR`` (stepped once per step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
