"""An aggregator: the root or a sub-federation. The same code runs at every level of the tree.

Asked to train by its parent, it runs `inner_rounds` rounds over its own children and replies
with its aggregate; the root's run loop calls `run_round` directly.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from worldlm.audit.digest import state_digest
from worldlm.compression.link import ChildLinks, Uplink, decode_task
from worldlm.compression.policy import check_child_links
from worldlm.config import AggregatorConfig, LinkConfig
from worldlm.core.chunked import ChunkBuffers, mean_like
from worldlm.core.messages import (
    EvalReport,
    EvalTask,
    Record,
    Residual,
    RoutedResidual,
    SignedStatement,
    State,
    TrainTask,
    Update,
    tensor_bytes,
)
from worldlm.core.secure_messages import SecureMessage, SecureReply
from worldlm.core.state import cast_like
from worldlm.core.transport import ChildInfo, Dropout, Transport
from worldlm.errors import UpdateRejected
from worldlm.federation.aggregator_checkpoint import aggregator_restore, aggregator_snapshot
from worldlm.federation.buffered_round import BufferedRounds
from worldlm.federation.context import NoAudit, RunContext
from worldlm.federation.eval_check import accepted_results
from worldlm.federation.key_layers import (
    KeyLayerPolicy,
    KeyLayerRound,
    KeyLayers,
    PersonalKeyLayers,
    SharedKeyLayers,
    check_optimizer_on_keys,
)
from worldlm.federation.privacy_policy import DPPolicy, DPRule, check_dp_settings
from worldlm.federation.record_check import (
    INCIDENTS_PER_CHILD,
    check_records,
    trim_incidents,
)
from worldlm.federation.reply_check import check_reply, is_abstention
from worldlm.federation.round_rule import RoundRule, StrategyRule
from worldlm.federation.round_runner import RoundRunner, SynchronousRounds
from worldlm.federation.round_state import (
    Collected,
    RoundOutcome,
    aggregate_row,
    incident_row,
    rejection_row,
    wider_than,
)
from worldlm.federation.secure_child import SecureChild
from worldlm.federation.secure_round import run_secure_round
from worldlm.federation.selection import (
    eligible,
    sample_count,
    select_children,
    update_stragglers,
)
from worldlm.security.downlink import DownlinkSigner, sign_eval_tasks, sign_tasks
from worldlm.seeding import derive_seed
from worldlm.strategies.fedbuff import FEDBUFF
from worldlm.strategies.registry import RoundAggregation, Strategy
from worldlm.strategies.routing import route
from worldlm.strategies.server_optimizer import ServerOptimizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterPolicy:
    top_k: int
    tau: float


class Aggregator:
    """One federation's aggregator. What varies between methods and federations plugs in:
    `rule` (the strategy, or DP-FedAvg around it), `keys` (WorldLM's key layers, or none),
    `optimizer` (the server optimizer), `links` (compression), plain or secure collection, and
    `rounds`, what runs a round (the synchronous round, or FedBuff's buffered step)."""

    def __init__(
        self,
        path: str,
        settings: AggregatorConfig,
        *,
        transport: Transport,
        strategy: Strategy,
        ctx: RunContext,
        key_policy: KeyLayerPolicy | None = None,
        router: RouterPolicy | None = None,
        child_links: Mapping[str, LinkConfig] | None = None,
        weight_bounds: Mapping[str, float] | None = None,
        record_limits: Mapping[str, int] | None = None,
        eval_owners: Mapping[str, frozenset[str]] | None = None,
        eval_max_tokens: int | None = None,
        child_slowdowns: Mapping[str, float] | None = None,
    ) -> None:
        self.path = path
        self.settings = settings
        self.transport = transport
        self.ctx = ctx
        check_dp_settings(path, settings.dp, settings.strategy, settings.sample.weighting)
        self.rule: RoundRule = (
            DPRule(DPPolicy(settings.dp, path, ctx.seed))
            if settings.dp.enabled
            else StrategyRule(strategy)
        )
        self.keys: KeyLayers = (
            PersonalKeyLayers(key_policy, attend=self.rule.attends_keys)
            if key_policy is not None
            else SharedKeyLayers()
        )
        check_optimizer_on_keys(path, settings.server_optimizer.key_layers, key_policy)
        self.optimizer = ServerOptimizer(settings.server_optimizer)
        self.routed: tuple[RoutedResidual, ...] = ()  # residuals routed to it this round
        # Signs what it sends on the chain it was sent (security.downlink); None: unsigned.
        self.signer: DownlinkSigner | None = None
        self.chain: tuple[SignedStatement, ...] = ()
        self.router = router  # the root under WorldLM: routes residuals between sub-federations
        self.residuals: dict[str, Residual] = {}  # latest residual of each child
        self.routes: dict[str, list[tuple[str, float]]] = {}
        self.rounds_done = 0  # this node's own round counter (seeds its selection)
        self.misses: dict[str, int] = {}  # selected rounds in a row without a valid reply
        self.benched_until: dict[str, int] = {}  # stragglers sit out until this round index
        self.state: State = {}
        # The most tokens each child may claim per round (None: only at least 1, as tests of
        # a bare aggregator have it; every built federation has bounds).
        self.weight_bounds = weight_bounds
        self.record_limits = record_limits or {}  # the most metrics rows per child's reply
        # Which evaluation sets each child may report (its subtree's leaves) and how many
        # tokens a leaf's evaluation can have (None: unchecked, as in tests of a bare node).
        self.eval_owners = eval_owners
        self.eval_max_tokens = eval_max_tokens
        self.privacy_exhausted = False  # set when a round would have exceeded the ε budget
        check_child_links(path, settings, child_links or {})
        self.links = ChildLinks(child_links or {})  # compression towards each child
        self.uplink = Uplink(settings.link)  # and towards its own parent
        self.secure_child = SecureChild(self)  # answers its parent's secure rounds
        secure = settings.secure_aggregation.enabled
        self._collect = self._collect_secure if secure else self._collect_plain
        # FedBuff replaces the synchronous round by buffered server steps (buffered_round), on
        # a simulated clock where `child_slowdowns` make its stragglers, or a real one.
        self.rounds: RoundRunner = (
            BufferedRounds(self, child_slowdowns or {})
            if settings.strategy == FEDBUFF
            else SynchronousRounds(self._synchronous_round)
        )

    @property
    def key_policy(self) -> KeyLayerPolicy | None:
        return self.keys.policy

    @property
    def key_state(self) -> State:
        return self.keys.key_state

    @property
    def child_keys(self) -> dict[str, State]:
        return self.keys.child_keys

    def info(self) -> ChildInfo:
        tokens = sum(c.train_tokens for c in self.transport.children(self.path))
        return ChildInfo(self.path, tokens)

    def with_own_key_layers(self, incoming: State) -> State:
        """The incoming model with this aggregator's K_p in place of the parent's K."""
        return self.keys.own(incoming)

    def state_for(self, child: str, state: State) -> State:
        """What `child` is sent: the model, with its own attended K when it has one."""
        return self.keys.state_for(child, state)

    def handle_train(self, task: TrainTask) -> Update:
        task = decode_task(task)  # the weights, if the parent compressed them
        start = self.keys.own(task.state)
        self.routed = task.routed
        self.chain = task.signatures
        state, exact, scale, weight, records = start, start, 1.0, 0.0, []
        for _ in range(self.settings.inner_rounds):
            outcome = self.run_round(state, task.global_round)
            state, exact, scale = outcome.state, outcome.exact, outcome.scale
            weight += outcome.weight
            records.extend(outcome.records)
        # A float64 sum goes up exact, not as a rounded mean, so that a hierarchy with one
        # inner round equals flat FedAvg over the same leaves (DESIGN §4).
        exact = self.keys.forwarded(exact, scale)
        residual = self.keys.residual()
        update = Update(self.path, task.round, task.nonce, exact, weight, records, scale, residual)
        return self.uplink.encode(update, task.state)

    def handle_secure(self, message: SecureMessage) -> SecureReply:
        """A stage of the parent's secure round; the first trains, like `handle_train`."""
        return self.secure_child.handle(message)

    def run_round(self, state: State, global_round: int) -> RoundOutcome:
        """One round over this node's children (a FedBuff node's: one server step)."""
        return self.rounds.run(state, global_round)

    def _synchronous_round(self, state: State, global_round: int) -> RoundOutcome:
        """One round over this node's children: select, send, collect, finalize, record."""
        started, r = time.perf_counter(), self.rounds_done
        n_children, chosen = self._select(r)
        if not self.rule.admits(n_children, sample_count(n_children, self.settings.sample)):
            return self._out_of_budget(state, global_round, r, started)
        aggregation = self.rule.start_round(state, n_children, len(chosen), r)
        key_round = self.keys.start_round(self.routed)
        sent, seen = self._send(chosen, state, r, global_round)
        got = self._collect(sent, seen, state, aggregation, key_round, (r, global_round))
        benched = self._settle(got, chosen, r, global_round)
        finished = None
        if got.status == "ok":
            finished = self._finalize(state, got, key_round, (r, global_round))
            if finished is None:  # every reply passed its checks, yet their sum did not
                got.status = "non_finite_aggregate"
        if finished is not None:
            new_state, exact, scale = finished
        else:  # too few replies, a secure round that released nothing, or a sum that
            # overflowed: nothing changes
            new_state, exact, scale, got.weight = state, state, 1.0, 0.0  # (TESTPLAN B6, F23)
        row = self._aggregate_record(global_round, r, chosen, got, started, benched)
        got.records.append(row)
        self._audit_round(row, new_state if got.status == "ok" else None)
        self.rounds_done += 1
        self.state = new_state
        return RoundOutcome(new_state, exact, scale, got.weight, got.records)

    def _select(self, r: int) -> tuple[int, list[str]]:
        """(how many children may be asked this round, the ones this round asks)."""
        infos = self.transport.children(self.path)
        sizes = {c.path: c.train_tokens for c in infos}
        sample = self.settings.sample
        pool = eligible({c.path: c.resources for c in infos}, sample, self.benched_until, r)
        dp = self.settings.dp
        chosen = select_children(
            pool,
            [sizes[path] for path in pool],
            sample,
            seed=self.ctx.seed,
            path=self.path,
            round_index=r,
            # Under DP a draw that every node can recompute from the config seed justifies no
            # amplification by subsampling; seeded_noise keeps the seeded draw for simulation.
            secure=dp.enabled and not dp.seeded_noise,
        )
        return len(pool), chosen

    def _send(
        self, chosen: list[str], state: State, r: int, global_round: int
    ) -> tuple[dict[str, TrainTask], dict[str, TrainTask]]:
        """The tasks of `chosen` as they cross the links, and as the children decode them."""
        sent, seen = self.links.send(self._tasks(chosen, state, r, global_round))
        if self.signer is not None:
            sent, seen = sign_tasks(self.signer, sent, seen, self.chain)
        return sent, seen

    def _tasks(
        self, chosen: list[str], state: State, r: int, global_round: int
    ) -> dict[str, TrainTask]:
        return {
            child: TrainTask(
                self.ctx.run_id,
                r,
                global_round,
                self.path,
                child,
                secrets.token_hex(8),
                self.keys.state_for(child, state),
                self._routed_to(child),
            )
            for child in chosen
        }

    def _settle(self, got: Collected, chosen: list[str], r: int, global_round: int) -> list[str]:
        """Record who dropped out, bench stragglers, and decide whether the round counts."""
        for dropout in [*got.dropouts, *self.transport.dropouts()]:
            got.records.append(incident_row(global_round, self.path, dropout))
            kind = got.records[-1]["kind"]
            self._audit(kind, global_round, sender=dropout.path, reason=dropout.reason)
        # Every incident is audited; the metrics keep as many as the parent accepts.
        got.records = trim_incidents(got.records, self.path, INCIDENTS_PER_CHILD * len(chosen))
        sample = self.settings.sample
        misses, benched_until = self.misses, self.benched_until
        benched = update_stragglers(chosen, got.answered, misses, benched_until, sample, r)
        if got.status == "ok" and len(got.answered) < self.settings.min_replies:
            got.status = "too_few_replies"
        return benched

    def _finalize(
        self,
        state: State,
        got: Collected,
        key_round: KeyLayerRound | None,
        rounds: tuple[int, int],
    ) -> tuple[State, State, float] | None:
        """The new model, and what goes up (the model times `scale`): the rule's result, K_p,
        then the server optimizer's step from the model sent. None, with nothing committed,
        when the rule's result is not finite."""
        exact, scale = got.aggregation.result()
        got.records.extend(
            self.rule.finish_round(got.aggregation, rounds[1], rounds[0], self._audit)
        )
        if scale != 1.0 and not wider_than(exact, state):
            # A float32 sum (sum_dtype) becomes the new model in place: no third copy. What
            # goes up is then the mean with scale 1 and the same weight, the same FedAvg sum
            # up to float32 rounding (a float32 sum has no exactness to keep).
            exact, scale = {k: v.div_(scale) for k, v in exact.items()}, 1.0
        # Keys no child sent (the root's K under WorldLM) keep their current value. Each
        # tensor is divided and cast on its own: a whole float64 mean would be 2 more copies.
        buffers = ChunkBuffers()
        model = {**state, **{k: mean_like(v, scale, state[k], buffers) for k, v in exact.items()}}
        if not all(bool(torch.isfinite(model[k]).all()) for k in exact):
            return None
        self.residuals.update(got.residuals)
        self.keys.finish(model, key_round)
        if not self.optimizer.is_identity:  # `state` is what was sent, K_p included
            model.update(self.optimizer.step(state, model, self._optimized_keys(exact)))
            self.keys.adopt(model)
            exact, scale = {k: model[k] for k in exact}, 1.0
        if self.router is not None and len(self.residuals) > 1:
            self.routes = route(self.residuals, top_k=self.router.top_k, tau=self.router.tau)
        return cast_like(model, state), exact, scale

    def _optimized_keys(self, exact: State) -> list[str]:
        """The keys the server optimizer steps on: what the round combined, less WorldLM's key
        layers unless `server_optimizer.key_layers` asks for them too."""
        personal = set(self.keys.names)
        keys = [k for k in exact if k not in personal]
        if self.settings.server_optimizer.key_layers:
            keys += sorted(personal)
        return keys

    def _collect_plain(
        self,
        sent: dict[str, TrainTask],
        seen: dict[str, TrainTask],
        state: State,
        aggregation: RoundAggregation,
        key_round: KeyLayerRound | None,
        rounds: tuple[int, int],
    ) -> Collected:
        """A plain round: validate each reply as it arrives and fold it into `aggregation`.
        `sent` are the tasks as they cross the links, `seen` as the children decode them."""
        del state  # each reply is checked against the model its own child was sent
        got = Collected(aggregation)
        reference_norms: dict[int, dict[str, float]] = {}
        buffers = ChunkBuffers()  # this round's: a round may run beside another's thread
        got.traffic["bytes_down"] = sum(tensor_bytes(t) for t in sent.values())
        for reply in self.transport.train(list(sent.values())):
            # Compact bytes, as they crossed the link; refused replies crossed it too.
            got.traffic["bytes_up"] += tensor_bytes(reply)
            scratch = (reference_norms, buffers)
            self._take(reply, seen, got, scratch, key_round, rounds)
            # Let the reply go before the transport produces the next one: the loop variable
            # would otherwise keep it alive beside its successor (one more model copy).
            del reply
        return got

    def _take(
        self,
        reply: Update,
        seen: dict[str, TrainTask],
        got: Collected,
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
            if is_abstention(update, seen, got.answered | got.abstained):
                # An inner aggregator whose own round had no valid replies trained nothing:
                # not a reply to fold or count, but its rows (why its children dropped) stand.
                check_records(update.sender, update.records, self.record_limits.get(update.sender))
                got.abstained.add(update.sender)
                got.records.extend(update.records)
                reason = "its own round had no valid replies: it trained nothing"
                got.dropouts.append(Dropout(update.sender, reason))
                return
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
                weight_bounds=self.weight_bounds,
            )
            check_records(update.sender, update.records, self.record_limits.get(update.sender))
            # DP clips here; a change whose norm overflows is refused like any bad reply.
            clipped = got.aggregation.add(update)
        except UpdateRejected as exc:
            got.records.append(rejection_row(global_round, self.path, exc))
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
            clip_factor=None if clipped is None else clipped[1],
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
        sent: dict[str, TrainTask],
        seen: dict[str, TrainTask],
        state: State,
        aggregation: RoundAggregation,
        key_round: KeyLayerRound | None,
        rounds: tuple[int, int],
    ) -> Collected:
        """A secure round: only the sum of the children's changes arrives (secure_round).
        Its links are never compressed (policy), so `sent` are the tasks themselves."""
        del seen, key_round  # secure aggregation refuses key attention at build
        r, global_round = rounds
        out = run_secure_round(
            self.transport,
            sent,
            state,
            self.settings.secure_aggregation,
            dp_clip=self.rule.secure_clip(aggregation),
            graph_seed=derive_seed(self.ctx.seed, self.path, r, "secagg"),
            weight_bounds=self.weight_bounds,
            record_limits=self.record_limits,
        )
        aggregation, max_error = self.rule.secure_fold(aggregation, state, out)
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
            # bound on |aggregate - exact mean| per value, before any server optimizer's step
            "secagg_max_error": None if out.changes is None else max_error,
        }
        if out.reason is not None:
            got.row["reason"] = out.reason
        return got

    def _aggregate_record(
        self,
        global_round: int,
        local_round: int,
        chosen: list[str],
        got: Collected | None,
        started: float,
        benched: list[str],
    ) -> Record:
        return aggregate_row(self.path, (global_round, local_round), chosen, got, started, benched)

    def _out_of_budget(
        self, state: State, global_round: int, r: int, started: float
    ) -> RoundOutcome:
        """A round not run because it would take ε above the budget: nothing changes."""
        self.privacy_exhausted = True
        row = self._aggregate_record(global_round, r, [], None, started, [])
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

    def _routed_to(self, child: str) -> tuple[RoutedResidual, ...]:
        return tuple(
            RoutedResidual(source, weight, self.residuals[source])
            for source, weight in self.routes.get(child, [])
        )

    def handle_eval(self, task: EvalTask) -> EvalReport:
        """Every child (not a sample) evaluates the model it would deploy, or, for a task that
        is not `deployed`, the model it was sent, with no key layers of this level on top."""
        state = self.keys.own(task.state) if task.deployed else task.state
        tasks = [
            EvalTask(
                self.ctx.run_id,
                task.global_round,
                self.path,
                c.path,
                secrets.token_hex(8),
                self.keys.state_for(c.path, state) if task.deployed else state,
                task.deployed,
            )
            for c in self.transport.children(self.path)
        ]
        if self.signer is not None:  # on the chain this task came with (security.downlink)
            tasks = sign_eval_tasks(self.signer, tasks, task.signatures)

        def refused(exc: UpdateRejected) -> None:
            # Its results are left out of the table; the other children's still count.
            log.warning("%s refused an evaluation report: %s", self.path, exc)
            self._audit("eval_rejected", task.global_round, sender=exc.sender, reason=exc.reason)

        reports = self.transport.evaluate(tasks)
        results = accepted_results(reports, tasks, self.eval_owners, self.eval_max_tokens, refused)
        # Children that refused the task (its provenance did not verify) or dropped out: said
        # here, with this evaluation's round, rather than in the next training round's rows.
        for dropout in self.transport.dropouts():
            log.warning(
                "%s: %s left out of the evaluation: %s", self.path, dropout.path, dropout.reason
            )
            self._audit(
                "eval_dropped", task.global_round, sender=dropout.path, reason=dropout.reason
            )
        return EvalReport(self.path, task.nonce, results)

    # --- checkpointing (federation/aggregator_checkpoint.py) --------------------------------
    def snapshot(self) -> tuple[State, dict[str, Any]]:
        return aggregator_snapshot(self)

    def restore(self, tensors: State, meta: dict[str, Any]) -> None:
        aggregator_restore(self, tensors, meta)
