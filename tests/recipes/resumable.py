"""A float64 MLP with dropout (the RNG), SGD with momentum and a step schedule over four batches:
everything a resumed run must restore to continue exactly.

Fault hook for the kill tests (tests/test_crash_safety.py): with ``RESUMABLE_HALT=loss:K`` (or
``fsync:K``) the K-th call of loss() (of os.fsync: inside a checkpoint or run.json write) in this
process appends its pid to the file ``RESUMABLE_HALTED`` and waits there to be killed, so a test signals the
run at an exact moment without racing it."""
import os
import time

import torch
import torch.nn.functional as F

_HALT = os.environ.get("RESUMABLE_HALT", "")
_calls = {"loss": 0, "fsync": 0}


def _maybe_halt(kind):
    _calls[kind] += 1
    if _HALT == f"{kind}:{_calls[kind]}":
        with open(os.environ["RESUMABLE_HALTED"], "a") as halted:  # one line per process: its pid
            halted.write(f"{os.getpid()}\n")
        for _ in range(600):  # the test signals within milliseconds; give up after a minute
            time.sleep(0.1)


if _HALT.startswith("fsync:"):
    _fsync = os.fsync

    def _halting_fsync(fd):
        _maybe_halt("fsync")
        return _fsync(fd)

    os.fsync = _halting_fsync


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(8, 3)).double()


def data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=g)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]


def loss(model, batch):
    _maybe_halt("loss")
    x, y = batch
    return F.cross_entropy(model(x), y)


def optimizer(params):
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


def scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
