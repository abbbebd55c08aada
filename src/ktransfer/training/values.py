"""Config values: the ``ConfigError``, and text or YAML values converted to a field's declared type and checked
against its bounds (the part of ``ktransfer.training.config`` that knows types, not keys or sections)."""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key, the bad value and its source (file:line)."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


def option(default, help: str, *, ge=None, gt=None, le=None, lt=None):
    """A dataclass field with help text and bounds (applied to each element of a tuple)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)



_HINTS: dict[type, dict[str, Any]] = {}
NONE_WORDS = ("none", "null", "~", "")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a config section class (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def is_union(tp) -> bool:
    """Whether ``tp`` is ``X | Y`` (either spelling)."""
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` (text like ``1,2`` too) as type ``tp`` (int, float, bool, str, Literal, tuple, list, X | None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_union(tp):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)):
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return convert_value(value, rest[0], key)
        errors = []
        for a in rest:
            try:
                return convert_value(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0], key=key)
    if value is None:
        raise ConfigError(f"{key}: must be {type_name(tp)}, got None (this key cannot be empty)", key=key)
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}{hint}", key=key)
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            text = value.strip().strip("()[]")
            items = [v.strip() for v in text.split(",")] if text else []
        if origin is list or len(args) == 2 and args[1] is Ellipsis:
            items = items if isinstance(items, list | tuple) else [items]
            return origin(convert_value(v, args[0], key) for v in items)
        if not isinstance(items, list | tuple) or len(items) != len(args):
            raise ConfigError(f"{key}: must have {len(args)} values ({type_name(tp)}), got {value!r}", key=key)
        return tuple(convert_value(v, a, key) for v, a in zip(items, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise ConfigError(f"{key}: must be true or false, got {value!r}", key=key)
    if tp is int:
        number = value
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    pass
        if isinstance(number, int) and not isinstance(number, bool):
            return number
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        raise ConfigError(f"{key}: must be an integer, got {value!r}", key=key)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be a number, got {value!r}", key=key)
        try:
            number = float(value) if isinstance(value, int | float | str) else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}", key=key)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: must be a string, got {value!r} (quote it)", key=key)
    raise ConfigError(f"{key}: unsupported field type {tp!r}", key=key)


def check_bounds(value: Any, meta, key: str) -> None:
    """Raise ConfigError unless ``value`` (each element of a tuple) is within the field's bounds."""
    for v in value if isinstance(value, tuple) else (value,):
        if v is None or not isinstance(v, int | float) or isinstance(v, bool):
            continue
        for bound, ok in (
            (meta.get("ge"), lambda x, b: x >= b),
            (meta.get("gt"), lambda x, b: x > b),
            (meta.get("le"), lambda x, b: x <= b),
            (meta.get("lt"), lambda x, b: x < b),
        ):
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{key}: must be {bounds_text(meta)}, got {value!r}", key=key)


def bounds_text(meta) -> str:
    """The bounds of a field in words (``>= 0 and <= 1``)."""
    ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    parts = [f"{op} {meta[k]}" for k, op in ops if meta.get(k) is not None]
    return " and ".join(parts)


def type_name(tp: Any) -> str:
    """A type as the user reads it in an error (``int | None``, ``one of a/b``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_union(tp):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + "/".join(map(str, args))
    if origin is tuple:
        return "(" + ", ".join(type_name(a) for a in args) + ")"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))
