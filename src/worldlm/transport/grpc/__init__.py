"""The byte-level gRPC link between a federation parent and its children.

Each child dials its parent and holds one bidirectional `Attach` stream (see `link.proto`),
authenticated by mutual TLS with certificates from `worldlm.security.certs`. The link carries
opaque byte payloads of any size as checked chunks; what the bytes mean is up to the caller.

- parent: `ParentLinkServer(address, node_path, children, tls)` -> `ChildConnection`s
- child: `ChildLink(parent_address, node_path, tls).connect_with_backoff()`
- both: `send(kind, payload)` and `receive(timeout) -> (kind, payload)`

Framing (`framing.py`): chunks travel as raw bytes behind a small header, control frames
(Hello, Refusal) as protobuf. `link_pb2.py` and `link_pb2.pyi` are generated and committed, so
installing worldlm needs no grpcio-tools. After editing `link.proto`, regenerate them from the
repository root with grpcio-tools==1.85.1:
`python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src
src/worldlm/transport/grpc/link.proto`
"""

from worldlm.transport.grpc.chunking import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    Message,
    Reassembler,
    split_payload,
)
from worldlm.transport.grpc.client import ChildLink
from worldlm.transport.grpc.connection import ChildConnection
from worldlm.transport.grpc.errors import (
    ChunkError,
    HelloError,
    LinkConfigError,
    LinkDisconnected,
    LinkError,
    LinkRefused,
    LinkTimeout,
    LinkUnreachable,
)
from worldlm.transport.grpc.hello import HelloInfo
from worldlm.transport.grpc.server import ParentLinkServer
from worldlm.transport.grpc.tls import TlsFiles, is_loopback

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ChildConnection",
    "ChildLink",
    "ChunkError",
    "HelloError",
    "HelloInfo",
    "LinkConfigError",
    "LinkDisconnected",
    "LinkError",
    "LinkRefused",
    "LinkTimeout",
    "LinkUnreachable",
    "Message",
    "ParentLinkServer",
    "Reassembler",
    "TlsFiles",
    "is_loopback",
    "split_payload",
]
