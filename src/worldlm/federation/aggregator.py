"""An aggregator: the root or a sub-federation. The same code runs at every level of the tree.

Asked to train by its parent, it runs `inner_rounds` rounds over its own children and replies
with its aggregate; the root's run loop calls `run_round` directly.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from worldlm.audit.digest import state_digest
from worldlm.compression.link import ChildLinks, Uplink, decode_task
from worldlm.compression.policy import check_child_links
from worldlm.config import LinkConfig, NodeConfig
from worldlm.errors import UpdateRejected
from worldlm.federation.chunked import ChunkBuffers, mean_like
from worldlm.federation.context import NoAudit, RunContext
from worldlm.federation.key_layers import KeyLayerPolicy, KeyLayerRound, residual_of
from worldlm.federation.messages import (
    EvalReport,
    EvalTask,
    Record,
    RoutedResidual,
    State,
    TrainTask,
    Update,
    tensor_bytes,
)
from worldlm.federation.privacy_policy import DPPolicy, check_dp_settings
from worldlm.federation.reply_check import check_reply
from worldlm.federation.secure_child import SecureChild
from worldlm.federation.secure_messages import SecureMessage, SecureReply
from worldlm.federation.secure_round import SecureSum, run_secure_round
from worldlm.federation.selection import (
    eligible,
    sample_count,
    select_children,
    update_stragglers,
)
from worldlm.model.state import cast_like
from worldlm.privacy.dp_round import DPRound
from worldlm.seeding import derive_seed
from worldlm.strategies.fedavg import FedAvgRound
from worldlm.strategies.registry import RoundAggregation, Strategy
from worldlm.strategies.routing import Residual, route
from worldlm.train.evaluate import EvalResult
from worldlm.transport.base import ChildInfo, Dropout, Transport


@dataclass(frozen=True)
class RouterPolicy:
    top_k: int
    tau: float


@dataclass
class RoundOutcome:
    state: State  # the new model, in the model's dtypes
    exact: State  # the strategy's result before casting: the model times `scale`, sent upward
    scale: float
    weight: float  # tokens trained by the children that took part
    records: list[Record]


@dataclass
class Collected:
    """What a round's exchange with its children gave: the aggregation to finish and the rest
    of the round's record."""

    aggregation: RoundAggregation | DPRound | SecureSum
    records: list[Record] = field(default_factory=list)
    answered: set[str] = field(default_factory=set)
    weight: float = 0.0  # tokens trained by the children that took part
    residuals: dict[str, Residual] = field(default_factory=dict)  # WorldLM, for routing
    traffic: dict[str, int] = field(default_factory=lambda: {"bytes_down": 0, "bytes_up": 0})
    dropouts: list[Dropout] = field(default_factory=list)  # besides the transport's own
    row: Record = field(default_factory=dict)  # extra fields of the aggregate row
    status: str = "ok"
    round_keys: set[str] | None = None  # every reply of a round carries the same keys


