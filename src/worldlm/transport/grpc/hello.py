"""The Hello frame each end sends first: who it is, which run, and what it offers.

The child's Hello is a claim, checked by the parent against the child's certificate; the
parent's answering Hello is the acknowledgement that the child was accepted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worldlm.errors import shown
from worldlm.security.certs import CertError, validate_node_path
from worldlm.transport.grpc import link_pb2
from worldlm.transport.grpc.errors import HelloError

_UINT64_MAX = (1 << 64) - 1
# A claim a parent accepts: training tokens that a float64 counts exactly (2^53, far beyond any
# corpus), and a short resources object whose known fields have their types.
MAX_TRAIN_TOKENS = 1 << 53
MAX_RESOURCES_BYTES = 4096
_RESOURCE_NUMBERS = ("memory_gb", "gpu_memory_gb", "cpus")


@dataclass(frozen=True)
class HelloInfo:
    """What a node said about itself when it attached."""

    node_path: str
    run_id: str = ""
    train_tokens: int = 0  # training tokens in the node's subtree
    resources: Mapping[str, Any] = field(default_factory=dict)  # availability, memory, ...

    def to_frame(self) -> link_pb2.Frame:
        try:
            resources_json = json.dumps(dict(self.resources), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise HelloError(
                f"resources of {self.node_path!r} cannot be sent as JSON: {exc}"
            ) from exc
        if not 0 <= self.train_tokens <= _UINT64_MAX:
            raise HelloError(f"train_tokens {self.train_tokens} does not fit in a uint64")
        return link_pb2.Frame(
            hello=link_pb2.Hello(
                node_path=self.node_path,
                run_id=self.run_id,
                train_tokens=self.train_tokens,
                resources_json=resources_json,
            )
        )

    @classmethod
    def from_proto(cls, hello: link_pb2.Hello) -> HelloInfo:
        """Parse and validate a received Hello; raise `HelloError` saying what is wrong."""
        try:
            node_path = validate_node_path(hello.node_path)
        except CertError as exc:
            raise HelloError(f"Hello names no valid node: {exc}") from exc
        if hello.train_tokens > MAX_TRAIN_TOKENS:
            raise HelloError(
                f"Hello from {node_path!r}: train_tokens {hello.train_tokens} is above the "
                f"{MAX_TRAIN_TOKENS} a node may claim"
            )
        if len(hello.resources_json) > MAX_RESOURCES_BYTES:
            raise HelloError(
                f"Hello from {node_path!r}: resources_json of {len(hello.resources_json)} "
                f"characters is longer than {MAX_RESOURCES_BYTES}"
            )
        resources: Any = {}
        if hello.resources_json:
            try:
                resources = json.loads(hello.resources_json)
            except ValueError as exc:
                raise HelloError(
                    f"Hello from {node_path!r}: resources_json is not valid JSON: {exc}"
                ) from exc
        if not isinstance(resources, dict):
            raise HelloError(
                f"Hello from {node_path!r}: resources_json must be a JSON object, "
                f"not {type(resources).__name__}"
            )
        _check_resources(node_path, resources)
        return cls(
            node_path=node_path,
            run_id=hello.run_id,
            train_tokens=hello.train_tokens,
            resources=resources,
        )


def _check_resources(node_path: str, resources: Mapping[str, Any]) -> None:
    """The fields selection reads must have their types: `available` a boolean, counts and
    memory finite non-negative numbers."""
    available = resources.get("available")
    if available is not None and not isinstance(available, bool):
        raise HelloError(f"Hello from {node_path!r}: resources.available must be true or false")
    for key in _RESOURCE_NUMBERS:
        value = resources.get(key)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise HelloError(
                f"Hello from {node_path!r}: resources.{key} must be a non-negative number, "
                f"got {shown(repr(value))}"
            )
