"""A child's side of its parent's secure aggregation rounds, for any node (leaf or aggregator).

Asked to train in a secure round (`SecureSetup`), the child runs its node's own `handle_train`,
turns the reply into the vector it protects, keeps that vector to itself, and answers the four
stages through `secagg.SecAggClient`. The vector, flattened over the task's parameter
names in sorted order (float64), is

    x = a * clip_c(change)  ++  [c * k / L, c * d]

* change = update.state / update.scale - task.state: the child's change to the model it was
  sent (zero for parameters it keeps to itself: FedPer's K, WorldLM's K above a sub-federation);
  under the parent's DP policy first clipped to L2 norm C (`dp_clip`), as DP-FedAvg does.
* clip_c clips each coordinate to [-c, c], c = `secure_aggregation.clip_range`. This is the
  only value clipping: a = weight / total_weight <= 1 (FedAvg; `total_weight` is the sum of the
  weights of the children still in the round, sent by the parent before masking) or a = 1
  (DP's uniform weights), so every value of x lies in [-c, c] and the quantizer never
  saturates silently. The parent learns how many coordinates were clipped, but only in total:
* the tail holds the number k of clipped coordinates (of L) and d = 1 if the DP clip scaled the
  change down; summed with the rest, they tell the parent totals over the included children,
  which is what adaptive clipping needs, and nothing about any one child.

The weight (tokens), the child's metrics rows and its WorldLM residual travel in clear beside
the masked vector: FedAvg weights are no secret (a plain round shows them too), and the root
needs each residual to route. Secrets live in memory only: a child that restarts mid-round
declines the later stages and the parent counts it as dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from worldlm.compression.link import decode_update
from worldlm.core.messages import State, TrainTask, Update
from worldlm.core.secure_messages import (
    Declined,
    MaskRequest,
    SecureMessage,
    SecureReply,
    SecureSetup,
    TrainedKeys,
)
from worldlm.privacy.clipping import clip_factor, tensor_norm
from worldlm.secagg import SecAggAborted, SecAggClient, SecAggError, SecAggProtocolError
from worldlm.secagg.messages import (
    KeysBroadcast,
    MaskedInput,
    ShareKeys,
    UnmaskingShares,
    UnmaskRequest,
)

TAIL = 2  # values after the model's: clipped coordinates (as c * k / L), DP-clipped flag (c * d)


class CannotTakePart(Exception):
    """This node's own reply cannot be masked (not finite, no weight): it declines the round."""


class Trainer(Protocol):
    """What the adapter needs of a node: its path and its plain training reply."""

    path: str

    def handle_train(self, task: TrainTask) -> Update: ...


def vector_length(state: State) -> int:
    """Length of the vector a child protects for a task carrying `state`."""
    return sum(v.numel() for v in state.values()) + TAIL


def flat_change(sent: State, update: Update) -> np.ndarray:
    """The update's change to `sent`, flattened over sorted names (float64; zero where the
    update carries no tensor)."""
    parts = []
    for name in sorted(sent):
        base = sent[name]
        if name in update.state:
            value = update.state[name]
            if value.shape != base.shape:
                shapes = f"{tuple(value.shape)}, sent {tuple(base.shape)}"
                raise CannotTakePart(f"{name}: shape {shapes}")
            parts.append((value.double() / update.scale - base.double()).reshape(-1).cpu())
        else:
            parts.append(torch.zeros(base.numel(), dtype=torch.float64))
    return torch.cat(parts).numpy()


@dataclass(frozen=True)
class SumParts:
    """A decoded sum of protected vectors, read back."""

    changes: State  # float64, one tensor per parameter the children changed
    clipped_coordinates: int
    dp_clipped: int


def read_sum(
    total: np.ndarray,
    shapes: State,
    names: set[str],
    clip_range: float,
    children: int,
    error: float,
) -> SumParts:
    """Split a decoded sum of `children` vectors (each value within `error` of the exact sum)
    back into tensors shaped like `shapes` (only `names`), the total of clipped coordinates and
    the number of DP-clipped changes; counters no honest children sum to raise `SecAggAborted`."""
    parts: State = {}
    offset = 0
    for name in sorted(shapes):
        n = shapes[name].numel()
        if name in names:
            parts[name] = torch.from_numpy(total[offset : offset + n].copy())
        offset += n
    # In the model's own key order, as a plain round's sums are (DP draws its noise in it).
    changes = {k: parts[k].reshape(v.shape) for k, v in shapes.items() if k in parts}
    clipped = float(total[offset]) * offset / clip_range
    dp_clipped = float(total[offset + 1]) / clip_range
    # Each honest child's counters lie in [0, L] and [0, 1], give or take the quantization
    # error: a sum outside n times that was not made of honest encodings (and the values
    # beside it are then suspect too).
    check_counters(clipped, dp_clipped, children, offset, slack=error / clip_range)
    return SumParts(
        changes,
        clipped_coordinates=min(max(round(clipped), 0), children * offset),
        dp_clipped=min(max(round(dp_clipped), 0), children),
    )


