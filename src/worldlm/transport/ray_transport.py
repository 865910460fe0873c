"""The Ray backend: leaves train in parallel in Ray actors; aggregators stay in this process.

`worldlm run CONFIG --backend ray` runs the unchanged round engine (`Aggregator`) in the
driver; only the leaf side of the transport is remote. The leaves are dealt round-robin, in
sorted path order, to min(#leaves, CPUs) actors (`ray_worker.LeafWorker`), each with one CPU
and one intra-op thread, on a local Ray instance with every core of this machine or on an
existing cluster (`run.ray_address`). An actor runs one call at a time, in the order the driver
submitted them, so its leaves share one model workspace as in-process leaves do.
With `run.leaf_ranks` = N > 1 each leaf has N actors of its own instead, which train it
together as one process group (`ray_ranks`).

Calls. The messages for one actor go in batches (up to `max_batch`, 16, consecutive messages
per call; for train tasks at most `batch_bytes`, 256 MiB, of models per batch), so a round
costs a few round trips through Ray per actor instead of one per leaf; weights cross the
object store as NumPy byte arrays, which Ray maps without pickling (`ray_codec`).

Determinism and memory. `train` keeps `calls_per_actor` (2) calls per actor in flight, so leaves
on different actors train in parallel and an actor starts its next batch as soon as it
finishes one, and yields the replies in task order (`ray.get` on the batch of the next task).
A reply that finishes early waits in Ray's object store, not in the aggregator's memory, and
the window bounds how many wait: 2 batches per actor, whatever the number of leaves
(submitting all of a round's tasks at once let up to every reply pile up in the store). The
aggregator holds one update at a time and folds the updates in the same order as
the in-process transport, so its floating-point sums, and the final models, are bit-identical
to an in-process run on CPU (each leaf trains the same code on the same seeds; see
docs/design-notes.md for the one caveat, intra-op threads). `evaluate` and `exchange` (secure
aggregation) work the same way.

A task whose recipient is an aggregator is answered here, in process; that aggregator's round
calls the transport again for its own children. Sibling sub-federations therefore run one after
the other, each spreading its own leaves over the actors.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from types import ModuleType
from typing import Any

import torch

from worldlm.config import RunConfig
from worldlm.core.inprocess import InProcessTransport
from worldlm.core.leaf_data import LeafData
from worldlm.core.messages import EvalReport, EvalTask, State, TrainTask, Update, tensor_bytes
from worldlm.core.secure_messages import SecureMessage, SecureReply
from worldlm.core.transport import ChildInfo
from worldlm.data.prepare import PreparedData
from worldlm.errors import ConfigError, TransportError, WorldLMError
from worldlm.federation.build import Federation, build_federation, children_of
from worldlm.federation.context import Observer, RunContext
from worldlm.federation.methods import MethodPlan
from worldlm.transport.ray_codec import pack_state, unpack_reply, unpack_state
from worldlm.transport.ray_worker import LeafWorker

# How long a stopping worker may take to delete its leaves' state before it is killed.
CLOSE_TIMEOUT_S = 60.0


def import_ray() -> ModuleType:
    """The `ray` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "run.backend = 'ray' needs Ray, an optional extra: pip install 'worldlm[ray]'"
        ) from None
    return ray


def fetch(path: str, ref: Any) -> Any:
    """The result of a call on the actor hosting `path`; a worldlm error raised there is raised
    here as itself."""
    ray = import_ray()
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, WorldLMError):
            raise exc.cause from None
        raise
    except ray.exceptions.RayActorError as exc:
        raise TransportError(
            f"the Ray worker hosting {path} stopped ({type(exc).__name__}); continue from the "
            "last checkpoint with: worldlm run --resume RUN_DIR"
        ) from None


class ModelRefs:
    """The models a round's messages carry, each packed and put into Ray's object store once
    however many tasks carry it (by identity: a round sends one model object to many)."""

    def __init__(self) -> None:
        self._refs: dict[int, Any] = {}
        self._kept: list[State] = []  # alive until the round ends, so no id is reused

    def ref(self, state: State) -> Any:
        if id(state) not in self._refs:
            self._refs[id(state)] = import_ray().put(pack_state(state))
            self._kept.append(state)
        return self._refs[id(state)]


