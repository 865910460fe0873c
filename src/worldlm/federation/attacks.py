"""Byzantine leaves for tests and benchmarks: an honest in-process leaf whose replies are
altered on the way out, so the engine itself stays untouched.

`install_attack(fed, paths, attack)` registers a `ByzantineLeaf` in place of each named leaf on
the in-process transport; the real leaf still trains (and is still what checkpoints save), the
aggregator just receives the altered reply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from worldlm.core.messages import EvalReport, EvalTask, State, TrainTask, Update
from worldlm.core.secure_messages import SecureMessage, SecureReply
from worldlm.core.transport import ChildInfo, NodeHandler
from worldlm.federation.build import Federation
from worldlm.federation.secure_child import SecureChild

# (model the leaf was sent, its honest model) -> the model it replies with
Attack = Callable[[State, State], State]


def extrapolate(current: State, honest: State, factor: float) -> State:
    """`current + factor * (honest - current)` per tensor, in float64, cast back to the
    honest tensors' dtypes."""
    return {
        key: (current[key].double() + factor * (value.double() - current[key].double())).to(
            value.dtype
        )
        for key, value in honest.items()
    }


def sign_flip(k: float = 1.0) -> Attack:
    """Reply `current - k * (honest - current)`: the honest change reversed and scaled by k."""
    return lambda current, honest: extrapolate(current, honest, -k)


def model_replacement(s: float = 100.0) -> Attack:
    """Reply `current + s * (honest - current)`: the change scaled up so that it survives
    averaging with n - 1 others (Bagdasaryan et al. 2020, "How to backdoor federated
    learning"; here with the honest model standing in for the backdoored one)."""
    return lambda current, honest: extrapolate(current, honest, s)


class ByzantineLeaf:
    """Answers like `leaf`, but replies with `attack(sent model, honest model)`."""

    def __init__(self, leaf: NodeHandler, attack: Attack) -> None:
        self.leaf = leaf
        self.attack = attack
        self.path = leaf.path
        self.secure_child = SecureChild(self)  # masks the altered reply, not the honest one

    def info(self) -> ChildInfo:
        return self.leaf.info()

    def handle_train(self, task: TrainTask) -> Update:
        honest = self.leaf.handle_train(task)
        assert honest.scale == 1.0, "a leaf replies with its model itself"
        return replace(honest, state=self.attack(task.state, honest.state))

    def handle_secure(self, message: SecureMessage) -> SecureReply:
        return self.secure_child.handle(message)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        return self.leaf.handle_eval(task)


def install_attack(fed: Federation, paths: Iterable[str], attack: Attack) -> None:
    """Make the leaves at `paths` Byzantine: their replies pass through `attack`."""
    for path in paths:
        fed.transport.register(ByzantineLeaf(fed.leaves[path], attack))
