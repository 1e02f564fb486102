"""One configuration mechanism for every config dataclass (training and each benchmark).

A config is a dataclass whose fields are declared with `option`: default, help text and the
allowed values (choices, bounds), stated once. From it come the command-line flags
(`add_flags`), config files (TOML / YAML / JSON, `read_config_file`) and ``KEY=VALUE``
overrides (`parse_overrides`); `build` types every value, and `validate` checks every bound and
then the dataclass's own cross-field rules (an optional ``check()`` method). All of it happens
before anything heavy is loaded, and every mistake is a ValueError naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    flag: bool = True,
    cache_key: bool = True,
) -> Any:
    """A config field: its default, help, and the values it accepts (checked by `validate`):
    ``choices``, or bounds ``min`` <= value <= ``max`` and value > ``above``.

    ``flag=False`` keeps a field out of the generated command-line flags (it stays settable from
    a config file and as ``KEY=VALUE``); ``cache_key=False`` marks a benchmark setting that does
    not change any item's result (e.g. which items are selected), so cached items are reused
    across its values."""
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "min": min,
        "max": max,
        "above": above,
        "flag": flag,
        "cache_key": cache_key,
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bounds_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"in [{_number(low)}, {_number(high)}]"
    return f">= {_number(low)}" if low is not None else f"<= {_number(high)}"  # type: ignore[arg-type]


def validate(config: C) -> C:
    """Check every field's type, choices and bounds, then the config's own ``check()``."""
    types = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        kind = types[f.name]
        if value is None and _optional(kind):
            continue
        _check_type(f.name, value, _strip_optional(kind))
        meta = f.metadata
        if meta.get("choices"):
            for member in value if isinstance(value, list) else [value]:
                check_choice(f.name, member, meta["choices"])
        low, high = meta.get("min"), meta.get("max")
        above = meta.get("above")
        # A list's bounds hold for each of its members (e.g. adapter_scale).
        for member in value if isinstance(value, list) else [value]:
            if (low is not None or high is not None) and (
                not math.isfinite(member)
                or (low is not None and member < low)
                or (high is not None and member > high)
            ):
                noun = "an integer" if isinstance(member, int) else "a number"
                raise ValueError(
                    f"{f.name} must be {noun} {_bounds_text(low, high)}, got {member!r}"
                )
            if above is not None and not (math.isfinite(member) and member > above):
                raise ValueError(f"{f.name} must be > {_number(above)}, got {member!r}")
    check = getattr(config, "check", None)
    if check is not None:
        check()
    return config


def _optional(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


def _strip_optional(kind: Any) -> Any:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if _optional(kind) and len(args) == 1 else kind


def _check_type(name: str, value: Any, kind: Any) -> None:
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typing.get_origin(kind) is list:
        ok = isinstance(value, list)
        for member in value if ok else []:
            _check_type(name, member, _member_type(kind))
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"{name} expects {_type_name(kind)}, got {value!r}")


def _member_type(kind: Any) -> Any:
    """The member type of a list field (list[str] when unparameterized)."""
    return (typing.get_args(kind) or (str,))[0]


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        member = _member_type(kind)
        return "a list of " + ("strings" if member is str else "numbers")
    return getattr(kind, "__name__", str(kind))


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def describe(cls: type, prefix: str = "") -> str:
    """One line per key with its help and default, for ``--help`` epilogs."""
    defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    return "\n".join(
        f"  {prefix + name:<24} {text} (default {defaults[name]!r})"
        for name, text in field_help(cls).items()
    )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Values from a .toml, .yaml/.yml or .json file (a table of config keys)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ValueError(f"config file {str(path)!r}: use a .toml, .yaml, .yml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"config file {str(path)!r} is not valid: {err}") from err
    except ImportError as err:
        raise ValueError("YAML config files need PyYAML (`pip install pyyaml`)") from err
    except Exception as err:  # yaml.YAMLError, without importing yaml for the other formats
        if type(err).__module__.startswith("yaml"):
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        raise
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table of config keys")
    return values


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings into raw values (typed later by `build`)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like KEY=VALUE")
        values[key.strip()] = value
    return values


def build(cls: type[C], *layers: Mapping[str, Any], where: str = "config") -> C:
    """Apply value layers (lowest precedence first) to ``cls``'s defaults, type and validate."""
    types = typing.get_type_hints(cls)
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in types:
                raise ValueError(f"unknown {where} key {key!r}; known keys: {', '.join(types)}")
            merged[key] = coerce(key, value, types[key])
    return validate(cls(**merged))


def coerce(key: str, value: Any, kind: Any) -> Any:
    """Type a value from a file or the command line; strings are parsed as the field's type."""
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if _optional(kind):
            return None
    kind = _strip_optional(kind)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typing.get_origin(kind) is list:
            members = value
            if isinstance(value, str):
                members = [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(members, list):
                raise ValueError
            return [coerce(key, member, _member_type(kind)) for member in members]
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r} expects {_type_name(kind)}, got {value!r}") from None


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = ()) -> None:
    """One ``--flag`` per field of ``cls`` (booleans as ``--x/--no-x``); unset flags stay None,
    so a parsed namespace holds only what the user typed (`given_flags`)."""
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        if flag in parser._option_string_actions:  # a field shared by several benchmarks
            continue
        kind = _strip_optional(types[f.name])
        text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            # Checked by `validate`, which reports a bad value in one line (argparse would print
            # usage).
            text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
        if kind is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=text)


def given_flags(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of ``cls``'s fields that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(namespace).items() if k in names and v is not None}
