"""FedAvg against a float64 reference, folded one update at a time through a live aggregator."""

from __future__ import annotations

import torch

from worldlm.config import AggregatorConfig
from worldlm.core.inprocess import InProcessTransport
from worldlm.core.messages import EvalReport, EvalTask, State, TrainTask, Update
from worldlm.core.transport import ChildInfo
from worldlm.federation.aggregator import Aggregator
from worldlm.federation.context import RunContext
from worldlm.strategies.catalog import build_strategy
from worldlm.strategies.fedavg import WeightedSum, fedavg


class FixedChild:
    """A child that answers each round with a fixed state and weight (the data under test)."""

    def __init__(self, path: str, states: list[State], weights: list[float]) -> None:
        self.path, self.states, self.weights = path, states, weights

    def info(self) -> ChildInfo:
        return ChildInfo(self.path, 100)

    def handle_train(self, task: TrainTask) -> Update:
        r = task.round
        return Update(self.path, r, task.nonce, self.states[r], self.weights[r])

    def handle_eval(self, task: EvalTask) -> EvalReport:
        raise AssertionError("not used")


def _fedavg_root(transport: InProcessTransport) -> Aggregator:
    """A float64 sum (not the default): its result is the float64 reference's, rounded once."""
    return Aggregator(
        "root",
        AggregatorConfig.model_validate({"sum_dtype": "float64"}),
        transport=transport,
        strategy=build_strategy("fedavg", sum_dtype="float64"),
        ctx=RunContext("r", 0, torch.device("cpu")),
    )


def _states(seed: int, rounds: int) -> list[State]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(7, 5, generator=gen), "b": torch.randn(5, generator=gen) * 1e3}
        for _ in range(rounds)
    ]


def test_fedavg_golden_five_updates_three_rounds() -> None:
    rounds, n = 3, 5
    children = [f"root/c{i}" for i in range(n)]
    states = {c: _states(i, rounds) for i, c in enumerate(children)}
    weights = {
        c: [float(17 * (i + 1) + 3 * r) for r in range(rounds)] for i, c in enumerate(children)
    }
    transport = InProcessTransport({"root": children})
    for c in children:
        transport.register(FixedChild(c, states[c], weights[c]))
    root = _fedavg_root(transport)
    current: State = {"w": torch.zeros(7, 5), "b": torch.zeros(5)}
    for r in range(rounds):
        outcome = root.run_round(current, r)
        for key in current:
            num = sum(weights[c][r] * states[c][r][key].double() for c in children)
            expected = num / sum(weights[c][r] for c in children)
            mean = outcome.exact[key] / outcome.scale
            torch.testing.assert_close(mean, expected, rtol=1e-15, atol=1e-12)
            assert outcome.state[key].dtype == torch.float32
            assert torch.equal(outcome.state[key], expected.float())
        assert outcome.weight == sum(weights[c][r] for c in children)
        current = outcome.state


def test_streaming_sum_matches_the_reference_in_any_order() -> None:
    states = [s[0] for s in (_states(i, 1) for i in range(6))]
    weights = [1.0, 2.5, 100.0, 3.0, 0.25, 7.0]
    expected = fedavg(states, weights)
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4]):
        acc = WeightedSum()
        for i in order:
            acc.add(states[i], weights[i])
        for key, value in acc.mean().items():
            assert torch.equal(value.float(), expected[key].float())


def test_rejected_replies_are_recorded_and_skipped() -> None:
    children = ["root/a", "root/b"]
    transport = InProcessTransport({"root": children})
    good = FixedChild("root/a", [{"w": torch.ones(3)}], [1.0])
    bad_shape = FixedChild("root/b", [{"w": torch.ones(4)}], [1.0])
    transport.register(good)
    transport.register(bad_shape)
    root = _fedavg_root(transport)
    outcome = root.run_round({"w": torch.zeros(3)}, 0)
    assert torch.equal(outcome.state["w"], torch.ones(3))
    rejected = [r for r in outcome.records if r["kind"] == "rejected"]
    assert rejected == [
        {
            "round": 0,
            "node": "root",
            "kind": "rejected",
            "sender": "root/b",
            "reason": "w: shape (4,), expected (3,)",
        }
    ]


def test_a_float32_sum_agrees_with_float64_to_float32_rounding() -> None:
    states = [s[0] for s in (_states(i, 1) for i in range(6))]
    weights = [1.0, 2.5, 100.0, 3.0, 0.25, 7.0]
    expected = fedavg(states, weights)
    acc = WeightedSum(torch.float32)
    for state, weight in zip(states, weights, strict=True):
        acc.add(state, weight)
    for key, value in acc.mean().items():
        assert value.dtype == torch.float32  # the accumulator is one float32 copy
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-4)


def test_replies_of_another_dtype_are_converted_exactly() -> None:
    """A float64 sum fed float32 replies converts them through a reused buffer: the result
    equals converting each reply on its own, including tensors of different sizes."""
    states = [s[0] for s in (_states(i, 1) for i in range(4))]
    weights = [3.0, 1.0, 2.0, 5.0]
    acc = WeightedSum()
    for state, weight in zip(states, weights, strict=True):
        acc.add(state, weight)
    for key in states[0]:
        reference = states[0][key].double() * weights[0]
        for state, weight in zip(states[1:], weights[1:], strict=True):
            reference.add_(state[key].double(), alpha=weight)
        assert torch.equal(acc.sums[key], reference)


def test_an_aggregator_with_a_float32_sum_returns_float32_sums() -> None:
    children = [f"root/c{i}" for i in range(3)]
    states = {c: _states(i, 1) for i, c in enumerate(children)}
    transport = InProcessTransport({"root": children})
    for i, c in enumerate(children):
        transport.register(FixedChild(c, states[c], [float(i + 1)]))
    root = Aggregator(
        "root",
        AggregatorConfig.model_validate({"sum_dtype": "float32"}),
        transport=transport,
        strategy=build_strategy("fedavg", sum_dtype="float32"),
        ctx=RunContext("r", 0, torch.device("cpu")),
    )
    outcome = root.run_round({"w": torch.zeros(7, 5), "b": torch.zeros(5)}, 0)
    weights = [1.0, 2.0, 3.0]
    expected = fedavg([states[c][0] for c in children], weights)
    for key, value in outcome.exact.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(outcome.state[key].double(), expected[key], rtol=1e-6, atol=1e-4)


def test_a_float32_sum_equals_the_plain_add_loop_bit_for_bit() -> None:
    """The default sum folds a reply's tensors in one foreach call: the same bits as adding
    each tensor on its own, in the same order."""
    states = [s[0] for s in (_states(i, 1) for i in range(5))]
    weights = [3.0, 1.5, 2.0, 5.0, 0.25]
    acc = WeightedSum(torch.float32)
    for state, weight in zip(states, weights, strict=True):
        acc.add(state, weight)
    for key in states[0]:
        plain = states[0][key] * weights[0]
        for state, weight in zip(states[1:], weights[1:], strict=True):
            plain.add_(state[key], alpha=weight)
        assert torch.equal(acc.sums[key], plain), key
