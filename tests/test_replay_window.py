"""The replay window across rounds (issue 19): a child remembers the newest signed task it
accepted and refuses a correctly signed statement of an older round, which the chain alone
accepts; a root that resumed from a checkpoint signs with a larger epoch, and its rolled-back
rounds are accepted while the old epoch's statements stay refused. A deployed child keeps the
window in its state directory, across its own restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worldlm.core.messages import EvalTask, TrainTask
from worldlm.deploy.root_epoch import EPOCH_FILE, next_epoch
from worldlm.errors import WorldLMError
from worldlm.federation.downlink_policy import tasks_per_root_round
from worldlm.security.downlink import DownlinkSigner, DownlinkVerifier, TaskFacts, tensor_digests
from worldlm.security.downlink_facts import EVAL_DEPLOYED, EVAL_GLOBAL, TRAIN
from worldlm.security.replay_window import ReplayWindow, StaleTask, Stamp, check_fresh
from worldlm.tree import build_tree

from .conftest import TWO_LEVEL, tiny_config
from .test_downlink import Keys, node_keys

ROOT, MED, LEAF = "world", "world/med", "world/med/a"


def _stamp(epoch: int, global_round: int, round_: int = 0, task: str = TRAIN) -> Stamp:
    return Stamp("run", epoch, global_round, round_, task)


@pytest.mark.parametrize(
    ("last", "stamp", "trained", "refused"),
    [
        (None, _stamp(0, 5), 0, None),  # a first task
        (_stamp(0, 3), _stamp(0, 4), 1, None),  # the next root round
        (_stamp(0, 3, 1), _stamp(0, 3, 2), 1, "already trained 1 of root round 3"),
        (_stamp(0, 3), _stamp(0, 3, task=EVAL_DEPLOYED), 1, None),  # evaluated after training
        (_stamp(0, 3, task=EVAL_DEPLOYED), _stamp(0, 3, task=EVAL_GLOBAL), 1, None),
        (_stamp(0, 3, task=EVAL_GLOBAL), _stamp(0, 3, task=EVAL_GLOBAL), 1, None),
        (_stamp(0, 3), _stamp(0, 3), 1, "already accepted root round 3 (round 0)"),
        (_stamp(0, 3), _stamp(0, 2), 1, "a replayed statement of an older round"),
        (_stamp(0, 3, task=EVAL_DEPLOYED), _stamp(0, 3), 1, "of root round 3 (round 0)"),
        (_stamp(0, 3, task=EVAL_DEPLOYED), _stamp(0, 2, task=EVAL_DEPLOYED), 1, "older round"),
        (_stamp(0, 3), _stamp(1, 1), 1, None),  # the root resumed: a signed rollback
        (_stamp(1, 1), _stamp(0, 4), 1, "earlier session of the root (epoch 0"),
    ],
)
def test_check_fresh(last: Stamp | None, stamp: Stamp, trained: int, refused: str | None) -> None:
    if refused is None:
        check_fresh(last, stamp, LEAF, trained=trained)
    else:
        with pytest.raises(StaleTask, match=refused.replace("(", r"\(").replace(")", r"\)")):
            check_fresh(last, stamp, LEAF, trained=trained)


def test_a_parent_with_several_inner_rounds_sends_as_many_tasks_per_root_round() -> None:
    window = ReplayWindow(per_round=2)
    window.admit(_stamp(0, 3, 4), LEAF)
    window.admit(_stamp(0, 3, 5), LEAF)
    with pytest.raises(StaleTask, match="already trained 2 of root round 3"):
        window.admit(_stamp(0, 3, 6), LEAF)  # a parent raising its own round index at will
    window.admit(_stamp(0, 4, 6), LEAF)


def test_tasks_per_root_round_multiplies_the_inner_rounds_above(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, ["nodes.world/med.inner_rounds=3"])
    tree = build_tree(config.nodes)
    assert tasks_per_root_round(tree, "world/med") == 1
    assert tasks_per_root_round(tree, "world/med/a") == 3
    assert tasks_per_root_round(tree, "world/soft/c") == 1


# --- the attack: a hostile world/med replays the root's statement of an older round ---------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return node_keys(tmp_path_factory.mktemp("pki"), (ROOT, MED, LEAF))


def _model(global_round: int) -> dict[str, torch.Tensor]:
    return {"embed": torch.full((4,), float(global_round))}


def _task(keys: Keys, global_round: int, *, epoch: int = 0, nonce: str = "n") -> TrainTask:
    """The root's statement about its round `global_round` (to world/med), which world/med
    forwards to the leaf with its own statement: a task world/med can build again later from
    what it kept of that round."""
    _, root_cert, root_key = keys[ROOT]
    _, med_cert, med_key = keys[MED]
    root = DownlinkSigner(ROOT, root_key, root_cert, "cfg", epoch=epoch)
    med = DownlinkSigner(MED, med_key, med_cert, "cfg")
    state = _model(global_round)
    digests = tensor_digests(state)
    chain = root.sign(TaskFacts("run", global_round, global_round - 1, MED, "r"), digests, ())
    facts = TaskFacts("run", global_round, global_round - 1, LEAF, nonce)
    return TrainTask(
        "run", global_round - 1, global_round, MED, LEAF, nonce, state,
        signatures=med.sign(facts, digests, chain),
    )  # fmt: skip


def _leaf(keys: Keys, window: ReplayWindow | None = None) -> DownlinkVerifier:
    return DownlinkVerifier(LEAF, keys[LEAF][0], "cfg", {(MED, LEAF): frozenset()}, window=window)


def test_a_replayed_older_round_is_refused_though_its_chain_verifies(keys: Keys) -> None:
    old, now = _task(keys, 2), _task(keys, 3)
    leaf = _leaf(keys)
    leaf.check(old)
    leaf.check(now)
    replay = _task(keys, 2, nonce="again")  # world/med sends round 2's model again
    with pytest.raises(StaleTask, match=r"root round 2 .* already accepted root round 3"):
        leaf.check(replay)
    # Undefended: the chain alone proves it (the root did sign round 2's model), so a leaf
    # that does not remember what it accepted trains on the old model.
    _leaf(keys).check(replay)


def test_a_resumed_root_rolls_back_and_the_old_sessions_statements_stay_refused(
    keys: Keys,
) -> None:
    leaf = _leaf(keys)
    for global_round in (1, 2, 3):
        leaf.check(_task(keys, global_round, epoch=10))
    # The root resumes from its checkpoint of round 1: round 2 again, in a larger epoch.
    leaf.check(_task(keys, 2, epoch=11))
    leaf.check(_task(keys, 3, epoch=11, nonce="re-run"))
    # The first session's round 3 (a different model once the rounds diverge) is refused.
    with pytest.raises(StaleTask, match="earlier session of the root \\(epoch 10"):
        leaf.check(_task(keys, 3, epoch=10, nonce="old"))


def test_the_window_survives_the_childs_restart(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "state" / "downlink-window.json"
    _leaf(keys, ReplayWindow(path)).check(_task(keys, 3))
    replay = _task(keys, 2)
    with pytest.raises(StaleTask, match="already accepted root round 3"):
        _leaf(keys, ReplayWindow(path)).check(replay)  # restarted: read back from its file
    _leaf(keys).check(replay)  # a window in memory only forgets at a restart


def test_an_evaluation_of_an_older_round_is_refused(keys: Keys) -> None:
    _, root_cert, root_key = keys[ROOT]
    _, med_cert, med_key = keys[MED]
    root = DownlinkSigner(ROOT, root_key, root_cert, "cfg")
    med = DownlinkSigner(MED, med_key, med_cert, "cfg")

    def evaluation(global_round: int) -> EvalTask:
        state = _model(global_round)
        digests = tensor_digests(state)
        chain = root.sign(TaskFacts("run", global_round, 0, MED, "r", EVAL_DEPLOYED), digests, ())
        facts = TaskFacts("run", global_round, 0, LEAF, "n", EVAL_DEPLOYED)
        signatures = med.sign(facts, digests, chain)
        return EvalTask("run", global_round, MED, LEAF, "n", state, signatures=signatures)

    leaf = _leaf(keys)
    leaf.check(evaluation(2))
    leaf.check(_task(keys, 3))
    with pytest.raises(StaleTask, match="root round 2 \\(eval:deployed\\)"):
        leaf.check(evaluation(2))
    _leaf(keys).check(evaluation(2))  # undefended: the old model is evaluated again


def test_an_unreadable_window_stops_the_child(tmp_path: Path) -> None:
    path = tmp_path / "downlink-window.json"
    path.write_text('{"run": {"stamp": {"run_id": "run"}, "trained": 1}}', encoding="utf-8")
    with pytest.raises(WorldLMError, match="the replay window is unreadable"):
        ReplayWindow(path)


def test_each_start_of_the_root_has_a_larger_epoch(tmp_path: Path) -> None:
    first = next_epoch(tmp_path, now_us=1_000)
    assert first == 1_000
    assert next_epoch(tmp_path, now_us=2_000) == 2_000
    assert next_epoch(tmp_path, now_us=500) == 2_001  # the clock went back: still larger
    assert (tmp_path / EPOCH_FILE).read_text() == "2001\n"
    # A fresh start of the same config, in another run directory, is newer by the clock.
    (tmp_path / "other").mkdir()
    assert next_epoch(tmp_path / "other") > 2_001
