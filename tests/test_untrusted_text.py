"""Strings a child controls cannot crash the refusal of its message (issue 19, item 2): names
are checked when a message is decoded, and whatever is quoted in a reason, a metrics row or the
audit log is escaped and clipped."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from worldlm import errors, wire
from worldlm.audit import AuditError
from worldlm.audit.cli import AUDIT_FILE
from worldlm.audit.log import verify
from worldlm.core.messages import EvalReport, EvalResult, TrainTask, Update
from worldlm.core.transport import Dropout
from worldlm.errors import UpdateRejected, WireError, shown
from worldlm.progress import QuietProgress
from worldlm.session import open_session
from worldlm.transport import fields
from worldlm.transport.codec import decode_message, encode_message

from .conftest import TWO_LEVEL, tiny_config

LONG = "x" * 5000


def test_shown_escapes_and_clips() -> None:
    assert shown("world/med/a") == "world/med/a"
    assert shown("a\nb\x00") == "a\\nb\\x00"
    clipped = shown(LONG)
    assert len(clipped) < 250 and clipped.endswith("(5000 characters)")
    assert len(UpdateRejected(LONG, LONG).reason) < 1000
    assert len(Dropout(LONG, LONG).path) < 250


class LongNamedLeaf:
    """Answers like `leaf`, under a 5,000-character sender name."""

    def __init__(self, leaf: object) -> None:
        self.leaf = leaf
        self.path = leaf.path  # type: ignore[attr-defined]

    def info(self):  # type: ignore[no-untyped-def]
        return self.leaf.info()  # type: ignore[attr-defined]

    def handle_train(self, task: TrainTask) -> Update:
        return replace(self.leaf.handle_train(task), sender=LONG)  # type: ignore[attr-defined]

    def handle_eval(self, task):  # type: ignore[no-untyped-def]
        return self.leaf.handle_eval(task)  # type: ignore[attr-defined]


def _round_with_a_long_sender(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = tiny_config(tmp_path, TWO_LEVEL, ["train.local_steps=1"])
    session = open_session(config, QuietProgress(), tmp_path / "run")
    session.fed.transport.register(LongNamedLeaf(session.fed.leaves["world/med/a"]))
    outcome = session.fed.root.run_round(session.fed.root.state, 1)
    return session, outcome


def test_a_5000_character_sender_is_refused_and_the_round_goes_on(tmp_path: Path) -> None:
    session, outcome = _round_with_a_long_sender(tmp_path)
    rejected = [r for r in outcome.records if r["kind"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["reason"] == "not selected this round"
    assert rejected[0]["sender"].endswith("(5000 characters)")
    med = next(r for r in outcome.records if r["kind"] == "aggregate" and r["node"] == "world/med")
    assert med["participants"] == ["world/med/b"]  # the round went on without it
    assert all(torch.isfinite(v).all() for v in outcome.state.values())
    assert session.audit is not None
    session.audit.close()
    assert verify(session.run_dir / AUDIT_FILE).ok


def test_without_clipping_the_same_reply_crashes_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(errors, "shown", lambda text, limit=0: str(text))
    with pytest.raises(AuditError, match="4096"):
        _round_with_a_long_sender(tmp_path)


def _payload(meta_change: dict[str, object] | None = None, tensor: str = "w") -> bytes:
    """A valid update payload, then edited as a hostile child would (the encoder refuses to
    write such a message itself)."""
    _, payload = encode_message(Update("world/a", 1, "n", {"w": torch.zeros(2)}, 1.0))
    tensors, meta = wire.decode(payload)
    tensors = {k.replace("/w", "/" + tensor): v for k, v in tensors.items()}
    return wire.encode(tensors, {**meta, **(meta_change or {})})


def _report_payload(leaf: str) -> bytes:
    _, payload = encode_message(EvalReport("world/a", "n", {"world/a": EvalResult(1.0, 3)}))
    tensors, meta = wire.decode(payload)
    meta["results"][0]["name"] = leaf
    return wire.encode(tensors, meta)


@pytest.mark.parametrize(
    ("kind", "payload", "named"),
    [
        ("update", _payload({"sender": LONG}), "update field sender is 5000 characters long"),
        ("update", _payload({"sender": "w/../a b"}), "update field sender is not a node path"),
        ("update", _payload(tensor="n" * 600), "payload tensor name"),
        ("update", _payload(tensor="a b"), "payload tensor name"),
        ("eval_report", _report_payload(LONG), r"results\[0\]\.name is 5000 characters long"),
    ],
    ids=["long-sender", "sender-charset", "long-tensor-name", "tensor-name-space", "eval-name"],
)
def test_hostile_names_are_refused_at_decode_in_a_short_message(
    kind: str, payload: bytes, named: str
) -> None:
    with pytest.raises(WireError, match=named) as refused:
        decode_message(kind, payload)
    assert len(str(refused.value)) < 600


def test_without_the_checks_the_long_names_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fields, "MAX_TEXT", 10**9)
    monkeypatch.setattr(fields, "MAX_NODE_PATH", 10**9)
    monkeypatch.setattr(wire, "is_tensor_name", lambda name: True)
    decoded = decode_message("update", _payload({"sender": LONG}, tensor="n" * 600))
    assert isinstance(decoded, Update) and decoded.sender == LONG
    assert decoded.state.keys() == {"n" * 600}


def test_a_config_cannot_name_a_node_no_message_could_carry(tmp_path: Path) -> None:
    from worldlm.config_load import validate_config
    from worldlm.errors import ConfigError

    from .conftest import tiny_config_dict

    data = tiny_config_dict(tmp_path, {"world/a": "med"})
    data["nodes"]["world/" + "b" * 300] = data["nodes"]["world/a"]
    with pytest.raises(ConfigError, match="at most 256 characters"):
        validate_config(data)
