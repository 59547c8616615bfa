"""The fixed sets of values the command line accepts, as ``str`` enums (typer shows them in
``--help``). Each mirrors a library tuple named in its docstring (``tests/test_cli.py`` checks
they agree); they live here, free of torch, so that ``--help`` starts without importing it.
"""

from __future__ import annotations

from enum import Enum

import typer


class UnknownChoice(typer.BadParameter):
    """A value outside a choice's set; the CLI prints it as ``--flag VALUE: unknown flag``."""

    def __init__(self, value: str, choices: list):
        super().__init__(f"{value}: unknown; choose one of {', '.join(choices)}")
        self.value, self.choices = value, choices


class Choice(str, Enum):
    """A ``str`` enum whose :meth:`parse` (typer's ``parser=``) accepts any case."""

    @classmethod
    def parse(cls, text):
        """The member named ``text`` (case-insensitive); :class:`UnknownChoice` otherwise."""
        if isinstance(text, cls):
            return text
        try:
            return cls(str(text).lower())
        except ValueError:
            raise UnknownChoice(str(text), [member.value for member in cls]) from None


class OptimizerFamily(Choice):
    """``curvdiag.loading.optimizer.FAMILIES``: the rows of the stability table (DESIGN §3.7)."""

    sgd = "sgd"
    momentum = "momentum"
    nesterov = "nesterov"
    adam = "adam"
    adamw = "adamw"


class EigenMethod(Choice):
    """How λmax is computed: Lanczos (default) or power iteration (DESIGN §3.1)."""

    lanczos = "lanczos"
    power = "power"


class DType(Choice):
    """``curvdiag.loading.target.DTYPES``: the floating-point types a model may be probed in."""

    float32 = "float32"
    float64 = "float64"


class HvpMethod(Choice):
    """``curvdiag.curvature.operator.HVP_METHODS``: how a Hessian-vector product is taken (DESIGN §3)."""

    auto = "auto"
    kept_graph = "kept-graph"
    double_backward = "double-backward"
    finite_difference = "finite-difference"


class ThrottleEngage(Choice):
    """``curvdiag.train.controllers.ENGAGE_MODES``: when the throttle takes over from the optimizer's rate."""

    edge = "edge"
    always = "always"


class FigureFormat(Choice):
    """File formats of the figures ``plot`` writes."""

    png = "png"
    svg = "svg"
    pdf = "pdf"


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text) -> int:
    """``--memory``: a number of bytes, with an optional unit (``512MiB``, ``2GiB``, ``1.5GB``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    raw = str(text).strip().replace(" ", "")
    number = raw.rstrip("KMGTBikmgtb")
    unit = raw[len(number):].lower()
    try:
        value = float(number) * _BYTE_UNITS[unit]
    except (KeyError, ValueError):
        raise typer.BadParameter(f"{text}: not a size; give bytes, e.g. 536870912, 512MiB or 2GiB") from None
    if not value >= 1 or value != value or value == float("inf"):
        raise typer.BadParameter(f"{text}: must be at least one byte")
    return int(value)

