"""curvdiag: training-stability diagnostics for PyTorch from the curvature of the loss.

The public API mirrors the CLI: load a recipe and checkpoint into a :class:`Target`, wrap it
in a :class:`CurvatureOperator`, and run probes (:func:`lambda_max`, :func:`hutchinson_trace`,
:func:`hutchinson_diag`) and the stability margins of :mod:`curvdiag.stability` on it.
"""

__version__ = "0.1.0"

from curvdiag.errors import BadInput, ProbeFailed  # noqa: E402
from curvdiag.operator import CurvatureOperator  # noqa: E402
from curvdiag.sharpness import lambda_max  # noqa: E402
from curvdiag.hutchinson import hutchinson_diag, hutchinson_trace  # noqa: E402

__all__ = [
    "__version__",
    "BadInput",
    "ProbeFailed",
    "CurvatureOperator",
    "lambda_max",
    "hutchinson_trace",
    "hutchinson_diag",
]
