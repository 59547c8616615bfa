"""Typed records ↔ JSON, and the JSON Schema of a record, from one description: the dataclass.

A record is a dataclass whose fields are ``bool``, ``int``, ``float``, ``str``, ``Optional[X]``,
``List[X]``, ``Dict[str, Any]`` or another record. Field metadata adjusts the JSON side:
``key`` (the JSON name, when it is not a Python name: ``"lambda"``) and ``omit_if_none`` (the
key is absent rather than null when the value is None). JSON has no inf or nan: a ``float``
read as null (how :func:`~curvdiag.results.json_safe.finite_or_none` writes a non-finite
number) comes back as nan, so a ``float`` field's schema admits null.

Reading is tolerant where reports of older versions differ: unknown keys are ignored, a missing
key takes the field's default (None for ``Optional``); a missing required key or a value of the
wrong shape is :class:`~curvdiag.errors.BadInput` naming where it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Dict, List, Type, TypeVar, Union

from curvdiag.errors import BadInput

R = TypeVar("R")
_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string"}


def json_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_of(hint: Any) -> Any:
    """X for ``Optional[X]``, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)]
    return None


def encode(value: Any) -> Any:
    """A record (or list of records) → JSON-ready dicts and lists, keys in field order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get("omit_if_none"):
                continue
            out[json_key(f)] = encode(item)
        return out
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def decode(hint: Any, data: Any, where: str) -> Any:
    """JSON data → a value of type ``hint``; BadInput naming ``where`` when it does not fit."""
    inner = _optional_of(hint)
    if inner is not None:
        return None if data is None else decode(inner, data, where)
    if hint is Any:
        return data
    if dataclasses.is_dataclass(hint):
        return decode_record(hint, data, where)
    origin = typing.get_origin(hint)
    if origin in (list, List):
        if not isinstance(data, list):
            raise BadInput(f"{where}: expected a list, got {data!r:.60}")
        (item,) = typing.get_args(hint)
        return [decode(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin in (dict, Dict):
        if not isinstance(data, dict):
            raise BadInput(f"{where}: expected an object, got {data!r:.60}")
        return dict(data)
    if hint is float:
        if data is None:
            return math.nan
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
    elif hint is int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
        if isinstance(data, float) and data.is_integer():
            return int(data)
    elif hint in _SCALARS and isinstance(data, hint):
        return data
    raise BadInput(f"{where}: expected {_SCALARS.get(hint, hint)}, got {data!r:.60}")


def decode_record(cls: Type[R], data: Any, where: str) -> R:
    """A JSON object → the record ``cls`` (see the module docstring for what is tolerated)."""
    if not isinstance(data, dict):
        raise BadInput(f"{where}: expected an object, got {data!r:.60}")
    hints, values = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = json_key(f)
        if key in data:
            values[f.name] = decode(hints[f.name], data[key], f"{where}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if _optional_of(hints[f.name]) is None:
                raise BadInput(f"{where}: no {key!r}")
            values[f.name] = None
    return cls(**values)


def schema(hint: Any) -> Dict[str, Any]:
    """The JSON Schema (draft 2020-12 subset) of what :func:`encode` writes for ``hint``."""
    inner = _optional_of(hint)
    if inner is not None:
        return {"anyOf": [schema(inner), {"type": "null"}]}
    if hint is Any:
        return {}
    if dataclasses.is_dataclass(hint):
        return record_schema(hint)
    origin = typing.get_origin(hint)
    if origin in (list, List):
        return {"type": "array", "items": schema(typing.get_args(hint)[0])}
    if origin in (dict, Dict):
        return {"type": "object"}
    if hint is float:
        return {"type": ["number", "null"]}  # null: a non-finite number (JSON has no inf or nan)
    return {"type": _SCALARS[hint]}


def record_schema(cls: type) -> Dict[str, Any]:
    hints = _hints(cls)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        properties[json_key(f)] = schema(hints[f.name])
        if not f.metadata.get("omit_if_none"):  # encode writes every other field
            required.append(json_key(f))
    out: Dict[str, Any] = {"type": "object", "title": cls.__name__, "properties": properties}
    if required:
        out["required"] = required
    return out
