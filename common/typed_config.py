"""Strict config dataclasses from plain containers: the one place a composed Hydra config turns
into typed objects.

The dataclasses are the single source of every default. The YAML under conf/ holds only what an
option changes (`loss=jsd` sets the divergence), so `with_defaults` lays the composed values over
the dataclass defaults before `build_dataclass` checks them: an unknown key, a wrong type or an
unknown choice raises `ConfigError` with one line naming the key and the valid choices.

A field whose config key is a Python keyword is declared under another name with
`field(metadata={"key": "async"})`; `as_dict` writes every config under its keys, and it is what
a config is shown, saved and compared as.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Literal

from distill.common.errors import ConfigError


def with_defaults(cls, composed: dict) -> dict:
    """`composed` laid over the defaults of dataclass `cls`: a nested dataclass merges field by
    field; any other value (a list, a mapping of entries such as the students) replaces the
    default whole, so that Hydra's `~key` deletions inside it hold."""
    return _merge(cls, as_dict(cls()), composed)


def as_dict(obj) -> Any:
    """`dataclasses.asdict` with each field under its config key."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {_key(f): as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_dict(v) for v in obj)
    return obj


def _key(spec) -> str:
    return spec.metadata.get("key", spec.name)


def _hints(cls) -> dict:
    """Type hints by config key."""
    hints = typing.get_type_hints(cls)
    return {_key(f): hints[f.name] for f in fields(cls)}


def _merge(cls, defaults: dict, composed: dict) -> dict:
    hints = _hints(cls)
    merged = dict(defaults)
    for key, value in composed.items():
        nested = _dataclass_in(hints.get(key))
        if nested is not None and isinstance(value, dict) and isinstance(defaults.get(key), dict):
            merged[key] = _merge(nested, defaults[key], value)
        else:
            merged[key] = value
    return merged


def _dataclass_in(kind) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), else None."""
    if is_dataclass(kind):
        return kind
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if is_dataclass(a)]
        return options[0] if len(options) == 1 else None
    return None


def build_dataclass(cls, raw: dict):
    """`cls` from plain containers; an unknown key or a wrong type raises a one-line ConfigError."""
    return _build(cls, raw, "")


def _build(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = _hints(cls)
    known = {_key(f): f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; valid keys{' in ' + path if path else ''}: {', '.join(known)}")
    values = {}
    for name, spec in known.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            values[spec.name] = _convert(hints[name], data[name], key)
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(f"missing config key '{key}'")
    return cls(**values)


def _convert(kind, value: Any, key: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: '{value}' is not a valid choice; valid: {', '.join(map(str, args))}")
        return value
    if is_dataclass(kind):
        return _build(kind, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0]
        converted = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return converted if origin is list else tuple(converted)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if kind is Any:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {kind}")
