"""Per-round quality figures of the whole tree: every leaf's validation perplexity with the
model it deploys and with the global model, merged per node, and fairness across leaves.

The rows written here are what `metrics.jsonl`, TensorBoard and `worldlm report` show:
- `eval`: per node, the token-weighted merge of the leaves below it, each with its deployed
  (personalized) model;
- `eval_global`: the same with the global model, for methods whose leaves deploy something else;
- `fairness`: per aggregator, the worst and best leaf, their gap and the spread (see
  `metrics.fairness`).
"""

from __future__ import annotations

from worldlm.core.messages import EvalResult, EvalTask, Record, State
from worldlm.federation.build import Federation
from worldlm.metrics.fairness import fairness_figures
from worldlm.train.evaluate import merge_results
from worldlm.tree import FederationNode


def leaf_results(
    fed: Federation, tree: FederationNode, state: State, round_index: int, *, deployed: bool
) -> dict[str, EvalResult]:
    """Each leaf of the configured tree on its own validation split, by leaf path: with the
    model it would deploy, or with `state` itself when not `deployed`."""
    task = EvalTask(fed.root.ctx.run_id, round_index, "", fed.root.path, "eval", state, deployed)
    by_name = fed.root.handle_eval(task).results
    # A deployed leaf that dropped out of this evaluation has no row; the rest still report.
    return {leaf.path: by_name[leaf.name] for leaf in tree.leaves() if leaf.name in by_name}


def eval_rows(
    tree: FederationNode, per_leaf: dict[str, EvalResult], round_index: int, kind: str
) -> list[Record]:
    """One row per node of the tree that has evaluated leaves below it."""
    rows: list[Record] = []
    for node in tree.walk():
        present = [per_leaf[leaf.path] for leaf in node.leaves() if leaf.path in per_leaf]
        if not present:
            continue
        merged = merge_results(present)
        rows.append(
            {
                "round": round_index,
                "node": node.path,
                "kind": kind,
                "loss": merged.loss,
                "ppl": merged.ppl,
                "tokens": merged.tokens,
            }
        )
    return rows


def fairness_rows(
    tree: FederationNode, per_leaf: dict[str, EvalResult], round_index: int
) -> list[Record]:
    """One row per aggregator (a node with children) that has evaluated leaves below it."""
    rows: list[Record] = []
    for node in tree.walk():
        if not node.children:
            continue
        below = [leaf.path for leaf in node.leaves() if leaf.path in per_leaf]
        ppl = {path: per_leaf[path].ppl for path in below}
        if ppl:
            rows.append(
                {"round": round_index, "node": node.path, "kind": "fairness"}
                | fairness_figures(ppl)
            )
    return rows
