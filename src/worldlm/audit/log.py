"""The audit log of one run: an append-only, hash-chained SQLite table, and its verification.

Every entry records who (`node`, a tree path), when (`at`, UTC), in which root `round`, what
(`event`) and a few `fields`. The log holds digests and figures only, never raw data or weights:
`append` refuses bytes, tensors, arrays, NaN/Inf and long strings (see `worldlm.audit.chain`).

Each append is its own committed transaction in WAL mode with `synchronous=FULL`, so a crash
loses at most the append in flight and never leaves a half-written row. Rows are never updated.
The only deletion is `truncate_after`: a resumed run re-runs the rounds after its last
checkpoint, so the rows those rounds wrote before the crash are dropped, exactly like their
metrics rows. It is only legal back to an anchor, the head (seq, hash) recorded in that
checkpoint; `verify` checks the log against such anchors, which is what catches rows deleted at
the tail (a chain cut short is still a valid chain).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from worldlm.audit import AuditError
from worldlm.audit.chain import (
    GENESIS_HASH,
    canonical_json,
    check_fields,
    encode_entry,
    entry_hash,
)

FORMAT_NAME = "worldlm-audit"
FORMAT_VERSION = 1

_SCHEMA = (
    "CREATE TABLE entries (seq INTEGER PRIMARY KEY, at TEXT NOT NULL, node TEXT NOT NULL,"
    " round INTEGER NOT NULL, event TEXT NOT NULL, fields TEXT NOT NULL,"
    " prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_COLUMNS = "seq, at, node, round, event, fields, prev_hash, hash"


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log, as written."""

    seq: int
    at: str
    node: str
    round: int
    event: str
    fields: dict[str, Any]
    prev_hash: str
    hash: str


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string with microseconds, e.g. `...T12:00:00.5Z`."""
    return iso_utc(datetime.now(UTC))


def iso_utc(moment: datetime) -> str:
    """`moment` (timezone-aware) as an ISO 8601 UTC string ending in `Z`."""
    if moment.tzinfo is None:
        raise AuditError("audit times must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _serialized(method: _Method) -> _Method:
    """Run `method` holding the log's lock (see AuditLog.__init__)."""

    @functools.wraps(method)
    def locked(self: AuditLog, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return cast(_Method, locked)


class AuditLog:
    """An open audit log of one run; `AuditLog.open(path, run_id)` creates or reopens it."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, run_id: str, clock: Callable[[], str]
    ) -> None:
        self._conn: sqlite3.Connection | None = conn
        # Aggregators append from the transport's threads (gRPC replies arrive on them): one
        # connection shared across threads, one call at a time.
        self._lock = threading.RLock()
        self.path = path
        self.run_id = run_id
        self._clock = clock

    @classmethod
    def open(cls, path: Path, run_id: str, *, clock: Callable[[], str] = utc_now) -> AuditLog:
        """Create `path`, or reopen it and continue its chain; AuditError if it belongs to
        another run or is not a worldlm audit log. `clock` returns the `at` string (tests)."""
        if not run_id:
            raise AuditError("an audit log needs a non-empty run id")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: transactions are explicit, one per append.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise AuditError(f"cannot open audit log {path}: {exc}") from exc
        try:
            # Check an existing file before the pragmas, which would rewrite a foreign database.
            if _tables(conn):
                _read_meta(conn, path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            with _immediate(conn):
                if not _tables(conn):
                    _create(conn, run_id)
            stored = _read_meta(conn, path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise AuditError(f"{path} is not a worldlm audit log ({exc})") from exc
        except AuditError:
            conn.close()
            raise
        if stored != run_id:
            conn.close()
            raise AuditError(
                f"{path} is the audit log of run {stored!r}, not {run_id!r}; "
                "use a fresh run directory or resume the run it belongs to"
            )
        return cls(conn, path, run_id, clock)

    @_serialized
    def append(self, event: str, *, node: str, round: int, **fields: Any) -> AuditEntry:
        """Add one entry after the current head and commit it; returns it with its seq and hash.
        AuditError names any field the log must not hold (raw data, weights, NaN...)."""
        _check_label("event", event)
        _check_label("node", node)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise AuditError(f"audit round must be a non-negative int, got {round!r}")
        check_fields(fields)
        fields_json = canonical_json(fields)
        at = self._clock()
        conn = self._connection()
        try:
            with _immediate(conn):  # the head read and the insert are one atomic step
                last_seq, prev_hash = _head(conn)
                seq = last_seq + 1
                digest = entry_hash(
                    prev_hash, encode_entry(seq, at, node, round, event, fields_json)
                )
                conn.execute(
                    f"INSERT INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (seq, at, node, round, event, fields_json, prev_hash, digest),
                )
        except sqlite3.Error as exc:
            raise AuditError(f"cannot append to audit log {self.path}: {exc}") from exc
        return AuditEntry(seq, at, node, round, event, json.loads(fields_json), prev_hash, digest)

    @_serialized
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last entry, or (0, genesis hash) for an empty log: the anchor to
        record in a checkpoint or summary."""
        return _head(self._connection())

    @_serialized
    def truncate_after(self, seq: int, *, expect_hash: str | None = None) -> int:
        """Delete the entries after `seq` and return how many; the only deletion the log allows.

        Legal only back to an anchor recorded in a checkpoint, when a resumed run re-runs the
        rounds after it; pass that anchor's hash as `expect_hash` to refuse a truncation to a
        row that is not the one the checkpoint saw."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise AuditError(f"cannot truncate the audit log after {seq!r}: not a seq")
        conn = self._connection()
        try:
            with _immediate(conn):
                if expect_hash is not None:
                    self._check_anchor(conn, seq, expect_hash)
                return conn.execute("DELETE FROM entries WHERE seq > ?", (seq,)).rowcount
        except sqlite3.Error as exc:
            raise AuditError(f"cannot truncate audit log {self.path}: {exc}") from exc

    def _check_anchor(self, conn: sqlite3.Connection, seq: int, expect_hash: str) -> None:
        if seq == 0:
            found: str | None = GENESIS_HASH
        else:
            row = conn.execute("SELECT hash FROM entries WHERE seq = ?", (seq,)).fetchone()
            found = row[0] if row else None
        if found != expect_hash:
            state = "is missing" if found is None else f"has hash {found[:16]}"
            raise AuditError(
                f"cannot truncate audit log {self.path} after row {seq}: the checkpoint's anchor "
                f"is {expect_hash[:16]} but the row {state}; the log or the checkpoint was altered"
            )

    @_serialized
    def close(self) -> None:
        """Close the file; later appends raise AuditError. Closing twice is harmless."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @_serialized
    def last_seq_through(self, round_index: int) -> int:
        """The seq of the last entry of root rounds up to `round_index` (0 if none): where a
        run resumed after that round cuts the log. Entries are appended in round order."""
        row = (
            self._connection()
            .execute("SELECT MAX(seq) FROM entries WHERE round <= ?", (round_index,))
            .fetchone()
        )
        return int(row[0] or 0)

    @_serialized
    def checkpoint_entry(self, file_name: str) -> tuple[int, dict[str, Any]] | None:
        """The last entry recording checkpoint `file_name`: (seq, fields), or None."""
        return checkpoint_entry(self._connection(), file_name)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AuditError(f"audit log {self.path} is closed")
        return self._conn


def checkpoint_entry(conn: sqlite3.Connection, file_name: str) -> tuple[int, dict[str, Any]] | None:
    """The last entry of `conn`'s log recording checkpoint `file_name`: (seq, fields), or None.
    Shared by a run that resumes from the file and by `worldlm audit verify`."""
    row = conn.execute(
        "SELECT seq, fields FROM entries WHERE event = 'checkpoint' AND "
        "json_extract(fields, '$.file') = ? ORDER BY seq DESC LIMIT 1",
        (file_name,),
    ).fetchone()
    return None if row is None else (int(row[0]), json.loads(row[1]))


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taking the write lock up front so that reading the head and
    inserting after it cannot interleave with another writer."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
            conn.execute("ROLLBACK")
        raise


def _check_label(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise AuditError(f"audit {name} must be a non-empty string of at most 1024 characters")


def _tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {row[0] for row in rows}


def _create(conn: sqlite3.Connection, run_id: str) -> None:
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("format", FORMAT_NAME), ("version", str(FORMAT_VERSION)), ("run_id", run_id)],
    )


