"""The one tensor format for every transport and checkpoint: a header plus raw buffers.

Layout: magic `WLMW`, u16 version, u32 header length, a JSON header (tensor table, metadata,
body size and digest), then the body of raw little-endian buffers, each 64-byte aligned. Tensors
keep their dtype (bf16 stays bf16). Decoding never unpickles, checks the declared body size
against a limit before allocating anything, and verifies the digest before building tensors.

Speed: `encode_parts` hands out the tensors' own memory (no copy) for a transport to stream,
and `decode(copy=False)` builds tensors over a buffer the caller owns, so a link copies each
byte once on each side. The body digest is XXH3-128, which runs at memory speed (SHA-256 would
cap a link near 1.7 GB/s here); it detects corruption and truncation, while tampering on a
link is TLS's job. Payloads written with a SHA-256 body digest (before XXH3) still decode.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch
import xxhash

from worldlm.errors import WireError, shown

MAGIC = b"WLMW"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_ALIGN = 64
# A header holds the tensor table and a reply's records: a few hundred kilobytes for a model of
# thousands of tensors and a subtree of a thousand leaves. Parsed JSON costs about 25x its bytes
# in Python objects (a 14 MiB header of empty records cost 345 MiB), so both its bytes and its
# objects and arrays are capped before parsing.
MAX_HEADER_BYTES = 8 << 20
MAX_HEADER_CONTAINERS = 250_000
# Parameter names ("model.layers.0.self_attn.q_proj.lora_A.default.weight") with the codecs'
# prefixes: printable ASCII, no spaces, and short enough to quote in a refusal.
MAX_TENSOR_NAME = 512
_TENSOR_NAME = re.compile(rf"[\x21-\x7e]{{1,{MAX_TENSOR_NAME}}}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json.loads would keep the last silently, so
    a reader and a checker of the same header could see different values)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {shown(repr(key))} appears twice in one object")
        out[key] = value
    return out


def is_tensor_name(name: str) -> bool:
    return bool(_TENSOR_NAME.fullmatch(name))


DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


Buffer = bytes | bytearray | memoryview


def encode_parts(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any] | None = None,
    *,
    body_digest: bool = True,
) -> tuple[list[Buffer], int]:
    """The payload as a list of buffers (header, then each tensor's own memory and padding)
    and its total size: nothing is copied for contiguous CPU tensors. The buffers are valid as
    long as the tensors are not modified.

    `body_digest=False` leaves the body digest out, for a carrier that checks its own digest
    over the whole payload (the gRPC link's chunks): hashing twice would cost a pass over the
    bytes for nothing. Such a payload only decodes with `verify_body=False`."""
    entries = []
    body: list[Buffer] = []
    digest = xxhash.xxh3_128() if body_digest else None
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise WireError(f"tensor {name!r}: dtype {tensor.dtype} cannot travel on the wire")
        raw = _tensor_view(tensor)
        pad = (-offset) % _ALIGN
        if pad:
            body.append(bytes(pad))
            if digest is not None:
                digest.update(body[-1])
            offset += pad
        entries.append(
            {
                "name": name,
                "dtype": _NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "offset": offset,
                "nbytes": raw.nbytes,
            }
        )
        if raw.nbytes:
            body.append(raw)
            if digest is not None:
                digest.update(raw)
        offset += raw.nbytes
    header: dict[str, Any] = {"tensors": entries, "meta": dict(meta or {}), "body_bytes": offset}
    if digest is not None:
        header["body_xxh3_128"] = digest.hexdigest()
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, VERSION, len(head)) + head
    return [prefix, *body], len(prefix) + offset


def encode(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> bytes:
    """Serialize `tensors` (any device; copied to CPU) and JSON-able `meta` into one payload."""
    parts, _ = encode_parts(tensors, meta)
    return b"".join(parts)


def _tensor_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy when it is a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def read_file_header(fh: BinaryIO) -> dict[str, Any]:
    """The header of the payload a file starts with, reading the header's bytes alone."""
    prefix = fh.read(_PREFIX.size)
    if len(prefix) == _PREFIX.size:
        head_len = _PREFIX.unpack_from(prefix, 0)[2]
        prefix += fh.read(min(head_len, MAX_HEADER_BYTES + 1))
    return read_header(prefix)[0]


def read_header(payload: bytes | bytearray | memoryview) -> tuple[dict[str, Any], int]:
    """Parse and sanity-check the header; returns it and the offset where the body starts."""
    view = memoryview(payload)
    if len(view) < _PREFIX.size:
        raise WireError(f"payload of {len(view)} bytes is too short to be a worldlm payload")
    magic, version, head_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError("not a worldlm payload (bad magic bytes)")
    if version != VERSION:
        raise WireError(f"unsupported payload version {version} (this worldlm reads {VERSION})")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(view):
        raise WireError(f"header length {head_len} is impossible for a {len(view)}-byte payload")
    raw = bytes(view[_PREFIX.size : _PREFIX.size + head_len])
    # Brackets inside strings count too: an upper bound on what parsing would allocate.
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_HEADER_CONTAINERS:
        raise WireError(
            f"payload header holds up to {containers} objects and arrays, more than the "
            f"{MAX_HEADER_CONTAINERS} a message can have"
        )
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, huge ints, deep nesting
        raise WireError(f"payload header is not valid JSON: {shown(str(exc))}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise WireError("payload header has no tensor table")
    return header, _PREFIX.size + head_len


def decode(
    payload: bytes | bytearray | memoryview,
    *,
    max_bytes: int | None = None,
    copy: bool = True,
    verify_body: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata from a payload; refuses oversize, truncated or corrupted payloads.

    The tensors share memory with a private copy of the body (one copy, no pickle); with
    `copy=False` they share the payload's own memory, which must be writable and not reused.
    `verify_body=False` skips the body digest, for a caller that has already checked a digest
    over the whole payload (a gRPC link); sizes and the tensor table are checked regardless."""
    header, start = read_header(payload)
    body_bytes = header.get("body_bytes")
    if not isinstance(body_bytes, int) or body_bytes < 0:
        raise WireError("payload header has no valid body size")
    if max_bytes is not None and body_bytes > max_bytes:
        raise WireError(f"payload declares {body_bytes} bytes, above the limit of {max_bytes}")
    view = memoryview(payload)[start:]
    if len(view) != body_bytes:
        raise WireError(f"payload body has {len(view)} bytes but its header declares {body_bytes}")
    if verify_body:
        _check_body_digest(header, view)
    if body_bytes and not copy and view.readonly:
        raise WireError("decode(copy=False) needs a writable payload buffer")
    body = bytearray(view) if copy else view
    base = (
        torch.frombuffer(body, dtype=torch.uint8)
        if body_bytes
        else torch.empty(0, dtype=torch.uint8)
    )
    tensors: dict[str, torch.Tensor] = {}
    for entry in header["tensors"]:
        name, tensor = _tensor_from_entry(entry, base, body_bytes)
        if name in tensors:
            raise WireError(f"payload names tensor {name!r} twice")
        tensors[name] = tensor
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError("payload metadata is not a JSON object")
    return tensors, meta


def _check_body_digest(header: dict[str, Any], body: memoryview) -> None:
    if "body_xxh3_128" in header:
        if xxhash.xxh3_128_hexdigest(body) != header["body_xxh3_128"]:
            raise WireError("payload body does not match its XXH3-128 digest (corrupted)")
    elif "body_sha256" in header:  # written before XXH3
        if hashlib.sha256(body).hexdigest() != header["body_sha256"]:
            raise WireError("payload body does not match its SHA-256 digest (corrupted)")
    else:
        raise WireError("payload header has no body digest")


def _tensor_from_entry(entry: Any, base: torch.Tensor, body_bytes: int) -> tuple[str, torch.Tensor]:
    if not isinstance(entry, dict):
        raise WireError("payload tensor table holds a non-object entry")
    name, dtype_name = entry.get("name"), entry.get("dtype")
    shape, offset, nbytes = entry.get("shape"), entry.get("offset"), entry.get("nbytes")
    if not isinstance(name, str) or not is_tensor_name(name):
        raise WireError(
            f"payload tensor name {shown(repr(name))} is not 1 to {MAX_TENSOR_NAME} printable "
            "ASCII characters without spaces"
        )
    if dtype_name not in DTYPES:
        raise WireError(f"tensor {name!r}: dtype {shown(repr(dtype_name))} cannot travel")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise WireError(f"tensor {name!r}: bad shape {shown(repr(shape))}")
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if not (isinstance(offset, int) and isinstance(nbytes, int)) or nbytes != expected:
        raise WireError(f"tensor {name!r}: declares {nbytes} bytes, its shape needs {expected}")
    if offset < 0 or offset + nbytes > body_bytes or offset % _ALIGN:
        raise WireError(
            f"tensor {name!r}: buffer [{offset}, {offset + nbytes}) is outside the body"
        )
    flat = base[offset : offset + nbytes].view(dtype)
    return name, flat.view(shape)


def digest(payload: bytes | bytearray | memoryview) -> str:
    """SHA-256 of a whole payload (header and body), as hex."""
    return hashlib.sha256(memoryview(payload)).hexdigest()
