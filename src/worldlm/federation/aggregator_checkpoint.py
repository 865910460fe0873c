"""An aggregator's state in a checkpoint, and back: its model, its rule's, key layers', link's,
server optimizer's and round runner's state, the residuals it routes, and its counters."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from worldlm.compression.link import Uplink
from worldlm.core.messages import Residual, State
from worldlm.federation.key_layers import KeyLayers
from worldlm.federation.round_rule import RoundRule
from worldlm.federation.round_runner import RoundRunner
from worldlm.federation.round_state import under_prefix
from worldlm.strategies.server_optimizer import ServerOptimizer


class Aggregator(Protocol):
    """What is checkpointed of `federation.aggregator.Aggregator` (a protocol, not the class:
    the aggregator imports this)."""

    state: State
    rounds_done: int
    misses: dict[str, int]
    benched_until: dict[str, int]
    residuals: dict[str, Residual]
    routes: dict[str, list[tuple[str, float]]]
    rule: RoundRule
    keys: KeyLayers
    uplink: Uplink
    optimizer: ServerOptimizer
    rounds: RoundRunner


def aggregator_snapshot(agg: Aggregator) -> tuple[State, dict[str, Any]]:
    tensors = {f"model/{k}": v for k, v in agg.state.items()}
    tensors.update({f"strategy/{k}": v for k, v in agg.rule.state_dict().items()})
    tensors.update(agg.keys.snapshot())
    tensors.update({f"link/{k}": v for k, v in agg.uplink.state_dict().items()})
    tensors.update({f"server_opt/{k}": v for k, v in agg.optimizer.state_dict().items()})
    runner_tensors, runner_meta = agg.rounds.snapshot()  # FedBuff's work in flight
    tensors.update({f"runner/{k}": v for k, v in runner_tensors.items()})
    tensors.update(residual_tensors(agg.residuals))
    meta = {
        "rounds_done": agg.rounds_done,
        "routes": agg.routes,
        "misses": agg.misses,
        "benched_until": agg.benched_until,
        **agg.rule.meta(),
    }
    if runner_meta:
        meta["runner"] = runner_meta
    return tensors, meta


def aggregator_restore(agg: Aggregator, tensors: State, meta: dict[str, Any]) -> None:
    agg.rounds_done = int(meta["rounds_done"])
    agg.misses = {k: int(v) for k, v in meta.get("misses", {}).items()}
    agg.benched_until = {k: int(v) for k, v in meta.get("benched_until", {}).items()}
    agg.rule.load_meta(meta)
    agg.state = {k[6:]: v.clone() for k, v in tensors.items() if k.startswith("model/")}
    agg.keys.restore(tensors)
    agg.uplink.load_state_dict(under_prefix("link/", tensors))
    agg.optimizer.load_state_dict(under_prefix("server_opt/", tensors))
    agg.rounds.restore(under_prefix("runner/", tensors), meta.get("runner", {}))
    agg.residuals = residuals_from(tensors)
    agg.routes = {k: [(s, float(w)) for s, w in v] for k, v in meta.get("routes", {}).items()}
    agg.rule.load_state_dict(under_prefix("strategy/", tensors))


def residual_tensors(residuals: dict[str, Residual]) -> State:
    """Each source's residual factors as `residual#<source>#<name>#U` (and `#V`)."""
    tensors: State = {}
    for source, residual in sorted(residuals.items()):
        for name, (left, right) in residual.items():
            tensors[f"residual#{source}#{name}#U"] = left
            tensors[f"residual#{source}#{name}#V"] = right
    return tensors


def residuals_from(tensors: State) -> dict[str, Residual]:
    factors: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        if key.startswith("residual#"):
            _, source, name, part = key.split("#")
            factors.setdefault(source, {}).setdefault(name, {})[part] = value.clone()
    return {s: {n: (uv["U"], uv["V"]) for n, uv in names.items()} for s, names in factors.items()}
