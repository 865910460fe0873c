"""One node of a deployment in this process: build it from the shared config and its node file,
then serve its children and/or answer its parent over gRPC.

Every process builds the same initial model from the shared config (same seed), so nothing but
task and update payloads crosses a link. The run id is the digest of the shared config, so a
node started with another config is refused by its parent.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from worldlm.audit.cli import AUDIT_FILE
from worldlm.audit.log import AuditLog
from worldlm.config import LeafDataConfig, RunConfig, dump_config
from worldlm.data.prepare import PreparedData, check_sources, choose_tokenizer
from worldlm.deploy.journal import JournaledNode, journal_keep
from worldlm.deploy.node_file import NodeFile
from worldlm.deploy.root_epoch import next_epoch
from worldlm.errors import ConfigError
from worldlm.federation.aggregator import Aggregator
from worldlm.federation.build import Federation, LeafNode
from worldlm.federation.context import AuditRelay, RunContext
from worldlm.federation.downlink_policy import (
    downlink_allowances,
    eval_allowances,
    tasks_per_root_round,
)
from worldlm.federation.methods import finetune_rounds, plan_method
from worldlm.model.partition import key_layer_partition
from worldlm.model.pretrained import pretrained_dir
from worldlm.model.workspace import build_workspace, cache_dir_of
from worldlm.outputs import RunResult
from worldlm.root_loop import continue_session, evaluate_tree, round_loop
from worldlm.security.certs import safe_name
from worldlm.security.downlink import DownlinkSigner, DownlinkVerifier
from worldlm.security.replay_window import ReplayWindow
from worldlm.session import (
    RunObserver,
    Session,
    audit_run_start,
    config_digest,
    federation_from_config,
    make_run_dir,
    open_metrics,
    prepare_config_data,
)
from worldlm.strategies.fedbuff import check_fedbuff_deployable
from worldlm.train.device import pick_device
from worldlm.transport.grpc import ChildLink, LinkTimeout, ParentLinkServer, TlsFiles
from worldlm.transport.grpc.child import answer_parent
from worldlm.transport.grpc.transport import GrpcTransport, RoundPolicy
from worldlm.tree import FederationNode, build_tree

log = logging.getLogger(__name__)
DEPLOYABLE = ("hierfavg", "worldlm")  # methods that run on the configured tree as it is
WINDOW_FILE = "downlink-window.json"  # a child's replay window, in its state directory


@dataclass
class NodeRuntime:
    config: RunConfig
    tree: FederationNode
    node: FederationNode
    fed: Federation
    data: PreparedData
    model: PreTrainedModel
    run_id: str
    audit: AuditRelay  # attached to this node's audit.sqlite once its directory is known


def with_own_files(leaf: FederationNode, paths: list[str]) -> FederationNode:
    """`leaf` reading the files its node file names instead of the shared config's source:
    the other sources and their keys are cleared (max_chars and text_field apply to files
    too, and stay)."""
    kept = {"paths", "max_chars", "text_field"}
    cleared = dict.fromkeys(set(LeafDataConfig.model_fields) - kept)
    data = leaf.data.model_copy(update={"paths": paths, **cleared})
    return FederationNode(leaf.path, leaf.leaf.model_copy(update={"data": data}))


def open_node(config: RunConfig, node_file: NodeFile, observer: RunObserver) -> NodeRuntime:
    """This process's node, built exactly as the in-process engine builds it."""
    if config.run.method not in DEPLOYABLE:
        raise ConfigError(
            f"run.method: {config.run.method!r} cannot be deployed across processes; use one of "
            f"{', '.join(DEPLOYABLE)} (a flat config with hierfavg is FedAvg)"
        )
    if config.tokenizer.path is None and config.model.path is None:
        raise ConfigError(
            "tokenizer.path: a deployment needs one tokenizer file that every node shares "
            "(no node may train it on the others' data); set tokenizer.path or model.path"
        )
    tree = build_tree(config.nodes)
    check_fedbuff_deployable(config.nodes)
    try:
        node = tree.find(node_file.node.path)
    except KeyError:
        known = ", ".join(n.path for n in tree.walk())
        raise ConfigError(
            f"node.path: {node_file.node.path!r} is not in the federation config (nodes: {known})"
        ) from None
    run_id = config_digest(config)[:16]  # of the shared config, before this node's own data
    if node.is_leaf:
        if node_file.data is not None:
            node = with_own_files(node, node_file.data.paths)
        check_sources(node)
        data = prepare_config_data(node, config, observer)
    else:
        tokenizer = choose_tokenizer(
            config.tokenizer,
            pretrained_dir(config.model, cache_dir_of(config)),
            [],
            cache_dir_of(config),
        )
        data = PreparedData(tokenizer, {}, {})
    device = pick_device(config.run.device)
    model = build_workspace(config, data.tokenizer.get_vocab_size(), device)
    audit = AuditRelay()
    fed = federation_from_config(
        config,
        plan_method(config.run.method, tree),
        data,
        model,
        RunContext(run_id, config.run.seed, device, observer, audit),
        partial=True,
    )
    return NodeRuntime(config, tree, node, fed, data, model, run_id, audit)


