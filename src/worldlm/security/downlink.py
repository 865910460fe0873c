"""Integrity of what comes down the tree (TESTPLAN §21, issue 19): the root signs each train
and evaluation task it sends, every inner aggregator signs what it forwards, and a child
verifies the chain before it trains or evaluates.

A statement names the run, the round, the recipient, the task's nonce and kind (train, or the
deployed or global evaluation), the config digest, a SHA-256 per tensor of the weights the
recipient decodes and of the residuals routed to it (`downlink_facts`); the root's names its
epoch (`replay_window`), each later one the digest of the one before it. A child checks that:

* each statement is signed by the node it names, with that node's certificate from the
  federation's CA (the key a node already holds for TLS; ECDSA P-256 with SHA-256), and the
  signers are its ancestors from the root down to its parent, each addressing the next;
* every statement is of this run, this root round, this kind of task and this config, the last
  one of this task (nonce, round, recipient) and of exactly the weights and routed residuals
  received;
* between two statements, an aggregator changed only what its role lets it change
  (`federation.downlink_policy`): in a train task a WorldLM sub-federation its key layers K, an
  aggregator with several inner rounds or a compressed link to the next node anything; in the
  deployed evaluation a WorldLM sub-federation its K; in the global evaluation nothing. Only the
  root routes residuals: a later statement that names any is an alteration;
* the task is newer than the last one it accepted (`replay_window`), unless the root's epoch
  says it restarted.

So a child can tell who produced each part of its model, and refuses a model, residuals or a
config that an inner aggregator altered, and an old statement replayed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import load_pem_x509_certificate

from worldlm.core.messages import EvalTask, RoutedResidual, SignedStatement, TrainTask
from worldlm.errors import WorldLMError, shown
from worldlm.security.certs import CertError, verify_node_cert
from worldlm.security.downlink_facts import (
    EVAL_GLOBAL,
    TRAIN,
    TaskFacts,
    routed_digests,
    task_facts,
    tensor_digests,
)
from worldlm.security.replay_window import ReplayWindow, Stamp

__all__ = [
    "DownlinkRefused",
    "DownlinkSigner",
    "DownlinkVerifier",
    "TaskFacts",
    "sign_eval_tasks",
    "sign_tasks",
    "task_facts",
    "tensor_digests",
]

State = Mapping[str, torch.Tensor]
# Per hop (signer, recipient): the tensor names the signer may change (None: any).
Allowance = Mapping[tuple[str, str], frozenset[str] | None]


class DownlinkRefused(WorldLMError):
    """A task whose signatures do not prove where its weights came from."""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(statement: SignedStatement) -> str:
    return hashlib.sha256(statement.statement.encode()).hexdigest()


class DownlinkSigner:
    """An aggregator's end: signs each task it sends on top of the chain it received."""

    def __init__(
        self, path: str, key_pem: bytes, cert_pem: bytes, config_digest: str, *, epoch: int = 0
    ) -> None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{path}: the node key is not an EC key; reissue it with worldlm certs")
        self.path, self.key, self.cert_pem, self.config_digest = path, key, cert_pem, config_digest
        # The root's session (`replay_window`): larger at each start, so that its children
        # accept the rounds a resume runs again and refuse the old statements of those rounds.
        self.epoch = epoch

    def sign(
        self,
        facts: TaskFacts,
        digests: Mapping[str, str],
        chain: Sequence[SignedStatement],
        routed: Sequence[Mapping[str, Any]] = (),
    ) -> tuple[SignedStatement, ...]:
        """`chain` (what this node was sent; empty at the root) with this node's statement
        about the task `facts` whose weights have `digests` and whose routed residuals have
        `routed` (`routed_digests`)."""
        statement = _canonical(
            {
                "signer": self.path,
                "run_id": facts.run_id,
                "epoch": None if chain else self.epoch,  # only the root's counts
                "global_round": facts.global_round,
                "round": facts.round,
                "recipient": facts.recipient,
                "nonce": facts.nonce,
                "task": facts.task,
                "config_digest": self.config_digest,
                "previous": _digest(chain[-1]) if chain else None,
                "tensors": dict(digests),
                "routed": list(routed),
            }
        )
        signature = self.key.sign(statement.encode(), ec.ECDSA(hashes.SHA256()))
        return (*chain, SignedStatement(statement, signature, self.cert_pem))