class Aggregator:
    def __init__(
        self,
        path: str,
        settings: NodeConfig,
        *,
        transport: Transport,
        strategy: Strategy,
        ctx: RunContext,
        key_policy: KeyLayerPolicy | None = None,
        router: RouterPolicy | None = None,
        child_links: Mapping[str, LinkConfig] | None = None,
    ) -> None:
        self.path = path
        self.key_policy = key_policy  # WorldLM: this aggregator personalizes the key layers
        self.key_state: State = {}  # its own K_p, kept between rounds
        self.key_ref: State = {}  # the K it started from; residuals are K_p - K_ref
        self.child_keys: dict[str, State] = {}  # per-child attended K (child_key_layers)
        self.routed: tuple[RoutedResidual, ...] = ()  # residuals routed to it this round
        self.router = router  # the root under WorldLM: routes residuals between sub-federations
        self.residuals: dict[str, Residual] = {}  # latest residual of each child
        self.routes: dict[str, list[tuple[str, float]]] = {}
        self.settings = settings
        self.transport = transport
        self.strategy = strategy
        self.ctx = ctx
        self.rounds_done = 0  # this node's own round counter (seeds its selection)
        self.misses: dict[str, int] = {}  # selected rounds in a row without a valid reply
        self.benched_until: dict[str, int] = {}  # stragglers sit out until this round index
        self.state: State = {}
        check_dp_settings(
            path, settings.dp, settings.strategy, key_policy is not None and key_policy.per_child
        )
        self.dp = DPPolicy(settings.dp, path, ctx.seed) if settings.dp.enabled else None
        self.privacy_exhausted = False  # set when a round would have exceeded the ε budget
        check_child_links(path, settings, child_links or {})
        self.links = ChildLinks(child_links or {})  # compression towards each child
        self.uplink = Uplink(settings.link)  # and towards its own parent
        self.secure_child = SecureChild(self)  # answers its parent's secure rounds

    def info(self) -> ChildInfo:
        tokens = sum(c.train_tokens for c in self.transport.children(self.path))
        return ChildInfo(self.path, tokens)

    def with_own_key_layers(self, incoming: State) -> State:
        """The incoming model with this aggregator's K_p in place of the parent's K."""
        if self.key_policy is not None and not self.key_state:
            self.key_state = {k: incoming[k] for k in self.key_policy.partition.key_names}
            self.key_ref = dict(self.key_state)
        return {**incoming, **self.key_state}

    def handle_train(self, task: TrainTask) -> Update:
        task = decode_task(task)  # the weights, if the parent compressed them
        start = self.with_own_key_layers(task.state)
        self.routed = task.routed
        state, exact, scale, weight, records = start, start, 1.0, 0.0, []
        for _ in range(self.settings.inner_rounds):
            outcome = self.run_round(state, task.global_round)
            state, exact, scale = outcome.state, outcome.exact, outcome.scale
            weight += outcome.weight
            records.extend(outcome.records)
        # Forward the exact float64 weighted sum, not a rounded mean, so that a hierarchy with
        # one inner round equals flat FedAvg over the same leaves (DESIGN §4).
        if self.key_policy is not None:
            keys = self.key_policy.partition.key_names
            exact = {k: v for k, v in exact.items() if k not in keys}
            if not self.key_policy.private:  # inside a sub-federation K_p goes up, same scale
                exact.update({k: self.key_state[k].double() * scale for k in keys})
        residual = (
            residual_of(self.key_state, self.key_ref, self.key_policy.residual_rank)
            if self.key_policy is not None and self.key_policy.private
            else {}
        )
        update = Update(self.path, task.round, task.nonce, exact, weight, records, scale, residual)
        return self.uplink.encode(update, task.state)

    def handle_secure(self, message: SecureMessage) -> SecureReply:
        """A stage of the parent's secure round; the first trains, like `handle_train`."""
        return self.secure_child.handle(message)

    def run_round(self, state: State, global_round: int) -> RoundOutcome:
        """One round over this node's children: select, send, fold replies in, finalize."""
        started = time.perf_counter()
        r = self.rounds_done
        infos = self.transport.children(self.path)
        if self.dp is not None and self.dp.would_exceed_budget(
            len(infos), sample_count(len(infos), self.settings.sample)
        ):
            return self._out_of_budget(state, global_round, r, started)
        sizes = {c.path: c.train_tokens for c in infos}
        sample = self.settings.sample
        pool = eligible({c.path: c.resources for c in infos}, sample, self.benched_until, r)
        chosen = select_children(
            pool,
            [sizes[path] for path in pool],
            sample,
            seed=self.ctx.seed,
            path=self.path,
            round_index=r,
        )
        tasks = {
            child: TrainTask(
                self.ctx.run_id,
                r,
                global_round,
                self.path,
                child,
                secrets.token_hex(8),
                self.state_for(child, state),
                self._routed_to(child),
            )
            for child in chosen
        }
        dp_round = (
            self.dp.start_round(state, len(infos), len(chosen), r) if self.dp is not None else None
        )
        aggregation = dp_round if dp_round is not None else self.strategy.start_round(state)
        # Under DP the key layers are the noisy mean like the rest (see privacy_policy):
        # attention over the children's raw K would release them without noise.
        key_round = (
            KeyLayerRound(self.key_policy, self.key_state, self.key_ref, self.routed)
            if self.key_policy is not None and self.dp is None
            else None
        )
        # What crosses each link, and what each child trains from once it decodes that.
        sent, seen = self.links.send(tasks)
        if self.settings.secure_aggregation.enabled:  # never compressed down (policy)
            got = self._collect_secure(tasks, state, dp_round, r, global_round)
        else:
            got = self._collect(sent, seen, aggregation, key_round, r, global_round)
        records, answered, weight = got.records, got.answered, got.weight
        for dropout in [*got.dropouts, *self.transport.dropouts()]:
            records.append(_incident(global_round, self.path, dropout))
            kind = records[-1]["kind"]
            self._audit(kind, global_round, sender=dropout.path, reason=dropout.reason)
        benched = update_stragglers(chosen, answered, self.misses, self.benched_until, sample, r)
        status = got.status
        if status == "ok" and len(answered) < self.settings.min_replies:
            status = "too_few_replies"
        if status != "ok":
            # Too few replies to trust an aggregate, or a secure round that released nothing:
            # this round changes nothing (TESTPLAN B6, F23).
            records.append(
                self._aggregate_record(global_round, r, chosen, answered, 0.0, started, benched)
            )
            records[-1].update(got.traffic, **got.row, status=status)
            self._audit_round(records[-1], None)
            self.rounds_done += 1
            self.state = state
            return RoundOutcome(state, state, 1.0, 0.0, records)
        self.residuals.update(got.residuals)
        exact, scale = got.aggregation.result()
        if dp_round is not None and self.dp is not None:
            records.append(self.dp.finish_round(dp_round, global_round))
            privacy = records[-1]
            self._audit(
                "dp_noise",
                global_round,
                local_round=r,
                noise_stddev=privacy["noise_stddev"],
                clip=privacy["clip"],
                clipped=privacy["clipped"],
                epsilon=privacy["epsilon"],
                delta=privacy["delta"],
            )
        # Keys no child sent (the root's K under WorldLM) keep their current value.
        buffers = ChunkBuffers()
        if scale != 1.0 and isinstance(got.aggregation, FedAvgRound) and not _wider(exact, state):
            # A float32 sum (sum_dtype) becomes the new model in place: no third copy. What
            # goes up is then the mean with scale 1 and the same weight, the same FedAvg sum
            # up to float32 rounding (a float32 sum has no exactness to keep).
            exact = {k: v.div_(scale) for k, v in exact.items()}
            scale = 1.0
        # Each tensor divided and cast on its own: a whole float64 mean would be 2 more copies.
        model = {**state, **{k: mean_like(v, scale, state[k], buffers) for k, v in exact.items()}}
        if key_round is not None:
            self.key_state = cast_like(key_round.result(), self.key_state)
            model.update(self.key_state)
            for child, keys in key_round.per_child().items():  # absent children keep theirs
                self.child_keys[child] = cast_like(keys, self.key_state)
        elif self.key_policy is not None:  # DP: K_p is the noisy mean, kept like attended K
            names = self.key_policy.partition.key_names
            self.key_state = cast_like({k: model[k] for k in names}, self.key_state)
        new_state = cast_like(model, state)
        if self.router is not None and len(self.residuals) > 1:
            self.routes = route(self.residuals, top_k=self.router.top_k, tau=self.router.tau)
        records.append(
            self._aggregate_record(global_round, r, chosen, answered, weight, started, benched)
        )
        records[-1].update(got.traffic, **got.row)
        self._audit_round(records[-1], new_state)
        self.rounds_done += 1
        self.state = new_state
        return RoundOutcome(new_state, exact, scale, weight, records)

    def _collect(
        self,
        sent: dict[str, TrainTask],
        seen: dict[str, TrainTask],
        aggregation: RoundAggregation | DPRound,
        key_round: KeyLayerRound | None,
        r: int,
        global_round: int,
    ) -> Collected:
        """A plain round: validate each reply as it arrives and fold it into `aggregation`.
        `sent` are the tasks as they cross the links, `seen` as the children decode them."""
        got = Collected(aggregation)
        reference_norms: dict[int, dict[str, float]] = {}
        buffers = ChunkBuffers()  # this round's: a round may run beside another's thread
        got.traffic["bytes_down"] = sum(tensor_bytes(t) for t in sent.values())
        for reply in self.transport.train(list(sent.values())):
            # Compact bytes, as they crossed the link; refused replies crossed it too.
            got.traffic["bytes_up"] += tensor_bytes(reply)
            scratch = (reference_norms, buffers)
            self._take(reply, seen, got, aggregation, scratch, key_round, (r, global_round))
            # Let the reply go before the transport produces the next one: the loop variable
            # would otherwise keep it alive beside its successor (one more model copy).
            del reply
        return got

    def _take(
        self,
        reply: Update,
        seen: dict[str, TrainTask],
        got: Collected,
        aggregation: RoundAggregation | DPRound,
        scratch: tuple[dict[int, dict[str, float]], ChunkBuffers],
        key_round: KeyLayerRound | None,
        rounds: tuple[int, int],
    ) -> None:
        """Check one reply and fold it in, or record why it was refused. `rounds` is (this
        aggregator's round, the root's round)."""
        reference_norms, buffers = scratch
        r, global_round = rounds
        try:
            update = self.links.receive(reply, seen)  # decoded before any check
            limit = self.settings.max_change
            round_keys = got.round_keys
            # The change's norm is an audit figure: unrecorded, the check reads the reply alone.
            measure = not isinstance(self.ctx.audit, NoAudit)
            change = check_reply(
                update,
                seen,
                got.answered,
                round_keys,
                limit,
                reference_norms,
                buffers,
                measure=measure,
            )
            # DP clips here; a change whose norm overflows is refused like any bad reply.
            clipped = aggregation.add(update)
        except UpdateRejected as exc:
            got.records.append(_rejection(global_round, self.path, exc))
            self._audit("update_rejected", global_round, sender=exc.sender, reason=exc.reason)
            return
        self._audit(
            "update_accepted",
            global_round,
            local_round=r,
            sender=update.sender,
            digest=self._digest(update.state),
            weight=update.weight,
            scale=update.scale,
            change_norm=change,
            clip_factor=clipped[1] if isinstance(clipped, tuple) else None,
        )
        got.round_keys = set(update.state)
        got.answered.add(update.sender)
        got.records.extend(update.records)
        if key_round is not None:
            key_round.add(update)
        if self.router is not None and update.residual:
            got.residuals[update.sender] = update.residual
        got.weight += update.weight

    def _collect_secure(
        self,
        tasks: dict[str, TrainTask],
        state: State,
        dp_round: DPRound | None,
        r: int,
        global_round: int,
    ) -> Collected:
        """A secure round: only the sum of the children's changes arrives (secure_round)."""
        out = run_secure_round(
            self.transport,
            tasks,
            state,
            self.settings.secure_aggregation,
            dp_clip=None if dp_round is None else dp_round.clip,
            graph_seed=derive_seed(self.ctx.seed, self.path, r, "secagg"),
        )
        aggregation: RoundAggregation | DPRound | SecureSum = (
            dp_round if dp_round is not None else SecureSum(state, {}, 1.0)
        )
        max_error = None
        if out.changes is not None:
            if dp_round is not None:
                dp_round.add_sum(out.changes, len(out.included), out.dp_clipped)
                max_error = out.error / dp_round.expected_children
            else:
                aggregation = SecureSum(state, out.changes, out.weight)
                max_error = out.error / out.weight
        self._audit(
            "secure_aggregation",
            global_round,
            local_round=r,
            status=out.status,
            reason=out.reason,
            included=list(out.included),
            weights=out.weights,
            dropouts=out.dropouts,
            clipped_coordinates=out.clipped_coordinates,
            sum_digest=None if out.changes is None else state_digest(out.changes),
        )
        got = Collected(aggregation, out.records, set(out.included), out.weight, out.residuals)
        got.traffic.update(bytes_down=out.bytes_down, bytes_up=out.bytes_up)
        got.dropouts, got.status = out.incidents, out.status
        got.row = {
            "secure_aggregation": True,
            "secagg_dropouts": out.dropouts,
            "secagg_clipped": out.clipped_coordinates,
            "secagg_max_error": max_error,  # bound on |new model - exact mean| per value
        }
        if out.reason is not None:
            got.row["reason"] = out.reason
        return got

    def _aggregate_record(
        self,
        global_round: int,
        local_round: int,
        chosen: list[str],
        answered: set[str],
        weight: float,
        started: float,
        benched: list[str],
    ) -> Record:
        return {
            "round": global_round,
            "node": self.path,
            "kind": "aggregate",
            "local_round": local_round,
            "status": "ok",
            "selected": chosen,
            "participants": sorted(answered),
            "missing": sorted(set(chosen) - answered),
            "benched": benched,
            "tokens": weight,
            "seconds": time.perf_counter() - started,
        }

    def _out_of_budget(
        self, state: State, global_round: int, r: int, started: float
    ) -> RoundOutcome:
        """A round not run because it would take ε above the budget: nothing changes."""
        self.privacy_exhausted = True
        row = self._aggregate_record(global_round, r, [], set(), 0.0, started, [])
        row["status"] = "privacy_budget_exhausted"
        self._audit_round(row, None)
        self.state = state
        return RoundOutcome(state, state, 1.0, 0.0, [row])

    def _audit(self, event: str, global_round: int, **fields: Any) -> None:
        self.ctx.audit.append(event, node=self.path, round=global_round, **fields)

    def _digest(self, state: State) -> str | None:
        """SHA-256 of `state` for the audit log; not computed when nothing records it (a pass
        over every byte at about 1 GB/s)."""
        return None if isinstance(self.ctx.audit, NoAudit) else state_digest(state)

    def _audit_round(self, row: Record, result: State | None) -> None:
        """Who was asked and who took part, how the replies were combined, and the digest of
        the result (none when the round was skipped)."""
        self._audit(
            "round",
            row["round"],
            local_round=row["local_round"],
            status=row["status"],
            selected=row["selected"],
            participants=row["participants"],
            missing=row["missing"],
            benched=row["benched"],
            rule=self.settings.strategy,
            tokens=row["tokens"],
            result_digest=None if result is None else self._digest(result),
        )

    def state_for(self, child: str, state: State) -> State:
        """What `child` is sent: the model, with its own attended K when it has one."""
        return {**state, **self.child_keys[child]} if child in self.child_keys else state

    def _routed_to(self, child: str) -> tuple[RoutedResidual, ...]:
        return tuple(
            RoutedResidual(source, weight, self.residuals[source])
            for source, weight in self.routes.get(child, [])
        )

    def handle_eval(self, task: EvalTask) -> EvalReport:
        """Every child (not a sample) evaluates the model it would deploy, or, for a task that
        is not `deployed`, the model it was sent, with no key layers of this level on top."""
        state = self.with_own_key_layers(task.state) if task.deployed else task.state
        tasks = [
            EvalTask(
                self.ctx.run_id,
                task.global_round,
                self.path,
                c.path,
                secrets.token_hex(8),
                self.state_for(c.path, state) if task.deployed else state,
                task.deployed,
            )
            for c in self.transport.children(self.path)
        ]
        results: dict[str, EvalResult] = {}
        for report in self.transport.evaluate(tasks):
            results.update(report.results)
        return EvalReport(self.path, task.nonce, results)

    # --- checkpointing -------------------------------------------------------------------
    def snapshot(self) -> tuple[State, dict[str, Any]]:
        tensors = {f"model/{k}": v for k, v in self.state.items()}
        tensors.update({f"strategy/{k}": v for k, v in self.strategy.state_dict().items()})
        tensors.update({f"key/{k}": v for k, v in self.key_state.items()})
        tensors.update({f"keyref/{k}": v for k, v in self.key_ref.items()})
        tensors.update({f"link/{k}": v for k, v in self.uplink.state_dict().items()})
        for child, keys in sorted(self.child_keys.items()):
            tensors.update({f"childkey#{child}#{k}": v for k, v in keys.items()})
        for source, residual in sorted(self.residuals.items()):
            for name, (left, right) in residual.items():
                tensors[f"residual#{source}#{name}#U"] = left
                tensors[f"residual#{source}#{name}#V"] = right
        meta = {
            "rounds_done": self.rounds_done,
            "routes": self.routes,
            "misses": self.misses,
            "benched_until": self.benched_until,
        }
        if self.dp is not None:
            meta["dp"] = self.dp.state_dict()
        return tensors, meta

    def restore(self, tensors: State, meta: dict[str, Any]) -> None:
        self.rounds_done = int(meta["rounds_done"])
        self.misses = {k: int(v) for k, v in meta.get("misses", {}).items()}
        self.benched_until = {k: int(v) for k, v in meta.get("benched_until", {}).items()}
        if self.dp is not None:
            self.dp.load_state_dict(meta.get("dp", {}))
        self.state = {k[6:]: v.clone() for k, v in tensors.items() if k.startswith("model/")}
        self.key_state = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("key/")}
        self.key_ref = {k[7:]: v.clone() for k, v in tensors.items() if k.startswith("keyref/")}
        self.uplink.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("link/")})
        self.child_keys = {}
        for key, value in tensors.items():
            if key.startswith("childkey#"):
                _, child, name = key.split("#")
                self.child_keys.setdefault(child, {})[name] = value.clone()
        factors: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for key, value in tensors.items():
            if key.startswith("residual#"):
                _, source, name, part = key.split("#")
                factors.setdefault(source, {}).setdefault(name, {})[part] = value.clone()
        self.residuals = {
            s: {n: (uv["U"], uv["V"]) for n, uv in names.items()} for s, names in factors.items()
        }
        self.routes = {k: [(s, float(w)) for s, w in v] for k, v in meta.get("routes", {}).items()}
        self.strategy.load_state_dict(
            {k[9:]: v for k, v in tensors.items() if k.startswith("strategy/")}
        )


def _wider(sums: State, model: State) -> bool:
    """Whether any sum is kept in a wider dtype than the model's (float64 sums)."""
    return any(v.dtype != model[k].dtype for k, v in sums.items())


def _incident(global_round: int, path: str, dropout: Dropout) -> Record:
    """A metrics row for a child the transport left out, or a message it refused."""
    return {
        "round": global_round,
        "node": path,
        "kind": "dropped" if dropout.left_out else "refused",
        "sender": dropout.path,
        "reason": dropout.reason,
    }


def _rejection(global_round: int, path: str, exc: UpdateRejected) -> Record:
    return {
        "round": global_round,
        "node": path,
        "kind": "rejected",
        "sender": exc.sender,
        "reason": exc.reason,
    }
