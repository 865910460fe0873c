"""Downlink integrity of evaluation tasks and routed residuals (issue 19): the root signs the model
each leaf is to evaluate (and whether it is the deployed or the global evaluation), and the
residuals it routes to a sub-federation; a child refuses what an aggregator altered. Shown in
the verifier alone and over gRPC with mutual TLS, where the evaluation of the other leaves and
the round of the other sub-federation go on; without signatures the altered model is evaluated
and the altered residuals are used."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from worldlm.core.messages import EvalReport, EvalTask, RoutedResidual, TrainTask, Update
from worldlm.monitoring import leaf_results
from worldlm.progress import QuietProgress
from worldlm.security.downlink import (
    DownlinkRefused,
    DownlinkSigner,
    DownlinkVerifier,
    TaskFacts,
    tensor_digests,
)
from worldlm.security.downlink_facts import EVAL_DEPLOYED, EVAL_GLOBAL, TRAIN, routed_digests
from worldlm.session import open_session

from .conftest import TWO_LEVEL, tiny_config
from .test_downlink import Keys, node_keys
from .test_grpc_transport import ROUTING, over_grpc

ROOT, MED, LEAF = "world", "world/med", "world/med/a"
MODEL = {"embed": torch.arange(6.0), "block.k": torch.ones(3)}
KEYS = frozenset({"block.k"})
ROUTED = (RoutedResidual("world/soft", 0.5, {"block.k": (torch.ones(3, 1), torch.ones(3, 1))}),)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return node_keys(tmp_path_factory.mktemp("pki"), (ROOT, MED, LEAF))


def _signer(keys: Keys, path: str) -> DownlinkSigner:
    _, cert, key = keys[path]
    return DownlinkSigner(path, key, cert, "cfg")


def _chain(keys: Keys, state, task: str, *, root_task: str | None = None, routed=()):  # type: ignore[no-untyped-def]
    """The root's statement to world/med about MODEL, then world/med's to the leaf about
    `state` (with `routed` residuals named in it)."""
    root_facts = TaskFacts("run", 3, 2, MED, "n-root", root_task or task)
    chain = _signer(keys, ROOT).sign(root_facts, tensor_digests(MODEL), ())
    facts = TaskFacts("run", 3, 0, LEAF, "n-leaf", task)
    return _signer(keys, MED).sign(facts, tensor_digests(state), chain, routed_digests(routed))


def _verify(keys: Keys, state, chain, task: str, routed=()):  # type: ignore[no-untyped-def]
    verifier = DownlinkVerifier(
        LEAF, keys[LEAF][0], "cfg", {(MED, LEAF): None}, eval_may_change={(MED, LEAF): KEYS}
    )
    return verifier.verify(TaskFacts("run", 3, 0, LEAF, "n-leaf", task), state, chain, routed)


WITH_OWN_K = {**MODEL, "block.k": torch.full((3,), 2.0)}


def test_the_deployed_evaluation_may_carry_the_sub_federations_key_layers(keys: Keys) -> None:
    _verify(keys, MODEL, _chain(keys, MODEL, EVAL_DEPLOYED), EVAL_DEPLOYED)
    _verify(keys, WITH_OWN_K, _chain(keys, WITH_OWN_K, EVAL_DEPLOYED), EVAL_DEPLOYED)
    _verify(keys, MODEL, _chain(keys, MODEL, EVAL_GLOBAL), EVAL_GLOBAL)


@pytest.mark.parametrize(
    ("state", "signed_as", "root_task", "task", "named"),
    [  # the backbone altered for evaluation (the train allowance here is "anything")
        (
            {**MODEL, "embed": MODEL["embed"] + 1},
            None,
            None,
            EVAL_DEPLOYED,
            "world/med altered 1 tensors it may not change (e.g. embed) in what the root sent "
            "for the eval:deployed evaluation",
        ),
        # the global model is evaluated as the root sent it: not even K may change
        (WITH_OWN_K, None, None, EVAL_GLOBAL, "altered 1 tensors it may not change"),
        # the root's statement about an evaluation passed off as a train task, and the reverse
        (MODEL, None, EVAL_DEPLOYED, TRAIN, "has task 'eval:deployed', expected 'train'"),
        (MODEL, None, EVAL_GLOBAL, EVAL_DEPLOYED, "expected 'eval:deployed'"),
        # the leaf told to evaluate the deployed model where the root asked for the global one
        (MODEL, EVAL_GLOBAL, None, EVAL_DEPLOYED, "has task 'eval:global'"),
    ],
    ids=["backbone", "k-in-global", "eval-as-train", "global-as-deployed", "flag-swapped"],
)
def test_an_altered_evaluation_is_refused(  # type: ignore[no-untyped-def]
    keys, state, signed_as, root_task, task, named
) -> None:
    chain = _chain(keys, state, signed_as or task, root_task=root_task)
    with pytest.raises(DownlinkRefused, match=named.replace("(", r"\(").replace(")", r"\)")):
        _verify(keys, state, chain, task)


# --- routed residuals ------------------------------------------------------------------------


def _to_med(keys: Keys, routed) -> tuple:  # type: ignore[no-untyped-def]
    """The root's train task statement to world/med, naming `routed`."""
    facts = TaskFacts("run", 3, 2, MED, "n-med")
    return _signer(keys, ROOT).sign(facts, tensor_digests(MODEL), (), routed_digests(routed))


