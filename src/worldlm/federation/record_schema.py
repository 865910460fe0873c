"""The schema of each metrics row a child may send (issue 19, item 5): which fields a row of a
kind must have and what each may hold. The report, the model cards, the trackers and resume
read these rows after the run; a row whose ε is a string or whose participants are not a list
would break them there, long after the reply was accepted. Fields the engine adds beyond these
(traffic counters, secure aggregation's dropouts per stage) may be JSON scalars, or lists and
objects of them nested at most two levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from worldlm.errors import shown

# Longer strings are refused: the audit log refuses strings over 4,096 characters, and no
# field the engine writes comes near it (reasons are shortened before they are recorded).
MAX_STRING = 4096
# A list field names children (selected, participants, ...); more than this is no honest tree.
MAX_LIST = 100_000

Check = Callable[[Any], bool]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def count(value: Any) -> bool:
    """A non-negative integer."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def amount(value: Any) -> bool:
    """A finite, non-negative number."""
    return _number(value) and math.isfinite(value) and value >= 0


def finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def number(value: Any) -> bool:
    """Any number, NaN and infinities included (a diverged leaf's honest loss)."""
    return _number(value)


def nonnegative(value: Any) -> bool:
    """A non-negative number, infinity included (an adaptive clip bound that overflowed)."""
    return _number(value) and not math.isnan(value) and value >= 0


def budget(value: Any) -> bool:
    """ε: non-negative, and infinite where the accountant says so (no noise at all)."""
    return _number(value) and not math.isnan(value) and value >= 0


def probability(value: Any) -> bool:
    return _number(value) and 0.0 <= value <= 1.0


def text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_STRING


def names(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= MAX_LIST and all(text(v) for v in value)


def flag(value: Any) -> bool:
    return isinstance(value, bool)


def optional(check: Check) -> Check:
    return lambda value: value is None or check(value)


_INCIDENT: dict[str, tuple[bool, Check]] = {"sender": (True, text), "reason": (True, text)}

# kind -> field -> (required, check)
SCHEMAS: dict[str, dict[str, tuple[bool, Check]]] = {
    "train": {
        "loss": (True, number),
        "tokens": (True, amount),
        "steps": (True, count),
        "seconds": (False, amount),
    },
    "privacy": {
        "epsilon": (True, budget),
        "delta": (True, probability),
        "steps": (True, count),
        "local": (False, flag),
        "sampling_rate": (False, probability),
        "clip": (False, optional(nonnegative)),
        "next_clip": (False, optional(nonnegative)),
        "noise_multiplier": (False, amount),
        "noise_stddev": (False, amount),
        "clipped": (False, count),
        "replies": (False, count),
    },
    "aggregate": {
        "local_round": (True, count),
        "status": (True, text),
        "selected": (False, names),
        "participants": (True, names),
        "missing": (False, names),
        "benched": (False, names),
        "tokens": (False, amount),
        "seconds": (False, amount),
        "secure_aggregation": (False, flag),
        "secagg_clipped": (False, count),
        "secagg_max_error": (False, optional(amount)),
    },
    "dropped": _INCIDENT,
    "refused": _INCIDENT,
    "rejected": _INCIDENT,
}

_COMMON = frozenset({"round", "node", "kind"})  # checked by record_check itself


def _extra_ok(value: Any, depth: int = 2) -> bool:
    """A field outside the schema: a JSON scalar, or a list or an object of them nested at
    most `depth` levels (secure aggregation's dropouts per stage, a rule's figures)."""
    if value is None or flag(value) or finite(value) or text(value):
        return True
    if depth == 0:
        return False
    if isinstance(value, list):
        return len(value) <= MAX_LIST and all(_extra_ok(v, depth - 1) for v in value)
    if isinstance(value, dict):
        return len(value) <= MAX_LIST and all(
            text(k) and _extra_ok(v, depth - 1) for k, v in value.items()
        )
    return False


def schema_problem(kind: str, row: Mapping[str, Any]) -> str | None:
    """Why `row` (of a known `kind`) does not fit its schema, or None."""
    schema = SCHEMAS[kind]
    for field, (required, check) in schema.items():
        if field not in row:
            if required:
                return f"a {kind} row without {field!r}"
            continue
        if not check(row[field]):
            return f"a {kind} row whose {field!r} is {_value(row[field])}"
    for field, value in row.items():
        if not isinstance(field, str) or len(field) > 100:
            return f"a {kind} row with a field named {_value(field)}"
        if field not in schema and field not in _COMMON and not _extra_ok(value):
            return f"a {kind} row whose {field!r} is {_value(value)}"
    return None


def _value(value: Any) -> str:
    return shown(repr(value), limit=60)
