"""Leaves' checkpoint state as content-addressed files beside the checkpoints.

A checkpoint (`round-NNNNNN.wlm`) holds the aggregators' state inline and names each leaf's
state by the SHA-256 of a file `objects/<sha256>.wlm`. A leaf whose state has not changed since
the last checkpoint (it was not sampled, or a sub-federation did not run) is not written again:
a round's checkpoint writes the leaves that trained, not every leaf. Files that no kept
checkpoint names are deleted after each checkpoint.

The checkpoint's own digest (recorded in the audit log) covers the names, and each file is
checked against its name before it is restored: a changed file is refused like a changed
checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from worldlm import wire
from worldlm.errors import CheckpointError, WireError

OBJECTS = "objects"
PART_KEY = "part"  # a leaf's entry in a checkpoint's node metadata: {"part": <sha256>}
_OBJECT = re.compile(r"^([0-9a-f]{64})\.wlm$")
_READ_CHUNK = 8 << 20


class StoredNode(Protocol):
    """A node whose state the store can keep: a leaf, in this process or another."""

    @property
    def state_version(self) -> int: ...

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...


def fsync_dir(directory: Path) -> None:
    """Make a rename into `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class PartStore:
    """The `objects/` directory of a run's checkpoints, and which leaf state each file holds."""

    directory: Path  # the checkpoints directory
    # leaf path -> (the leaf's state_version when stored, the file's digest): a leaf whose
    # version has not moved is named by the same file again without being read.
    stored: dict[str, tuple[int, str]] = field(default_factory=dict)
    # What this store wrote since it was made (each checkpoint's metrics row reports its own).
    written_bytes: int = 0
    written_files: int = 0

    @property
    def objects(self) -> Path:
        return self.directory / OBJECTS

    def path_of(self, digest: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CheckpointError(f"a checkpoint names a leaf state {digest!r}: not a SHA-256")
        return self.objects / f"{digest}.wlm"

    def store(self, path: str, node: StoredNode, version: int | None = None) -> str:
        """The digest of `node`'s current state, written only if it changed since last stored
        (`version`: its state_version, if the caller knows it already)."""
        version = node.state_version if version is None else version
        known = self.stored.get(path)
        if known is not None and known[0] == version and self.path_of(known[1]).is_file():
            return known[1]
        tensors, meta = node.snapshot()
        payload = wire.encode(tensors, meta)
        del tensors
        digest = hashlib.sha256(payload).hexdigest()
        target = self.path_of(digest)
        if not target.is_file():  # identical state (two leaves, or a run again): one file
            self._write(target, payload)
        self.stored[path] = (version, digest)
        return digest

    def _write(self, target: Path, payload: bytes) -> None:
        self.objects.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            with tmp.open("wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            fsync_dir(self.objects)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(
                f"could not write leaf state {target} ({len(payload) / 2**20:.1f} MiB): "
                f"{exc.strerror or exc}; the previous checkpoints are kept: free space and "
                "continue with `worldlm run --resume`"
            ) from exc
        self.written_bytes += len(payload)
        self.written_files += 1

    def problem(self, digest: str) -> str | None:
        """Why the file named `digest` cannot be restored from (missing, or changed), or None."""
        target = self.path_of(digest)
        try:
            found = file_digest(target)
        except OSError as exc:
            return f"leaf state {target} is unreadable: {exc.strerror or exc}"
        if found != digest:
            return f"leaf state {target} does not match its name: it was altered since"
        return None

    def load(self, digest: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta) of the file named `digest`; CheckpointError if it is not that file."""
        problem = self.problem(digest)
        if problem is not None:
            raise CheckpointError(problem)
        try:
            return wire.decode(self.path_of(digest).read_bytes())
        except (OSError, WireError) as exc:
            raise CheckpointError(f"leaf state {self.path_of(digest)}: {exc}") from exc

    def remember(self, path: str, version: int, digest: str) -> None:
        """`path` holds the state of file `digest` at `version` (just restored from it)."""
        self.stored[path] = (version, digest)

    def collect(self, kept: Iterable[str]) -> None:
        """Delete the files (and torn temporaries) that none of the `kept` digests names."""
        if not self.objects.is_dir():
            return
        keep = set(kept)
        for entry in self.objects.iterdir():
            match = _OBJECT.match(entry.name)
            if match is None or match.group(1) not in keep:
                entry.unlink(missing_ok=True)
        self.stored = {p: v for p, v in self.stored.items() if v[1] in keep}


def parts_named(meta: dict[str, Any]) -> list[str]:
    """The leaf-state digests a checkpoint's metadata names."""
    nodes = meta.get("nodes")
    if not isinstance(nodes, dict):
        return []
    return [
        entry[PART_KEY]
        for entry in nodes.values()
        if isinstance(entry, dict) and isinstance(entry.get(PART_KEY), str)
    ]
