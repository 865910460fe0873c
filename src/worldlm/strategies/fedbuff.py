"""FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"):
the math of one buffered server step, and the settings a FedBuff aggregator refuses.

A server step folds K buffered changes, each from a child that trained on the model of some
earlier version, into the current model:

    model += server_lr * sum_i w_i s(staleness_i) delta_i / sum_i w_i

with w_i the tokens a child trained (FedAvg's weight), delta_i its model minus the model it was
sent, and s the staleness weight (the paper's 1/sqrt(1+s)). Normalizing by sum_i w_i rather
than sum_i w_i s_i makes stale updates move the model less, not merely weigh less against fresh
ones. The round that keeps children in flight and buffers their changes is
`federation.buffered_round`; here are pure functions on tensors and the config checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from worldlm.config import AggregatorConfig, FedBuffConfig, NodeConfig, SpeedConfig
from worldlm.core.messages import State
from worldlm.errors import ConfigError
from worldlm.strategies.fedavg import FedAvg
from worldlm.strategies.registry import StrategySettings, register_strategy

FEDBUFF = "fedbuff"
PAPER_BUFFER = 10  # the paper's K, the default where the children allow it


def staleness_weight(staleness: int, rule: str, exponent: float = 0.5) -> float:
    """s(staleness): sqrt = 1/sqrt(1+s) (the paper's), none = 1, poly = (1+s)^-exponent."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} is negative")
    if rule == "none":
        return 1.0
    if rule == "sqrt":
        return 1.0 / math.sqrt(1 + staleness)
    if rule == "poly":
        return float((1 + staleness) ** -exponent)
    raise ValueError(f"unknown staleness rule {rule!r}")


def buffered_fold(
    model: State,
    changes: Sequence[State],
    weights: Sequence[float],
    factors: Sequence[float],
    server_lr: float,
    dtype: torch.dtype = torch.float32,
) -> State:
    """model + server_lr * sum_i w_i f_i changes_i / sum_i w_i, summed in `dtype` (at least the
    model's precision) and cast back to the model's dtypes. Keys no change carries keep their
    value (what a child keeps of its own is never sent)."""
    if not changes or len(changes) != len(weights) or len(weights) != len(factors):
        raise ValueError("one weight and one staleness factor per change, and at least one")
    total = float(sum(weights))
    result = dict(model)
    for key in changes[0]:
        base = model[key]
        wide = torch.promote_types(dtype, base.dtype) if base.is_floating_point() else dtype
        acc = torch.zeros(base.shape, dtype=wide, device=base.device)  # one model tensor
        for change, weight, factor in zip(changes, weights, factors, strict=True):
            acc.add_(change[key].to(wide), alpha=weight * factor)
        acc.mul_(server_lr / total).add_(base.to(wide))
        result[key] = acc.to(base.dtype)
    return result


@register_strategy(FEDBUFF)
def fedbuff_strategy(settings: StrategySettings) -> FedAvg:
    # A FedBuff node runs buffered steps (federation.buffered_round) instead of the synchronous
    # round this object would serve; it is FedAvg so that everything that asks an aggregator
    # for its strategy (its state, its name) finds an ordinary stateless one.
    return FedAvg(settings.sum_dtype)


def check_fedbuff(key: str, settings: AggregatorConfig, n_children: int) -> None:
    """Refuse a FedBuff node's settings that it cannot honour, and fedbuff settings on a node
    that does not run FedBuff; `key` is the node's config key (nodes.PATH)."""
    if settings.strategy != FEDBUFF:
        if settings.fedbuff != FedBuffConfig():
            raise ConfigError(
                f"{key}.fedbuff: these settings apply only with strategy = 'fedbuff' "
                f"(this node's is {settings.strategy!r})"
            )
        return
    if settings.secure_aggregation.enabled:
        raise ConfigError(
            f"{key}.secure_aggregation: refused with strategy 'fedbuff': secure aggregation's "
            "pairwise masks cancel only in the sum of one fixed cohort reporting in the same "
            "round, while a FedBuff buffer mixes updates dispatched at different server "
            "versions and arriving in different steps; no mask set covers such a sum"
        )
    if settings.dp.enabled:
        raise ConfigError(
            f"{key}.dp: central DP is refused with strategy 'fedbuff': the privacy accountant "
            "charges one sampled cohort per round (sampling rate q = selected / eligible), but "
            "a FedBuff step folds whichever K updates arrive first, from models of several "
            "versions, so no sampling rate describes it and the spent epsilon would be wrong; "
            "use local DP on the leaves (dp.local_noise_multiplier) or a synchronous strategy"
        )
    optimizer = settings.server_optimizer
    if optimizer.name != "fedavg" or optimizer.lr is not None or optimizer.key_layers:
        raise ConfigError(
            f"{key}.server_optimizer: strategy 'fedbuff' takes its step with fedbuff.server_lr; "
            "a server optimizer is not composed with it (leave server_optimizer unset)"
        )
    if settings.robust.norm_bound is not None:
        raise ConfigError(
            f"{key}.robust.norm_bound: not applied by strategy 'fedbuff'; remove it "
            "(the reply checks, max_change included, still apply to every update)"
        )
    if settings.sample.fraction != 1.0:
        raise ConfigError(
            f"{key}.sample.fraction: strategy 'fedbuff' keeps fedbuff.concurrency children "
            "training instead of sampling a share per round; set concurrency instead"
        )
    if settings.fedbuff.concurrency is not None and settings.fedbuff.concurrency > n_children:
        raise ConfigError(
            f"{key}.fedbuff.concurrency: {settings.fedbuff.concurrency} is above the number of "
            f"children ({n_children})"
        )
    if settings.fedbuff.clock == "real" and settings.fedbuff.speed != SpeedConfig():
        raise ConfigError(
            f"{key}.fedbuff.speed: describes the simulated clock; with fedbuff.clock = 'real' "
            "children take as long as they really take (remove it)"
        )
    concurrency = fedbuff_concurrency(settings.fedbuff, n_children)
    if fedbuff_buffer(settings.fedbuff, concurrency) > concurrency:
        raise ConfigError(
            f"{key}.fedbuff.buffer: K = {settings.fedbuff.buffer} is above the children "
            f"training at once ({concurrency}): a step would never fill its buffer"
        )


def check_fedbuff_method(method: str, nodes: Mapping[str, NodeConfig]) -> None:
    """Refuse FedBuff under WorldLM's key layers: they are combined over one round's cohort."""
    if method != "worldlm":
        return
    for path, settings in sorted(nodes.items()):
        if isinstance(settings, AggregatorConfig) and settings.strategy == FEDBUFF:
            raise ConfigError(
                f"nodes.{path}.strategy: 'fedbuff' is refused under run.method = 'worldlm': a "
                "sub-federation's key layers K_p are combined from children that all trained "
                "from the same K_p in the same round (attention against K_p, residuals "
                "K_p - K_ref, per-child attended K, and the root's routing of residuals "
                "between sub-federations each round), and a buffer of updates from several "
                "versions of K_p has no such common reference; use hierfavg or fedper"
            )


def check_fedbuff_deployable(nodes: Mapping[str, NodeConfig]) -> None:
    """Refuse FedBuff on the simulated clock in a deployment (`worldlm serve`/`join`): there the
    children train in processes of their own, and their replies arrive when they arrive."""
    for path, settings in sorted(nodes.items()):
        if (
            isinstance(settings, AggregatorConfig)
            and settings.strategy == FEDBUFF
            and settings.fedbuff.clock != "real"
        ):
            raise ConfigError(
                f"nodes.{path}.fedbuff.clock: {settings.fedbuff.clock!r} cannot be deployed: "
                "a deployed federation has real clocks (its children train in processes of "
                "their own and their updates arrive when they do), so a simulated clock "
                "cannot order them; set fedbuff.clock = 'real' (not bit-reproducible, see "
                "docs/fedbuff.md), or run the simulation with `worldlm run`"
            )


def fedbuff_concurrency(config: FedBuffConfig, n_children: int) -> int:
    """Children training at once: the configured number, or every child."""
    return n_children if config.concurrency is None else min(config.concurrency, n_children)


def fedbuff_buffer(config: FedBuffConfig, concurrency: int) -> int:
    """K: the configured size, or the paper's 10 where `concurrency` allows it."""
    return min(PAPER_BUFFER, concurrency) if config.buffer is None else config.buffer
