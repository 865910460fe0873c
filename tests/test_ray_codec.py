"""The Ray backend's message codec (`transport.ray_codec`), without Ray: states cross as byte
arrays bit for bit in every dtype, into writable memory of their own, and an error raised for
one message of a batch is that message's answer, not the batch's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from worldlm.core.messages import TrainTask, Update
from worldlm.errors import UpdateRejected
from worldlm.transport.ray_codec import (
    PackedReply,
    Raised,
    answer_batch,
    pack_state,
    unpack_reply,
    unpack_state,
)


def test_a_state_crosses_bit_for_bit_in_every_dtype() -> None:
    state = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(-3, 4),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(-0.0),
        "nan": torch.tensor([float("nan"), float("inf")]),
        "strided": torch.arange(20.0).reshape(4, 5)[:, 1::2],
        "empty": torch.zeros(0, 3),
    }
    back = unpack_state(pack_state(state))
    assert back.keys() == state.keys()
    for key, value in state.items():
        got = back[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        # bytes, not values: -0.0 and NaN payloads survive
        assert got.contiguous().view(-1).view(torch.uint8).tolist() == (
            value.contiguous().view(-1).view(torch.uint8).tolist()
        ), key


def test_an_unpacked_state_is_writable_and_owns_its_memory() -> None:
    packed = pack_state({"w": torch.zeros(4)})
    raw = packed["w"][0]
    raw.setflags(write=False)  # as Ray maps it from its store
    back = unpack_state(packed)
    back["w"].add_(1.0)
    assert raw.tolist() == [0] * 16  # the store's bytes are untouched


def _task(recipient: str) -> TrainTask:
    return TrainTask("run", 1, 1, "root", recipient, f"n-{recipient}", {})


def test_a_batch_answers_each_message_with_its_model_and_error() -> None:
    models = [pack_state({"w": torch.full((2,), 1.0)}), pack_state({"w": torch.full((2,), 2.0)})]
    seen: list[dict[str, torch.Tensor]] = []

    def handle(method: str, task: Any) -> Update:
        assert method == "handle_train"
        seen.append(task.state)
        if task.recipient == "root/bad":
            raise UpdateRejected(task.recipient, "refused for the test")
        return Update(task.recipient, task.round, task.nonce, {"w": task.state["w"] * 10}, 1.0)

    calls = [
        (_task("root/a"), 0),
        (_task("root/bad"), 0),
        (_task("root/b"), 1),
        (_task("root/c"), 0),
    ]
    answers = answer_batch(handle, "handle_train", calls, models)
    assert isinstance(answers[0], PackedReply) and isinstance(answers[1], Raised)
    first = unpack_reply(answers[0])
    assert first.sender == "root/a" and first.state["w"].tolist() == [10.0, 10.0]
    with pytest.raises(UpdateRejected, match="refused for the test"):
        unpack_reply(answers[1])
    assert unpack_reply(answers[2]).state["w"].tolist() == [20.0, 20.0]
    assert unpack_reply(answers[3]).state["w"].tolist() == [10.0, 10.0]
    # The messages naming one model share one copy of it, unpacked once (as in-process
    # messages share their parent's model), in memory of the worker's own.
    assert seen[0] is seen[1] is seen[3] and seen[2] is not seen[0]
    assert seen[0]["w"].tolist() == [1.0, 1.0] and seen[2]["w"].tolist() == [2.0, 2.0]
    assert seen[0]["w"].numpy().flags.writeable


def test_a_refusal_raised_in_a_worker_crosses_to_the_driver_whole() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(Raised(UpdateRejected("root/a", "a reason")))).error
    assert isinstance(error, UpdateRejected)
    assert (error.sender, error.reason) == ("root/a", "a reason")
