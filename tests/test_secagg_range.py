"""Secure aggregation refuses a sum that honest inputs cannot make (issue 19, item 7): one
child that ignores the fixed-point encoding and adds raw integers to its masked input moves the
unmasked sum by thousands per coordinate on a 62-bit ring (an honest one by 2 at most); with
the range check the round is aborted with its reason and the model is left as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worldlm.federation import secure_child
from worldlm.progress import QuietProgress
from worldlm.secagg import MaskedInput, Quantizer, SecAggAborted, SecAggClient
from worldlm.session import open_session

from .conftest import tiny_config

TRIO = {f"world/t{i}": topic for i, topic in enumerate(["med", "law", "code"])}
SECURE = [
    "train.local_steps=1",
    "nodes.world.secure_aggregation.enabled=true",
    "nodes.world.secure_aggregation.bits=62",
    "nodes.world.sum_dtype=float64",
]
ATTACKER = "world/t0"
SHIFT = 1 << 50  # raw integer units added to every coordinate


def _shifting(original):  # type: ignore[no-untyped-def]
    def masked_input(self: SecAggClient, delivery, values):  # type: ignore[no-untyped-def]
        honest: MaskedInput = original(self, delivery, values)
        if self.id != ATTACKER:
            return honest
        raw = honest.masked.astype(np.uint64) + np.uint64(SHIFT)
        ring = (raw & np.uint64((1 << self.setup.bits) - 1)).astype(honest.masked.dtype)
        return MaskedInput(sender=honest.sender, masked=ring)

    return masked_input


def _round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[float, str, str]:
    """(largest change of the root's model, aggregate status, reason) after one round."""
    monkeypatch.setattr(SecAggClient, "masked_input", _shifting(SecAggClient.masked_input))
    config = tiny_config(tmp_path, TRIO, SECURE, n_docs=30)
    root = open_session(config, QuietProgress(), tmp_path / "run").fed.root
    before = {k: v.clone() for k, v in root.state.items()}
    outcome = root.run_round(root.state, 1)
    row = next(r for r in outcome.records if r["kind"] == "aggregate" and r["node"] == "world")
    moved = max(float((outcome.state[k] - v).abs().max()) for k, v in before.items())
    return moved, row["status"], str(row.get("reason", ""))


def test_an_input_that_ignores_the_encoding_aborts_the_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moved, status, reason = _round(tmp_path, monkeypatch)
    assert status == "secagg_aborted" and "an input ignored the encoding" in reason
    assert moved == 0.0


def test_without_the_range_check_the_sum_moves_by_thousands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Quantizer, "check_sum", lambda self, total, n: None)
    monkeypatch.setattr(secure_child, "check_counters", lambda *args, **kwargs: None)
    moved, status, _ = _round(tmp_path, monkeypatch)
    assert status == "ok" and moved > 1000  # an honest child moves it by at most 2c = 2


def test_decode_refuses_sums_above_what_n_inputs_reach() -> None:
    q = Quantizer(bits=32, clip_range=1.0, max_clients=4)
    honest = sum(q.encode(np.array([1.0, -1.0, 0.3])) for _ in range(3))
    assert np.allclose(q.decode_sum(honest, 3), [3.0, -3.0, 0.9], atol=q.max_error(3))
    with pytest.raises(SecAggAborted, match="out of range at 1 coordinates"):
        q.decode_sum(honest + np.array([3 * q.max_int, 0, 0], dtype=np.uint64), 3)
