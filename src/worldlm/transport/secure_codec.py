"""Secure aggregation messages (`core.secure_messages`) as parts of a wire payload.

`codec` owns the payload; this module gives it, per secure kind, the metadata fields, the tensor
prefixes and the checks, and turns the protocol's bodies into tensors and back. Bytes travel as
1-D uint8 tensors; a masked vector in its own width (uint16/32/64 reinterpreted as the signed
integer of the same width, the wire having no wider unsigned types); dicts keyed by peer as one
tensor per peer, `<field>/<peer path>`; everything else in the JSON metadata. Decoding checks
every field, every tensor's dtype, shape and byte length, and that the peers of paired dicts
agree, before it builds a message; the protocol then checks what only it can (ciphertexts,
shares, who is whose neighbour).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from worldlm.core.secure_messages import (
    Declined,
    MaskRequest,
    SecureReply,
    SecureSetup,
    SecureStage,
)
from worldlm.errors import WireError, shown
from worldlm.secagg import (
    AdvertiseKeys,
    ClientSetup,
    KeysBroadcast,
    MaskedInput,
    ShareKeys,
    SharesDelivery,
    UnmaskingShares,
    UnmaskRequest,
)
from worldlm.secagg.keys import KEY_BYTES, NONCE_BYTES
from worldlm.secagg.plan import SESSION_BYTES
from worldlm.secagg.shamir import SHARE_BYTES
from worldlm.transport.fields import (
    array,
    finite,
    integer,
    json_object,
    node_path,
    tensor_name,
    text,
)

Tensors = dict[str, torch.Tensor]
OWN = "secagg/"  # single tensors of a message: secagg/session, secagg/masked, ...
_ENVELOPE = ("run_id", "round", "global_round", "sender", "recipient", "nonce")
_REPLY = ("sender", "nonce")
SETUP_FIELDS = (
    "client",
    "index",
    "neighbours",
    "threshold",
    "bits",
    "clip_range",
    "max_clients",
    "length",
    "dp_clip",
)

# Metadata fields and tensor prefixes of each kind. The setup also carries a train_task's
# fields and tensors, the trained reply an update's records and residual: `codec` adds those.
FIELDS: dict[str, tuple[str, ...]] = {
    "secagg_setup": SETUP_FIELDS,
    "secagg_broadcast": _ENVELOPE,
    "secagg_delivery": (*_ENVELOPE, "total_weight"),
    "secagg_unmask": (*_ENVELOPE, "survivors", "dropped"),
    "secagg_trained": (*_REPLY, "weight", "names"),
    "secagg_shares": _REPLY,
    "secagg_masked": _REPLY,
    "secagg_unmasking": _REPLY,
    "secagg_declined": (*_REPLY, "reason"),
}
PREFIXES: dict[str, tuple[str, ...]] = {
    "secagg_setup": (OWN,),
    "secagg_broadcast": ("c_public/", "s_public/"),
    "secagg_delivery": ("sealed/",),
    "secagg_unmask": (),
    "secagg_trained": (OWN,),
    "secagg_shares": ("sealed/",),
    "secagg_masked": (OWN,),
    "secagg_unmasking": ("seed_share/", "key_share/"),
    "secagg_declined": (),
}
# Masked vectors by wire dtype: the unsigned numpy dtype each signed wire dtype stands for.
_UNSIGNED = {
    torch.uint8: np.uint8,
    torch.int16: np.uint16,
    torch.int32: np.uint32,
    torch.int64: np.uint64,
}
_SIGNED = {
    np.dtype(np.uint8): np.dtype(np.uint8),
    np.dtype(np.uint16): np.dtype(np.int16),
    np.dtype(np.uint32): np.dtype(np.int32),
    np.dtype(np.uint64): np.dtype(np.int64),
}


def kind_of(message: SecureSetup | SecureStage | SecureReply) -> str:
    """The wire kind of a secure message."""
    if isinstance(message, SecureSetup):
        return "secagg_setup"
    body = message.body
    kinds: list[tuple[type, str]] = [
        (KeysBroadcast, "secagg_broadcast"),
        (MaskRequest, "secagg_delivery"),
        (UnmaskRequest, "secagg_unmask"),
        (ShareKeys, "secagg_shares"),
        (MaskedInput, "secagg_masked"),
        (UnmaskingShares, "secagg_unmasking"),
        (Declined, "secagg_declined"),
    ]
    for body_type, kind in kinds:
        if isinstance(body, body_type):
            return kind
    return "secagg_trained"


def encode(message: SecureSetup | SecureStage | SecureReply) -> tuple[str, Tensors, dict[str, Any]]:
    """Kind, tensors and metadata of `message`, except what `codec` adds (see FIELDS)."""
    kind = kind_of(message)
    tensors: Tensors = {}
    if isinstance(message, SecureSetup):
        s = message.setup
        tensors[OWN + "session"] = _bytes_tensor(s.session)
        meta: dict[str, Any] = {
            "client": s.client,
            "index": s.index,
            "neighbours": dict(s.neighbours),
            "threshold": s.threshold,
            "bits": s.bits,
            "clip_range": s.clip_range,
            "max_clients": s.max_clients,
            "length": s.length,
            "dp_clip": message.dp_clip,
        }
        return kind, tensors, meta
    if isinstance(message, SecureStage):
        meta = {name: getattr(message, name) for name in _ENVELOPE}
        body = message.body
        if isinstance(body, KeysBroadcast):
            tensors.update(_peer_tensors("c_public/", body.c_public))
            tensors.update(_peer_tensors("s_public/", body.s_public))
        elif isinstance(body, MaskRequest):
            tensors.update(_peer_tensors("sealed/", body.delivery.sealed))
            meta["total_weight"] = body.total_weight
        else:
            meta.update(survivors=list(body.survivors), dropped=list(body.dropped))
        return kind, tensors, meta
    meta = {"sender": message.sender, "nonce": message.nonce}
    reply = message.body
    if isinstance(reply, Declined):
        meta["reason"] = reply.reason
    elif isinstance(reply, ShareKeys):
        tensors.update(_peer_tensors("sealed/", reply.sealed))
    elif isinstance(reply, MaskedInput):
        masked = np.ascontiguousarray(reply.masked)
        if masked.ndim != 1 or masked.dtype not in _SIGNED:
            raise WireError(f"a masked input must be 1-D uint8/16/32/64, got {masked.dtype}")
        tensors[OWN + "masked"] = torch.from_numpy(masked.view(_SIGNED[masked.dtype]))
    elif isinstance(reply, UnmaskingShares):
        tensors.update(_peer_tensors("seed_share/", reply.seed_shares))
        tensors.update(_peer_tensors("key_share/", reply.key_shares))
    else:  # TrainedKeys; codec adds its records and residual
        tensors[OWN + "c_public"] = _bytes_tensor(reply.keys.c_public)
        tensors[OWN + "s_public"] = _bytes_tensor(reply.keys.s_public)
        meta.update(weight=reply.weight, names=list(reply.names))
    return kind, tensors, meta


# --- decoding -----------------------------------------------------------------------------------


def read_setup(fields: Mapping[str, Any], own: Tensors) -> ClientSetup:
    """The ClientSetup of a secagg_setup payload (its checked fields and `secagg/` tensors)."""
    _only("secagg_setup", own, {"session"})
    return ClientSetup(
        session=_bytes_of("secagg_setup", "session", own.get("session"), SESSION_BYTES),
        client=fields["client"],
        index=fields["index"],
        neighbours=fields["neighbours"],
        threshold=fields["threshold"],
        bits=fields["bits"],
        clip_range=fields["clip_range"],
        max_clients=fields["max_clients"],
        length=fields["length"],
    )


def read_keys(sender: str, own: Tensors) -> AdvertiseKeys:
    """The public keys of a secagg_trained payload."""
    kind = "secagg_trained"
    _only(kind, own, {"c_public", "s_public"})
    return AdvertiseKeys(
        sender=sender,
        c_public=_bytes_of(kind, "c_public", own.get("c_public"), KEY_BYTES),
        s_public=_bytes_of(kind, "s_public", own.get("s_public"), KEY_BYTES),
    )


def decode(
    kind: str, fields: Mapping[str, Any], groups: Mapping[str, Tensors]
) -> SecureStage | SecureReply:
    """A secure message other than the setup and the trained reply (`codec` builds those)."""

    def peers(prefix: str, size: int) -> dict[str, bytes]:
        return {
            peer: _bytes_of(kind, prefix + peer, tensor, size)
            for peer, tensor in sorted(groups.get(prefix, {}).items())
        }

    if kind in ("secagg_broadcast", "secagg_delivery", "secagg_unmask"):
        body: KeysBroadcast | MaskRequest | UnmaskRequest
        if kind == "secagg_broadcast":
            c_public, s_public = peers("c_public/", KEY_BYTES), peers("s_public/", KEY_BYTES)
            if set(c_public) != set(s_public):
                raise WireError(f"{kind} payload has c and s keys of different peers")
            body = KeysBroadcast(c_public=c_public, s_public=s_public)
        elif kind == "secagg_delivery":
            sealed = SharesDelivery(sealed=peers("sealed/", SEALED_BYTES))
            body = MaskRequest(sealed, fields["total_weight"])
        else:
            body = UnmaskRequest(survivors=fields["survivors"], dropped=fields["dropped"])
        envelope = {name: fields[name] for name in _ENVELOPE}
        return SecureStage(**envelope, body=body)
    sender, nonce = fields["sender"], fields["nonce"]
    reply: ShareKeys | MaskedInput | UnmaskingShares | Declined
    if kind == "secagg_shares":
        reply = ShareKeys(sender=sender, sealed=peers("sealed/", SEALED_BYTES))
    elif kind == "secagg_masked":
        own = groups.get(OWN, {})
        _only(kind, own, {"masked"})
        masked = own.get("masked")
        if masked is None or masked.dim() != 1 or masked.dtype not in _UNSIGNED:
            raise WireError(f"{kind} payload needs a 1-D uint8/int16/int32/int64 'masked' tensor")
        reply = MaskedInput(sender=sender, masked=masked.numpy().view(_UNSIGNED[masked.dtype]))
    elif kind == "secagg_unmasking":
        reply = UnmaskingShares(
            sender=sender,
            seed_shares=peers("seed_share/", SHARE_BYTES),
            key_shares=peers("key_share/", SHARE_BYTES),
        )
    else:
        reply = Declined(fields["reason"])
    return SecureReply(sender, nonce, reply)


SEALED_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16  # nonce, two shares, AES-GCM tag


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data), dtype=torch.uint8)


def _peer_tensors(prefix: str, values: Mapping[str, bytes]) -> Tensors:
    return {prefix + peer: _bytes_tensor(data) for peer, data in values.items()}


def _bytes_of(kind: str, name: str, tensor: torch.Tensor | None, size: int) -> bytes:
    if tensor is None:
        raise WireError(f"{kind} payload lacks tensor {name!r}")
    if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (size,):
        raise WireError(
            f"{kind} payload tensor {name!r} must be {size} bytes (1-D uint8), got "
            f"{tuple(tensor.shape)} {tensor.dtype}"
        )
    return tensor.numpy().tobytes()


def _only(kind: str, own: Tensors, names: set[str]) -> None:
    extra = sorted(set(own) - names)
    if extra:
        raise WireError(f"{kind} payload carries unexpected tensor {OWN + extra[0]!r}")


def _positive_int(where: str, value: Any) -> int:
    n = integer(where, value)
    if n < 1:
        raise WireError(f"{where} must be a positive integer, got {n}")
    return n


def _positive(where: str, value: Any) -> float:
    x = finite(where, value)
    if not x > 0:
        raise WireError(f"{where} must be positive, got {x}")
    return x


def _optional_positive(where: str, value: Any) -> float | None:
    return None if value is None else _positive(where, value)


def _bits(where: str, value: Any) -> int:
    n = integer(where, value)
    if not 2 <= n <= 62:
        raise WireError(f"{where} must be in [2, 62], got {n}")
    return n


def _names(where: str, value: Any) -> tuple[str, ...]:
    names = tuple(tensor_name(f"{where}[{i}]", v) for i, v in enumerate(array(where, value)))
    if len(set(names)) != len(names):
        raise WireError(f"{where} repeats a name")
    return names


def _neighbours(where: str, value: Any) -> dict[str, int]:
    return {
        node_path(f"{where} key", peer): _positive_int(f"{where}[{shown(repr(peer))}]", index)
        for peer, index in json_object(where, value).items()
    }


# One checker per field name, merged into `codec`'s (a name means the same in every kind).
CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "client": text,
    "index": _positive_int,
    "neighbours": _neighbours,
    "threshold": _positive_int,
    "bits": _bits,
    "clip_range": _positive,
    "max_clients": _positive_int,
    "length": _positive_int,
    "dp_clip": _optional_positive,
    "total_weight": _positive,
    "survivors": _names,
    "dropped": _names,
    "names": _names,
    "reason": text,
}
