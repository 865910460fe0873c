"""The audit log: its chain verifies, and every kind of tampering is found and named by row."""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

from worldlm.audit import AuditError
from worldlm.audit.chain import GENESIS_HASH, canonical_json, encode_entry, entry_hash
from worldlm.audit.cli import add_audit_parser, run_audit
from worldlm.audit.log import AuditEntry, AuditLog, verify
from worldlm.audit.show import render
from worldlm.checkpoint import save_checkpoint

RUN = "run-1"
NODES = ["world", "world/eu", "world/eu/paris", "world/europe/x", "world/us/nyc"]


def _fill(path: Path, n: int = 20) -> list[AuditEntry]:
    """`n` entries over five nodes, five per round."""
    with AuditLog.open(path, RUN) as log:
        return [
            log.append(
                "update_received",
                node=NODES[i % len(NODES)],
                round=i // 5,
                digest=f"{i:064x}",
                loss=1.0 / (i + 1),
                tokens=i * 100,
            )
            for i in range(n)
        ]


def _sql(path: Path, statement: str, params: tuple[Any, ...] = ()) -> None:
    """Tamper with the file the way an attacker would: raw SQL, outside worldlm."""
    with sqlite3.connect(path) as conn:
        conn.execute(statement, params)
    conn.close()


def _flagged(path: Path, anchors: list[tuple[int, str]] | None = None) -> set[tuple[int, str]]:
    return {(p.seq, p.kind) for p in verify(path, anchors or []).problems}


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.sqlite"


def test_a_chain_of_twenty_entries_verifies(log_path: Path) -> None:
    entries = _fill(log_path)
    assert [e.seq for e in entries] == list(range(1, 21))
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    report = verify(log_path, [(e.seq, e.hash) for e in entries])
    assert report.ok and report.problems == []
    assert (report.entries, report.head, report.run_id) == (20, (20, entries[-1].hash), RUN)


def test_entry_hash_is_sha256_of_prev_hash_and_canonical_encoding(log_path: Path) -> None:
    with AuditLog.open(log_path, RUN, clock=lambda: "2024-01-02T03:04:05.000006Z") as log:
        entry = log.append("aggregated", node="world", round=3, b=[1, 2.5], a={"y": None})
    encoded = encode_entry(1, entry.at, "world", 3, "aggregated", '{"a":{"y":null},"b":[1,2.5]}')
    assert encoded == b'[1,"2024-01-02T03:04:05.000006Z","world",3,"aggregated",' + (
        b'"{\\"a\\":{\\"y\\":null},\\"b\\":[1,2.5]}"]'
    )
    assert entry.hash == hashlib.sha256(GENESIS_HASH.encode() + encoded).hexdigest()
    assert entry.hash == entry_hash(GENESIS_HASH, encoded)
    assert canonical_json({"b": 1, "a": [True]}) == '{"a":[true],"b":1}'


def test_an_edited_row_is_named(log_path: Path) -> None:
    _fill(log_path)
    _sql(log_path, "UPDATE entries SET fields = ? WHERE seq = 7", ('{"loss":0.001}',))
    report = verify(log_path)
    assert not report.ok
    assert [(p.seq, p.kind) for p in report.problems] == [(7, "edited")]


def test_an_edited_and_rehashed_row_breaks_the_next_link(log_path: Path) -> None:
    entries = _fill(log_path)
    row = entries[6]
    fields = '{"loss":0.001}'
    forged = entry_hash(
        row.prev_hash, encode_entry(7, row.at, row.node, row.round, row.event, fields)
    )
    _sql(log_path, "UPDATE entries SET fields = ?, hash = ? WHERE seq = 7", (fields, forged))
    assert _flagged(log_path) == {(8, "link")}


def test_a_deleted_middle_row_is_named(log_path: Path) -> None:
    _fill(log_path)
    _sql(log_path, "DELETE FROM entries WHERE seq = 10")
    report = verify(log_path)
    assert [(p.seq, p.kind) for p in report.problems] == [(10, "missing")]
    assert "row 10 is missing" in str(report.problems[0])


def test_a_deleted_and_renumbered_row_breaks_the_chain(log_path: Path) -> None:
    _fill(log_path, n=12)
    _sql(log_path, "DELETE FROM entries WHERE seq = 10")
    _sql(log_path, "UPDATE entries SET seq = seq - 1 WHERE seq > 10")
    assert _flagged(log_path) >= {(10, "link"), (10, "edited")}


def test_swapped_rows_are_detected(log_path: Path) -> None:
    _fill(log_path)
    columns = ["at", "node", "round", "event", "fields", "prev_hash", "hash"]
    with sqlite3.connect(log_path) as conn:
        five, twelve = (
            conn.execute(f"SELECT {', '.join(columns)} FROM entries WHERE seq = ?", (s,)).fetchone()
            for s in (5, 12)
        )
        update = f"UPDATE entries SET {', '.join(c + ' = ?' for c in columns)} WHERE seq = ?"
        conn.execute(update, (*twelve, 5))
        conn.execute(update, (*five, 12))
    conn.close()
    flagged = _flagged(log_path)
    assert {(5, "edited"), (12, "edited"), (5, "link"), (12, "link")} <= flagged


