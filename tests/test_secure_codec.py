"""Secure aggregation's messages on the wire (issue 5, item 3): every kind round-trips with its
values intact, and a tampered field or tensor is refused with a message naming it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from worldlm import wire
from worldlm.config import SecAggConfig
from worldlm.core.messages import TrainTask
from worldlm.core.secure_messages import (
    Declined,
    MaskRequest,
    SecureReply,
    SecureSetup,
    SecureStage,
    TrainedKeys,
)
from worldlm.errors import WireError
from worldlm.secagg import SecAggClient, SecAggServer, plan_round
from worldlm.transport.codec import decode_message, encode_message

PEERS = ["world/a", "world/b", "world/c", "world/d"]


def _task() -> TrainTask:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    return TrainTask("run-7", 2, 5, "world", "world/a", "n0nce", state)


def _protocol(bits: int = 32) -> dict[str, Any]:
    """One real round among PEERS, up to unmasking: the messages every stage exchanges."""
    plan = plan_round(PEERS, SecAggConfig(bits=bits), length=8, graph_seed=1)
    server = SecAggServer(plan)
    clients = {c: SecAggClient(s) for c, s in server.setups().items()}
    adverts = {c: clients[c].advertise_keys() for c in PEERS}
    broadcasts = server.receive_keys(list(adverts.values()))
    shares = {c: clients[c].share_keys(broadcasts[c]) for c in PEERS}
    deliveries = server.receive_shares(list(shares.values()))
    values = np.linspace(-1, 1, 8)
    masked = {c: clients[c].masked_input(deliveries[c], values) for c in PEERS}
    requests = server.receive_masked([masked[c] for c in PEERS[:3]])  # world/d dropped
    unmasking = clients["world/a"].unmask(requests["world/a"])
    return {
        "setup": server.setups()["world/a"],
        "advert": adverts["world/a"],
        "broadcast": broadcasts["world/a"],
        "shares": shares["world/a"],
        "delivery": deliveries["world/a"],
        "masked": masked["world/a"],
        "request": requests["world/a"],
        "unmasking": unmasking,
    }


def _stage(body: Any) -> SecureStage:
    return SecureStage("run-7", 2, 5, "world", "world/a", "n0nce", body)


def _reply(body: Any) -> SecureReply:
    return SecureReply("world/a", "n0nce", body)


def _messages(bits: int = 32) -> dict[str, Any]:
    p = _protocol(bits)
    residual = {"w": (torch.ones(2, 1), torch.ones(3, 1))}
    records = [{"round": 5, "node": "world/a", "kind": "train", "loss": 2.5}]
    return {
        "secagg_setup": SecureSetup(_task(), p["setup"], 0.5),
        "secagg_trained": _reply(TrainedKeys(p["advert"], 640.0, ("w",), records, residual)),
        "secagg_broadcast": _stage(p["broadcast"]),
        "secagg_shares": _reply(p["shares"]),
        "secagg_delivery": _stage(MaskRequest(p["delivery"], 1920.0)),
        "secagg_masked": _reply(p["masked"]),
        "secagg_unmask": _stage(p["request"]),
        "secagg_unmasking": _reply(p["unmasking"]),
        "secagg_declined": _reply(Declined("restarted")),
    }


def _same(got: Any, want: Any) -> None:
    """Equal field by field: tensors and arrays by value and dtype, the rest by ==."""
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want)
        for key in want:
            _same(got[key], want[key])
    elif isinstance(want, tuple) and not hasattr(want, "__dataclass_fields__"):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _same(a, b)
    elif hasattr(want, "__dataclass_fields__"):
        assert type(got) is type(want)
        for name in want.__dataclass_fields__:
            _same(getattr(got, name), getattr(want, name))
    else:
        assert got == want


@pytest.mark.parametrize("bits", [8, 16, 32, 62])
def test_every_secure_kind_round_trips(bits: int) -> None:
    for kind, message in _messages(bits).items():
        sent_kind, payload = encode_message(message)
        assert sent_kind == kind
        _same(decode_message(kind, payload), message)


def _retamper(
    message: Any, edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]
) -> bytes:
    _, payload = encode_message(message)
    tensors, meta = wire.decode(payload)
    edit(tensors, meta)
    return wire.encode(tensors, meta)


def _meta(key: str, value: Any) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], None]:
    return lambda tensors, meta: meta.__setitem__(key, value)


def _tensor(name: str, value: torch.Tensor | None) -> Callable[..., None]:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value

    return edit


def _first(prefix: str) -> Callable[..., None]:
    """Cut the first tensor under `prefix` short by one byte."""

    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        name = next(n for n in sorted(tensors) if n.startswith(prefix))
        tensors[name] = tensors[name][:-1].clone()

    return edit


CASES = [
    ("bits past 62", "secagg_setup", _meta("bits", 63), r"field bits must be in \[2, 62\]"),
    ("NaN clip range", "secagg_setup", _meta("clip_range", float("nan")), "must be finite"),
    ("zero dp clip", "secagg_setup", _meta("dp_clip", 0.0), "dp_clip must be positive"),
    ("index 0", "secagg_setup", _meta("index", 0), "index must be a positive integer"),
    ("neighbour index", "secagg_setup", _meta("neighbours", {"x": "1"}), r"neighbours\['x'\]"),
    ("short session", "secagg_setup", _first("secagg/session"), "'session' must be 16 bytes"),
    ("no session", "secagg_setup", _tensor("secagg/session", None), "lacks tensor 'session'"),
    ("short key", "secagg_trained", _first("secagg/c_public"), "'c_public' must be 32 bytes"),
    ("names twice", "secagg_trained", _meta("names", ["w", "w"]), "names repeats a name"),
    ("extra own", "secagg_trained", _tensor("secagg/x", torch.zeros(1)), "unexpected tensor"),
    ("unpaired key", "secagg_broadcast", _tensor("s_public/world/b", None), "different peers"),
    ("short sealed", "secagg_shares", _first("sealed/"), "must be 160 bytes"),
    ("zero total", "secagg_delivery", _meta("total_weight", 0), "total_weight must be positive"),
    ("survivor twice", "secagg_unmask", _meta("survivors", ["a", "a"]), "repeats a name"),
    ("short share", "secagg_unmasking", _first("seed_share/"), "must be 66 bytes"),
    (
        "float masked",
        "secagg_masked",
        _tensor("secagg/masked", torch.zeros(8)),
        "1-D uint8/int16/int32/int64 'masked'",
    ),
    ("no reason", "secagg_declined", lambda t, m: m.pop("reason"), "lacks field 'reason'"),
    ("kept nonce", "secagg_shares", lambda t, m: m.pop("nonce"), "lacks field 'nonce'"),
]


@pytest.mark.parametrize(
    ("kind", "edit", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_tampered_secure_messages_are_refused_naming_the_field(
    kind: str, edit: Callable[..., None], match: str
) -> None:
    message = _messages()[kind]
    with pytest.raises(WireError, match=match):
        decode_message(kind, _retamper(message, edit))
