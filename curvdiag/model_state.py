"""Leave a model as it was: the one context every probe, check and measurement runs a model in.

Only torch here, so that the curvature operator and the recipe loader share it from below both.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
            torch.nn.FeatureAlphaDropout)


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module, train_mode: bool) -> Iterator[None]:
    """Evaluate ``model`` in eval mode (or train mode with dropout off) and leave it as it was.

    Each buffer is swapped for a copy during the block and the original put back afterwards:
    BatchNorm may update the copy (train mode), the original is never written, and a graph that
    saved the copy stays valid for later products. Every module's mode is restored.
    """
    modes = [(m, m.training) for m in model.modules()]
    swapped = []
    for m in model.modules():
        for name, buffer in list(m._buffers.items()):
            if buffer is not None:
                swapped.append((m, name, buffer))
                m._buffers[name] = buffer.clone()
    # Dropout modules also get p = 0: Hugging Face attention passes ``self.attn_dropout.p`` to the
    # fused kernel whenever its *parent* is in train mode, whatever the dropout module's own mode.
    rates = [(m, m.p) for m in model.modules() if isinstance(m, _DROPOUT)] if train_mode else []
    try:
        model.train(train_mode)
        for m, _ in rates:
            m.eval()
            m.p = 0.0
        yield
    finally:
        for m, name, buffer in swapped:
            m._buffers[name] = buffer
        for m, mode in modes:
            m.training = mode
        for m, p in rates:
            m.p = p
