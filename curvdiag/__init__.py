"""curvdiag: training-stability diagnostics for PyTorch from the curvature of the loss.

The public Python API mirrors the CLI (README, "Python API"). Names are imported lazily, on
first use, so ``import curvdiag`` and ``curvdiag --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from curvdiag._version import __version__

# public name -> module that defines it
_PUBLIC = {
    "probe": "curvdiag.api",
    "BadInput": "curvdiag.errors",
    "ProbeFailed": "curvdiag.errors",
    "CurvdiagError": "curvdiag.errors",
    "CurvatureOperator": "curvdiag.curvature.operator",
    "lambda_max": "curvdiag.probes.sharpness",
    "hutchinson_trace": "curvdiag.probes.hutchinson",
    "hutchinson_diag": "curvdiag.probes.hutchinson",
    "stability_margin": "curvdiag.stability",
    "CurvatureThrottle": "curvdiag.train.adapters",
    "NewtonLearningRate": "curvdiag.train.adapters",
    "Monitor": "curvdiag.train.monitor",
    "Measurement": "curvdiag.train.monitor",
    "LightningMonitor": "curvdiag.train.lightning_callback",  # needs lightning
    "HuggingFaceMonitor": "curvdiag.train.huggingface_callback",  # needs transformers
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'curvdiag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(__all__)
