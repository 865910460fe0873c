from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from worldlm import wire
from worldlm.core.messages import (
    EvalReport,
    EvalResult,
    EvalTask,
    Residual,
    RoutedResidual,
    State,
    TrainTask,
    Update,
)
from worldlm.errors import WireError
from worldlm.transport.codec import decode_message, encode_message


def _state(seed: int) -> State:
    gen = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(4, 3, generator=gen),
        "blocks.0.k.weight": torch.randn(3, 3, generator=gen).to(torch.bfloat16),
        "steps": torch.arange(3, dtype=torch.int64),
    }


def _residual(seed: int) -> Residual:
    gen = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.k.weight": (torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)),
        "blocks.1.k.weight": (torch.randn(3, 1, generator=gen), torch.randn(3, 1, generator=gen)),
    }


def _train_task() -> TrainTask:
    routed = (
        RoutedResidual("world/eu", 0.75, _residual(1)),
        RoutedResidual("world/asia", 0.25, _residual(2)),
    )
    return TrainTask("run-7", 3, 12, "world", "world/us", "n0nce", _state(0), routed)


def _eval_task() -> EvalTask:
    return EvalTask("run-7", 12, "world", "world/us", "abc123", _state(3))


def _update() -> Update:
    records = [
        {"round": 12, "node": "world/us/a", "kind": "train", "loss": 2.5, "tokens": 640},
        {"round": 12, "node": "world/us", "kind": "aggregate", "participants": ["a", "b"]},
    ]
    return Update("world/us", 3, "n0nce", _state(4), 1280.0, records, 2.5, _residual(5))


def _eval_report() -> EvalReport:
    results = {"world/us/a": EvalResult(3.25, 1000), "world/us/b": EvalResult(2.0, 24)}
    return EvalReport("world/us", "abc123", results)


def _same_state(got: State, want: State) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def _same_residual(got: Residual, want: Residual) -> None:
    assert list(got) == list(want)
    for name, (left, right) in want.items():
        _same_state({"U": got[name][0], "V": got[name][1]}, {"U": left, "V": right})


def _round_trip(message: Any, kind: str) -> Any:
    sent_kind, payload = encode_message(message)
    assert sent_kind == kind
    return decode_message(kind, payload)


def test_train_task_round_trip() -> None:
    task = _train_task()
    got = _round_trip(task, "train_task")
    assert isinstance(got, TrainTask)
    assert (got.run_id, got.round, got.global_round) == ("run-7", 3, 12)
    assert (got.sender, got.recipient, got.nonce) == ("world", "world/us", "n0nce")
    _same_state(got.state, task.state)
    assert got.state["blocks.0.k.weight"].dtype == torch.bfloat16
    assert [(r.source, r.weight) for r in got.routed] == [("world/eu", 0.75), ("world/asia", 0.25)]
    for got_routed, want_routed in zip(got.routed, task.routed, strict=True):
        _same_residual(got_routed.residual, want_routed.residual)


def test_eval_task_round_trip() -> None:
    task = _eval_task()
    got = _round_trip(task, "eval_task")
    assert isinstance(got, EvalTask)
    assert (got.run_id, got.global_round, got.sender, got.recipient, got.nonce) == (
        "run-7",
        12,
        "world",
        "world/us",
        "abc123",
    )
    _same_state(got.state, task.state)


def test_update_round_trip() -> None:
    update = _update()
    got = _round_trip(update, "update")
    assert isinstance(got, Update)
    assert (got.sender, got.round, got.nonce) == ("world/us", 3, "n0nce")
    assert got.weight == 1280.0 and got.scale == 2.5
    assert got.records == update.records
    _same_state(got.state, update.state)
    _same_residual(got.residual, update.residual)


def test_eval_report_round_trip() -> None:
    report = _eval_report()
    got = _round_trip(report, "eval_report")
    assert isinstance(got, EvalReport)
    assert (got.sender, got.nonce) == ("world/us", "abc123")
    assert got.results == report.results
    assert list(got.results) == list(report.results)


def test_a_diverged_eval_loss_still_travels() -> None:
    report = EvalReport("a", "n", {"a": EvalResult(math.inf, 3)})
    got = _round_trip(report, "eval_report")
    assert got.results["a"].loss == math.inf


def test_oversize_payload_is_refused_before_the_body_is_read() -> None:
    _, payload = encode_message(_update())
    _, start = wire.read_header(payload)
    # The body is cut off entirely: only the declared size can trigger this message.
    with pytest.raises(WireError, match="above the limit of 16"):
        decode_message("update", payload[:start], max_bytes=16)
    assert isinstance(decode_message("update", payload, max_bytes=len(payload)), Update)


def test_a_payload_of_another_kind_is_refused() -> None:
    _, payload = encode_message(_update())
    with pytest.raises(WireError, match="is of kind 'update', expected 'train_task'"):
        decode_message("train_task", payload)


def test_unknown_kind_is_refused() -> None:
    _, payload = encode_message(_eval_task())
    with pytest.raises(WireError, match="unknown message kind 'pickle'"):
        decode_message("pickle", payload)


def test_corrupted_body_is_refused() -> None:
    _, payload = encode_message(_eval_task())
    flipped = bytearray(payload)
    flipped[-1] ^= 0xFF
    with pytest.raises(WireError, match="digest"):
        decode_message("eval_task", flipped)


