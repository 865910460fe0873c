from __future__ import annotations

import json
import tracemalloc

import pytest
import torch

from worldlm import wire
from worldlm.errors import WireError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 4, generator=gen),
        "b": torch.randn(5, generator=gen).to(torch.bfloat16),
        "c": torch.randn(2, 2, generator=gen).to(torch.float16),
        "ids": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }


def test_round_trip_keeps_values_and_dtypes() -> None:
    original = _tensors()
    payload = wire.encode(original, {"round": 3, "who": "w/a"})
    decoded, meta = wire.decode(payload)
    assert meta == {"round": 3, "who": "w/a"}
    assert list(decoded) == list(original)
    for key, value in original.items():
        assert decoded[key].dtype == value.dtype and torch.equal(decoded[key], value)


def test_bf16_travels_as_bf16() -> None:
    t = torch.randn(1000).to(torch.bfloat16)
    assert len(wire.encode({"t": t})) < 1000 * 2 + 1024


def test_corruption_truncation_and_oversize_are_refused() -> None:
    payload = bytearray(wire.encode(_tensors()))
    flipped = bytearray(payload)
    flipped[-5] ^= 0xFF
    with pytest.raises(WireError, match="digest"):
        wire.decode(flipped)
    with pytest.raises(WireError, match="declares"):
        wire.decode(payload[:-10])
    with pytest.raises(WireError, match="above the limit"):
        wire.decode(payload, max_bytes=16)
    with pytest.raises(WireError, match="magic"):
        wire.decode(b"NOPE" + bytes(payload[4:]))


def test_encoding_is_deterministic() -> None:
    assert wire.encode(_tensors(), {"x": 1}) == wire.encode(_tensors(), {"x": 1})


@pytest.mark.parametrize(
    "head", [b'{"tensors": [], "n": ' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000]
)
def test_hostile_headers_are_wire_errors(head: bytes) -> None:
    # an integer past Python's digit limit, and nesting deeper than the recursion limit
    payload = wire._PREFIX.pack(wire.MAGIC, wire.VERSION, len(head)) + head
    with pytest.raises(WireError, match="not valid JSON"):
        wire.decode(payload)


def test_a_key_given_twice_in_a_header_is_refused() -> None:
    """json.loads would keep the second value silently: a checker and a reader could see
    different headers."""
    payload = wire.encode({"t": torch.ones(2)}, {"round": 1})
    head = wire.read_header(payload)[0]
    text = json.dumps(head)
    twice = text.replace('"round": 1', '"round": 1, "round": 2').encode()
    assert json.loads(twice)["meta"]["round"] == 2  # the attack: the last value wins unseen
    forged = wire._PREFIX.pack(wire.MAGIC, wire.VERSION, len(twice)) + twice
    with pytest.raises(WireError, match="'round' appears twice"):
        wire.read_header(forged)


def _empty_records_payload(count: int) -> bytes:
    head = b'{"tensors": [], "meta": {"records": [' + b",".join([b"{}"] * count) + b"]}}"
    return wire._PREFIX.pack(wire.MAGIC, wire.VERSION, len(head)) + head


def _parse_peak(payload: bytes) -> int:
    tracemalloc.start()
    try:
        wire.read_header(payload)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_header_of_a_million_empty_records_is_refused_before_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3 MB of `{},` is under the byte cap but would parse into ~100 MB of Python objects."""
    payload = _empty_records_payload(1_000_000)
    assert len(payload) < wire.MAX_HEADER_BYTES
    with pytest.raises(WireError, match="objects and arrays, more than"):
        wire.read_header(payload)
    monkeypatch.setattr(wire, "MAX_HEADER_CONTAINERS", 10**9)  # the attack, undefended
    assert _parse_peak(payload) > 50 << 20


def test_a_header_with_as_many_records_as_a_large_subtree_sends_still_parses() -> None:
    assert wire.read_header(_empty_records_payload(50_000))[0]["meta"]["records"][0] == {}


def test_parts_share_the_tensors_memory_and_decode_can_share_the_buffer() -> None:
    big = torch.randn(64, 64)
    parts, total = wire.encode_parts({"big": big, "b": torch.ones(3, dtype=torch.bfloat16)})
    assert total == sum(memoryview(p).nbytes for p in parts)
    payload = bytearray(b"".join(parts))
    tensors, _ = wire.decode(payload, copy=False)
    assert torch.equal(tensors["big"], big)
    big[0, 0] = 7.0  # no copy was made on the way out: the part shows the change
    assert torch.frombuffer(bytearray(parts[1]), dtype=torch.float32)[0] == 7.0
    tensors["big"][1, 1] = 42.0  # and none on the way in: the tensor lives in the buffer,
    with pytest.raises(WireError, match="digest"):  # which therefore no longer matches
        wire.decode(payload)
    with pytest.raises(WireError, match="writable"):
        wire.decode(wire.encode({"x": torch.ones(2)}), copy=False)  # bytes are read-only


def test_payloads_with_a_sha256_body_digest_still_decode() -> None:
    import hashlib
    import json
    import struct

    parts, _ = wire.encode_parts({"w": torch.arange(4.0)}, {"m": 1})
    prefix, body = parts[0], b"".join(parts[1:])
    head_len = struct.unpack_from("<4sHI", prefix)[2]
    header = json.loads(bytes(prefix[10 : 10 + head_len]))
    del header["body_xxh3_128"]
    header["body_sha256"] = hashlib.sha256(body).hexdigest()
    head = json.dumps(header).encode()
    legacy = struct.pack("<4sHI", b"WLMW", 1, len(head)) + head + body
    tensors, meta = wire.decode(legacy)
    assert torch.equal(tensors["w"], torch.arange(4.0)) and meta == {"m": 1}
    header.pop("body_sha256")
    head = json.dumps(header).encode()
    with pytest.raises(WireError, match="no body digest"):
        wire.decode(struct.pack("<4sHI", b"WLMW", 1, len(head)) + head + body)


def test_a_payload_without_body_digest_decodes_only_when_the_carrier_checked_it() -> None:
    # The gRPC link digests whole payloads, so it sends them without the body digest.
    parts, _ = wire.encode_parts(_tensors(), {"m": 2}, body_digest=False)
    payload = b"".join(parts)
    assert len(payload) < len(wire.encode(_tensors(), {"m": 2}))
    with pytest.raises(WireError, match="no body digest"):
        wire.decode(payload)
    decoded, meta = wire.decode(payload, verify_body=False)
    assert meta == {"m": 2} and torch.equal(decoded["a.weight"], _tensors()["a.weight"])
    with pytest.raises(WireError, match="declares"):  # sizes are still checked
        wire.decode(payload[:-10], verify_body=False)
