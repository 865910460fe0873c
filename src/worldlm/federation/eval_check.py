"""What a child may report from an evaluation (issue 19, item 5): results only for the leaves
of its own subtree, answering the task it was sent, with a loss a cross-entropy can have and no
more tokens than a leaf evaluates. Without this a leaf could report a sibling's loss as 0.0 on
1e9 tokens and decide the perplexity table, the model cards and the `target_ppl` stop.

A leaf can still misreport its own quality; what it can move is its own row, weighed by at most
`eval.max_blocks x block_size` tokens (docs/security.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from worldlm.core.messages import EvalReport, EvalResult, EvalTask
from worldlm.errors import UpdateRejected, shown
from worldlm.tree import FederationNode


def eval_owners(
    tree: FederationNode, *, pooled: frozenset[str] = frozenset()
) -> dict[str, frozenset[str]]:
    """The evaluation sets each node may report, keyed by path: the names of the leaves below
    it. `pooled` names the sets of a leaf that holds every leaf's data (`centralized`)."""
    owners: dict[str, frozenset[str]] = {}
    for node in tree.walk():
        names = frozenset(leaf.name for leaf in node.leaves())
        owners[node.path] = names | pooled if pooled else names
    return owners


def check_eval_report(
    report: EvalReport,
    tasks: Mapping[str, EvalTask],
    answered: set[str],
    owners: Mapping[str, frozenset[str]] | None,
    max_tokens: int | None,
) -> None:
    """Refuse `report` unless it answers the task its sender was sent, once, with results only
    for sets its subtree owns (`owners`; None: any), each with a loss >= 0 (NaN or inf: a
    diverged model, still a result) and at most `max_tokens` tokens per leaf (None: any)."""
    sender = report.sender
    task = tasks.get(sender)
    if task is None:
        raise UpdateRejected(sender, "evaluation report from a child that was not asked")
    if sender in answered:
        raise UpdateRejected(sender, "duplicate evaluation report")
    if report.nonce != task.nonce:
        raise UpdateRejected(sender, "evaluation report answers another task")
    own = None if owners is None else owners.get(sender, frozenset())
    for name, result in report.results.items():
        if own is not None and name not in own:
            raise UpdateRejected(
                sender, f"evaluation result for {shown(repr(name))}, outside its own subtree"
            )
        if result.loss < 0:
            raise UpdateRejected(
                sender, f"evaluation loss {result.loss:g} for {shown(name)} is negative"
            )
        if max_tokens is not None and result.tokens > max_tokens:
            raise UpdateRejected(
                sender,
                f"evaluation of {shown(name)} claims {result.tokens} tokens, more than the "
                f"{max_tokens} a leaf evaluates",
            )


def accepted_results(
    reports: Iterable[EvalReport],
    tasks: Sequence[EvalTask],
    owners: Mapping[str, frozenset[str]] | None,
    max_tokens: int | None,
    refused: Callable[[UpdateRejected], None],
) -> dict[str, EvalResult]:
    """The results of every report that passes `check_eval_report`; `refused` is told of the
    others."""
    asked = {t.recipient: t for t in tasks}
    answered: set[str] = set()
    results: dict[str, EvalResult] = {}
    for report in reports:
        try:
            check_eval_report(report, asked, answered, owners, max_tokens)
        except UpdateRejected as exc:
            refused(exc)
            continue
        answered.add(report.sender)
        results.update(report.results)
    return results