def test_rows_deleted_at_the_tail_are_caught_only_against_an_anchor(log_path: Path) -> None:
    entries = _fill(log_path)
    anchor = (20, entries[-1].hash)  # the head a checkpoint or summary recorded
    _sql(log_path, "DELETE FROM entries WHERE seq > 17")
    # Without an anchor the log is a valid chain of 17 entries from genesis: nothing inside the
    # file says that rows 18-20 ever existed. That is why checkpoints record the head.
    alone = verify(log_path)
    assert alone.ok and alone.entries == 17
    anchored = verify(log_path, [anchor])
    assert [(p.seq, p.kind) for p in anchored.problems] == [(20, "anchor")]


def test_an_anchor_whose_row_differs_is_named(log_path: Path) -> None:
    entries = _fill(log_path)
    _sql(log_path, "DELETE FROM entries WHERE seq > 15")
    with AuditLog.open(log_path, RUN) as log:  # rewrite the tail with other rows
        for i in range(5):
            log.append("forged", node="world", round=9, i=i)
    assert verify(log_path).ok
    assert _flagged(log_path, [(15, entries[14].hash), (18, entries[17].hash)]) == {(18, "anchor")}


def test_reopening_continues_the_chain(log_path: Path) -> None:
    first = _fill(log_path, n=3)
    with AuditLog.open(log_path, RUN) as log:
        assert log.head() == (3, first[-1].hash)
        entry = log.append("resumed", node="world", round=1)
    assert (entry.seq, entry.prev_hash) == (4, first[-1].hash)
    assert verify(log_path).ok


def test_an_empty_log_has_the_genesis_head(log_path: Path) -> None:
    with AuditLog.open(log_path, RUN) as log:
        assert log.head() == (0, GENESIS_HASH)
    report = verify(log_path, [(0, GENESIS_HASH)])
    assert report.ok and report.entries == 0


def test_a_log_of_another_run_is_refused(log_path: Path) -> None:
    _fill(log_path, n=2)
    with pytest.raises(AuditError, match="run 'run-1', not 'run-2'"):
        AuditLog.open(log_path, "run-2")


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (b"raw bytes", "payload"),
        (torch.zeros(3), "payload"),
        (np.zeros(3), "payload"),
        (np.int64(3), "payload"),
        (float("nan"), "payload"),
        (float("inf"), "payload"),
        ("x" * 4097, "payload"),
        ({"inner": [1, b"x"]}, "payload.inner[1]"),
        (list(range(5000)), "payload"),
    ],
)
def test_forbidden_field_values_are_refused(log_path: Path, value: Any, named: str) -> None:
    with AuditLog.open(log_path, RUN) as log:
        log.append("start", node="world", round=0)
        with pytest.raises(AuditError, match=re.escape(f"field '{named}'")):
            log.append("update", node="world/eu", round=1, digest="ab", payload=value)
        assert log.head()[0] == 1  # nothing was written


def test_allowed_field_values_round_trip(log_path: Path) -> None:
    fields = {"s": "x" * 4096, "n": None, "b": True, "f": 0.5, "i": -3, "l": [1, {"k": "v"}]}
    with AuditLog.open(log_path, RUN) as log:
        entry = log.append("figures", node="world", round=0, **fields)
    assert entry.fields == fields
    assert verify(log_path).ok


def test_truncate_after_an_anchor_then_append_verifies(log_path: Path) -> None:
    entries = _fill(log_path)
    anchor = (12, entries[11].hash)
    with AuditLog.open(log_path, RUN) as log:
        assert log.truncate_after(12, expect_hash=anchor[1]) == 8
        assert log.head() == anchor
        entry = log.append("update_received", node="world/eu", round=2, digest="cd")
    assert (entry.seq, entry.prev_hash) == (13, anchor[1])
    assert verify(log_path, [anchor, (13, entry.hash)]).ok


def test_truncate_to_a_row_that_differs_from_the_anchor_is_refused(log_path: Path) -> None:
    entries = _fill(log_path)
    with AuditLog.open(log_path, RUN) as log:
        with pytest.raises(AuditError, match="after row 12"):
            log.truncate_after(12, expect_hash=entries[10].hash)
        assert log.head() == (20, entries[-1].hash)


def test_a_closed_log_refuses_appends(log_path: Path) -> None:
    log = AuditLog.open(log_path, RUN)
    log.close()
    log.close()
    with pytest.raises(AuditError, match="closed"):
        log.append("late", node="world", round=0)


def test_verify_only_reads(log_path: Path) -> None:
    _fill(log_path)
    before = log_path.read_bytes()
    _sql(log_path, "UPDATE entries SET node = 'world/x' WHERE seq = 3")
    tampered = log_path.read_bytes()
    assert tampered != before
    verify(log_path)
    assert log_path.read_bytes() == tampered


