"""Leave a model as it was: the one context every probe, check and measurement runs a model in.

Only torch here, so that the curvature operator and the recipe loader share it from below both.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Any, Dict, Iterator, Optional

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


_ATOMS = (bool, int, float, str, bytes)  # immutable: shared, not copied


def snapshot(state: Any, _memo: Optional[Dict[Any, torch.Tensor]] = None) -> Any:
    """A copy of a state (``state_dict()`` of a model, optimizer or scheduler: dicts, lists and
    tuples of tensors and plain values) that later in-place updates of the live tensors cannot
    reach: every tensor cloned once (entries that view the same tensor, as tied weights do, share
    one clone, as ``copy.deepcopy`` shares their storage), every container rebuilt, an
    OrderedDict's ``_metadata`` (module versions that ``load_state_dict`` reads) kept. What deepcopy
    gives for these at a fraction of its per-object cost: the training loop takes one every step,
    and deepcopy made a 26k-parameter MLP's Trainer step ~2× a plain loop's. Other objects are
    deep-copied."""
    memo = {} if _memo is None else _memo
    if isinstance(state, torch.Tensor):
        key = (state.untyped_storage().data_ptr(), state.storage_offset(), tuple(state.shape), tuple(state.stride()),
               state.dtype, state.device)
        if key not in memo:
            memo[key] = state.detach().clone()
        return memo[key]
    if type(state) in (dict, OrderedDict):
        copied = type(state)((key, snapshot(value, memo)) for key, value in state.items())
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            copied._metadata = copy.deepcopy(metadata)
        return copied
    if type(state) in (list, tuple):
        if all(value is None or type(value) in _ATOMS for value in state):  # an optimizer group's parameter ids
            return type(state)(state)
        return type(state)(snapshot(value, memo) for value in state)
    if state is None or type(state) in _ATOMS:
        return state
    return copy.deepcopy(state)
