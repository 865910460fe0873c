"""Config files as data: reading TOML with clear errors, dotted `--set` overrides, and a
small TOML writer for the resolved config a run saves. No knowledge of the schema here: the
validator (`worldlm.config`) checks every key.

The writer is ours, not tomli_w: a run's id is the SHA-256 of this text (`session.config_digest`),
so its layout must not change, and tomli_w lays out the same data differently (lists one item
per line, no header for a table that holds only tables); see docs/design-notes.md."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from worldlm.errors import ConfigError


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file into a dict, with a ConfigError naming the file on failure."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its key path and a TOML-typed value (a bare word is a string)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return override_key_path(key, item), value


def override_key_path(key: str, item: str) -> list[str]:
    """The parts of a dotted key. Node paths may be written bare (nodes.world/med.strategy) or
    quoted as in TOML, which also allows dots in them (nodes."world/v1.2".strategy)."""
    try:
        node: Any = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        parts = [part.strip() for part in key.split(".")]
        if any(not part or '"' in part for part in parts):
            raise ConfigError(f"override {item!r} must look like section.key=value") from None
        return parts
    parts = []
    while isinstance(node, dict):
        ((part, node),) = node.items()
        parts.append(part)
    return parts


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each dotted override set; the validator checks the keys."""
    result: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = result
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[: i + 1])} is not a table")
            node = child
        node[keys[-1]] = value
    return result


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for config dicts (tables, scalars and lists of scalars)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out = "\n".join(lines)
    for key, value in tables:
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        body = to_toml(value, name)
        header = f"[{name}]"
        out += ("\n\n" if out else "") + header + ("\n" + body if body else "")
    return out.strip() + ("\n" if not prefix else "")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "")
    return key if bare.isascii() and bare.isalnum() else _toml_string(key)


# TOML basic strings: a backslash, a quote and control characters (tab aside) are escaped.
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(value: str) -> str:
    out = []
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