def test_a_file_that_is_not_an_audit_log_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database at all, just some text " * 10)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    conn.close()
    foreign_bytes = foreign.read_bytes()
    for path in (text, foreign):
        with pytest.raises(AuditError, match="not a worldlm audit log"):
            verify(path)
        with pytest.raises(AuditError, match="not a worldlm audit log"):
            AuditLog.open(path, RUN)
    assert foreign.read_bytes() == foreign_bytes  # refused before anything was written
    with pytest.raises(AuditError, match="no audit log"):
        verify(tmp_path / "missing.sqlite")


# --- the command line -----------------------------------------------------------------------


def _cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="worldlm")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", *argv])
    out = io.StringIO()
    code = run_audit(args, Console(file=out, width=240))
    return code, out.getvalue()


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, list[AuditEntry]]:
    """A run directory as a run leaves it: two checkpoints, each recorded by an entry with its
    SHA-256, and a summary holding the final head."""
    run = tmp_path / "run"
    entries = _fill(run / "audit.sqlite")
    checkpoints = run / "checkpoints"
    with AuditLog.open(run / "audit.sqlite", RUN) as log:
        for round_index in (1, 2):
            path = save_checkpoint(checkpoints, round_index, {"w": torch.zeros(2)}, {}, keep=5)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entries.append(
                log.append("checkpoint", node="world", round=4, file=path.name, sha256=digest)
            )
    summary = {"rounds": 4, "audit_head": [22, entries[-1].hash]}
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run, entries


def test_cli_verify_passes_a_sound_log(run_dir: tuple[Path, list[AuditEntry]]) -> None:
    run, entries = run_dir
    code, out = _cli("verify", str(run))
    assert code == 0
    assert f"audit log OK: 22 entries, head {entries[-1].hash[:16]}" in out
    assert "1 anchors checked" in out


def test_cli_verify_names_an_edited_row(run_dir: tuple[Path, list[AuditEntry]]) -> None:
    run, _ = run_dir
    _sql(run / "audit.sqlite", "UPDATE entries SET round = 9 WHERE seq = 7")
    code, out = _cli("verify", str(run))
    assert code == 1
    assert "row 7: its hash does not match its content" in out


def test_cli_verify_catches_a_cut_tail_with_the_summary_anchor(
    run_dir: tuple[Path, list[AuditEntry]],
) -> None:
    run, _ = run_dir
    _sql(run / "audit.sqlite", "DELETE FROM entries WHERE seq > 18")
    code, out = _cli("verify", str(run))
    assert code == 1
    assert "row 22:" in out and "summary.json" in out
    assert "round-000002.wlm: no audit entry records it" in out


def test_cli_verify_catches_a_replaced_checkpoint(run_dir: tuple[Path, list[AuditEntry]]) -> None:
    run, _ = run_dir
    path = run / "checkpoints" / "round-000001.wlm"
    path.unlink()
    save_checkpoint(path.parent, 1, {"w": torch.ones(2)}, {}, keep=5)  # a valid, other model
    code, out = _cli("verify", str(run))
    assert code == 1
    assert "row 21: records checkpoint round-000001.wlm with another SHA-256" in out


def test_cli_verify_reports_unreadable_and_unrecorded_checkpoints(
    run_dir: tuple[Path, list[AuditEntry]],
) -> None:
    run, _ = run_dir
    (run / "checkpoints" / "round-000003.wlm").write_bytes(b"WLMW garbage")
    (run / "checkpoints" / "round-000004.wlm").write_bytes(b"")
    code, out = _cli("verify", str(run))
    assert code == 1  # checkpoint files no entry records: planted, or never resumed after a crash
    assert "round-000003.wlm is unreadable" in out and "round-000004.wlm is unreadable" in out
    assert "round-000003.wlm: no audit entry records it" in out


def test_cli_without_a_log_is_a_one_line_error(tmp_path: Path) -> None:
    code, out = _cli("verify", str(tmp_path / "nowhere"))
    assert code == 2 and "no run directory" in out and len(out.strip().splitlines()) == 1
    code, out = _cli("show", str(tmp_path))
    assert code == 2 and "has no audit log" in out and len(out.strip().splitlines()) == 1


def test_show_filters_by_node_subtree_and_round(log_path: Path) -> None:
    _fill(log_path)
    assert render(log_path).row_count == 20
    # world/eu and world/eu/paris, 4 rows each over 4 rounds; world/europe/x is not in the subtree
    assert render(log_path, node="world/eu").row_count == 8
    assert render(log_path, node="world/eu/paris").row_count == 4
    assert render(log_path, node="world/eu", round=2).row_count == 2
    assert render(log_path, round=3).row_count == 5
    assert render(log_path, node="world/e").row_count == 0  # a prefix of a name is not a subtree


def test_cli_show_prints_filtered_rows(run_dir: tuple[Path, list[AuditEntry]]) -> None:
    run, _ = run_dir
    code, out = _cli("show", str(run), "--node", "world/eu", "--round", "1")
    assert code == 0
    assert "world/eu/paris" in out and "world/europe" not in out and "world/us" not in out
    assert "2 of 22 entries" in out
    assert f"digest={6:064x}" in out and "tokens=600" in out and "loss=0.142857" in out
