"""The probes curvdiag runs: one line each, name → (function, result type), in report order.

A probe function takes ``(target, op, settings)`` — the :class:`~curvdiag.loading.target.Target`,
the :class:`~curvdiag.curvature.operator.CurvatureOperator` and the
:class:`~curvdiag.probes.runner.ProbeSettings` — and returns its report entries
``{name: typed result or Skipped}``: its own, and its ``companions`` (``lambda_max`` also
writes ``preconditioned_lambda_max`` and ``eos``). A function that fills several wanted entries
at once (``glass`` and ``power_law`` share their perturbations) runs once for all of them.

Functions are named as ``"module:function"`` and imported on first use, so that listing the
probes (``curvdiag probe --help``) does not load torch. Adding a probe: a module with its
function, its result record in :mod:`curvdiag.results.probe_results`, and one line below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

from curvdiag.results import probe_results as results

RUNNER = "curvdiag.probes.runner"


@dataclass(frozen=True)
class Probe:
    name: str
    function: str  # "module:function"
    result: type  # the record of its entry (curvdiag.results.probe_results)
    companions: Tuple[str, ...] = ()  # further entries it writes

    def load(self) -> Callable[..., Dict[str, Any]]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: Dict[str, Probe] = {probe.name: probe for probe in (
    Probe("lambda_max", f"{RUNNER}:run_lambda_max", results.LambdaMax,
          companions=("preconditioned_lambda_max", "eos")),
    Probe("hessian_trace", f"{RUNNER}:run_hessian_trace", results.HessianTrace),
    Probe("hessian_diag", f"{RUNNER}:run_hessian_diag", results.HessianDiag),
    Probe("hesscale_diag", f"{RUNNER}:run_hesscale_diag", results.HesScaleDiag),
    Probe("directional_curvature", f"{RUNNER}:run_directional_curvature", results.DirectionalCurvature),
    Probe("glass", f"{RUNNER}:run_glass_and_power_law", results.Glass),
    Probe("power_law", f"{RUNNER}:run_glass_and_power_law", results.PowerLaw),
    Probe("spectral_density", f"{RUNNER}:run_spectral_density", results.SpectralDensity),
)}

PROBE_NAMES: Tuple[str, ...] = tuple(REGISTRY)
# Entries written along with another probe's: asking for one of them runs that probe.
COMPANIONS: Dict[str, str] = {companion: probe.name for probe in REGISTRY.values() for companion in probe.companions}
