"""WorldLM's personalized key layers at an aggregator (DESIGN §5.2–5.7).

An aggregator below the root keeps its own K_p between rounds, sends it down with the backbone,
and folds its children's key layers in by attention. Attention weights depend on every child's
distance, so a round holds each child's key layers (not the backbone) until it ends. Residuals
routed from similar sub-federations join as extra keys/values with their own softmax, scaled by
lambda_route, so that lambda_route = 0 is exactly no routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from worldlm.core.messages import Residual, RoutedResidual, Update
from worldlm.core.state import State, cast_like
from worldlm.errors import ConfigError
from worldlm.model.partition import Partition
from worldlm.strategies.attention import attend, attention_weights, layer_distance
from worldlm.strategies.routing import decode, low_rank_factors


@dataclass(frozen=True)
class KeyLayerPolicy:
    partition: Partition
    tau: float
    eps: float
    private: bool  # K_p never leaves this aggregator's subtree (a child of the root)
    residual_rank: int = 4
    lambda_route: float = 0.0
    per_child: bool = False  # also send each child its own attended K (FedAMP-style)
    attention: bool = True  # off: K_p is the children's mean, like the rest of the model


def aggregate_key_layers(
    current: State,
    children: list[State],
    sizes: list[float],
    policy: KeyLayerPolicy,
    routed: Sequence[tuple[State, float]] = (),
    self_index: int | None = None,
) -> State:
    """The new K_p: per layer, attention over the children's versions of that layer, plus
    lambda_route times attention over routed candidates (decoded residuals).

    With `self_index`, `current` is that child's own K (a per-child aggregation): its zero
    distance to itself is left out of the median that sets the distance scale."""
    if not children and not routed:
        return dict(current)
    result: State = {}
    for names in policy.partition.groups.values():
        mine = [current[n] for n in names]
        distances = torch.tensor(
            [layer_distance(mine, [child[n] for n in names]) for child in children],
            dtype=torch.float64,
        )
        median = 0.0
        if children:
            others = distances if self_index is None else _without(distances, self_index)
            median = float(others.median()) if others.numel() else 0.0
            weights = attention_weights(distances, torch.tensor(sizes), policy.tau, median)
            for name in names:
                kids = [c[name] for c in children]
                result[name] = attend(current[name], kids, weights, policy.eps)
        else:
            result.update({name: current[name] for name in names})
        if routed and policy.lambda_route > 0:
            _add_routed(result, current, names, routed, median, policy)
    return result


def _without(values: torch.Tensor, index: int) -> torch.Tensor:
    return torch.cat([values[:index], values[index + 1 :]])


def personalized_key_layers(
    children: list[State],
    sizes: list[float],
    policy: KeyLayerPolicy,
    routed: Sequence[tuple[State, float]] = (),
) -> list[State]:
    """Each child's own attended K: the attention aggregation seen from that child's K (closer
    siblings weigh more, the child itself counts at distance 0), after FedAMP (Huang et al.,
    2021). Equal children all get their mean; a far outlier keeps mostly its own K."""
    return [
        aggregate_key_layers(child, children, sizes, policy, routed, self_index=i)
        for i, child in enumerate(children)
    ]


def _add_routed(
    result: State,
    current: State,
    names: tuple[str, ...],
    routed: Sequence[tuple[State, float]],
    children_median: float,
    policy: KeyLayerPolicy,
) -> None:
    mine = [current[n] for n in names]
    distances = torch.tensor(
        [layer_distance(mine, [cand[n] for n in names]) for cand, _ in routed],
        dtype=torch.float64,
    )
    scale = policy.tau * (children_median if children_median > 0 else float(distances.median()))
    scores = -distances / (scale if scale > 0 else 1.0)
    scores += torch.log(torch.tensor([w for _, w in routed], dtype=torch.float64))
    weights = torch.softmax(scores, dim=0)
    for name in names:
        step = sum(
            float(w) * (cand[name].double() - current[name].double())
            for (cand, _), w in zip(routed, weights, strict=True)
        )
        moved = result[name].double() + policy.eps * policy.lambda_route * step
        result[name] = moved.to(current[name].dtype)


def residual_of(key_state: State, key_ref: State, rank: int) -> Residual:
    """Rank-r factors of K_p - K_ref for every key-layer matrix (vectors are not sent)."""
    return {
        name: low_rank_factors(value - key_ref[name], rank)
        for name, value in key_state.items()
        if value.ndim == 2
    }


def decode_candidate(residual: Residual, key_ref: State, current: State) -> State:
    """A routed residual as a candidate K: K_ref + U V^T on matrices, K_p elsewhere."""
    return {
        name: (key_ref[name].double() + decode(residual[name])).to(value.dtype)
        if name in residual
        else value
        for name, value in current.items()
    }


class KeyLayerRound:
    """Collects one round's children key layers, then attends over them (and routed ones)."""

    def __init__(
        self,
        policy: KeyLayerPolicy,
        current: State,
        key_ref: State,
        routed: tuple[RoutedResidual, ...] = (),
    ) -> None:
        self.policy = policy
        self.current = current
        self.senders: list[str] = []
        self.children: list[State] = []
        self.sizes: list[float] = []
        self.routed = [(decode_candidate(r.residual, key_ref, current), r.weight) for r in routed]

    def add(self, update: Update) -> None:
        # Only K is needed here; a forwarded sum is divided by its scale for these keys alone.
        names = self.policy.partition.key_names
        scale = update.scale
        self.children.append(
            {n: update.state[n] if scale == 1.0 else update.state[n] / scale for n in names}
        )
        self.sizes.append(update.weight)
        self.senders.append(update.sender)

    def result(self) -> State:
        return aggregate_key_layers(
            self.current, self.children, self.sizes, self.policy, self.routed
        )

    def per_child(self) -> dict[str, State]:
        """Each child's attended K, by sender (empty unless the policy asks for it)."""
        if not self.policy.per_child:
            return {}
        personal = personalized_key_layers(self.children, self.sizes, self.policy, self.routed)
        return dict(zip(self.senders, personal, strict=True))


