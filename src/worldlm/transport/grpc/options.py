"""gRPC channel and server arguments shared by both ends of the link.

The frame limit is a little above the chunk size and no more: payloads travel as chunks, so a
frame near gRPC's own ceiling can only be a bug or an attack. Keepalive pings let either end
notice a silently dead peer (a crashed host, a dropped NAT mapping) during the long idle spells
of federated training, when hours can pass between messages.
"""

from __future__ import annotations

from worldlm.transport.grpc.chunking import DEFAULT_CHUNK_BYTES, Reassembler, check_chunk_bytes
from worldlm.transport.grpc.errors import ChunkError, LinkConfigError

# Room for a Hello's fields and a chunk's protobuf framing on top of its data.
FRAME_HEADROOM = 64 << 10
KEEPALIVE_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 20_000
# The server must tolerate the client's pings, or it answers them with GOAWAY "too_many_pings".
MIN_PING_INTERVAL_MS = 10_000

GrpcOptions = list[tuple[str, int | str]]


def check_limits(chunk_bytes: int, max_message_bytes: int, inbox_messages: int) -> None:
    """Check a link's size settings up front, so a bad one fails at construction, not on attach."""
    try:
        check_chunk_bytes(chunk_bytes)
        Reassembler(max_message_bytes)
    except ChunkError as exc:
        raise LinkConfigError(str(exc)) from exc
    if (
        isinstance(inbox_messages, bool)
        or not isinstance(inbox_messages, int)
        or inbox_messages < 1
    ):
        raise LinkConfigError(f"invalid inbox_messages {inbox_messages!r}: need an integer >= 1")


def frame_limit(chunk_bytes: int) -> int:
    """Largest frame either end accepts: our chunk size, or the default one if that is larger.

    A peer using the default chunk size therefore always gets through, while a peer sending
    frames far beyond any sensible chunk is cut off by gRPC with RESOURCE_EXHAUSTED.
    """
    return max(chunk_bytes, DEFAULT_CHUNK_BYTES) + FRAME_HEADROOM


def _common_options(chunk_bytes: int) -> GrpcOptions:
    """Frame limits and keepalive, the same at both ends of a link."""
    limit = frame_limit(chunk_bytes)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # 0 = no cap on pings while no data flows; the default (2) would stop them when idle.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def channel_options(chunk_bytes: int) -> GrpcOptions:
    return [
        *_common_options(chunk_bytes),
        # Our own backoff decides when to retry; a fresh channel is made for each attempt.
        ("grpc.enable_retries", 0),
    ]


def server_options(chunk_bytes: int) -> GrpcOptions:
    return [
        *_common_options(chunk_bytes),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        # gRPC sets SO_REUSEPORT by default, which lets a second parent bind the same port and
        # silently take half the children; binding an occupied port must fail instead.
        ("grpc.so_reuseport", 0),
    ]
