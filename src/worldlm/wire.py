"""The one tensor format for every transport and checkpoint: a header plus raw buffers.

Layout: magic `WLMW`, u16 version, u32 header length, a JSON header (tensor table, metadata,
body size and SHA-256), then the body of raw little-endian buffers, each 64-byte aligned. Tensors
keep their dtype (bf16 stays bf16). Decoding never unpickles, checks the declared body size
against a limit before allocating anything, and verifies the digest before building tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import torch

from worldlm.errors import WireError

MAGIC = b"WLMW"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_ALIGN = 64
MAX_HEADER_BYTES = 64 << 20

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


def encode(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> bytes:
    """Serialize `tensors` (any device; copied to CPU) and JSON-able `meta` into one payload."""
    entries = []
    buffers: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise WireError(f"tensor {name!r}: dtype {tensor.dtype} cannot travel on the wire")
        raw = _tensor_bytes(tensor)
        pad = (-offset) % _ALIGN
        if pad:
            buffers.append(b"\0" * pad)
            offset += pad
        entries.append(
            {
                "name": name,
                "dtype": _NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "offset": offset,
                "nbytes": len(raw),
            }
        )
        buffers.append(raw)
        offset += len(raw)
    body = b"".join(buffers)
    header = {
        "tensors": entries,
        "meta": dict(meta or {}),
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _PREFIX.pack(MAGIC, VERSION, len(head)) + head + body


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


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
    try:
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + head_len]))
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, huge ints, deep nesting
        raise WireError(f"payload header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise WireError("payload header has no tensor table")
    return header, _PREFIX.size + head_len


def decode(
    payload: bytes | bytearray | memoryview, *, max_bytes: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata from a payload; refuses oversize, truncated or corrupted payloads.

    The tensors share memory with a private copy of the body (one copy, no pickle)."""
    header, start = read_header(payload)
    body_bytes = header.get("body_bytes")
    if not isinstance(body_bytes, int) or body_bytes < 0:
        raise WireError("payload header has no valid body size")
    if max_bytes is not None and body_bytes > max_bytes:
        raise WireError(f"payload declares {body_bytes} bytes, above the limit of {max_bytes}")
    view = memoryview(payload)[start:]
    if len(view) != body_bytes:
        raise WireError(f"payload body has {len(view)} bytes but its header declares {body_bytes}")
    if hashlib.sha256(view).hexdigest() != header.get("body_sha256"):
        raise WireError("payload body does not match its SHA-256 digest (corrupted or altered)")
    body = bytearray(view)
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


def _tensor_from_entry(entry: Any, base: torch.Tensor, body_bytes: int) -> tuple[str, torch.Tensor]:
    if not isinstance(entry, dict):
        raise WireError("payload tensor table holds a non-object entry")
    name, dtype_name = entry.get("name"), entry.get("dtype")
    shape, offset, nbytes = entry.get("shape"), entry.get("offset"), entry.get("nbytes")
    if not isinstance(name, str) or dtype_name not in DTYPES:
        raise WireError(f"payload tensor entry {entry!r} has a bad name or dtype")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise WireError(f"tensor {name!r}: bad shape {shape!r}")
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