class KeyLayers(Protocol):
    """How an aggregator's key layers take part in its rounds (WorldLM's K, or none)."""

    @property
    def policy(self) -> KeyLayerPolicy | None: ...

    key_state: State
    child_keys: dict[str, State]

    def own(self, incoming: State) -> State: ...

    def state_for(self, child: str, state: State) -> State: ...

    def start_round(self, routed: tuple[RoutedResidual, ...]) -> KeyLayerRound | None: ...

    def finish(self, model: State, key_round: KeyLayerRound | None) -> None: ...

    def adopt(self, model: State) -> None:
        """Keep `model`'s K as K_p (after a server optimizer stepped on it)."""
        ...

    def forwarded(self, exact: State, scale: float) -> State: ...

    @property
    def names(self) -> tuple[str, ...]: ...

    def residual(self) -> Residual: ...

    def snapshot(self) -> State: ...

    def restore(self, tensors: State) -> None: ...


class PersonalKeyLayers:
    """WorldLM's key layers at one aggregator, across rounds: its own K_p, the K it started
    from (residuals are K_p - K_ref), and per child the attended K it sends that child.

    It plugs into the round at four points: what a child is sent (`state_for`), a round's
    collection of the children's K (`start_round`), the new model (`finish`), and what goes up
    (`forwarded`, `residual`). With attention off (the policy's default, and always under DP,
    where attention over the children's raw K would release them without noise: see
    privacy_policy), K_p is the round's mean like the rest of the model."""

    def __init__(self, policy: KeyLayerPolicy, *, attend: bool = True) -> None:
        self.policy = policy
        self.attend = attend and policy.attention
        self.key_state: State = {}  # K_p, kept between rounds
        self.key_ref: State = {}  # the K it started from
        self.child_keys: dict[str, State] = {}  # per-child attended K (child_key_layers)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.policy.partition.key_names)

    def own(self, incoming: State) -> State:
        """The incoming model with K_p in place of the parent's K (K_p starts as that K)."""
        if not self.key_state:
            self.key_state = {k: incoming[k] for k in self.names}
            self.key_ref = dict(self.key_state)
        return {**incoming, **self.key_state}

    def state_for(self, child: str, state: State) -> State:
        """What `child` is sent: the model, with its own attended K when it has one."""
        return {**state, **self.child_keys[child]} if child in self.child_keys else state

    def start_round(self, routed: tuple[RoutedResidual, ...]) -> KeyLayerRound | None:
        if not self.attend:
            return None
        return KeyLayerRound(self.policy, self.key_state, self.key_ref, routed)

    def finish(self, model: State, key_round: KeyLayerRound | None) -> None:
        """Put the round's K_p into `model` (in place) and keep it, with each child's K."""
        if key_round is None:  # no attention: K_p is the round's mean (noisy under DP)
            self.key_state = cast_like({k: model[k] for k in self.names}, self.key_state)
            return
        self.key_state = cast_like(key_round.result(), self.key_state)
        model.update(self.key_state)
        for child, keys in key_round.per_child().items():  # absent children keep theirs
            self.child_keys[child] = cast_like(keys, self.key_state)

    def adopt(self, model: State) -> None:
        """Keep `model`'s K as K_p (after a server optimizer stepped on it)."""
        self.key_state = cast_like({k: model[k] for k in self.names}, self.key_state)

    def forwarded(self, exact: State, scale: float) -> State:
        """What goes up of a result (`exact` = the model times `scale`): the backbone, and K_p
        (at the same scale) only where it may leave this subtree."""
        up = {k: v for k, v in exact.items() if k not in self.policy.partition.key_names}
        if not self.policy.private:  # inside a sub-federation K_p goes up
            up.update({k: self.key_state[k].double() * scale for k in self.names})
        return up

    def residual(self) -> Residual:
        """What a sub-federation tells the root's router: its K_p - K_ref in rank-r factors."""
        if not self.policy.private:
            return {}
        return residual_of(self.key_state, self.key_ref, self.policy.residual_rank)

    def snapshot(self) -> State:
        tensors = {f"key/{k}": v for k, v in self.key_state.items()}
        tensors.update({f"keyref/{k}": v for k, v in self.key_ref.items()})
        for child, keys in sorted(self.child_keys.items()):
            tensors.update({f"childkey#{child}#{k}": v for k, v in keys.items()})
        return tensors

    def restore(self, tensors: State) -> None:
        self.key_state = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("key/")}
        self.key_ref = {k[7:]: v.clone() for k, v in tensors.items() if k.startswith("keyref/")}
        self.child_keys = {}
        for key, value in tensors.items():
            if key.startswith("childkey#"):
                _, child, name = key.split("#")
                self.child_keys.setdefault(child, {})[name] = value.clone()


