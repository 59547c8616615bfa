"""Small BatchNorm CNN on digits (1x8x8 images), mini-batch SGD with momentum.

Model: Conv2d(1,8,3,p=1) -> BatchNorm2d(8) -> ReLU -> Conv2d(8,16,3,p=1)
       -> BatchNorm2d(16) -> ReLU -> MaxPool2d(2) -> Flatten -> Linear(256,10)
       (3,866 parameters; the BatchNorm layers also carry running_mean /
       running_var / num_batches_tracked buffers).
Data:  the first 1000 scikit-learn ``load_digits`` samples, pixels scaled to
       [0, 1], shaped (N, 1, 8, 8), as 4 consecutive mini-batches of 250.
Loss:  cross-entropy (mean over the batch).
Optimizer: ``torch.optim.SGD(params, lr=0.1, momentum=0.9)``.

Note: the loss depends on whether the model is in train mode (BatchNorm uses
the batch's own statistics, and a forward pass updates the running stats) or
eval mode (uses the stored running stats).  The checkpoint was trained in
train mode; its running stats are populated (non-default).

Checkpoint ``checkpoints/bn_cnn.pt``: 300 SGD steps (75 epochs of 4 batches).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _digits import batches, digits_images  # noqa: E402

SEED = 0


def model():
    """Fresh BN CNN, deterministically initialised (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )


def data():
    """4 mini-batches of 250: x (250, 1, 8, 8) float32, y (250,) int64."""
    x, y = digits_images(1000)
    return batches(x, y, 250)


def loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)