def submit_batch(actor: Any, method: str, messages: Sequence[Any], models: ModelRefs) -> Any:
    """Start `method` on `actor` for each of `messages` (all for leaves it hosts), in one call;
    the object ref of the list of their answers (`ray_codec.answer_batch`)."""
    calls: list[tuple[Any, int | None]] = []
    refs: list[Any] = []
    index_of: dict[int, int] = {}
    for message in messages:
        if not isinstance(message, TrainTask | EvalTask):
            calls.append((message, None))
            continue
        if id(message.state) not in index_of:
            index_of[id(message.state)] = len(refs)
            refs.append(models.ref(message.state))
        calls.append((replace(message, state={}), index_of[id(message.state)]))
    # The packed models go as arguments of their own: Ray hands an actor the values of
    # top-level object refs (mapped from shared memory), not of refs inside a list.
    return actor.answer.remote(method, calls, *refs)


class RemoteLeaf:
    """A leaf living in a Ray actor, as the driver sees it: the tasks, checkpoints and final
    models the run asks of a leaf, forwarded to its actor."""

    def __init__(self, path: str, data: LeafData, actor: Any) -> None:
        self.path = path
        self.data = data  # the driver tokenized it; the actor holds a copy of its own
        self.actor = actor

    def info(self) -> ChildInfo:
        return ChildInfo(self.path, self.data.train_tokens)

    def _one(self, method: str, message: Any) -> Any:
        (answer,) = fetch(self.path, submit_batch(self.actor, method, [message], ModelRefs()))
        return unpack_reply(answer)

    def handle_train(self, task: TrainTask) -> Update:
        update: Update = self._one("handle_train", task)
        return update

    def handle_eval(self, task: EvalTask) -> EvalReport:
        report: EvalReport = self._one("handle_eval", task)
        return report

    def handle_secure(self, message: SecureMessage) -> SecureReply:
        reply: SecureReply = self._one("handle_secure", message)
        return reply

    def _kept(self) -> tuple[State, State]:
        own, adapted = fetch(self.path, self.actor.kept_state.remote(self.path))
        return unpack_state(own), unpack_state(adapted)

    @property
    def own_state(self) -> State:
        return self._kept()[0]

    @property
    def adapted_state(self) -> State:
        return self._kept()[1]

    def deployed_state(self, incoming: State) -> State:
        """As `Leaf.deployed_state`: the incoming model, its personal and adapted weights on top."""
        own, adapted = self._kept()
        return {**incoming, **own, **adapted}

    @property
    def state_version(self) -> int:
        version: int = fetch(self.path, self.actor.state_version.remote(self.path))
        return version

    def snapshot(self) -> tuple[State, dict[str, Any]]:
        tensors, meta = fetch(self.path, self.actor.snapshot.remote(self.path))
        return unpack_state(tensors), meta

    def restore(self, tensors: State, meta: dict[str, Any]) -> None:
        fetch(self.path, self.actor.restore.remote(self.path, pack_state(tensors), meta))


