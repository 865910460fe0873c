"""What each aggregator may legitimately change in the weights it forwards, read off the shared
config: the allowance a child checks the signed chain against (`security.downlink`)."""

from __future__ import annotations

from worldlm.federation.methods import MethodPlan
from worldlm.tree import FederationNode


def downlink_allowances(
    plan: MethodPlan, key_names: frozenset[str]
) -> dict[tuple[str, str], frozenset[str] | None]:
    """Per hop (aggregator, child) the tensor names the aggregator may change in what it was
    sent before passing it on (None: any):

    * with several inner rounds, it sends its own model after the first, so anything;
    * with a compressed link to the child, the child decodes an approximation, so anything
      (the child still learns who signed it, not that the root's values were kept);
    * a WorldLM sub-federation puts its own key layers K in place of the root's;
    * otherwise nothing: it forwards what the root sent."""
    tree = plan.tree
    allowed: dict[tuple[str, str], frozenset[str] | None] = {}
    for node in tree.walk():
        if node.is_leaf:
            continue
        for child in node.children:
            hop = (node.path, child.path)
            if node.aggregator.inner_rounds > 1 or child.settings.link.down != "none":
                allowed[hop] = None
            elif plan.key_layers and node.path != tree.path:
                allowed[hop] = key_names
            else:
                allowed[hop] = frozenset()
    return allowed


def eval_allowances(
    plan: MethodPlan, key_names: frozenset[str]
) -> dict[tuple[str, str], frozenset[str] | None]:
    """Per hop, what an aggregator may change in the model it forwards for the *deployed*
    evaluation: a WorldLM sub-federation its K (each child evaluates the model it would deploy,
    with its sub-federation's K), every other hop nothing. Evaluation tasks are never
    compressed, and an aggregator forwards the model it was sent whatever its inner rounds
    (`Aggregator.handle_eval`). The global evaluation may be changed by no hop."""
    tree = plan.tree
    allowed: dict[tuple[str, str], frozenset[str] | None] = {}
    for node in tree.walk():
        for child in node.children:
            keys = plan.key_layers and node.path != tree.path
            allowed[(node.path, child.path)] = key_names if keys else frozenset()
    return allowed


def tasks_per_root_round(tree: FederationNode, path: str) -> int:
    """The most train tasks the node at `path` is sent in one root round: the `inner_rounds` of
    the aggregators strictly between the root and it, multiplied (the root runs one). A child's
    replay window accepts no more (`security.replay_window`)."""
    parts = path.split("/")
    count = 1
    for i in range(2, len(parts)):
        count *= tree.find("/".join(parts[:i])).aggregator.inner_rounds
    return count
