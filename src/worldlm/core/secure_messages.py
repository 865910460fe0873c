"""The messages of a secure aggregation round between an aggregator and its children.

A secure round replaces the one TrainTask/Update exchange of a plain round with the four stages
of `secagg` (Bonawitz et al. 2017): the first request is the TrainTask itself plus the
child's ClientSetup, so a child trains and then advertises its keys; the next three carry the
library's messages. Every reply names its sender and the nonce of the round's TrainTask, which
is how a parent tells this round's answers from stale ones and a child tells which secure round
a request belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worldlm.core.messages import Record, Residual, TrainTask
from worldlm.secagg.messages import (
    AdvertiseKeys,
    ClientSetup,
    KeysBroadcast,
    MaskedInput,
    ShareKeys,
    SharesDelivery,
    Stage,
    UnmaskingShares,
    UnmaskRequest,
)

__all__ = [
    "Declined",
    "MaskRequest",
    "SecureMessage",
    "SecureReply",
    "SecureSetup",
    "SecureStage",
    "TrainedKeys",
    "answer_type",
    "answers",
]


@dataclass(frozen=True)
class SecureSetup:
    """AdvertiseKeys request: train on `task`, then join the secure round `setup` describes.

    `dp_clip` is the parent's DP clip bound C when its DP policy is on: the child clips its
    change to L2 norm C and masks it with weight 1 (DP-FedAvg's uniform weights)."""

    task: TrainTask
    setup: ClientSetup
    dp_clip: float | None = None

    @property
    def run_id(self) -> str:
        return self.task.run_id

    @property
    def recipient(self) -> str:
        return self.task.recipient

    @property
    def nonce(self) -> str:
        return self.task.nonce

    @property
    def global_round(self) -> int:
        return self.task.global_round

    @property
    def stage(self) -> Stage:
        return Stage.ADVERTISE_KEYS


@dataclass(frozen=True)
class MaskRequest:
    """MaskedInputCollection request: the shares addressed to the child, and the total weight
    of the children still in the round, so the child masks `weight / total_weight * change`
    (a share at most 1 of its change: the weighting can never push a value out of range)."""

    delivery: SharesDelivery
    total_weight: float


@dataclass(frozen=True)
class SecureStage:
    """A later request of the secure round that the TrainTask with `nonce` started."""

    run_id: str
    round: int
    global_round: int
    sender: str
    recipient: str
    nonce: str
    body: KeysBroadcast | MaskRequest | UnmaskRequest

    @property
    def stage(self) -> Stage:
        if isinstance(self.body, KeysBroadcast):
            return Stage.SHARE_KEYS
        return Stage.MASKED_INPUT if isinstance(self.body, MaskRequest) else Stage.UNMASKING


@dataclass(frozen=True)
class TrainedKeys:
    """The child's answer to SecureSetup: its public keys, and what travels in clear beside the
    masked vector: its FedAvg weight (tokens), which parameters it changed (the structure a plain
    update shows too), its metrics rows, and (WorldLM) its residual."""

    keys: AdvertiseKeys
    weight: float
    names: tuple[str, ...]  # parameters its change covers (the rest it keeps to itself)
    records: list[Record] = field(default_factory=list)
    residual: Residual = field(default_factory=dict)


@dataclass(frozen=True)
class Declined:
    """The child cannot answer this request (it restarted and lost the round's secrets, or the
    protocol refused the request): the parent counts it as dropped at this stage."""

    reason: str


@dataclass(frozen=True)
class SecureReply:
    """A child's answer to one stage of a secure round."""

    sender: str
    nonce: str
    body: TrainedKeys | ShareKeys | MaskedInput | UnmaskingShares | Declined


SecureMessage = SecureSetup | SecureStage

_ANSWERS: dict[Stage, type] = {
    Stage.ADVERTISE_KEYS: TrainedKeys,
    Stage.SHARE_KEYS: ShareKeys,
    Stage.MASKED_INPUT: MaskedInput,
    Stage.UNMASKING: UnmaskingShares,
}


def answer_type(stage: Stage) -> type:
    """The reply body a stage's request asks for (a child may also decline any request)."""
    return _ANSWERS[stage]


def answers(request: SecureMessage, reply: SecureReply) -> bool:
    """Whether `reply` is of the kind `request` asks for: a late reply to an earlier stage of
    the same round carries the same nonce, and must not pass for this stage's answer."""
    return isinstance(reply.body, Declined | answer_type(request.stage))
