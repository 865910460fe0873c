"""`worldlm audit show`: the audit log as a table, filtered by node subtree and round.

Reading is read-only and does not verify the chain (that is `worldlm audit verify`): a tampered
log is still shown as it stands, so that one can see what was changed.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from worldlm.audit.log import connect_readonly

_BARE = re.compile(r"^[^\s\"'=]+$")  # strings shown unquoted: digests, paths, names


def render(path: Path, node: str | None = None, round: int | None = None) -> Table:
    """A table of the entries of the log at `path`; `node` keeps an exact node path and its
    subtree (`world/eu` keeps `world/eu/paris`, not `world/europe`), `round` one root round."""
    conn, run_id = connect_readonly(path)
    try:
        total = conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        rows = select_rows(conn, node, round)
    finally:
        conn.close()
    title = Text(_title(path, run_id, len(rows), total, node, round))
    table = Table(title=title, title_justify="left")
    table.add_column("seq", justify="right")
    table.add_column("time")
    table.add_column("node")
    table.add_column("round", justify="right")
    table.add_column("event")
    table.add_column("fields", overflow="fold")
    for seq, at, node_path, round_, event, fields_json in rows:
        # Text, not str: values are data and must never be read as rich markup.
        table.add_row(
            str(seq),
            Text(str(at)),
            Text(str(node_path)),
            str(round_),
            Text(str(event)),
            Text(format_fields(fields_json)),
        )
    return table


def select_rows(
    conn: sqlite3.Connection, node: str | None, round: int | None
) -> list[tuple[Any, ...]]:
    """The (seq, at, node, round, event, fields) rows passing the filters, in seq order."""
    where: list[str] = []
    params: list[Any] = []
    if node is not None:
        exact = node.rstrip("/")
        # A prefix test with substr, not LIKE, so that `_` and `%` in paths stay literal.
        where.append("(node = ? OR substr(node, 1, ?) = ?)")
        params += [exact, len(exact) + 1, exact + "/"]
    if round is not None:
        where.append("round = ?")
        params.append(round)
    sql = "SELECT seq, at, node, round, event, fields FROM entries"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return conn.execute(sql + " ORDER BY seq", params).fetchall()


def format_fields(fields_json: Any) -> str:
    """Fields as compact `key=value` text; a row whose fields are not JSON is shown raw."""
    try:
        fields = json.loads(fields_json)
    except (TypeError, ValueError):
        return repr(fields_json)
    if not isinstance(fields, dict):
        return str(fields_json)
    return " ".join(f"{key}={_format_value(value)}" for key, value in sorted(fields.items()))


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return value if _BARE.match(value) else json.dumps(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    # Not canonical_json: a hand-edited row may hold NaN, and show must still show it.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _title(
    path: Path, run_id: str, shown: int, total: int, node: str | None, round: int | None
) -> str:
    filters = [f"node {node}"] if node is not None else []
    if round is not None:
        filters.append(f"round {round}")
    which = f"{shown} of {total} entries" if filters else f"{total} entries"
    where = f" ({', '.join(filters)})" if filters else ""
    return f"audit log {path} of run {run_id}: {which}{where}"
