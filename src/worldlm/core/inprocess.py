"""The reference transport: every node lives in this process and answers when called.

Children run one after another, lazily as the parent iterates, so only one update exists at a
time; this is what keeps an in-process aggregator's memory independent of its child count.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from worldlm.core.messages import EvalReport, EvalTask, TrainTask, Update
from worldlm.core.secure_messages import SecureMessage, SecureReply
from worldlm.core.transport import ChildInfo, Dropout, NodeHandler
from worldlm.errors import TransportError


class InProcessTransport:
    def __init__(self, children: Mapping[str, Sequence[str]]) -> None:
        self._children = {parent: sorted(kids) for parent, kids in children.items()}
        self._handlers: dict[str, NodeHandler] = {}

    def register(self, handler: NodeHandler) -> None:
        self._handlers[handler.path] = handler

    def handler(self, path: str) -> NodeHandler:
        try:
            return self._handlers[path]
        except KeyError:
            raise TransportError(f"no node is registered at {path!r}") from None

    def children(self, parent: str) -> list[ChildInfo]:
        return [self.handler(path).info() for path in self._children.get(parent, [])]

    def train(self, tasks: Sequence[TrainTask]) -> Iterator[Update]:
        for task in tasks:
            yield self.handler(task.recipient).handle_train(task)

    def evaluate(self, tasks: Sequence[EvalTask]) -> Iterator[EvalReport]:
        for task in tasks:
            yield self.handler(task.recipient).handle_eval(task)

    def exchange(self, messages: Sequence[SecureMessage]) -> Iterator[SecureReply]:
        for message in messages:
            yield self.handler(message.recipient).handle_secure(message)

    def dropouts(self) -> list[Dropout]:
        return []  # a child in this process either answers or raises
