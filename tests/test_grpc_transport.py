"""The round engine over real gRPC links with mutual TLS (threads in this process): the same
config gives the same checkpoint, bit for bit, as the in-process engine."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from worldlm.core.messages import EvalReport, EvalTask, TrainTask, Update
from worldlm.core.secure_messages import SecureMessage, SecureReply
from worldlm.core.transport import ChildInfo, NodeHandler
from worldlm.federation.downlink_policy import (
    downlink_allowances,
    eval_allowances,
    tasks_per_root_round,
)
from worldlm.federation.methods import plan_method
from worldlm.federation.secure_child import SecureChild
from worldlm.model.partition import key_layer_partition
from worldlm.progress import QuietProgress
from worldlm.root_loop import evaluate_tree, round_loop
from worldlm.runner import run
from worldlm.security.certs import create_ca, issue_node_cert, safe_name
from worldlm.security.downlink import DownlinkSigner, DownlinkVerifier
from worldlm.security.replay_window import ReplayWindow
from worldlm.session import Session, config_digest, open_session
from worldlm.transport.grpc import ChildLink, ParentLinkServer, TlsFiles
from worldlm.transport.grpc.child import answer_parent
from worldlm.transport.grpc.transport import GrpcTransport, RoundPolicy

from .conftest import TWO_LEVEL, tiny_config


class OneAtATime:
    """In this test every leaf shares one in-process model, so leaves take turns with it; in a
    deployment each leaf is its own process."""

    def __init__(self, handler: NodeHandler, lock: threading.Lock) -> None:
        self.handler, self.lock, self.path = handler, lock, handler.path
        self.secure_child = SecureChild(self)  # secure rounds train through handle_train

    def info(self) -> ChildInfo:
        return self.handler.info()

    def handle_train(self, task: TrainTask) -> Update:
        with self.lock:
            return self.handler.handle_train(task)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        with self.lock:
            return self.handler.handle_eval(task)

    def handle_secure(self, message: SecureMessage) -> SecureReply:
        return self.secure_child.handle(message)


@contextmanager
def over_grpc(
    session: Session, pki: Path, *, signed: bool = True, round_timeout: float = 120
) -> Iterator[dict[str, GrpcTransport]]:
    """Put every parent-child link of `session`'s federation on gRPC with mTLS; with `signed`,
    as a deployment does, every aggregator signs the train and evaluation tasks it sends and
    every child verifies the chain (and that the task is not older than the last it accepted)
    before it acts on it (`security.downlink`)."""
    create_ca(pki)
    tree, fed = session.tree, session.fed
    for node in tree.walk():
        issue_node_cert(pki, node.path, pki)

    def tls(path: str) -> TlsFiles:
        name = safe_name(path)
        return TlsFiles(pki / "ca.pem", pki / f"{name}.pem", pki / f"{name}.key")

    digest = config_digest(session.config)
    keys = key_layer_partition(session.model, session.config.worldlm.key_fraction).key_names
    plan = plan_method(session.config.run.method, tree)
    allowances, eval_allowed = downlink_allowances(plan, keys), eval_allowances(plan, keys)
    verifiers: dict[str, Callable[[TrainTask | EvalTask], None] | None] = {}
    for node in tree.walk():
        ca, cert, key = tls(node.path).read()
        if signed and not node.is_leaf:
            fed.aggregators[node.path].signer = DownlinkSigner(node.path, key, cert, digest)
        window = ReplayWindow(per_round=tasks_per_root_round(tree, node.path))
        verifier = DownlinkVerifier(
            node.path, ca, digest, allowances, eval_may_change=eval_allowed, window=window
        )
        verifiers[node.path] = verifier.check if signed else None

    lock = threading.Lock()
    transports: dict[str, GrpcTransport] = {}
    with ExitStack() as stack:
        # bottom-up, so an inner aggregator knows its subtree's tokens when it says hello
        for node in sorted(
            (n for n in tree.walk() if not n.is_leaf), key=lambda n: -n.path.count("/")
        ):
            server = ParentLinkServer(
                "127.0.0.1:0", node.path, [c.path for c in node.children], tls(node.path)
            )
            stack.callback(server.stop, 0.5)
            transports[node.path] = GrpcTransport(server, RoundPolicy(round_timeout=round_timeout))
            fed.aggregators[node.path].transport = transports[node.path]
            for child in node.children:
                handler: NodeHandler = (
                    OneAtATime(fed.leaves[child.path], lock)
                    if child.is_leaf
                    else fed.aggregators[child.path]
                )
                link = ChildLink(
                    server.address,
                    child.path,
                    tls(child.path),
                    train_tokens=handler.info().train_tokens,
                )
                link.connect_with_backoff(30)
                stack.callback(link.close)
                threading.Thread(
                    target=answer_parent,
                    args=(link, handler),
                    kwargs={"verify": verifiers[child.path]},
                    daemon=True,
                ).start()
            server.wait_for_children(timeout=30)
        yield transports
        for transport in transports.values():
            transport.stop_children()


# Server optimizers at the root and at a sub-federation: their state lives in the aggregators
# wherever those run, so the deployed tree gives the same bytes as in process.
OPTIMIZERS = [
    "nodes.world.server_optimizer.name='nesterov'",
    "nodes.world/med.server_optimizer.name='fedadam'",
]


# WorldLM with the paper's attention over K and routing between sub-federations (off by default).
ROUTING = ["worldlm.attention=true", "worldlm.lambda_route=0.5"]


@pytest.mark.parametrize(
    ("method", "extra"),
    [("hierfavg", []), ("worldlm", []), ("worldlm", ROUTING), ("hierfavg", OPTIMIZERS)],
    ids=["hierfavg", "worldlm", "worldlm-routing", "hierfavg-server-optimizers"],
)
def test_grpc_federation_equals_the_in_process_engine(
    tmp_path: Path, method: str, extra: list[str]
) -> None:
    overrides = [f"run.method='{method}'", "stop.rounds=2", *extra]
    config = tiny_config(tmp_path, TWO_LEVEL, overrides)
    reference = run(config, QuietProgress(), out=tmp_path / "in-process")

    (tmp_path / "grpc").mkdir()
    session = open_session(config, QuietProgress(), tmp_path / "grpc")
    with over_grpc(session, tmp_path / "pki") as transports:
        before = evaluate_tree(session, session.fed.root.state, 0)
        result = round_loop(session, QuietProgress(), before, first_round=1, tokens=0.0)
    assert all(not t.dropped for t in transports.values())
    final = "checkpoints/round-000002.wlm"
    assert (result.run_dir / final).read_bytes() == (reference.run_dir / final).read_bytes()
    assert {k: v.loss for k, v in result.after.items()} == {
        k: v.loss for k, v in reference.after.items()
    }
