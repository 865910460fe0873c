"""A deployed child's journal: it restarts from its last answered task, rolls back when its
parent runs a round again after resuming, keeps its initial state, and refuses another run's
state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from worldlm.checkpoint import list_checkpoints
from worldlm.config import SecAggConfig
from worldlm.core.messages import EvalReport, EvalTask, TrainTask, Update
from worldlm.core.secure_messages import Declined, SecureSetup, SecureStage, TrainedKeys
from worldlm.core.transport import ChildInfo
from worldlm.deploy.journal import JournaledNode, journal_keep
from worldlm.errors import CheckpointError
from worldlm.federation.secure_child import vector_length
from worldlm.secagg import KeysBroadcast, plan_round


class Accumulator:
    """A node whose state is the running sum of what it was sent: replaying a round without
    rolling back would count it twice."""

    def __init__(self, path: str = "world/a") -> None:
        self.path = path
        self.total = torch.zeros(3)

    def info(self) -> ChildInfo:
        return ChildInfo(self.path, 10)

    def handle_train(self, task: TrainTask) -> Update:
        self.total = self.total + task.state["w"]
        return Update(self.path, task.round, task.nonce, {"w": self.total.clone()}, 1.0)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        return EvalReport(self.path, task.nonce, {})

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"total": self.total.clone()}, {"kind": "accumulator"}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        assert meta == {"kind": "accumulator"}
        self.total = tensors["total"].clone()


def _task(r: int) -> TrainTask:
    return TrainTask("run", r, r + 1, "world", "world/a", f"n{r}", {"w": torch.full((3,), 2.0**r)})


def test_a_resumed_parent_replays_rounds_and_nothing_counts_twice(tmp_path: Path) -> None:
    node = JournaledNode(Accumulator(), tmp_path, "run", keep=4)
    first = [node.handle_train(_task(r)).state["w"] for r in range(5)]
    # the parent restarts from its checkpoint after round 2 and runs rounds 3 and 4 again
    again = [node.handle_train(_task(r)).state["w"] for r in (3, 4)]
    assert torch.equal(again[0], first[3]) and torch.equal(again[1], first[4])
    assert torch.equal(first[4], torch.full((3,), 31.0))


def test_a_restarted_child_continues_from_its_last_task(tmp_path: Path) -> None:
    node = JournaledNode(Accumulator(), tmp_path, "run", keep=4)
    for r in range(3):
        node.handle_train(_task(r))
    restarted = JournaledNode(Accumulator(), tmp_path, "run", keep=4)
    assert restarted.done == 3
    assert torch.equal(restarted.handle_train(_task(3)).state["w"], torch.full((3,), 15.0))


def test_a_fresh_start_of_the_same_run_goes_back_to_the_initial_state(tmp_path: Path) -> None:
    node = JournaledNode(Accumulator(), tmp_path, "run", keep=2)
    for r in range(6):
        node.handle_train(_task(r))
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["round-000000.wlm", "round-000005.wlm", "round-000006.wlm"]
    restarted = JournaledNode(Accumulator(), tmp_path, "run", keep=2)
    assert torch.equal(restarted.handle_train(_task(0)).state["w"], torch.ones(3))
    with pytest.raises(CheckpointError, match="no longer holds the state from before it"):
        restarted.handle_train(_task(1))
        restarted.handle_train(_task(2))
        restarted.handle_train(_task(3))
        restarted.handle_train(_task(1))


def test_state_of_another_run_or_node_is_refused(tmp_path: Path) -> None:
    node = JournaledNode(Accumulator(), tmp_path, "run", keep=2)
    node.handle_train(_task(0))
    with pytest.raises(CheckpointError, match="not of 'world/a' in run 'other'"):
        JournaledNode(Accumulator(), tmp_path, "other", keep=2)
    with pytest.raises(CheckpointError, match="not of 'world/b'"):
        JournaledNode(Accumulator("world/b"), tmp_path, "run", keep=2)


def test_keep_covers_what_a_parent_can_run_again() -> None:
    assert journal_keep(1, []) == 3
    assert journal_keep(5, [2, 3]) == 32


def test_a_secure_round_trains_through_the_journal_and_a_restart_drops_out_of_it(
    tmp_path: Path,
) -> None:
    task = _task(0)
    plan = plan_round(
        ["world/a", "world/b", "world/c"],
        SecAggConfig(),
        length=vector_length(task.state),
        graph_seed=0,
    )
    node = JournaledNode(Accumulator(), tmp_path, "run", keep=4)
    reply = node.handle_secure(SecureSetup(task, plan.setup_for("world/a")))
    assert isinstance(reply.body, TrainedKeys) and node.done == 1  # trained, and journaled
    # The round's secrets live in memory only: after a restart the child declines the rest
    # of the round, and its parent counts it as dropped there.
    restarted = JournaledNode(Accumulator(), tmp_path, "run", keep=4)
    assert restarted.done == 1
    keys = KeysBroadcast(c_public={}, s_public={})
    stage = SecureStage("run", 0, 1, "world", "world/a", task.nonce, keys)
    answer = restarted.handle_secure(stage)
    assert isinstance(answer.body, Declined) and "no secure round" in answer.body.reason


def _dp_aggregator(tmp_path: Path):  # type: ignore[no-untyped-def]
    from worldlm.progress import QuietProgress
    from worldlm.session import open_session

    from .conftest import TWO_LEVEL, tiny_config

    overrides = ["run.method=hierfavg", "train.local_steps=1", "nodes.world/med.dp.enabled=true"]
    overrides += ["nodes.world/med.dp.noise_multiplier=0.001"]
    session = open_session(
        tiny_config(tmp_path, TWO_LEVEL, overrides), QuietProgress(), tmp_path / "r"
    )
    return session, session.fed.aggregators["world/med"]


def _med_task(session, r: int) -> TrainTask:  # type: ignore[no-untyped-def]
    run_id = session.fed.root.ctx.run_id
    return TrainTask(run_id, r, r + 1, "world", "world/med", f"n{r}", session.fed.root.state)


def test_a_rewind_at_a_dp_aggregator_charges_the_rounds_it_undoes(tmp_path: Path) -> None:
    """Rounds a DP aggregator answered released noisy aggregates; when its parent runs them
    again after resuming, the journal rolls its accountant back, and the re-runs draw fresh
    noise: the undone rounds are charged on top, so ε never goes down."""
    session, med = _dp_aggregator(tmp_path)
    node = JournaledNode(med, tmp_path / "journal", session.fed.root.ctx.run_id, keep=4)
    for r in range(3):
        node.handle_train(_med_task(session, r))
    policy = med.rule.policy
    spent = policy.accountant.epsilon()
    assert policy.accountant.steps == 3
    node.handle_train(_med_task(session, 1))  # the parent resumed after round 0
    # rolled back to 1 round, charged the 2 undone, then ran round 1 again
    assert policy.accountant.steps == 4
    assert policy.accountant.epsilon() > spent


def test_without_the_charge_a_rewind_lowers_epsilon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worldlm.deploy import journal

    monkeypatch.setattr(journal, "dp_policy", lambda node: None)
    session, med = _dp_aggregator(tmp_path)
    node = JournaledNode(med, tmp_path / "journal", session.fed.root.ctx.run_id, keep=4)
    for r in range(3):
        node.handle_train(_med_task(session, r))
    spent = med.rule.policy.accountant.epsilon()
    node.handle_train(_med_task(session, 1))
    assert med.rule.policy.accountant.steps == 2
    assert med.rule.policy.accountant.epsilon() < spent


def test_a_crash_right_after_a_rewind_keeps_the_charge(tmp_path: Path) -> None:
    """The undone states are deleted at the rewind; the charge for their rounds is written
    into the state rewound to first, so a crash before the re-run does not lose it."""
    session, med = _dp_aggregator(tmp_path / "a")
    run_id = session.fed.root.ctx.run_id
    node = JournaledNode(med, tmp_path / "journal", run_id, keep=4)
    for r in range(3):
        node.handle_train(_med_task(session, r))
    node._rewind_to(1)  # the parent resumed; this process dies before running round 1
    again, med_again = _dp_aggregator(tmp_path / "b")  # the restarted process
    restarted = JournaledNode(med_again, tmp_path / "journal", run_id, keep=4)
    restarted.handle_train(_med_task(again, 1))
    # 1 round kept, the 2 undone charged, round 1 run again
    assert med_again.rule.policy.accountant.steps == 4


def _local_dp_leaf(tmp_path: Path):  # type: ignore[no-untyped-def]
    from worldlm.progress import QuietProgress
    from worldlm.session import open_session

    from .conftest import TWO_LEVEL, tiny_config

    overrides = ["run.method=hierfavg", "train.local_steps=1"]
    overrides += ["nodes.world/med/a.dp.local_noise_multiplier=1.0"]
    session = open_session(
        tiny_config(tmp_path, TWO_LEVEL, overrides), QuietProgress(), tmp_path / "r"
    )
    return session, session.fed.leaves["world/med/a"]


def _leaf_task(session, r: int) -> TrainTask:  # type: ignore[no-untyped-def]
    run_id = session.fed.root.ctx.run_id
    state = session.fed.root.state
    return TrainTask(run_id, r, r + 1, "world/med", "world/med/a", f"n{r}", state)


def _released(update: Update) -> int:
    (row,) = [r for r in update.records if r["kind"] == "privacy"]
    return int(row["steps"])


@pytest.mark.parametrize("charged", [True, False])
def test_a_rewind_at_a_local_dp_leaf_charges_the_releases_it_undoes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, charged: bool
) -> None:
    """A leaf with local DP sent a noisy change in every round its parent later runs again;
    the re-runs draw fresh noise, so the undone releases count on top, and survive a crash.
    (Without the charge, the teeth: the count restarts from the state rewound to.)"""
    from worldlm.deploy import journal

    if not charged:
        monkeypatch.setattr(journal, "local_dp_leaf", lambda node: None)
    session, leaf = _local_dp_leaf(tmp_path / "a")
    run_id = session.fed.root.ctx.run_id
    node = JournaledNode(leaf, tmp_path / "journal", run_id, keep=4)
    assert [_released(node.handle_train(_leaf_task(session, r))) for r in range(3)] == [1, 2, 3]
    node._rewind_to(1)  # the parent resumed after round 0; this process dies now
    again, leaf_again = _local_dp_leaf(tmp_path / "b")  # the restarted process
    restarted = JournaledNode(leaf_again, tmp_path / "journal", run_id, keep=4)
    # 1 release kept, the 2 undone charged, round 1 released again
    assert _released(restarted.handle_train(_leaf_task(again, 1))) == (4 if charged else 2)


def test_a_second_rewind_to_an_older_state_keeps_the_first_rewinds_charge(tmp_path: Path) -> None:
    """A rewind lands on a state from before an earlier rewind's charge (the root fell back
    further, or started afresh): every release sent so far still counts."""
    session, leaf = _local_dp_leaf(tmp_path)
    node = JournaledNode(leaf, tmp_path / "journal", session.fed.root.ctx.run_id, keep=8)
    for r in range(3):
        node.handle_train(_leaf_task(session, r))  # releases 1, 2, 3
    assert _released(node.handle_train(_leaf_task(session, 1))) == 4  # 2 undone, charged
    # round 0 again: the state before any task, which knew of no charge; 4 releases went out
    assert _released(node.handle_train(_leaf_task(session, 0))) == 5