def tls_files(node_file: NodeFile) -> TlsFiles | None:
    tls = node_file.tls
    return None if tls is None else TlsFiles(Path(tls.ca), Path(tls.cert), Path(tls.key))


def check_tls_files(node_file: NodeFile) -> None:
    """Refuse, with a plain message, certificate files that are missing, expired, from another
    CA or for another node; plaintext is checked where the link is made (loopback only)."""
    files = tls_files(node_file)
    if files is not None:
        files.check_identity(node_file.node.path)


def downlink_integrity(
    rt: NodeRuntime, node_file: NodeFile, directory: Path
) -> DownlinkVerifier | None:
    """With TLS, an aggregator signs every train and evaluation task it sends with its node
    key, on top of the chain it was sent, and a child verifies the chain and the task's
    freshness before it acts on it (`security.downlink`); returns this child's verifier (None
    at the root). `directory` is the root's run directory (where its epoch is kept) or a
    child's state directory (where its replay window is kept, across its own restarts). Over
    plaintext, which is for loopback tests only, nothing is signed."""
    files = tls_files(node_file)
    if files is None:
        return None
    ca, cert, key = files.read()
    digest = config_digest(rt.config)
    is_root = rt.node.path == rt.tree.path
    if not rt.node.is_leaf:
        epoch = next_epoch(directory) if is_root else 0  # only the root's epoch is signed
        signer = DownlinkSigner(rt.node.path, key, cert, digest, epoch=epoch)
        rt.fed.aggregators[rt.node.path].signer = signer
    if is_root:
        return None
    plan = plan_method(rt.config.run.method, rt.tree)
    keys = key_layer_partition(rt.model, rt.config.worldlm.key_fraction).key_names
    return DownlinkVerifier(
        rt.node.path,
        ca,
        digest,
        downlink_allowances(plan, keys),
        eval_may_change=eval_allowances(plan, keys),
        window=ReplayWindow(
            directory / WINDOW_FILE, per_round=tasks_per_root_round(rt.tree, rt.node.path)
        ),
    )


def serve_children(rt: NodeRuntime, node_file: NodeFile) -> GrpcTransport:
    """Listen for this aggregator's children and wait until enough of them attached."""
    if node_file.node.listen is None:
        raise ConfigError(f"node.listen: aggregator {rt.node.path} needs an address to serve on")
    link = node_file.link
    children = [c.path for c in rt.node.children]
    server = ParentLinkServer(
        node_file.node.listen,
        rt.node.path,
        children,
        tls_files(node_file),
        allow_plaintext=node_file.allow_plaintext,
        run_id=rt.run_id,
        chunk_bytes=link.chunk_bytes,
        max_message_bytes=link.max_message_bytes,
        held_messages=link.held_messages,
    )
    wanted = link.min_children or len(children)
    if wanted > len(children):
        raise ConfigError(f"link.min_children: {wanted} is more than the {len(children)} children")
    log.info(
        "%s: waiting for %d of %d children on %s",
        rt.node.path,
        wanted,
        len(children),
        server.address,
    )
    _wait_for(server, wanted, link.wait_for_children)
    policy = RoundPolicy(
        link.round_timeout, link.max_message_bytes, ordered=True, rejoin_wait=link.rejoin_wait
    )
    transport = GrpcTransport(server, policy)
    rt.fed.aggregators[rt.node.path].transport = transport
    return transport


