"""What a signed statement binds of a task (`security.downlink`), as pure functions of the task:
its identity (run, rounds, recipient, nonce, kind) and digests of what it carries (the weights
as the recipient decodes them, the residuals routed to it)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worldlm.core.messages import EvalTask, RoutedResidual, TrainTask

State = Mapping[str, torch.Tensor]

# The kinds of task a statement is about. Binding the kind keeps a statement of one from being
# passed off as another (an evaluation's model as a round's, the global model as the deployed).
TRAIN, EVAL_DEPLOYED, EVAL_GLOBAL = "train", "eval:deployed", "eval:global"


@dataclass(frozen=True)
class TaskFacts:
    """What a statement binds of one task. An evaluation has no parent round: `round` is 0."""

    run_id: str
    global_round: int
    round: int
    recipient: str
    nonce: str
    task: str = TRAIN


def task_facts(task: TrainTask | EvalTask) -> TaskFacts:
    if isinstance(task, TrainTask):
        return TaskFacts(task.run_id, task.global_round, task.round, task.recipient, task.nonce)
    kind = EVAL_DEPLOYED if task.deployed else EVAL_GLOBAL
    return TaskFacts(task.run_id, task.global_round, 0, task.recipient, task.nonce, kind)


def tensor_digests(state: State) -> dict[str, str]:
    """SHA-256 hex per tensor, over its dtype, shape and bytes."""
    out: dict[str, str] = {}
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h = hashlib.sha256(f"{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        out[name] = h.hexdigest()
    return out


def routed_digests(routed: Sequence[RoutedResidual]) -> list[dict[str, Any]]:
    """Per routed residual, in order: its source, its routing weight and a digest per factor.
    The weight is a float that JSON writes and reads back exactly (`repr`)."""
    return [
        {
            "source": r.source,
            "weight": r.weight,
            "factors": tensor_digests(
                {
                    f"{name}/{part}": t
                    for name, pair in r.residual.items()
                    for part, t in zip("UV", pair, strict=True)
                }
            ),
        }
        for r in routed
    ]
