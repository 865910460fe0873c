"""An aggregator's side of a secure aggregation round: it learns only the sum of its children's
(weighted) changes to the model (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020).

The four stages of `secagg` run through the transport's one generic `exchange`: the
first carries each child's TrainTask with its ClientSetup, so children train and then advertise
keys; then ShareKeys, MaskedInputCollection (with the round's total weight) and Unmasking. A
child that does not answer a stage, declines it or answers malformed is dropped at that stage;
the library decides what survives (at least its threshold of each needed secret's holders).
What comes out is the sum over the included children U3 of

    FedAvg: (w_i / W) clip_c(change_i), so the sum times W is sum_i w_i change_i
    DP:     clip_c(clip_C(change_i)),   the clipped sum DP-FedAvg noises once

(see `secure_child` for the vector). Exact: the unmasked integer sum equals the sum of the
included children's quantized vectors. Within a bound: after decoding, each coordinate of the
sum is within n * step / 2 of the sum of their clipped weighted changes (`Quantizer`).
Too few survivors abort the round and nothing is released, not even a partial sum.

The parent cannot check what it cannot see: an individual change's norm, finiteness or
distance from the model (`max_change`) go unchecked; clip_c bounds every coordinate a child can
contribute, and under DP the children clip to C themselves (distributed DP's trust model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from worldlm.config import AggregatorConfig, SecAggConfig
from worldlm.core.messages import Record, Residual, State, TrainTask, tensor_bytes
from worldlm.core.secure_messages import (
    Declined,
    MaskRequest,
    SecureMessage,
    SecureReply,
    SecureSetup,
    SecureStage,
    TrainedKeys,
)
from worldlm.core.transport import Dropout, Transport
from worldlm.errors import ConfigError, UpdateRejected
from worldlm.federation.record_check import check_records
from worldlm.federation.secure_child import read_sum, vector_length
from worldlm.secagg import (
    MaskedInput,
    Quantizer,
    RoundPlan,
    SecAggError,
    SecAggServer,
    SecAggSetupError,
    ShareKeys,
    Stage,
    UnmaskingShares,
    plan_round,
    wire_size,
)
from worldlm.secagg.ring import wire_dtype

Body = TypeVar("Body", TrainedKeys, ShareKeys, MaskedInput, UnmaskingShares)


@dataclass
class SecureOutcome:
    """What a secure round released, and who dropped where."""

    status: str = "ok"  # or "secagg_aborted"
    reason: str | None = None  # why it aborted
    included: tuple[str, ...] = ()  # children whose changes are in the sum (U3)
    weights: dict[str, float] = field(default_factory=dict)  # in clear, of every trainer
    changes: State | None = None  # FedAvg: sum of w_i change_i; DP: sum of clipped changes
    error: float = 0.0  # |changes - exact sum of clipped weighted changes| <= this, per value
    clipped_coordinates: int = 0  # over the included children
    dp_clipped: int = 0  # included children whose change the DP clip scaled down
    records: list[Record] = field(default_factory=list)
    residuals: dict[str, Residual] = field(default_factory=dict)  # of the included children
    dropouts: dict[str, list[str]] = field(default_factory=dict)  # stage -> children
    incidents: list[Dropout] = field(default_factory=list)  # reasons, for metrics and audit
    bytes_down: int = 0
    bytes_up: int = 0

    @property
    def weight(self) -> float:
        """Total weight of the included children."""
        return sum(self.weights[c] for c in self.included)


class SecureSum:
    """FedAvg's result from a secure round: the model times W is current * W + sum w_i change_i
    (keys no child changed keep their current value)."""

    def __init__(self, current: State, changes: State, weight: float) -> None:
        self.current, self.changes, self.weight = current, changes, weight

    def add(self, update: object) -> None:
        raise RuntimeError("a secure round's replies arrive only as their sum")

    @property
    def count(self) -> int:
        return 1 if self.changes else 0

    def result(self) -> tuple[State, float]:
        w = self.weight
        return {k: self.current[k].double() * w + v for k, v in self.changes.items()}, w


def check_secure_aggregation(
    path: str, settings: AggregatorConfig, n_selected: int, *, key_attention: bool
) -> None:
    """Refuse, at build, secure aggregation where an aggregator would need what it hides."""
    config = settings.secure_aggregation
    if not config.enabled:
        return
    where = f"nodes.{path}.secure_aggregation"
    if settings.strategy != "fedavg" or settings.robust.norm_bound is not None:
        rule = "robust.norm_bound" if settings.strategy == "fedavg" else repr(settings.strategy)
        raise ConfigError(
            f"{where}: the aggregator sees only the sum of its children's changes, so "
            f"{rule} (which needs each change) cannot run; use strategy 'fedavg' without "
            "norm bounding, or turn secure aggregation off here"
        )
    if key_attention and not settings.dp.enabled:
        raise ConfigError(
            f"{where}: WorldLM's key-layer attention weighs each child's own key layers, which "
            "secure aggregation hides; enable it at the root (or with dp here, where K is the "
            "noisy mean), or use hierfavg"
        )
    if n_selected < 3:
        raise ConfigError(
            f"{where}: needs at least 3 children per round, this node selects {n_selected} "
            "(with 2, the sum reveals each to the other)"
        )
    try:
        Quantizer(bits=config.bits, clip_range=config.clip_range, max_clients=n_selected)
    except SecAggSetupError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def run_secure_round(
    transport: Transport,
    tasks: Mapping[str, TrainTask],
    current: State,
    config: SecAggConfig,
    *,
    dp_clip: float | None,
    graph_seed: int,
    weight_bounds: Mapping[str, float] | None = None,
    record_limits: Mapping[str, int] | None = None,
) -> SecureOutcome:
    """Run one secure round over the children of `tasks` (all sent `current`); a child's
    weight, which travels in clear, must lie in [1, its bound in `weight_bounds`]."""
    out = SecureOutcome()
    try:
        plan = plan_round(list(tasks), config, length=vector_length(current), graph_seed=graph_seed)
        stages = _Stages(transport, out, weight_bounds, record_limits)
        _run(stages, plan, tasks, dp_clip, current, config.clip_range)
    except SecAggError as exc:
        out.status, out.reason = "secagg_aborted", str(exc)
        out.included, out.changes = (), None
    return out


def _run(
    stages: _Stages,
    plan: RoundPlan,
    tasks: Mapping[str, TrainTask],
    dp_clip: float | None,
    current: State,
    clip_range: float,
) -> None:
    out, server = stages.out, SecAggServer(plan)
    setups = server.setups()
    trained = stages.ask(
        Stage.ADVERTISE_KEYS,
        [SecureSetup(tasks[c], setups[c], dp_clip) for c in plan.clients],
        TrainedKeys,
    )
    out.weights = {c: t.weight for c, t in trained.items()}
    for c in sorted(trained):
        out.records.extend(trained[c].records)
    broadcasts = server.receive_keys([trained[c].keys for c in sorted(trained)])
    shares = stages.ask(
        Stage.SHARE_KEYS, [stages.request(tasks[c], broadcasts[c]) for c in broadcasts], ShareKeys
    )
    deliveries = server.receive_shares([shares[c] for c in sorted(shares)])
    total = math.fsum(out.weights[c] for c in deliveries)
    masked = stages.ask(
        Stage.MASKED_INPUT,
        [stages.request(tasks[c], MaskRequest(deliveries[c], total)) for c in deliveries],
        MaskedInput,
    )
    requests = server.receive_masked([masked[c] for c in sorted(masked)])
    answers = stages.ask(
        Stage.UNMASKING,
        [stages.request(tasks[c], requests[c]) for c in requests],
        UnmaskingShares,
    )
    released = server.receive_unmasking([answers[c] for c in sorted(answers)])
    n = len(released.included)
    decoded = plan.quantizer.decode_sum(released.total, n)  # (length,) float64
    factor = 1.0 if dp_clip is not None else total  # sum_i (w_i / W) x_i times W
    error = plan.quantizer.max_error(n)
    parts = read_sum(decoded, current, stages.names or set(), clip_range, n, error)
    out.included = released.included
    out.changes = {k: v.mul_(factor) for k, v in parts.changes.items()}
    out.error = factor * plan.quantizer.max_error(n)
    out.clipped_coordinates, out.dp_clipped = parts.clipped_coordinates, parts.dp_clipped
    out.residuals = {c: trained[c].residual for c in out.included if trained[c].residual}


class _Stages:
    """Sends one stage's requests and keeps the answers that are this round's, from whom they
    were asked; everything else is a dropout at that stage, with its reason."""

    def __init__(
        self,
        transport: Transport,
        out: SecureOutcome,
        weight_bounds: Mapping[str, float] | None = None,
        record_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.transport, self.out = transport, out
        self.weight_bounds = weight_bounds or {}
        self.record_limits = record_limits or {}
        self.names: set[str] | None = None  # parameters the children changed (first answer's)
        self.bits = 0
        self.length = 0

    def request(self, task: TrainTask, body: Any) -> SecureStage:
        """A later stage's request to the child `task` went to, in the same round."""
        t = task
        return SecureStage(t.run_id, t.round, t.global_round, t.sender, t.recipient, t.nonce, body)

    def ask(
        self, stage: Stage, requests: Sequence[SecureMessage], body_type: type[Body]
    ) -> dict[str, Body]:
        asked = {m.recipient: m for m in requests}
        for m in requests:
            self.out.bytes_down += _bytes(m)
            if isinstance(m, SecureSetup):
                self.bits, self.length = m.setup.bits, m.setup.length
        got: dict[str, Body] = {}
        for reply in self.transport.exchange(list(requests)):
            self.out.bytes_up += _bytes(reply)
            problem = self._problem(reply, asked, got, body_type)
            if problem is not None:
                declined = isinstance(reply.body, Declined)
                self.out.incidents.append(
                    Dropout(reply.sender, f"{stage}: {problem}", left_out=declined)
                )
                continue
            assert isinstance(reply.body, body_type)
            got[reply.sender] = reply.body
        for dropped in self.transport.dropouts():
            self.out.incidents.append(
                Dropout(dropped.path, f"{stage}: {dropped.reason}", dropped.left_out)
            )
        self.out.dropouts[str(stage)] = sorted(set(asked) - set(got))
        return got

    def _problem(
        self,
        reply: SecureReply,
        asked: Mapping[str, SecureMessage],
        got: Mapping[str, object],
        body_type: type,
    ) -> str | None:
        """Why `reply` is not a valid answer of this stage, or None."""
        body = reply.body
        if reply.sender not in asked:
            return "not asked at this stage"
        if reply.sender in got:
            return "duplicate reply"
        if reply.nonce != asked[reply.sender].nonce:
            return "reply to another round or task"
        if isinstance(body, Declined):
            return f"declined: {body.reason}"
        if not isinstance(body, body_type):
            return f"a {type(body).__name__} where a {body_type.__name__} was expected"
        inner = body.keys.sender if isinstance(body, TrainedKeys) else body.sender
        if inner != reply.sender:
            return f"its protocol message claims to come from {inner!r}"
        if isinstance(body, TrainedKeys):
            bound = self.weight_bounds.get(reply.sender, math.inf)
            if not 1.0 <= body.weight <= bound:  # (`not <=` refuses NaN too)
                return (
                    f"weight {body.weight:g} is outside [1, {bound:g}], the tokens its subtree "
                    "can train in one round"
                )
            try:
                check_records(reply.sender, body.records, self.record_limits.get(reply.sender))
            except UpdateRejected as exc:
                return exc.reason
            sent = asked[reply.sender]
            assert isinstance(sent, SecureSetup)
            if not set(body.names) <= sent.task.state.keys():
                return "it changed parameters the model does not have"
            if self.names is not None and set(body.names) != self.names:
                return "parameter names differ from this round's other replies"
            self.names = set(body.names)
        if isinstance(body, MaskedInput) and (
            body.masked.dtype != wire_dtype(self.bits) or body.masked.shape != (self.length,)
        ):
            return f"masked input must be ({self.length},) {wire_dtype(self.bits)}"
        return None


def _bytes(message: SecureMessage | SecureReply) -> int:
    """Bytes a link moves for `message`: model tensors, residuals and the protocol's fields."""
    if isinstance(message, SecureSetup):
        return tensor_bytes(message.task) + wire_size(message.setup)
    body = message.body
    if isinstance(body, MaskRequest):
        return wire_size(body.delivery) + 8
    if isinstance(body, TrainedKeys):
        pairs = body.residual.values()
        residual = sum(t.numel() * t.element_size() for pair in pairs for t in pair)
        return wire_size(body.keys) + residual
    if isinstance(body, Declined):
        return 0
    return wire_size(body)