def _wait_for(server: ParentLinkServer, wanted: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(server.children()) < wanted:
        if time.monotonic() > deadline:
            raise LinkTimeout(
                f"{server.node_path}: only {len(server.children())} of the {wanted} children "
                f"needed attached within {timeout}s ({', '.join(sorted(server.children()))})"
            )
        time.sleep(0.05)


def run_root(
    rt: NodeRuntime,
    node_file: NodeFile,
    observer: RunObserver,
    out: Path | None,
    *,
    resume: Path | None = None,
) -> RunResult:
    """The root: serve the sub-federations, then run the rounds, evaluate and checkpoint.

    With `resume` (the root's run directory) it continues from its last checkpoint; its
    children roll back to match (see `deploy.journal`)."""
    if resume is not None:
        run_dir = resume
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"--resume {run_dir}: not a run directory (no config.toml)")
    else:
        run_dir = make_run_dir(rt.config, out)
        (run_dir / "config.toml").write_text(dump_config(rt.config), encoding="utf-8")
    downlink_integrity(rt, node_file, run_dir)
    transport = serve_children(rt, node_file)
    audit = AuditLog.open(run_dir / AUDIT_FILE, rt.run_id)
    rt.audit.attach(audit)
    method = rt.config.run.method
    try:
        session = Session(
            rt.config,
            rt.tree,
            rt.fed,
            rt.model,
            rt.data,
            run_dir,
            open_metrics(rt.config, run_dir),
            plan_method(
                method,
                rt.tree,
                finetune_rounds=finetune_rounds(method, rt.config.train, rt.config.stop),
            ).personalizes,
            audit,
        )
        if resume is not None:
            result = continue_session(session, observer)
        else:
            audit_run_start(session)
            before = evaluate_tree(session, rt.fed.root.state, 0)
            result = round_loop(session, observer, before, first_round=1, tokens=0.0)
        transport.stop_children()
        return result
    finally:
        transport.server.stop(grace=2.0)


def answer_as_child(rt: NodeRuntime, node_file: NodeFile) -> int:
    """A leaf or an inner aggregator: (serve its own children, then) answer its parent."""
    if node_file.node.parent is None:
        raise ConfigError(f"node.parent: {rt.node.path} needs its parent's host:port")
    node: LeafNode | Aggregator = (
        rt.fed.leaves[rt.node.path] if rt.node.is_leaf else rt.fed.aggregators[rt.node.path]
    )
    state_dir = Path(node_file.node.state_dir or f"{safe_name(rt.node.path)}.state")
    handler = JournaledNode(
        node,
        state_dir,
        rt.run_id,
        keep=journal_keep(rt.config.checkpoint.every, _inner_rounds_above(rt.tree, rt.node)),
    )
    if not rt.node.is_leaf:
        # An inner aggregator's own log, beside its journal. It is not cut back when the
        # node rolls back to replay a round: the replayed round's entries appear again.
        rt.audit.attach(AuditLog.open(state_dir / AUDIT_FILE, rt.run_id))
    verifier = downlink_integrity(rt, node_file, state_dir)
    transport = None if rt.node.is_leaf else serve_children(rt, node_file)
    link = ChildLink(
        node_file.node.parent,
        rt.node.path,
        tls_files(node_file),
        node_file.allow_plaintext,
        run_id=rt.run_id,
        train_tokens=handler.info().train_tokens,
        resources=node_resources(node_file.node.available, rt.fed.root.ctx.device),
        chunk_bytes=node_file.link.chunk_bytes,
        max_message_bytes=node_file.link.max_message_bytes,
    )
    try:
        link.connect_with_backoff(node_file.link.reconnect_wait)
        return answer_parent(
            link,
            handler,
            run_id=rt.run_id,
            max_message_bytes=node_file.link.max_message_bytes,
            reconnect_wait=node_file.link.reconnect_wait,
            verify=None if verifier is None else verifier.check,
        )
    finally:
        link.close()
        if transport is not None:
            transport.stop_children()
            transport.server.stop(grace=2.0)


def _inner_rounds_above(tree: FederationNode, node: FederationNode) -> list[int]:
    """`inner_rounds` of the aggregators strictly between the root and `node`."""
    parts = node.path.split("/")
    between = ["/".join(parts[:i]) for i in range(2, len(parts))]
    return [tree.find(path).aggregator.inner_rounds for path in between]


def node_resources(available: bool, device: torch.device) -> dict[str, object]:
    """What a child tells its parent when it attaches, for selection (`sample.*`)."""
    memory = (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    )
    resources: dict[str, object] = {
        "available": available,
        "cpus": os.cpu_count() or 1,
        "memory_gb": round(memory / 2**30, 1),
        "device": device.type,
    }
    if device.type == "cuda":
        resources["gpu_memory_gb"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1
        )
    return resources
