"""The JSON Schema of a probe report, generated from the typed results; the committed copy is
``report.schema.json`` beside this module (a test checks that it is up to date).

Regenerate after changing a record: ``python -m curvdiag.results.schema``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from curvdiag.results.codec import record_schema
from curvdiag.results.probe_results import ENTRY_TYPES, SCHEMA_VERSION, ProbeReport, Skipped

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def report_schema() -> Dict[str, Any]:
    """The JSON Schema of ``ProbeReport.to_json()`` after ``finite_or_none`` (non-finite → null).
    ``probes`` admits only the registered entries, each either its record or ``{"skipped": reason}``."""
    document = record_schema(ProbeReport)
    skipped = record_schema(Skipped)
    document["properties"]["probes"] = {
        "type": "object",
        "properties": {name: {"anyOf": [record_schema(kind), skipped]} for name, kind in ENTRY_TYPES.items()},
        "additionalProperties": False,
    }
    document["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "description": "A curvdiag probe report (curvdiag probe --json). Generated from "
                           "curvdiag/results/probe_results.py by curvdiag.results.schema; do not edit.",
            **document}


def schema_text() -> str:
    return json.dumps(report_schema(), indent=2, ensure_ascii=False) + "\n"


def write_report_schema(path: Path = SCHEMA_PATH) -> Path:
    Path(path).write_text(schema_text(), encoding="utf-8")
    return Path(path)


if __name__ == "__main__":
    print(write_report_schema())
