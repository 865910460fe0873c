"""`worldlm audit verify|show RUN_DIR`: check a run's audit log, or print it as a table.

`verify` recomputes the hash chain of `RUN_DIR/audit.sqlite` and checks it against what the
run recorded elsewhere: the head (seq, hash) in `summary.json` key `audit_head` (or in a
checkpoint's `audit_head`), and, for every checkpoint whose metadata names its entry
(`audit_seq`), that the entry exists and records that file with its SHA-256. Those anchors are
what catch rows deleted at the tail; a checkpoint or summary that cannot be read is reported as
a warning, since the chain itself is still checked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rich.console import Console
from rich.markup import escape

from worldlm.audit import AuditError

if TYPE_CHECKING:
    from worldlm.audit.log import Problem

AUDIT_FILE = "audit.sqlite"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Anchor(NamedTuple):
    """A head of the audit log recorded in `source` (a file name in the run directory)."""

    source: str
    seq: int
    hash: str


def add_audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="verify or show a run's tamper-evident audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)

    verify = audit_sub.add_parser(
        "verify",
        help="recompute the audit log's hash chain and check it against the heads recorded "
        "in checkpoints and summary.json",
    )
    verify.add_argument("run_dir", type=Path, help="the run directory (holding audit.sqlite)")

    show = audit_sub.add_parser("show", help="print the audit log as a table")
    show.add_argument("run_dir", type=Path, help="the run directory (holding audit.sqlite)")
    show.add_argument(
        "--node", metavar="PATH", help="only this node and its subtree, e.g. world/eu"
    )
    show.add_argument("--round", type=int, metavar="R", help="only this root round")


def run_audit(args: argparse.Namespace, console: Console) -> int:
    """0 when the log verifies (or is shown), 1 when verification finds problems, 2 when there
    is no log to read."""
    run_dir: Path = args.run_dir
    log_path = run_dir / AUDIT_FILE
    if not run_dir.is_dir():
        return _error(console, f"no run directory at {run_dir}")
    if not log_path.is_file():
        return _error(console, f"{run_dir} has no audit log ({AUDIT_FILE})")
    try:
        if args.audit_command == "show":
            from worldlm.audit.show import render

            console.print(render(log_path, args.node, args.round))
            return 0
        return _verify(run_dir, log_path, console)
    except AuditError as exc:
        return _error(console, str(exc))


def _error(console: Console, message: str) -> int:
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    return 2


def _verify(run_dir: Path, log_path: Path, console: Console) -> int:
    from worldlm.audit.log import verify

    anchors, warnings = collect_anchors(run_dir)
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    report = verify(log_path, [(a.seq, a.hash) for a in anchors])
    problems = [_described(p, anchors) for p in report.problems]
    problems += checkpoint_entry_problems(run_dir, log_path)
    if not problems:
        _, head = report.head
        console.print(
            f"audit log OK: {report.entries} entries, head {head[:16]} "
            f"({len(anchors)} anchors checked)",
            highlight=False,
        )
        return 0
    console.print(
        f"[bold red]audit log FAILED:[/bold red] {len(problems)} problems in "
        f"{escape(str(log_path))} ({report.entries} entries)",
        highlight=False,
    )
    for problem in problems:
        console.print(f"  {escape(problem)}", highlight=False)
    return 1


def _described(problem: Problem, anchors: list[Anchor]) -> str:
    sources = [a.source for a in anchors if a.seq == problem.seq]
    where = f" [from {', '.join(sources)}]" if problem.kind == "anchor" and sources else ""
    return str(problem) + where


def checkpoint_entry_problems(run_dir: Path, log_path: Path) -> list[str]:
    """Every checkpoint in the run directory must have an entry ("checkpoint", its file name)
    recording its SHA-256: a checkpoint swapped or altered, or its entry deleted, shows."""
    from worldlm.audit.digest import file_sha256
    from worldlm.audit.log import checkpoint_entry, connect_readonly
    from worldlm.checkpoint import list_checkpoints, read_meta
    from worldlm.checkpoint_parts import PartStore, parts_named

    problems: list[str] = []
    conn, _ = connect_readonly(log_path)
    try:
        for path in list_checkpoints(run_dir / "checkpoints"):
            entry = checkpoint_entry(conn, path.name)
            if entry is None:
                problems.append(
                    f"checkpoint {path.name}: no audit entry records it (planted or swapped, "
                    "or the run crashed right after writing it and was not resumed)"
                )
                continue
            seq, fields = entry
            if fields.get("sha256") != file_sha256(path):
                problems.append(
                    f"row {seq}: records checkpoint {path.name} with another SHA-256 than "
                    "the file has (the file was replaced or altered)"
                )
                continue
            # The checkpoint names its leaves' state files by SHA-256: each must still be it.
            parts = PartStore(run_dir / "checkpoints")
            for digest in sorted(set(parts_named(read_meta(path)))):
                problem = parts.problem(digest)
                if problem is not None:
                    problems.append(f"checkpoint {path.name}: {problem}")
    finally:
        conn.close()
    return problems


def collect_anchors(run_dir: Path) -> tuple[list[Anchor], list[str]]:
    """Every head recorded in the run directory, and a warning for each file that recorded
    one unreadably (an unreadable file is not itself proof of tampering)."""
    anchors: list[Anchor] = []
    warnings: list[str] = []
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            warnings.append(f"{summary.name} is unreadable, its audit head is not checked: {exc}")
        else:
            _add_anchor(anchors, warnings, summary.name, data)
    from worldlm.checkpoint import list_checkpoints  # torch loads lazily

    for path in list_checkpoints(run_dir / "checkpoints"):
        try:
            meta = checkpoint_meta(path)
        except (OSError, ValueError, AuditError) as exc:
            warnings.append(
                f"checkpoint {path.name} is unreadable, its audit head is not checked: {exc}"
            )
            continue
        _add_anchor(anchors, warnings, path.name, meta)
    return anchors, warnings


def _add_anchor(anchors: list[Anchor], warnings: list[str], source: str, data: Any) -> None:
    if not isinstance(data, dict) or "audit_head" not in data:
        return  # written before the audit log existed, or by a run without one
    value = data["audit_head"]
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and type(value[0]) is int
        and value[0] >= 0
        and isinstance(value[1], str)
        and _HEX64.match(value[1])
    ):
        anchors.append(Anchor(source, value[0], value[1]))
    else:
        warnings.append(f"{source}: audit_head {value!r} is not [seq, hash]; it is not checked")


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """The metadata of a checkpoint. Read through mmap, so that only the header's pages are
    loaded: a checkpoint holds the whole model and may be gigabytes."""
    from worldlm.errors import WireError
    from worldlm.wire import read_header

    error: str | None = None
    header: dict[str, Any] = {}
    with path.open("rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError if empty
        view = memoryview(mm)
        try:
            header = read_header(view)[0]
        except WireError as exc:
            error = str(exc)  # keep no traceback: it would pin a view of the map
        finally:
            view.release()
            with contextlib.suppress(BufferError):  # a view still alive; the map goes with it
                mm.close()
    if error is not None:
        raise AuditError(error)
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise AuditError("its header has no metadata")
    return meta
