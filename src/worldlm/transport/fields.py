"""Checks of JSON metadata fields arriving from another machine: each returns the value, typed and
normalised, or raises `WireError` naming the field (`where`) and what was wrong."""

from __future__ import annotations

import math
import re
from typing import Any

from worldlm.errors import WireError, shown
from worldlm.wire import MAX_TENSOR_NAME, is_tensor_name

MAX_TEXT = 1024  # run ids, nonces, codec names: far below this
MAX_NODE_PATH = 256
_NODE_PATH = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


def check_json(where: str, value: Any) -> None:
    """Refuse values json.dumps would reject or silently change (non-string keys)."""
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_json(f"{where}[{i}]", item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise WireError(f"{where} has key {key!r}; JSON object keys must be strings")
            check_json(f"{where}[{key!r}]", item)
        return
    raise WireError(f"{where} holds a {type(value).__name__}, which is not a JSON value")


def json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    if value is None:
        return "null"
    return names.get(type(value), "object" if isinstance(value, dict) else type(value).__name__)


def text(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise WireError(f"{where} must be a string, got {json_type(value)}")
    if len(value) > MAX_TEXT:
        raise WireError(f"{where} is {len(value)} characters long, more than {MAX_TEXT}")
    return value


def node_path(where: str, value: Any) -> str:
    """A node path: names of letters, digits, '_', '-' or '.' joined by '/' (what a config's
    tree and a certificate allow), at most MAX_NODE_PATH characters."""
    path = text(where, value)
    if len(path) > MAX_NODE_PATH or not _NODE_PATH.fullmatch(path):
        raise WireError(
            f"{where} is not a node path (names of letters, digits, '_', '-' or '.' joined by "
            f"'/', at most {MAX_NODE_PATH} characters): {shown(repr(path))}"
        )
    return path


def tensor_name(where: str, value: Any) -> str:
    name = text(where, value)
    if not is_tensor_name(name):
        raise WireError(
            f"{where} is not a tensor name (1 to {MAX_TENSOR_NAME} printable ASCII characters "
            f"without spaces): {shown(repr(name))}"
        )
    return name


def boolean(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise WireError(f"{where} must be a boolean, got {json_type(value)}")
    return value


def integer(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"{where} must be an integer, got {json_type(value)}")
    return value


def number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"{where} must be a number, got {json_type(value)}")
    try:
        return float(value)
    except OverflowError as exc:  # an integer too large for a float
        raise WireError(f"{where} is out of range") from exc


def finite(where: str, value: Any) -> float:
    x = number(where, value)
    if not math.isfinite(x):  # a NaN weight or scale would poison the whole aggregate
        raise WireError(f"{where} must be finite, got {x}")
    return x


def array(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{where} must be an array, got {json_type(value)}")
    return value


def json_object(where: str, value: Any, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise WireError(f"{where} must be an object with string keys, got {json_type(value)}")
    if keys is not None and set(value) != set(keys):
        raise WireError(f"{where} must have exactly the keys {list(keys)}, got {sorted(value)}")
    return value