def _read_meta(conn: sqlite3.Connection, path: Path) -> str:
    """The run id of a worldlm audit log; AuditError for any other SQLite file."""
    if not {"entries", "meta"} <= _tables(conn):
        raise AuditError(f"{path} is an SQLite file but not a worldlm audit log")
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != FORMAT_NAME or not meta.get("run_id"):
        raise AuditError(f"{path} is an SQLite file but not a worldlm audit log")
    if meta.get("version") != str(FORMAT_VERSION):
        raise AuditError(
            f"{path} is an audit log of format version {meta.get('version')!r}; "
            f"this worldlm reads version {FORMAT_VERSION}"
        )
    return str(meta["run_id"])


def _head(conn: sqlite3.Connection) -> tuple[int, str]:
    row = conn.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))


def connect_readonly(path: Path) -> tuple[sqlite3.Connection, str]:
    """A read-only connection to the audit log at `path` and its run id. Read-only so that
    inspecting a log (perhaps someone else's, perhaps evidence) can never change it."""
    if not path.is_file():
        raise AuditError(f"no audit log at {path}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open audit log {path}: {exc}") from exc
    try:
        return conn, _read_meta(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise AuditError(f"{path} is not a worldlm audit log ({exc})") from exc
    except AuditError:
        conn.close()
        raise


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an audit log: the row's seq, a kind and a sentence."""

    seq: int
    kind: str  # "edited", "missing", "link", "malformed" or "anchor"
    reason: str

    def __str__(self) -> str:
        return f"row {self.seq}: {self.reason}"


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `verify`: the entries seen, the head, and every problem found."""

    path: Path
    run_id: str
    entries: int
    head: tuple[int, str]
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: Path, anchors: Sequence[tuple[int, str]] = ()) -> VerifyReport:
    """Recompute the chain of the log at `path` from genesis and check it against `anchors`,
    heads (seq, hash) recorded in checkpoints or the run summary. Reads the file read-only."""
    conn, run_id = connect_readonly(path)
    wanted, problems = _anchor_table(anchors)
    last_seq, last_hash, count = 0, GENESIS_HASH, 0
    try:
        for row in conn.execute(f"SELECT {_COLUMNS} FROM entries ORDER BY seq"):
            seq, stored_hash = int(row[0]), row[7]
            problems.extend(_check_row(row, last_seq, last_hash))
            for expected in wanted.pop(seq, []):
                if stored_hash != expected:
                    problems.append(_anchor_problem(seq, expected, "differs from"))
            last_seq, last_hash, count = seq, stored_hash, count + 1
    except sqlite3.DatabaseError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc}") from exc
    finally:
        conn.close()
    for seq, hashes in sorted(wanted.items()):
        problems.extend(_anchor_problem(seq, h, "is missing, but") for h in hashes)
    problems.sort(key=lambda p: p.seq)
    return VerifyReport(path, run_id, count, (last_seq, str(last_hash)), problems)


def _anchor_table(anchors: Sequence[tuple[int, str]]) -> tuple[dict[int, list[str]], list[Problem]]:
    """Anchors by seq (several sources may name one row); genesis anchors are checked here."""
    wanted: dict[int, list[str]] = {}
    problems: list[Problem] = []
    for seq, expected in anchors:
        if seq == 0:
            if expected != GENESIS_HASH:
                problems.append(_anchor_problem(0, expected, "differs from"))
            continue
        wanted.setdefault(seq, []).append(expected)
    return wanted, problems


def _anchor_problem(seq: int, expected: str, how: str) -> Problem:
    return Problem(
        seq,
        "anchor",
        f"the row {how} the head recorded in a checkpoint or summary "
        f"(seq {seq}, hash {expected[:16]}): rows were altered or deleted",
    )


def _check_row(row: tuple[Any, ...], last_seq: int, last_hash: str) -> list[Problem]:
    """The problems of one row given the row before it: a gap, a broken link, an edit."""
    seq, at, node, round_, event, fields_json, prev_hash, stored_hash = row
    problems: list[Problem] = []
    if seq != last_seq + 1:
        first, last = last_seq + 1, seq - 1
        rows = f"row {first} is" if first == last else f"rows {first}-{last} are"
        problems.append(
            Problem(first, "missing", f"{rows} missing: seq jumps from {last_seq} to {seq}")
        )
    elif prev_hash != last_hash:
        problems.append(
            Problem(
                seq,
                "link",
                f"prev_hash does not match the hash of row {last_seq}: "
                "rows were deleted, inserted or reordered",
            )
        )
    texts = (at, node, event, fields_json, prev_hash, stored_hash)
    if type(round_) is not int or not all(isinstance(text, str) for text in texts):
        problems.append(Problem(seq, "malformed", "a column holds a value of the wrong type"))
    elif entry_hash(prev_hash, encode_entry(seq, at, node, round_, event, fields_json)) != (
        stored_hash
    ):
        problems.append(
            Problem(seq, "edited", "its hash does not match its content: the row was edited")
        )
    return problems