def _verify_med(keys: Keys, chain, routed) -> None:  # type: ignore[no-untyped-def]
    verifier = DownlinkVerifier(MED, keys[MED][0], "cfg", {})
    verifier.verify(TaskFacts("run", 3, 2, MED, "n-med"), MODEL, chain, routed)


def test_the_residuals_the_root_routed_verify(keys: Keys) -> None:
    _verify_med(keys, _to_med(keys, ROUTED), ROUTED)


@pytest.mark.parametrize(
    "altered",
    [
        (replace(ROUTED[0], weight=5.0),),  # the routing weight
        (replace(ROUTED[0], residual={"block.k": (torch.full((3, 1), 9.0), torch.ones(3, 1))}),),
        (replace(ROUTED[0], source="world/med"),),  # its origin
        (),  # dropped
        (*ROUTED, *ROUTED),  # added
    ],
    ids=["weight", "factors", "source", "dropped", "added"],
)
def test_residuals_altered_after_the_root_signed_are_refused(keys: Keys, altered) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DownlinkRefused, match="residuals routed to it differ from what world"):
        _verify_med(keys, _to_med(keys, ROUTED), altered)


def test_an_inner_aggregator_may_not_route_residuals_of_its_own(keys: Keys) -> None:
    chain = _chain(keys, MODEL, TRAIN, routed=ROUTED)
    with pytest.raises(DownlinkRefused, match="world/med put routed residuals into what it"):
        _verify(keys, MODEL, chain, TRAIN, ROUTED)


# --- over gRPC with mutual TLS ---------------------------------------------------------------

TAMPERED = "model.embed_tokens.weight"


def _evaluated(tmp_path: Path, signed: bool) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """The deployed evaluation over gRPC, world/med adding 1.0 to the embeddings of the model it
    forwards (and signing them as its own): the sum of the embeddings each leaf evaluated, and
    what world/med recorded about its children's refusals."""
    config = tiny_config(tmp_path, TWO_LEVEL, ["run.method=hierfavg"])
    session = open_session(config, QuietProgress(), tmp_path / "run")
    fed = session.fed
    med = fed.aggregators[MED]
    state_for = med.keys.state_for
    med.keys.state_for = lambda child, state: {  # type: ignore[method-assign]
        **state_for(child, state),
        TAMPERED: state[TAMPERED] + 1.0,
    }
    given: dict[str, float] = {}
    for path, leaf in fed.leaves.items():
        evaluate = leaf.handle_eval

        def record(task: EvalTask, path: str = path, evaluate=evaluate) -> EvalReport:  # type: ignore[no-untyped-def]
            given[path] = float(task.state[TAMPERED].sum())
            return evaluate(task)

        leaf.handle_eval = record  # type: ignore[method-assign]
    audited: list[tuple[str, str]] = []
    audit = med._audit

    def recording(event: str, global_round: int, **fields) -> None:  # type: ignore[no-untyped-def]
        if event == "eval_dropped":
            audited.append((fields["sender"], fields["reason"]))
        audit(event, global_round, **fields)

    med._audit = recording  # type: ignore[method-assign]
    given["honest"] = float(fed.root.state[TAMPERED].sum())
    with over_grpc(session, tmp_path / "pki", signed=signed):
        results = leaf_results(fed, session.tree, fed.root.state, 0, deployed=True)
    given.update({f"result {path}": r.loss for path, r in results.items()})
    return given, audited


