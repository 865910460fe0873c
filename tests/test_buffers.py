"""The link's receive buffers: reused only once nothing can read them, idle memory bounded."""

from __future__ import annotations

import pytest
import torch

from worldlm.transport.grpc.buffers import BufferPool
from worldlm.transport.grpc.chunking import Reassembler, split_payload


def test_a_buffer_is_not_lent_again_while_a_tensor_over_it_lives() -> None:
    pool = BufferPool(max_idle=2)
    view = pool.acquire(64)
    view[:] = bytes(range(64))
    tensor = torch.frombuffer(view[8:], dtype=torch.uint8)[4:].view(torch.int32)
    del view
    again = pool.acquire(64)
    assert pool.reused == 0  # the tensor still holds the first buffer
    again[:] = bytes(64)
    assert tensor[0].item() == int.from_bytes(bytes(range(12, 16)), "little")
    del tensor, again
    assert pool.idle_bytes == 128
    pool.acquire(64)
    assert pool.reused == 1


def test_idle_buffers_are_bounded_whatever_was_lent() -> None:
    pool = BufferPool(max_idle=2)
    lent = [pool.acquire(1000) for _ in range(10)]
    del lent
    assert pool.idle_bytes == 2000  # eight of the ten were let go


def test_reassembled_messages_reuse_a_released_buffer_and_keep_their_bytes() -> None:
    pool = BufferPool(max_idle=1)
    reassembler = Reassembler(1 << 20, pool=pool)
    first, second = b"a" * 5000, b"b" * 5000

    def receive(message_id: int, payload: bytes) -> memoryview:
        for chunk in split_payload(message_id, "update", payload, chunk_bytes=1024):
            message = reassembler.feed(chunk)
        assert message is not None
        return message.payload

    held = receive(1, first)
    other = receive(2, second)  # the first is still held: a fresh buffer
    assert pool.reused == 0 and bytes(held) == first and bytes(other) == second
    del held
    third = receive(3, b"c" * 5000)
    assert pool.reused == 1 and bytes(third) == b"c" * 5000 and bytes(other) == second


def test_bad_pool_size_is_refused() -> None:
    with pytest.raises(ValueError, match="max_idle"):
        BufferPool(max_idle=-1)
