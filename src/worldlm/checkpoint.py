"""Atomic checkpoints of the whole run state, in the wire format.

A checkpoint is written to a temporary file, fsynced, and renamed into place, so a crash leaves
either the previous checkpoint or the new one, never a torn file; a torn or altered file fails its
digest and is skipped on load. A checkpoint may name leaves' state kept in files of their own
(`checkpoint_parts`): those are written before it, checked with it on load, and deleted when
no kept checkpoint names them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from worldlm import wire
from worldlm.checkpoint_parts import PartStore, fsync_dir, parts_named
from worldlm.errors import CheckpointError, WireError

log = logging.getLogger(__name__)
_NAME = re.compile(r"^round-(\d{6})\.wlm$")


def checkpoint_name(round_index: int) -> str:
    return f"round-{round_index:06d}.wlm"


def save_checkpoint(
    directory: Path,
    round_index: int,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    keep: int,
    parts: PartStore | None = None,
) -> Path:
    """Write `round-NNNNNN.wlm` atomically and keep only the newest `keep` checkpoints (and the
    leaf-state files of `parts` that they name)."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = wire.encode(tensors, {**meta, "round": round_index})
    final = directory / checkpoint_name(round_index)
    tmp = directory / f".{final.name}.tmp"
    try:
        with tmp.open("wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(directory)
    except OSError as exc:
        # A full disk: leave no partial file behind, and keep the previous checkpoints.
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write checkpoint {final} ({len(payload) / 2**20:.1f} MiB): "
            f"{exc.strerror or exc}; the previous checkpoints are kept: free space and "
            "continue with `worldlm run --resume`"
        ) from exc
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    if parts is not None:
        collect_parts(directory, parts)
    return final


def collect_parts(directory: Path, parts: PartStore) -> None:
    """Delete the leaf-state files no kept checkpoint names; nothing when a kept checkpoint's
    header cannot be read (its names unknown, deleting could lose the files it needs)."""
    metas = [read_meta(path) for path in list_checkpoints(directory)]
    if not all(metas):
        log.warning("a checkpoint in %s is unreadable: leaf-state files are kept", directory)
        return
    parts.collect([digest for meta in metas for digest in parts_named(meta)])


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint files in round order (temporary files are ignored)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of one checkpoint; CheckpointError if it is torn or altered."""
    try:
        return wire.decode(path.read_bytes())
    except (OSError, WireError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata from its header alone (at most a few megabytes, not the model);
    {} if it is torn or unreadable."""
    try:
        with path.open("rb") as fh:
            header = wire.read_file_header(fh)
    except (OSError, WireError):
        return {}
    meta = header.get("meta")
    return meta if isinstance(meta, dict) else {}


def finished_reason(directory: Path) -> str:
    """Why the run whose checkpoints are in `directory` ended ("rounds", "target_ppl", ...),
    from the newest checkpoint's header alone; "" while it has rounds left (or no readable
    checkpoint). Reads the header (at most a few megabytes), not the model, so that a resume
    can refuse before it reads any data or builds any model."""
    for path in reversed(list_checkpoints(directory)):
        meta = read_meta(path)
        if not meta:
            continue  # torn: a resume falls back to an older checkpoint, never a finished one
        return str(meta.get("finished") or "")
    return ""


def load_latest(
    directory: Path,
    vouch: Callable[[Path], str | None] | None = None,
    parts: PartStore | None = None,
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """The newest checkpoint that loads, whose leaf-state files (in `parts`, by default the
    directory's own) are there and unchanged, and that `vouch` finds no problem with (say, its
    digest against the audit log's); older ones are tried when a newer one is damaged or
    refused."""
    problems = []
    for path in reversed(list_checkpoints(directory)):
        problem = vouch(path) if vouch is not None else None
        if problem is not None:
            problems.append(problem)
            continue
        try:
            tensors, meta = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        store = parts if parts is not None else PartStore(directory)
        missing = next((p for d in parts_named(meta) if (p := store.problem(d))), None)
        if missing is not None:
            problems.append(f"{path}: {missing}")
            continue
        return path, tensors, meta
    detail = ("; " + "; ".join(problems)) if problems else ""
    raise CheckpointError(f"no usable checkpoint in {directory}{detail}")
