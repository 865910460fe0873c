"""Integrity of what comes down the tree (TESTPLAN §21, issue 19): the root signs each train
task it sends, every inner aggregator signs what it forwards, and a child verifies the chain
before it trains.

A statement names the run, the round, the recipient, the task's nonce, the config digest and a
SHA-256 per tensor of the weights the recipient decodes; each statement after the root's names
the digest of the one before it. A child checks that:

* each statement is signed by the node it names, with that node's certificate from the
  federation's CA (the key a node already holds for TLS; ECDSA P-256 with SHA-256), and the
  signers are its ancestors from the root down to its parent, each addressing the next;
* every statement is of this run, this root round and this config, the last one of this task
  (nonce, round, recipient) and of exactly the weights received;
* between two statements, an aggregator changed only what its role lets it change
  (`may_change`): a WorldLM sub-federation its key layers K, an aggregator with several inner
  rounds or a compressed link to the next node anything; any other change is an alteration.

So a leaf can tell who produced each part of its model, and refuses a model or config that an
inner aggregator altered. Eval tasks and routed residuals are not signed (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import load_pem_x509_certificate

from worldlm.core.messages import SignedStatement, TrainTask
from worldlm.errors import WorldLMError, shown
from worldlm.security.certs import CertError, verify_node_cert

State = Mapping[str, torch.Tensor]
# Per hop (signer, recipient): the tensor names the signer may change (None: any).
Allowance = Mapping[tuple[str, str], frozenset[str] | None]


class DownlinkRefused(WorldLMError):
    """A task whose signatures do not prove where its weights came from."""


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


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _digest(statement: SignedStatement) -> str:
    return hashlib.sha256(statement.statement.encode()).hexdigest()


@dataclass(frozen=True)
class TaskFacts:
    """What a statement binds of one task."""

    run_id: str
    global_round: int
    round: int
    recipient: str
    nonce: str


class DownlinkSigner:
    """An aggregator's end: signs each task it sends on top of the chain it received."""

    def __init__(self, path: str, key_pem: bytes, cert_pem: bytes, config_digest: str) -> None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{path}: the node key is not an EC key; reissue it with worldlm certs")
        self.path, self.key, self.cert_pem, self.config_digest = path, key, cert_pem, config_digest

    def sign(
        self, facts: TaskFacts, digests: Mapping[str, str], chain: Sequence[SignedStatement]
    ) -> tuple[SignedStatement, ...]:
        """`chain` (what this node was sent; empty at the root) with this node's statement
        about the task `facts` whose weights have `digests`."""
        statement = _canonical(
            {
                "signer": self.path,
                "run_id": facts.run_id,
                "global_round": facts.global_round,
                "round": facts.round,
                "recipient": facts.recipient,
                "nonce": facts.nonce,
                "config_digest": self.config_digest,
                "previous": _digest(chain[-1]) if chain else None,
                "tensors": dict(digests),
            }
        )
        signature = self.key.sign(statement.encode(), ec.ECDSA(hashes.SHA256()))
        return (*chain, SignedStatement(statement, signature, self.cert_pem))


class DownlinkVerifier:
    """A child's end: refuses a task whose chain does not prove its weights' provenance."""

    def check(self, task: TrainTask) -> None:
        """`verify` for a received (decoded) train task."""
        self.verify(task_facts(task), task.state, task.signatures)

    def __init__(self, path: str, ca_pem: bytes, config_digest: str, may_change: Allowance) -> None:
        self.path, self.ca_pem = path, ca_pem
        self.config_digest, self.may_change = config_digest, may_change
        parts = path.split("/")
        # The root, then every aggregator down to the parent: who must have signed, in order.
        self.signers = ["/".join(parts[:i]) for i in range(1, len(parts))]

    def verify(self, facts: TaskFacts, state: State, chain: Sequence[SignedStatement]) -> None:
        """Raise `DownlinkRefused`, naming the first problem, unless `chain` proves `state`."""
        if len(chain) != len(self.signers):
            raise DownlinkRefused(
                f"{self.path}: the task carries {len(chain)} signed statements; "
                f"{len(self.signers)} are needed ({', '.join(self.signers)})"
            )
        previous: dict[str, Any] | None = None
        for i, (signed, signer) in enumerate(zip(chain, self.signers, strict=True)):
            recipient = self.signers[i + 1] if i + 1 < len(self.signers) else self.path
            body = self._open(signed, signer)
            expected = {
                "signer": signer,
                "run_id": facts.run_id,
                "global_round": facts.global_round,
                "recipient": recipient,
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
                self._check_changes(previous["tensors"], body["tensors"], signer, recipient)
            previous = body
        assert previous is not None
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
        self, before: Mapping[str, str], after: Mapping[str, str], signer: str, recipient: str
    ) -> None:
        if before.keys() != after.keys():
            raise DownlinkRefused(
                f"{self.path}: {signer} forwarded other parameters than it was sent"
            )
        changed = {name for name in after if after[name] != before[name]}
        allowed = self.may_change.get((signer, recipient), frozenset())
        if allowed is not None and not changed <= allowed:
            extra = sorted(changed - allowed)
            raise DownlinkRefused(
                f"{self.path}: {signer} altered {len(extra)} tensors it may not change "
                f"(e.g. {shown(extra[0])}) in what the root sent"
            )


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
        signatures = signer.sign(facts, digests[key], chain)
        signed_sent[child] = replace(sent[child], signatures=signatures)
        signed_seen[child] = replace(task, signatures=signatures)
    return signed_sent, signed_seen


def task_facts(task: TrainTask) -> TaskFacts:
    return TaskFacts(task.run_id, task.global_round, task.round, task.recipient, task.nonce)