def _retamper(
    message: Any,
    meta_edit: Callable[[dict[str, Any]], None] | None = None,
    tensor_edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> bytes:
    """A payload re-encoded with wire.encode after editing its meta or tensors by hand."""
    _, payload = encode_message(message)
    tensors, meta = wire.decode(payload)
    if meta_edit is not None:
        meta_edit(meta)
    if tensor_edit is not None:
        tensor_edit(tensors)
    return wire.encode(tensors, meta)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda meta: meta.__setitem__(key, value)


def _routed_weight(meta: dict[str, Any]) -> None:
    meta["routed"][1]["weight"] = math.nan


def _tokens_bool(meta: dict[str, Any]) -> None:
    meta["results"][0]["tokens"] = True


def _duplicate_result(meta: dict[str, Any]) -> None:
    meta["results"][1]["name"] = meta["results"][0]["name"]


def _record_not_dict(meta: dict[str, Any]) -> None:
    meta["records"].append(5)


META_CASES = [
    ("weight as a string", _update, _set("weight", "3"), "update field weight must be a number"),
    ("missing nonce", _train_task, lambda m: m.pop("nonce"), "lacks field 'nonce'"),
    ("NaN weight", _update, _set("weight", math.nan), "update field weight must be finite"),
    ("inf scale", _update, _set("scale", math.inf), "update field scale must be finite"),
    ("NaN routed weight", _train_task, _routed_weight, r"routed\[1\].weight must be finite"),
    ("record not a dict", _update, _record_not_dict, r"records\[2\] must be an object"),
    ("bool round", _train_task, _set("round", True), "field round must be an integer"),
    ("bool tokens", _eval_report, _tokens_bool, r"results\[0\].tokens must be an integer"),
    ("float round", _eval_task, _set("global_round", 1.5), "global_round must be an integer"),
    ("int sender", _eval_report, _set("sender", 7), "field sender must be a string"),
    ("records not a list", _update, _set("records", {}), "field records must be an array"),
    ("unknown field", _eval_task, _set("pickle", "x"), "unknown field 'pickle'"),
    ("duplicate result", _eval_report, _duplicate_result, r"results\[1\].name repeats"),
    ("no kind", _eval_task, lambda m: m.pop("kind"), "names no message kind"),
]


@pytest.mark.parametrize(
    ("make", "edit", "match"), [c[1:] for c in META_CASES], ids=[c[0] for c in META_CASES]
)
def test_tampered_meta_is_refused_naming_the_field(
    make: Callable[[], Any], edit: Callable[[dict[str, Any]], None], match: str
) -> None:
    message = make()
    kind, _ = encode_message(message)
    with pytest.raises(WireError, match=match):
        decode_message(kind, _retamper(message, meta_edit=edit))


def _add(
    name: str, tensor: torch.Tensor | None = None
) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(
        name, torch.zeros(3, 2) if tensor is None else tensor
    )


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]

    return edit


def _drop_routed(index: int) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.startswith(f"routed/{index}/")]:
            del tensors[name]

    return edit


TENSOR_CASES = [
    ("unknown prefix", _update, _add("weights/emb"), "unexpected tensor 'weights/emb'"),
    ("routed in eval", _eval_task, _add("routed/0/w/U"), "unexpected tensor 'routed/0/w/U'"),
    ("empty state name", _eval_task, _add("state/"), "unexpected tensor 'state/'"),
    ("unpaired residual", _update, _drop("residual/blocks.1.k.weight/V"), "lack V"),
    ("not U or V", _update, _add("residual/w/W"), "not named <param>/U"),
    ("routed past end", _train_task, _add("routed/2/w/U"), r"routed\[2\], but field"),
    ("padded index", _train_task, _add("routed/01/w/U"), "no valid routed index"),
    ("routed without tensors", _train_task, _drop_routed(1), r"routed\[1\] has no factor"),
    (
        "rank mismatch",
        _update,
        _add("residual/blocks.1.k.weight/V", torch.zeros(3, 2)),
        "not \\(m, r\\) and \\(n, r\\)",
    ),
]


@pytest.mark.parametrize(
    ("make", "edit", "match"), [c[1:] for c in TENSOR_CASES], ids=[c[0] for c in TENSOR_CASES]
)
def test_unexpected_tensors_are_refused(
    make: Callable[[], Any], edit: Callable[[dict[str, torch.Tensor]], None], match: str
) -> None:
    message = make()
    kind, _ = encode_message(message)
    with pytest.raises(WireError, match=match):
        decode_message(kind, _retamper(message, tensor_edit=edit))


def test_a_record_that_is_not_json_is_refused_on_encode() -> None:
    update = _update()
    update.records[0]["labels"] = {"a", "b"}
    with pytest.raises(WireError, match=r"records\[0\]\['labels'\] holds a set"):
        encode_message(update)
    update.records[0]["labels"] = {1: "a"}
    with pytest.raises(WireError, match=r"records\[0\]\['labels'\] has key 1"):
        encode_message(update)


def test_a_non_finite_weight_is_refused_on_encode() -> None:
    update = _update()
    update.weight = math.nan
    with pytest.raises(WireError, match="weight must be finite"):
        encode_message(update)


def test_wire_header_stays_plain_json() -> None:
    # The meta is readable by any JSON parser: no pickled or custom-encoded objects.
    _, payload = encode_message(_train_task())
    header, _ = wire.read_header(payload)
    assert json.loads(json.dumps(header["meta"])) == header["meta"]
    assert header["meta"]["kind"] == "train_task"
