"""JSON has no inf or nan: reports and run logs write them as null, and readers take null back.
And reading a JSON file curvdiag wrote, with one-line errors when it is not one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from curvdiag.errors import BadInput


def finite(value: Any) -> Optional[float]:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth of dicts and lists, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def read_json(path: Path) -> Any:
    """The JSON document in ``path``; BadInput when it cannot be read or is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: not valid JSON ({exc})",
                       hint="give a run directory or a report written by curvdiag probe --json") from exc
