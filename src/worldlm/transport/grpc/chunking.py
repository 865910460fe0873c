"""Splitting a payload into Chunk frames, and putting chunks back together with every check.

gRPC caps a single protobuf message far below 2 GiB, and one huge message would be copied whole
several times on its way, so every payload travels as chunks of at most `chunk_bytes`. Sizes
are uint64 on the wire, so payloads above 2 GiB are representable.

The receiving side trusts nothing it is sent: the declared size is checked against a limit on
the first chunk, before any byte is stored; sequence numbers must follow each other; the bytes
must add up exactly to the declared size; and the XXH3-128 on the last chunk must match.

A payload may be handed over as several buffers (`wire.encode_parts`: a header, then tensors'
own memory), so the sender copies each byte once, into its chunk; the receiver copies each
byte once, from the chunks into one writable buffer that tensors can then share.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import xxhash

from worldlm.transport.grpc.buffers import SHARED_POOL, BufferPool
from worldlm.transport.grpc.errors import ChunkError
from worldlm.transport.grpc.framing import Chunk

DEFAULT_CHUNK_BYTES = 1 << 20
# Far below gRPC's ~2 GiB ceiling per protobuf message, and beyond any useful chunk size.
MAX_CHUNK_BYTES = 64 << 20
# Large enough for a model update above 2 GiB by default; a parent sets its own limit.
DEFAULT_MAX_MESSAGE_BYTES = 4 << 30
MAX_KIND_CHARS = 128
_UINT32_MAX = (1 << 32) - 1
_DIGEST_HEX = re.compile(r"[0-9a-f]{32}")

Payload = bytes | bytearray | memoryview
Payloads = Payload | Sequence[Payload]  # one buffer, or several sent back to back as one


@dataclass(frozen=True)
class Message:
    """One whole message, as it was sent: its id on the stream, its kind and its bytes."""

    message_id: int
    kind: str
    payload: memoryview  # writable, owned by the receiver alone


def check_kind(kind: str) -> str:
    """Return `kind` if it is a usable message kind, else raise `ChunkError`."""
    if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND_CHARS:
        raise ChunkError(
            f"invalid message kind {kind!r}: it must be 1 to {MAX_KIND_CHARS} characters"
        )
    return kind


def check_chunk_bytes(chunk_bytes: int) -> int:
    """Return `chunk_bytes` if it is a usable chunk size, else raise `ChunkError`."""
    if (
        isinstance(chunk_bytes, bool)
        or not isinstance(chunk_bytes, int)
        or not 1 <= chunk_bytes <= MAX_CHUNK_BYTES
    ):
        raise ChunkError(
            f"invalid chunk size {chunk_bytes!r}: it must be an integer from 1 to "
            f"{MAX_CHUNK_BYTES} bytes"
        )
    return chunk_bytes


def split_payload(
    message_id: int, kind: str, payload: Payloads, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[Chunk]:
    """The Chunk frames carrying `payload`, produced lazily one chunk at a time.

    Lazily, so that sending a multi-gigabyte payload never holds more than one extra chunk. The
    arguments are checked now, not on first iteration, so a bad call fails where it is made.
    An empty payload is one chunk with no data.
    """
    check_kind(kind)
    if isinstance(message_id, bool) or not isinstance(message_id, int) or message_id < 1:
        raise ChunkError(f"invalid message id {message_id!r}: it must be an integer >= 1")
    check_chunk_bytes(chunk_bytes)
    buffers = [payload] if isinstance(payload, bytes | bytearray | memoryview) else payload
    try:
        views = [memoryview(b).cast("B") for b in buffers]
    except (TypeError, ValueError) as exc:
        raise ChunkError(f"payload must be contiguous bytes: {exc}") from exc
    total = sum(v.nbytes for v in views)
    n_chunks = max(1, -(-total // chunk_bytes))
    if n_chunks - 1 > _UINT32_MAX:
        raise ChunkError(
            f"a payload of {total} bytes needs {n_chunks} chunks of {chunk_bytes} bytes, "
            f"more than the {_UINT32_MAX + 1} a uint32 sequence number can count; use larger chunks"
        )
    return _chunks(message_id, kind, views, total, chunk_bytes, n_chunks)


def _chunks(
    message_id: int,
    kind: str,
    views: list[memoryview],
    total: int,
    chunk_bytes: int,
    n_chunks: int,
) -> Iterator[Chunk]:
    # The digest is computed as the chunks go, so the payload is read once.
    digest = xxhash.xxh3_128()
    pieces = _pieces(views, chunk_bytes)
    for seq in range(n_chunks):
        data: memoryview | bytes = next(pieces, b"")
        digest.update(data)
        last = seq == n_chunks - 1
        chunk = Chunk(message_id=message_id, seq=seq, data=data, last=last)
        if seq == 0:
            chunk.kind = kind
            chunk.total_bytes = total
        if last:
            chunk.xxh3_128 = digest.hexdigest()
        yield chunk


def _pieces(views: list[memoryview], size: int) -> Iterator[memoryview | bytes]:
    """The concatenation of `views` cut into `size`-byte pieces: slices of the buffers (no
    copy), or, for a piece that spans two buffers, the joined bytes."""
    pending: list[memoryview] = []
    have = 0
    for view in views:
        start = 0
        while start < view.nbytes:
            take = min(size - have, view.nbytes - start)
            pending.append(view[start : start + take])
            have += take
            start += take
            if have == size:
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending, have = [], 0
    if have:
        yield pending[0] if len(pending) == 1 else b"".join(pending)


@dataclass
class _Partial:
    """The message being received: what its first chunk promised, and what has come so far."""

    message_id: int
    kind: str
    total_bytes: int
    received: int = 0
    next_seq: int = 1
    # Fresh memory is reserved, not touched: the OS commits pages only as chunks are copied
    # in, so a peer that declares a large size and sends little costs only what it sent. A
    # reused buffer (buffers.py) is memory this process already had.
    buffer: memoryview = field(default_factory=lambda: memoryview(bytearray()))
    digest: xxhash.xxh3_128 = field(default_factory=xxhash.xxh3_128)


class Reassembler:
    """Rebuilds messages from their chunks, one message at a time, refusing anything off.

    Each chunk is copied, as it arrives, into one buffer reserved for the declared size (after
    the limit check), lent by a `BufferPool` that reuses buffers whose users are gone. Fresh
    memory is committed only as bytes arrive, so a peer that declares a huge size and sends
    little costs only what it sent, and a whole message is held once. After a
    `ChunkError` the partial message is dropped; the stream it came from should be closed,
    since its framing can no longer be trusted.
    """

    def __init__(
        self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, pool: BufferPool | None = None
    ) -> None:
        if (
            isinstance(max_message_bytes, bool)
            or not isinstance(max_message_bytes, int)
            or max_message_bytes < 0
        ):
            raise ChunkError(f"invalid max_message_bytes {max_message_bytes!r}: need an int >= 0")
        self.max_message_bytes = max_message_bytes
        self._pool = SHARED_POOL if pool is None else pool
        self._partial: _Partial | None = None
        self._last_id = 0

    @property
    def in_progress(self) -> tuple[str, int, int] | None:
        """(kind, declared total bytes, bytes received) of the unfinished message, if any."""
        p = self._partial
        return None if p is None else (p.kind, p.total_bytes, p.received)

    def feed(self, chunk: Chunk, on_free: Callable[[], None] | None = None) -> Message | None:
        """Take the next chunk; return the whole message when this chunk completes it.
        `on_free`, for a chunk that starts a message: called once nothing uses that message's
        buffer any more (`BufferPool.acquire`)."""
        try:
            return self._feed(chunk, on_free)
        except ChunkError:
            self._partial = None
            raise

    def drop_partial(self) -> None:
        """Let an unfinished message go (its stream ended): its buffer is free at once."""
        self._partial = None

    def _feed(self, chunk: Chunk, on_free: Callable[[], None] | None) -> Message | None:
        p = self._partial
        if p is None:
            p = self._partial = self._start(chunk, on_free)
        else:
            if chunk.message_id != p.message_id:
                raise ChunkError(
                    f"chunk of message {chunk.message_id} arrived while message {p.message_id} "
                    f"({p.kind!r}) was incomplete; messages must not interleave"
                )
            if chunk.seq != p.next_seq:
                raise ChunkError(
                    f"message {p.message_id} ({p.kind!r}): expected chunk {p.next_seq}, "
                    f"got chunk {chunk.seq}"
                )
            if chunk.kind or chunk.total_bytes:
                raise ChunkError(
                    f"message {p.message_id}: chunk {chunk.seq} sets kind or total_bytes, "
                    "which belong on the first chunk only"
                )
            if not chunk.data and not chunk.last:
                # Refused so that a peer cannot spin the receiver on free, empty chunks.
                raise ChunkError(f"message {p.message_id}: chunk {chunk.seq} is empty")
            p.next_seq += 1

        size = len(chunk.data)
        if p.received + size > p.total_bytes:
            raise ChunkError(
                f"message {p.message_id} ({p.kind!r}) declared {p.total_bytes} bytes but sent "
                f"at least {p.received + size}"
            )
        if size:
            p.buffer[p.received : p.received + size] = chunk.data  # the one copy, as it comes
            p.digest.update(chunk.data)
            p.received += size
        if not chunk.last:
            if chunk.xxh3_128:
                raise ChunkError(
                    f"message {p.message_id}: chunk {chunk.seq} carries a digest but is not last"
                )
            return None
        return self._finish(p, chunk.xxh3_128)

    def _start(self, chunk: Chunk, on_free: Callable[[], None] | None) -> _Partial:
        if chunk.seq != 0:
            raise ChunkError(
                f"message {chunk.message_id} starts at chunk {chunk.seq}; the first chunk is 0"
            )
        if chunk.message_id <= self._last_id:
            raise ChunkError(
                f"message id {chunk.message_id} does not follow the previous id {self._last_id}; "
                "ids must increase (a replayed or duplicated message?)"
            )
        kind = check_kind(chunk.kind)
        # The limit check comes before anything of this message is kept.
        if chunk.total_bytes > self.max_message_bytes:
            raise ChunkError(
                f"message {chunk.message_id} ({kind!r}) declares {chunk.total_bytes} bytes, above "
                f"the limit of {self.max_message_bytes} bytes; raise max_message_bytes if it is "
                "expected"
            )
        if not chunk.data and not chunk.last:
            raise ChunkError(f"message {chunk.message_id}: its first chunk is empty but not last")
        try:
            buffer = self._pool.acquire(chunk.total_bytes, on_free)
        except MemoryError:
            raise ChunkError(
                f"message {chunk.message_id} ({kind!r}): cannot reserve memory for its declared "
                f"{chunk.total_bytes} bytes"
            ) from None
        return _Partial(chunk.message_id, kind, chunk.total_bytes, buffer=buffer)

    def _finish(self, p: _Partial, declared: str) -> Message:
        if p.received != p.total_bytes:
            raise ChunkError(
                f"message {p.message_id} ({p.kind!r}) ended after {p.received} bytes but "
                f"declared {p.total_bytes}"
            )
        if not _DIGEST_HEX.fullmatch(declared):
            raise ChunkError(
                f"message {p.message_id} ({p.kind!r}): its last chunk has no valid xxh3_128 "
                f"(got {declared[:80]!r}; expected 32 lowercase hex digits)"
            )
        actual = p.digest.hexdigest()
        if actual != declared:
            raise ChunkError(
                f"message {p.message_id} ({p.kind!r}) failed its digest: xxh3_128 {actual} "
                f"differs from the declared {declared}; the payload was corrupted"
            )
        payload = p.buffer
        self._partial = None
        self._last_id = p.message_id
        return Message(message_id=p.message_id, kind=p.kind, payload=payload)
