"""A node's own settings for a deployment: who it is, where it listens or dials, its
certificates and (for a leaf) where its private data lives. The federation config is shared by
every node; this file is not."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from worldlm.config import Section
from worldlm.config_errors import format_validation_error
from worldlm.errors import ConfigError
from worldlm.transport.grpc.admission import DEFAULT_HELD_MESSAGES
from worldlm.transport.grpc.chunking import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES


class NodeSection(Section):
    path: str = Field(description="This node's path in the federation tree, e.g. world/eu/paris.")
    listen: str | None = Field(
        None, description="host:port an aggregator serves its children on (not for leaves)."
    )
    parent: str | None = Field(None, description="host:port of the parent (all but the root).")
    state_dir: str | None = Field(
        None,
        description="Where a child keeps its state after each task, to restart and to replay "
        "rounds after its parent resumed (default: `<node file name>.state` beside the file).",
    )
    available: bool = Field(
        True, description="Reported to the parent: whether this node wants to be sampled."
    )


class TlsSection(Section):
    ca: str = Field(description="The federation CA certificate (PEM).")
    cert: str = Field(description="This node's certificate (PEM), bound to its path.")
    key: str = Field(description="This node's private key (PEM).")


class LinkSection(Section):
    round_timeout: float = Field(
        3600.0, gt=0, description="Seconds an aggregator waits for its children's replies."
    )
    wait_for_children: float = Field(
        600.0, gt=0, description="Seconds an aggregator waits for its children to attach."
    )
    rejoin_wait: float = Field(
        10.0,
        ge=0,
        description="Seconds an aggregator waits, at the start of each round, for children that "
        "went away (a restarted sub-federation) to attach again.",
    )
    min_children: int | None = Field(
        None, ge=1, description="Start once this many children attached (default: all)."
    )
    reconnect_wait: float = Field(
        300.0, gt=0, description="Seconds a child keeps dialing a parent that went away."
    )
    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, ge=1024, description="Bytes per gRPC frame.")
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES, ge=1, description="Largest message accepted from a peer."
    )
    held_messages: int = Field(
        DEFAULT_HELD_MESSAGES,
        ge=1,
        description="An aggregator's bound on its children's messages held in memory at once, "
        "whatever their number: beyond it, a child's reply waits in its send until the "
        "aggregator has folded earlier ones. The reply the round waits for next always passes, "
        "so at most this many + 2 are held. Raise it for many children on slow links.",
    )


class LeafDataSection(Section):
    paths: list[str] = Field(description="This leaf's private files (replace the shared config's).")


class NodeFile(Section):
    node: NodeSection
    tls: TlsSection | None = Field(None, description="Mutual TLS files; required off loopback.")
    allow_plaintext: bool = Field(
        False, description="Allow a link without TLS (loopback addresses only; for tests)."
    )
    link: LinkSection = LinkSection()
    data: LeafDataSection | None = None


def load_node_file(path: Path) -> NodeFile:
    """Read and validate a node file; relative file paths are relative to it."""
    if not path.is_file():
        raise ConfigError(f"node file {path} does not exist")
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"node file {path}: not valid TOML: {exc}") from None
    base = path.resolve().parent
    for section, keys in (("tls", ("ca", "cert", "key")), ("data", ())):
        part = raw.get(section)
        if not isinstance(part, dict):
            continue
        for key in keys:
            if isinstance(part.get(key), str):
                part[key] = str((base / Path(part[key]).expanduser()).resolve())
        if section == "data" and isinstance(part.get("paths"), list):
            part["paths"] = [
                str((base / Path(p).expanduser()).resolve()) if isinstance(p, str) else p
                for p in part["paths"]
            ]
    node = raw.get("node")
    if isinstance(node, dict):
        state = node.get("state_dir", f"{path.stem}.state")
        if isinstance(state, str):
            node["state_dir"] = str((base / Path(state).expanduser()).resolve())
    try:
        return NodeFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"node file {path}:\n{format_validation_error(exc, NodeFile)}") from None
