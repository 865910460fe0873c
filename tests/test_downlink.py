"""Integrity of what comes down the tree (TESTPLAN 21, issue 19): the root signs each train
task, inner aggregators sign what they forward, and a child refuses a model or config that an
inner aggregator altered, naming who altered what. Shown both in the verifier alone and over
gRPC with mutual TLS, where a tampering sub-federation's leaves refuse to train and the round
goes on; without the check they train on the tampered model."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from worldlm.core.messages import TrainTask, Update
from worldlm.progress import QuietProgress
from worldlm.security.certs import create_ca, issue_node_cert, safe_name
from worldlm.security.downlink import (
    DownlinkRefused,
    DownlinkSigner,
    DownlinkVerifier,
    TaskFacts,
    tensor_digests,
)
from worldlm.session import open_session

from .conftest import TWO_LEVEL, tiny_config
from .test_grpc_transport import over_grpc

ROOT, MED, SOFT, LEAF = "world", "world/med", "world/soft", "world/med/a"
MODEL = {"embed": torch.arange(6.0), "block.k": torch.ones(3)}
KEYS = frozenset({"block.k"})


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return node_keys(tmp_path_factory.mktemp("pki"), (ROOT, MED, SOFT, LEAF))


Keys = dict[str, tuple[bytes, bytes, bytes]]


def node_keys(pki: Path, paths: tuple[str, ...]) -> Keys:
    """(ca, cert, key) PEM per node of `paths`, from one CA made in `pki`."""
    create_ca(pki)
    out = {}
    for path in paths:
        issue_node_cert(pki, path, pki)
        name = safe_name(path)
        out[path] = tuple((pki / f).read_bytes() for f in ("ca.pem", f"{name}.pem", f"{name}.key"))
    return out  # type: ignore[return-value]


def _signer(keys: dict[str, tuple[bytes, bytes, bytes]], path: str, digest: str = "cfg"):  # type: ignore[no-untyped-def]
    _, cert, key = keys[path]
    return DownlinkSigner(path, key, cert, digest)


def _chain(keys, med_state, *, med_as: str = MED, root_round: int = 3):  # type: ignore[no-untyped-def]
    root_facts = TaskFacts("run", root_round, root_round - 1, MED, "n-root")
    chain = _signer(keys, ROOT).sign(root_facts, tensor_digests(MODEL), ())
    facts = TaskFacts("run", 3, 0, LEAF, "n-leaf")
    return _signer(keys, med_as).sign(facts, tensor_digests(med_state), chain)


def _verify(keys, state, chain, *, allowed=KEYS, digest: str = "cfg") -> None:  # type: ignore[no-untyped-def]
    verifier = DownlinkVerifier(LEAF, keys[LEAF][0], digest, {(MED, LEAF): allowed})
    verifier.verify(TaskFacts("run", 3, 0, LEAF, "n-leaf"), state, chain)


def test_the_root_model_forwarded_as_sent_verifies(keys) -> None:  # type: ignore[no-untyped-def]
    _verify(keys, MODEL, _chain(keys, MODEL))


def test_a_sub_federation_may_put_its_own_key_layers_in(keys) -> None:  # type: ignore[no-untyped-def]
    with_own_k = {**MODEL, "block.k": torch.full((3,), 2.0)}
    _verify(keys, with_own_k, _chain(keys, with_own_k))


Case = Callable[[dict[str, tuple[bytes, bytes, bytes]]], tuple[dict[str, torch.Tensor], tuple]]


@pytest.mark.parametrize(
    ("case", "named"),
    [
        (  # the inner aggregator alters the backbone and signs what it altered
            lambda k: (
                (s := {**MODEL, "embed": MODEL["embed"] + 1}),
                _chain(k, s),
            ),
            "world/med altered 1 tensors it may not change (e.g. embed)",
        ),
        (  # the weights are altered after the parent signed them
            lambda k: ({**MODEL, "block.k": torch.zeros(3)}, _chain(k, MODEL)),
            "differ from what the parent signed",
        ),
        (  # a sibling aggregator's certificate poses as the parent
            lambda k: (MODEL, _chain(k, MODEL, med_as=SOFT)),
            "expected 'world/med', but the certificate is for 'world/soft'",
        ),
        (  # an old root statement replayed under a new round
            lambda k: (MODEL, _chain(k, MODEL, root_round=2)),
            "has global_round 2, expected 3",
        ),
        (  # the root's statement dropped: the parent signs alone
            lambda k: (MODEL, _chain(k, MODEL)[1:]),
            "carries 1 signed statements; 2 are needed",
        ),
        (  # a statement whose signature does not match its text
            lambda k: (
                MODEL,
                (
                    (c := _chain(k, MODEL))[0],
                    replace(c[1], statement=c[1].statement.replace("n-leaf", "n-lea2")),
                ),
            ),
            "signature on world/med's statement does not verify",
        ),
    ],
    ids=[
        "inner-alters-backbone",
        "altered-after-signing",
        "sibling-signs",
        "replayed-root",
        "root-dropped",
        "forged-text",
    ],
)
def test_a_chain_that_does_not_prove_the_weights_is_refused(  # type: ignore[no-untyped-def]
    keys, case: Case, named: str
) -> None:
    state, chain = case(keys)
    with pytest.raises(DownlinkRefused, match=named.replace("(", r"\(").replace(")", r"\)")):
        _verify(keys, state, chain)


def test_another_config_is_refused(keys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DownlinkRefused, match="has config_digest 'cfg', expected 'other'"):
        _verify(keys, MODEL, _chain(keys, MODEL), digest="other")


# --- over gRPC with mutual TLS ---------------------------------------------------------------

TAMPERED = "model.embed_tokens.weight"


def _received(tmp_path: Path, signed: bool) -> dict[str, list[float]]:
    """One hierfavg root round over gRPC in which world/med adds 1.0 to the embeddings it
    forwards (and signs them as its own): what each leaf was given to train, by leaf."""
    config = tiny_config(tmp_path, TWO_LEVEL, ["run.method=hierfavg", "train.local_steps=1"])
    session = open_session(config, QuietProgress(), tmp_path / "run")
    fed = session.fed
    med = fed.aggregators[MED]
    send = med.links.send

    def tampering(tasks: dict[str, TrainTask]):  # type: ignore[no-untyped-def]
        altered = {
            c: replace(t, state={**t.state, TAMPERED: t.state[TAMPERED] + 1.0})
            for c, t in tasks.items()
        }
        return send(altered)

    med.links.send = tampering  # type: ignore[method-assign]
    received: dict[str, list[float]] = {}
    for path, leaf in fed.leaves.items():
        train = leaf.handle_train

        def record(task: TrainTask, path: str = path, train=train) -> Update:  # type: ignore[no-untyped-def]
            received.setdefault(path, []).append(float(task.state[TAMPERED].sum()))
            return train(task)

        leaf.handle_train = record  # type: ignore[method-assign]
    honest = float(fed.root.state[TAMPERED].sum())
    with over_grpc(session, tmp_path / "pki", signed=signed):
        started = time.monotonic()
        outcome = fed.root.run_round(fed.root.state, 1)
        took = time.monotonic() - started
    received["honest"] = [honest]
    received["status"] = [float(outcome.records[-1]["status"] == "ok")]
    received["seconds"] = [took]
    received["dropped"] = [  # world/med's rows reach the root with its reply
        float("altered 1 tensors it may not change" in r["reason"])
        for r in outcome.records
        if r["kind"] == "dropped" and r["node"] == MED
    ]
    return received


def test_leaves_refuse_a_model_their_sub_federation_altered_and_the_round_goes_on(
    tmp_path: Path,
) -> None:
    got = _received(tmp_path, signed=True)
    assert "world/med/a" not in got and "world/med/b" not in got  # refused: nothing trained
    assert got["world/soft/c"] == got["honest"] and got["world/soft/d"] == got["honest"]
    assert got["status"] == [1.0]  # the root's round went on with world/soft
    # The leaves said why, so their parent did not wait for its 120-second timeout.
    assert got["dropped"] == [1.0, 1.0] and got["seconds"][0] < 60


def test_without_signatures_the_leaves_train_on_the_altered_model(tmp_path: Path) -> None:
    got = _received(tmp_path, signed=False)
    # +1.0 on every embedding weight reached both of world/med's leaves (the sum moves by
    # the embedding's size); world/soft's got the root's model.
    assert got["world/med/a"][0] - got["honest"][0] > 1000
    assert got["world/med/b"] == got["world/med/a"]
    assert got["world/soft/c"] == got["honest"]
