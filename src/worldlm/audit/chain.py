"""The hash chain of the audit log: canonical encoding of one entry and its hash (pure functions).

An entry's hash is SHA-256 over the previous entry's hash followed by the entry's canonical
encoding, so a row cannot be edited, removed or moved without breaking every later link. The
encoding is canonical JSON (sorted keys, no spaces, no NaN) so that the same entry always hashes
the same on every machine and Python version.

Field values are checked here, before anything is written: the log holds digests and figures
only (str, int, finite float, bool, None, and lists/dicts of them), never raw data or weights.
Long strings, huge containers, bytes, tensors and arrays are refused so that a careless caller
cannot leak a leaf's text or a model into a file meant to be shown to auditors.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from worldlm.audit import AuditError

GENESIS_HASH = "0" * 64
"""The `prev_hash` of the first entry."""

MAX_STRING_CHARS = 4096
"""Longest string field: room for digests, paths and messages, not for documents."""

MAX_ITEMS = 1024
"""Most items in one list or dict field: room for per-child figures, not for a tensor's values."""

MAX_DEPTH = 8
"""Deepest nesting of lists and dicts in one field."""

_ALLOWED = "str, int, finite float, bool, None, and lists/dicts of them"


def canonical_json(value: Any) -> str:
    """The one JSON text of `value`: sorted keys, no spaces, NaN and Infinity refused."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def encode_entry(seq: int, at: str, node: str, round: int, event: str, fields_json: str) -> bytes:
    """Canonical bytes of one entry; `fields_json` is the stored (canonical) fields text, hashed
    as text so that any byte changed in the stored row changes the hash."""
    return canonical_json([seq, at, node, round, event, fields_json]).encode("utf-8")


def entry_hash(prev_hash: str, encoded: bytes) -> str:
    """SHA-256 hex of the previous entry's hash followed by this entry's encoding."""
    return hashlib.sha256(prev_hash.encode("utf-8") + encoded).hexdigest()


def check_fields(fields: Mapping[str, Any]) -> None:
    """Raise AuditError naming the first field whose value the audit log must not hold."""
    for name, value in fields.items():
        _check_value(name, value, depth=0)


def _check_value(name: str, value: Any, *, depth: int) -> None:
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(f"audit field {name!r}: {value} is not a finite number")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise AuditError(
                f"audit field {name!r}: a string of {len(value)} characters is longer than "
                f"{MAX_STRING_CHARS}; the audit log holds digests and figures, not raw text"
            )
        return
    if isinstance(value, list | tuple | dict):
        _check_container(name, value, depth=depth)
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise AuditError(
        f"audit field {name!r}: a {kind} is not allowed ({_ALLOWED}); the audit log holds "
        "digests and figures, never raw data or weights"
    )


def _check_container(
    name: str, value: list[Any] | tuple[Any, ...] | dict[Any, Any], *, depth: int
) -> None:
    if depth >= MAX_DEPTH:
        raise AuditError(f"audit field {name!r}: nested deeper than {MAX_DEPTH} levels")
    if len(value) > MAX_ITEMS:
        raise AuditError(
            f"audit field {name!r}: {len(value)} items is more than {MAX_ITEMS}; the audit log "
            "holds digests and figures, not raw data or weights"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"audit field {name!r}: key {key!r} is not a string")
            _check_value(f"{name}.{key}", item, depth=depth + 1)
        return
    for index, item in enumerate(value):
        _check_value(f"{name}[{index}]", item, depth=depth + 1)
