"""full_batch.py's float64 tanh MLP, loss and data as 4 mini-batches of 11 (6/5 per rank under 2
processes), SGD with momentum 0.9 at a rate the throttle holds: the throttle's batch-noise samples
(a gradient of the previous batch on each floor step, summed over ranks) must follow one process's."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import full_batch  # noqa: E402
from full_batch import loss, model  # noqa: E402,F401  (the same model and loss)


def data():
    (x, y), = full_batch.data()
    return [(x[i:i + 11], y[i:i + 11]) for i in range(0, 44, 11)]


def optimizer(params):
    return torch.optim.SGD(params, lr=2.0, momentum=0.9)