class SharedKeyLayers:
    """No personalized key layers (every method but WorldLM): K is part of the model like the
    rest, so every hook passes the model through unchanged."""

    policy: None = None

    def __init__(self) -> None:
        self.key_state: State = {}
        self.child_keys: dict[str, State] = {}

    def own(self, incoming: State) -> State:
        return incoming

    def state_for(self, child: str, state: State) -> State:
        del child
        return state

    def start_round(self, routed: tuple[RoutedResidual, ...]) -> KeyLayerRound | None:
        del routed
        return None

    def finish(self, model: State, key_round: KeyLayerRound | None) -> None:
        del model, key_round

    def adopt(self, model: State) -> None:
        del model

    def forwarded(self, exact: State, scale: float) -> State:
        del scale
        return exact

    @property
    def names(self) -> tuple[str, ...]:
        return ()

    def residual(self) -> Residual:
        return {}

    def snapshot(self) -> State:
        return {}

    def restore(self, tensors: State) -> None:
        del tensors


def check_optimizer_on_keys(path: str, step_keys: bool, policy: KeyLayerPolicy | None) -> None:
    """Refuse a server optimizer on key layers where it would not reach what children train."""
    if step_keys and policy is not None and policy.attention and policy.per_child:
        raise ConfigError(
            f"nodes.{path}.server_optimizer.key_layers: with worldlm.child_key_layers = "
            "'attended' each child is sent its own attended K, which the optimizer does not "
            "step; use child_key_layers = 'shared' or key_layers = false"
        )
