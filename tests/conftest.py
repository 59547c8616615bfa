"""Shared references: dense Hessians by double backward (torch.autograd.functional.hessian,
not torch.func.hessian, which is wrong on affine LayerNorm in torch 2.13: DESIGN §3)."""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any, Callable, List, Sequence

import jsonschema
import pytest
import torch
from torch.func import functional_call

from curvdiag.results.json_safe import finite_or_none
from curvdiag.results.probe_results import ProbeReport
from curvdiag.results.schema import SCHEMA_PATH

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).resolve().parent / "recipes"
SAMPLES = ROOT / "sample_models"


class _Functional:
    """Stands in for the model inside loss_fn: calls it with the given parameters."""

    def __init__(self, model: torch.nn.Module, params: dict):
        self.model, self.params = model, params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.params, args, kwargs)


def flat_loss(model: torch.nn.Module, batches: Sequence[Any], loss_fn: Callable, sizes: Sequence[int]) -> Callable:
    """θ (flat, trainable parameters in named_parameters order) ↦ sample-weighted mean loss."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = float(sum(sizes))

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, p in named:
            params[name] = flat[start:start + p.numel()].view_as(p)
            start += p.numel()
        proxy = _Functional(model, params)
        return sum(n / total * loss_fn(proxy, b) for n, b in zip(sizes, batches))

    return loss_of


def dense_hessian(model: torch.nn.Module, batches: Sequence[Any], loss_fn: Callable, sizes: Sequence[int]) -> torch.Tensor:
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    return torch.autograd.functional.hessian(flat_loss(model, batches, loss_fn, sizes), theta)


def quadratic_spectrum(eigenvalues: List[float], seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A dense symmetric matrix Q diag(λ) Qᵀ with a random orthogonal Q."""
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return ((a + a.T) / 2).to(dtype)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield


_REPORT_SCHEMA = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


@pytest.fixture(autouse=True)
def _every_report_matches_the_schema(monkeypatch):
    """Every report the suite writes (``ProbeReport.to_json``, in this process) is checked against
    the committed JSON Schema as it is written, non-finite numbers as null like the CLI writes them."""
    write = ProbeReport.to_json

    def checked(report: ProbeReport) -> dict:
        document = write(report)
        _REPORT_SCHEMA.validate(finite_or_none(document))
        return document

    monkeypatch.setattr(ProbeReport, "to_json", checked)