class RayTransport(InProcessTransport):
    """The in-process transport, except that tasks for a `RemoteLeaf` go to its actor, in
    batches of up to `max_batch` messages per call and `calls_per_actor` calls per actor at a
    time, the replies yielded in task order."""

    def __init__(
        self,
        children: Mapping[str, Sequence[str]],
        observer: Observer,
        calls_per_actor: int = 2,
        max_batch: int = 16,
        batch_bytes: int = 256 << 20,
    ) -> None:
        super().__init__(children)
        self.observer = observer
        # Calls in flight per actor: 1 would leave an actor idle while the driver fetches and
        # folds its reply; more lets replies pile up in the object store.
        self.calls_per_actor = calls_per_actor
        # Messages per call: one round trip through Ray for several leaves. A batch's replies
        # wait in the object store together, so a train batch holds at most `batch_bytes` of
        # models (one message per call for a model that large).
        self.max_batch = max_batch
        self.batch_bytes = batch_bytes

    def train(self, tasks: Sequence[TrainTask]) -> Iterator[Update]:
        for update in self._answer(tasks, "handle_train"):
            self._report(update)
            yield update

    def evaluate(self, tasks: Sequence[EvalTask]) -> Iterator[EvalReport]:
        yield from self._answer(tasks, "handle_eval")

    def exchange(self, messages: Sequence[SecureMessage]) -> Iterator[SecureReply]:
        yield from self._answer(messages, "handle_secure")

    def _batch_size(self, messages: Sequence[Any], method: str) -> int:
        if method != "handle_train":
            return self.max_batch
        model = max((tensor_bytes(m) for m in messages), default=0)
        return max(1, min(self.max_batch, self.batch_bytes // max(1, model)))

    def _answer(self, messages: Sequence[Any], method: str) -> Iterator[Any]:
        remote = {
            i: handler
            for i, message in enumerate(messages)
            if isinstance(handler := self.handler(message.recipient), RemoteLeaf)
        }
        batches = actor_batches(
            [(i, handler.actor) for i, handler in remote.items()],
            self._batch_size(messages, method),
        )
        batch_of = {i: b for b, (indices, _) in enumerate(batches) for i in indices}
        actors = len({id(actor) for _, actor in batches})
        window = max(1, self.calls_per_actor * actors)
        models = ModelRefs()  # the models sent, in the object store until the last call
        pending: dict[int, Any] = {}  # batch index -> object ref of its answers
        taken: dict[int, list[Any]] = {}  # batch index -> its answers not yet yielded
        submitted = 0
        for i, message in enumerate(messages):
            if i not in batch_of:
                yield getattr(self.handler(message.recipient), method)(message)
                continue
            b = batch_of[i]
            # Top the window up (a batch being taken still holds its place); always far enough
            # to include the batch waited for next.
            while submitted < len(batches) and (
                len(pending) + len(taken) < window or submitted <= b
            ):
                indices, actor = batches[submitted]
                batch = [messages[j] for j in indices]
                pending[submitted] = submit_batch(actor, method, batch, models)
                submitted += 1
            if b not in taken:
                taken[b] = list(fetch(message.recipient, pending.pop(b)))
            answer = taken[b].pop(0)
            if not taken[b]:
                del taken[b]
            yield unpack_reply(answer)

    def _report(self, update: Update) -> None:
        """A remote leaf's progress, as one step when its reply is taken."""
        for row in update.records:
            if row.get("kind") == "train":
                self.observer.leaf_started(row["node"], row["steps"])
                self.observer.leaf_step(row["node"], row["steps"], row["loss"])


def actor_batches(remote: Sequence[tuple[int, Any]], size: int) -> list[tuple[list[int], Any]]:
    """The messages at `remote` (index, actor), in index order, cut into batches of up to
    `size` consecutive messages of one actor; batches in the order of their first message."""
    open_batch: dict[int, tuple[list[int], Any]] = {}
    batches: list[tuple[list[int], Any]] = []
    for index, actor in remote:
        current = open_batch.get(id(actor))
        if current is None or len(current[0]) >= size:
            current = ([], actor)
            open_batch[id(actor)] = current
            batches.append(current)
        current[0].append(index)
    return batches


def start_ray(address: str | None) -> bool:
    """Connect to the cluster at `address`, or start a local Ray instance with every core;
    False when this process was already connected (a test, a notebook), which then owns it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True


def start_leaf_workers(
    config: RunConfig,
    run_id: str,
    vocab_size: int,
    leaf_data: Mapping[str, LeafData],
    paths: Mapping[str, str],
) -> tuple[dict[str, RemoteLeaf], Callable[[], None]]:
    """Actors hosting the leaves at `paths` (leaf path -> data name), one per CPU at most
    (with run.leaf_ranks = N > 1: N actors per leaf, one process group each, `ray_ranks`),
    and a function that stops them (and Ray, if this call started it)."""
    started = start_ray(config.run.ray_address)
    ray = import_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    order = sorted(paths)
    ranks = config.run.leaf_ranks
    worker_class = ray.remote(num_cpus=1)(LeafWorker)
    actors: list[Any] = []
    if ranks > 1 and len(order) * ranks > cpus:
        if started:
            ray.shutdown()
        raise ConfigError(
            f"run.leaf_ranks = {ranks}: {len(order)} leaves on {ranks} processes each need "
            f"{len(order) * ranks} CPUs; the Ray cluster has {cpus}"
        )
    if ranks > 1:  # each leaf its own actors, one per rank (a process joins one group)
        count = len(order)
        groups = [
            [
                worker_class.remote(config, run_id, vocab_size, {name: leaf_data[name]}, 1)
                for _ in range(ranks)
            ]
            for name in (paths[p] for p in order)
        ]
        actors = [group[0] for group in groups]
        everyone = [actor for group in groups for actor in group]
    else:
        count = min(len(order), cpus)
        for k in range(count):
            mine = {paths[p]: leaf_data[paths[p]] for p in order[k::count]}
            actors.append(worker_class.remote(config, run_id, vocab_size, mine, 1))
        everyone = actors

    def stop() -> None:
        # Each worker deletes its leaves' state first (ray.kill runs no exit handlers); one
        # that is gone or stuck is killed all the same, and so is every one if this is
        # interrupted.
        try:
            closing = [actor.close.remote() for actor in everyone]
            with contextlib.suppress(Exception):
                ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
        finally:
            for actor in everyone:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
            everyone.clear()
            if started and ray.is_initialized():
                ray.shutdown()

    try:
        # Wait until every worker has built its leaves, so that an error there shows now.
        for k, actor in enumerate(actors):
            fetch(order[k], actor.paths.remote())
        if ranks > 1:
            for path, group in zip(order, groups, strict=True):
                for actor in group[1:]:  # the other ranks built it too
                    fetch(path, actor.paths.remote())
                join_group(path, group)
    except BaseException:
        stop()
        raise
    leaves = {p: RemoteLeaf(p, leaf_data[paths[p]], actors[i % count]) for i, p in enumerate(order)}
    return leaves, stop


def join_group(path: str, group: Sequence[Any]) -> None:
    """Make the actors of `group` (rank 0 first) one process group training `path`'s leaf."""
    address = fetch(path, group[0].group_address.remote())
    joining = [
        actor.join_ranks.remote(address, rank, len(group), list(group[1:]) if rank == 0 else [])
        for rank, actor in enumerate(group)
    ]
    ray = import_ray()
    while joining:  # all at once: each waits in the rendezvous; the first error ends it
        done, joining = ray.wait(joining, num_returns=1)
        fetch(path, done[0])


def ray_federation(
    config: RunConfig,
    plan: MethodPlan,
    data: PreparedData,
    workspace: torch.nn.Module,
    ctx: RunContext,
) -> Federation:
    """The aggregators of `plan` in this process, its leaves in Ray actors; `Federation.close`
    stops the actors."""
    transport = RayTransport(children_of(plan.tree), ctx.observer)
    fed = build_federation(
        plan,
        {},  # no leaf here: partial leaves out every leaf without data in this process
        workspace=workspace,
        config=config,
        ctx=ctx,
        partial=True,
        transport=transport,
    )
    paths = {leaf.path: leaf.name for leaf in plan.tree.leaves()}
    vocab_size = data.tokenizer.get_vocab_size()
    leaves, stop = start_leaf_workers(config, ctx.run_id, vocab_size, data.leaves, paths)
    for leaf in leaves.values():
        transport.register(leaf)
    fed.leaves.update(leaves)
    fed.closers.append(stop)
    fed.versions = lambda: leaf_versions(leaves)
    return fed


def leaf_versions(leaves: Mapping[str, RemoteLeaf]) -> dict[str, int]:
    """The state_version of every remote leaf, from one call per actor."""
    actors = {id(leaf.actor): leaf for leaf in leaves.values()}
    refs = [(leaf.path, leaf.actor.state_versions.remote()) for leaf in actors.values()]
    versions: dict[str, int] = {}
    for path, ref in refs:
        versions.update(fetch(path, ref))
    return {path: versions[path] for path in leaves}