def test_leaves_refuse_to_evaluate_a_model_their_sub_federation_altered(tmp_path: Path) -> None:
    given, audited = _evaluated(tmp_path, signed=True)
    assert "world/med/a" not in given and "world/med/b" not in given  # refused: not evaluated
    assert given["world/soft/c"] == given["honest"] == given["world/soft/d"]
    # The other sub-federation's evaluation went on; world/med's leaves have no row.
    assert sorted(k for k in given if k.startswith("result")) == [
        "result world/soft/c",
        "result world/soft/d",
    ]
    assert sorted(sender for sender, _ in audited) == ["world/med/a", "world/med/b"]
    assert all("altered 1 tensors it may not change" in reason for _, reason in audited)
    assert all("eval:deployed evaluation" in reason for _, reason in audited)


def test_without_signatures_the_leaves_evaluate_the_altered_model(tmp_path: Path) -> None:
    given, audited = _evaluated(tmp_path, signed=False)
    assert given["world/med/a"] - given["honest"] > 1000  # +1.0 on every embedding weight
    assert given["world/med/b"] == given["world/med/a"]
    assert "result world/med/a" in given and not audited  # its figure reaches the table


def _routed_round(tmp_path: Path, signed: bool) -> tuple[list[float], list[str], str]:
    """Two WorldLM root rounds with routing over gRPC; in the second the root's routed
    residual for world/med is altered after the root signed it. Returns what world/med was
    routed in round 2 (the sum of its first factor), why the root dropped it, and the status of
    the root's round."""
    config = tiny_config(tmp_path, TWO_LEVEL, ["run.method=worldlm", *ROUTING])
    session = open_session(config, QuietProgress(), tmp_path / "run")
    fed = session.fed
    med = fed.aggregators[MED]
    routed: list[float] = []
    train = med.handle_train

    def record(task: TrainTask) -> Update:
        if task.routed:
            routed.extend(float(u.sum()) for u, _ in task.routed[0].residual.values())
        return train(task)

    med.handle_train = record  # type: ignore[method-assign]
    with over_grpc(session, tmp_path / "pki", signed=signed) as transports:
        fed.root.run_round(fed.root.state, 1)
        honest = [float(u.sum()) for u, _ in fed.root._routed_to(MED)[0].residual.values()]
        root_link = transports[ROOT]
        send = root_link.train

        def altering(tasks):  # type: ignore[no-untyped-def]
            def shifted(r: RoutedResidual) -> RoutedResidual:
                residual = {n: (u + 1.0, v) for n, (u, v) in r.residual.items()}
                return replace(r, residual=residual)

            return send(
                [
                    replace(t, routed=tuple(map(shifted, t.routed))) if t.recipient == MED else t
                    for t in tasks
                ]
            )

        root_link.train = altering  # type: ignore[method-assign]
        outcome = fed.root.run_round(fed.root.state, 2)
    reasons = [
        r["reason"] for r in outcome.records if r["kind"] == "dropped" and r.get("sender") == MED
    ]
    shift = [a - h for a, h in zip(routed, honest, strict=True)] if routed else []
    return shift, reasons, outcome.records[-1]["status"]


def test_a_sub_federation_refuses_residuals_altered_after_the_root_routed_them(
    tmp_path: Path,
) -> None:
    shift, reasons, status = _routed_round(tmp_path, signed=True)
    assert shift == []  # world/med never trained on them
    assert len(reasons) == 1 and "residuals routed to it differ from what world" in reasons[0]
    assert status == "ok"  # the root's round went on with world/soft


def test_without_signatures_the_altered_residuals_are_used(tmp_path: Path) -> None:
    shift, reasons, _ = _routed_round(tmp_path, signed=False)
    assert shift and all(s >= 1.0 for s in shift)  # +1.0 on every entry reached world/med
    assert reasons == []
