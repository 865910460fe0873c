"""A child reports evaluation results only for its own leaves (issue 19, item 5): a leaf that
reports a sibling's loss as 0.0 on 1e9 tokens is refused, the sibling's honest result stands,
and the rest of the table is unchanged. Without the check the forged result replaces it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from worldlm.core.messages import EvalReport, EvalResult, EvalTask, TrainTask, Update
from worldlm.core.transport import ChildInfo, NodeHandler
from worldlm.federation import eval_check
from worldlm.monitoring import leaf_results
from worldlm.progress import QuietProgress
from worldlm.session import Session, open_session

from .conftest import TWO_LEVEL, tiny_config

FORGER = "world/med/b"


class ForgingEvaluator:
    """Answers like `leaf`, adding `extra` to its evaluation results."""

    def __init__(self, leaf: NodeHandler, extra: dict[str, EvalResult], nonce: str = "") -> None:
        self.leaf, self.path, self.extra, self.nonce = leaf, leaf.path, extra, nonce

    def info(self) -> ChildInfo:
        return self.leaf.info()

    def handle_train(self, task: TrainTask) -> Update:
        return self.leaf.handle_train(task)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        honest = self.leaf.handle_eval(task)
        return replace(
            honest, results={**honest.results, **self.extra}, nonce=self.nonce or honest.nonce
        )


def _session(tmp_path: Path) -> Session:
    config = tiny_config(tmp_path, TWO_LEVEL, ["run.method=hierfavg"])
    return open_session(config, QuietProgress(), tmp_path / "run")


def _table(session: Session) -> dict[str, EvalResult]:
    fed = session.fed
    return leaf_results(fed, session.tree, fed.root.state, 0, deployed=True)


def _forge(session: Session, extra: dict[str, EvalResult], nonce: str = "") -> None:
    session.fed.transport.register(ForgingEvaluator(session.fed.leaves[FORGER], extra, nonce))


@pytest.mark.parametrize(
    ("extra", "nonce"),
    [
        ({"a": EvalResult(0.0, 10**9)}, ""),  # a sibling's result
        ({"b": EvalResult(0.0, 10**9)}, ""),  # its own, on more tokens than a leaf evaluates
        ({"b": EvalResult(-3.0, 100)}, ""),  # a loss no cross-entropy has
        ({}, "stale"),  # an answer to another task
    ],
    ids=["sibling", "inflated-tokens", "negative-loss", "wrong-nonce"],
)
def test_a_forged_evaluation_is_refused_and_the_rest_of_the_table_stands(
    tmp_path: Path, extra: dict[str, EvalResult], nonce: str
) -> None:
    session = _session(tmp_path)
    honest = _table(session)
    _forge(session, extra, nonce)
    table = _table(session)
    assert FORGER not in table  # its report is refused whole
    assert table == {path: r for path, r in honest.items() if path != FORGER}


def test_without_the_check_a_forged_sibling_result_enters_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = _session(tmp_path)
    honest = _table(session)["world/med/a"]
    monkeypatch.setattr(eval_check, "check_eval_report", lambda *args: None)
    _forge(session, {"a": EvalResult(0.0, 10**9)})
    forged = _table(session)["world/med/a"]
    assert honest.loss > 1.0 and forged == EvalResult(0.0, 10**9)