class DownlinkVerifier:
    """A child's end: refuses a task whose chain does not prove its weights' provenance."""

    def __init__(
        self,
        path: str,
        ca_pem: bytes,
        config_digest: str,
        may_change: Allowance,
        *,
        eval_may_change: Allowance | None = None,
        window: ReplayWindow | None = None,
    ) -> None:
        """`may_change` is what each hop may change in a train task, `eval_may_change` in the
        deployed evaluation (`federation.downlink_policy`); `window` remembers the newest task
        accepted (in memory unless given one kept in a file)."""
        self.path, self.ca_pem = path, ca_pem
        self.config_digest, self.may_change = config_digest, may_change
        self.eval_may_change = eval_may_change or {}
        self.window = window if window is not None else ReplayWindow()
        parts = path.split("/")
        # The root, then every aggregator down to the parent: who must have signed, in order.
        self.signers = ["/".join(parts[:i]) for i in range(1, len(parts))]

    def check(self, task: TrainTask | EvalTask) -> None:
        """`verify` a received (decoded) task, then admit it to the replay window: raises
        `DownlinkRefused` or `StaleTask` to refuse it."""
        routed = task.routed if isinstance(task, TrainTask) else ()
        stamp = self.verify(task_facts(task), task.state, task.signatures, routed)
        self.window.admit(stamp, self.path)

    def verify(
        self,
        facts: TaskFacts,
        state: State,
        chain: Sequence[SignedStatement],
        routed: Sequence[RoutedResidual] = (),
    ) -> Stamp:
        """Raise `DownlinkRefused`, naming the first problem, unless `chain` proves `state` and
        `routed`; return where the task stands (for the replay window)."""
        if len(chain) != len(self.signers):
            raise DownlinkRefused(
                f"{self.path}: the task carries {len(chain)} signed statements; "
                f"{len(self.signers)} are needed ({', '.join(self.signers)})"
            )
        previous: dict[str, Any] | None = None
        epoch = 0
        for i, (signed, signer) in enumerate(zip(chain, self.signers, strict=True)):
            recipient = self.signers[i + 1] if i + 1 < len(self.signers) else self.path
            body = self._open(signed, signer)
            if i == 0:
                epoch = self._epoch(body)
            expected = {
                "signer": signer,
                "run_id": facts.run_id,
                "global_round": facts.global_round,
                "recipient": recipient,
                "task": facts.task,
                "config_digest": self.config_digest,
                "previous": _digest(chain[i - 1]) if i else None,
            }
            for key, value in expected.items():
                if body.get(key) != value:
                    raise DownlinkRefused(
                        f"{self.path}: the statement signed by {signer} has {key} "
                        f"{shown(repr(body.get(key)))}, expected {shown(repr(value))}"
                    )
            if previous is not None:
                self._check_changes(previous["tensors"], body["tensors"], signer, recipient, facts)
                if body.get("routed") != []:  # residuals routed further down: not the root's
                    raise DownlinkRefused(
                        f"{self.path}: {signer} put routed residuals into what it forwards; "
                        "only the root routes them"
                    )
            previous = body
        assert previous is not None
        if previous.get("routed") != routed_digests(routed):
            raise DownlinkRefused(
                f"{self.path}: the residuals routed to it differ from what "
                f"{self.signers[-1]} signed"
            )
        if previous.get("nonce") != facts.nonce or previous.get("round") != facts.round:
            raise DownlinkRefused(
                f"{self.path}: the parent's signed statement is of another task (nonce or round)"
            )
        received = tensor_digests(state)
        if received != previous["tensors"]:
            altered = sorted(
                n
                for n in received.keys() | previous["tensors"].keys()
                if received.get(n) != previous["tensors"].get(n)
            )
            raise DownlinkRefused(
                f"{self.path}: the weights received differ from what the parent signed "
                f"({len(altered)} tensors, e.g. {shown(altered[0])})"
            )
        return Stamp(facts.run_id, epoch, facts.global_round, facts.round, facts.task)

    def _epoch(self, root: Mapping[str, Any]) -> int:
        """The root's epoch, from its statement (opened: its signature verifies)."""
        epoch = root.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise DownlinkRefused(
                f"{self.path}: the root's statement has epoch {shown(repr(epoch))}, "
                "not a count of its sessions"
            )
        return epoch

    def _open(self, signed: SignedStatement, signer: str) -> dict[str, Any]:
        try:
            verify_node_cert(signed.certificate, self.ca_pem, expected_path=signer)
            key = load_pem_x509_certificate(signed.certificate).public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise DownlinkRefused(f"{self.path}: {signer}'s certificate has no EC key")
            key.verify(signed.signature, signed.statement.encode(), ec.ECDSA(hashes.SHA256()))
        except CertError as exc:
            raise DownlinkRefused(
                f"{self.path}: the statement said to be {signer}'s: {exc}"
            ) from None
        except (InvalidSignature, ValueError):
            raise DownlinkRefused(
                f"{self.path}: the signature on {signer}'s statement does not verify"
            ) from None
        try:
            body = json.loads(signed.statement)
        except (ValueError, RecursionError):
            raise DownlinkRefused(f"{self.path}: {signer}'s statement is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("tensors"), dict):
            raise DownlinkRefused(f"{self.path}: {signer}'s statement names no weights")
        return body

    def _check_changes(
        self,
        before: Mapping[str, str],
        after: Mapping[str, str],
        signer: str,
        recipient: str,
        facts: TaskFacts,
    ) -> None:
        if before.keys() != after.keys():
            raise DownlinkRefused(
                f"{self.path}: {signer} forwarded other parameters than it was sent"
            )
        changed = {name for name in after if after[name] != before[name]}
        allowed = self._allowance(facts.task).get((signer, recipient), frozenset())
        if allowed is not None and not changed <= allowed:
            extra = sorted(changed - allowed)
            raise DownlinkRefused(
                f"{self.path}: {signer} altered {len(extra)} tensors it may not change "
                f"(e.g. {shown(extra[0])}) in what the root sent"
                + ("" if facts.task == TRAIN else f" for the {facts.task} evaluation")
            )

    def _allowance(self, task: str) -> Allowance:
        if task == TRAIN:
            return self.may_change
        # The global model is evaluated as the root sent it, by every leaf (no K on top).
        return {} if task == EVAL_GLOBAL else self.eval_may_change


def sign_tasks(
    signer: DownlinkSigner,
    sent: dict[str, TrainTask],
    seen: dict[str, TrainTask],
    chain: Sequence[SignedStatement],
) -> tuple[dict[str, TrainTask], dict[str, TrainTask]]:
    """`sent` (the tasks as they cross the links) and `seen` (as each child decodes them), each
    carrying `chain` and the signer's statement about the weights its child decodes."""
    digests: dict[int, dict[str, str]] = {}  # children sent the same weights share one digest
    signed_sent, signed_seen = dict(sent), dict(seen)
    for child, task in seen.items():
        key = id(task.state)
        if key not in digests:
            digests[key] = tensor_digests(task.state)
        facts = TaskFacts(task.run_id, task.global_round, task.round, child, task.nonce)
        signatures = signer.sign(facts, digests[key], chain, routed_digests(task.routed))
        signed_sent[child] = replace(sent[child], signatures=signatures)
        signed_seen[child] = replace(task, signatures=signatures)
    return signed_sent, signed_seen


def sign_eval_tasks(
    signer: DownlinkSigner, tasks: Sequence[EvalTask], chain: Sequence[SignedStatement]
) -> list[EvalTask]:
    """`tasks`, each carrying `chain` and the signer's statement about the model its child is
    to evaluate (evaluation tasks cross the links uncompressed: sent as decoded)."""
    digests: dict[int, dict[str, str]] = {}
    signed = []
    for task in tasks:
        key = id(task.state)
        if key not in digests:
            digests[key] = tensor_digests(task.state)
        signatures = signer.sign(task_facts(task), digests[key], chain)
        signed.append(replace(task, signatures=signatures))
    return signed