def check_counters(
    clipped: float, dp_clipped: float, children: int, length: int, *, slack: float
) -> None:
    """Raise `SecAggAborted` unless the summed counters of `children` honest inputs could be
    these: each input's clipped coordinates in [0, length], its DP flag in [0, 1], each sum
    give or take `slack` of the clip range (the quantization error)."""
    if not (
        -slack * length - 1 <= clipped <= children * length + slack * length + 1
        and -slack - 1 <= dp_clipped <= children + slack + 1
    ):
        raise SecAggAborted(
            f"the sum's counters are out of range ({clipped:.0f} clipped coordinates, "
            f"{dp_clipped:.0f} DP-clipped changes from {children} children): an input ignored "
            "the encoding"
        )


@dataclass
class _Session:
    """One secure round in progress at this child."""

    nonce: str
    client: SecAggClient
    change: np.ndarray | None  # (L,) float64, clipped; dropped once masked
    tail: np.ndarray  # (TAIL,)
    weight: float
    uniform: bool  # DP: mask the change with weight 1


class SecureChild:
    """Answers a parent's secure rounds for `trainer` (a Leaf, Aggregator or journaled node)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.session: _Session | None = None

    def handle(self, message: SecureMessage) -> SecureReply:
        """One stage's reply; a request the protocol refuses is declined, not raised."""
        body: TrainedKeys | ShareKeys | MaskedInput | UnmaskingShares | Declined
        try:
            if isinstance(message, SecureSetup):
                body = self._train_and_advertise(message)
            else:
                body = self._next_stage(message.nonce, message.body)
        except (SecAggError, CannotTakePart) as exc:
            self.session = None  # the round's secrets are useless now; forget them
            body = Declined(f"{type(exc).__name__}: {exc}")
        return SecureReply(self.trainer.path, message.nonce, body)

    def _train_and_advertise(self, message: SecureSetup) -> TrainedKeys:
        task, setup = message.task, message.setup
        self.session = None  # a new round replaces any unfinished one
        if setup.client != self.trainer.path or setup.length != vector_length(task.state):
            raise SecAggProtocolError(
                f"{self.trainer.path}: a setup for {setup.client!r} of length {setup.length}, "
                f"not for this node and its task's {vector_length(task.state)} values"
            )
        # A reply compressed for the link (bf16 or fp16 at most, see compression.policy) is
        # masked as the change it decodes to: the masked vector is what crosses the link.
        update = decode_update(self.trainer.handle_train(task), task.state)
        if not (update.weight > 0 and math.isfinite(update.weight)):
            raise CannotTakePart(f"weight {update.weight} is not a positive number")
        change = flat_change(task.state, update)
        if not np.isfinite(change).all():
            raise CannotTakePart("its change to the model has NaN or infinite values")
        tail = np.zeros(TAIL)
        if message.dp_clip is not None:
            factor = clip_factor(tensor_norm(torch.from_numpy(change)), message.dp_clip)
            change *= factor
            tail[1] = float(factor < 1.0)
        c = setup.clip_range
        tail[0] = np.count_nonzero(np.abs(change) > c) / change.size
        np.clip(change, -c, c, out=change)
        client = SecAggClient(setup)
        keys = client.advertise_keys()
        self.session = _Session(
            task.nonce, client, change, tail * c, update.weight, message.dp_clip is not None
        )
        names = tuple(sorted(update.state))
        return TrainedKeys(keys, update.weight, names, update.records, update.residual)

    def _next_stage(
        self, nonce: str, body: KeysBroadcast | MaskRequest | UnmaskRequest
    ) -> ShareKeys | MaskedInput | UnmaskingShares:
        session = self.session
        if session is None or session.nonce != nonce:
            raise SecAggProtocolError(
                f"{self.trainer.path}: no secure round with this nonce here (restarted, or the "
                "round was abandoned)"
            )
        if isinstance(body, KeysBroadcast):
            return session.client.share_keys(body)
        if isinstance(body, MaskRequest):
            if session.change is None:
                raise SecAggProtocolError(f"{self.trainer.path}: its input is already masked")
            share = 1.0 if session.uniform else session.weight / body.total_weight
            if not 0.0 < share <= 1.0 + 1e-12:  # an honest parent's total includes this weight
                raise SecAggProtocolError(
                    f"{self.trainer.path}: total weight {body.total_weight} is below its own "
                    f"weight {session.weight}"
                )
            values = np.concatenate([session.change * min(share, 1.0), session.tail])
            session.change = None
            return session.client.masked_input(body.delivery, values)
        self.session = None  # the last stage: nothing is kept after it
        return session.client.unmask(body)
