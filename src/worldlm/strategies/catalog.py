"""The strategies a config can name: every rule this package registers, built by name.

Importing this module imports each rule's module, which registers it (`registry`); the rules
import only `registry`, so the registrations and their users never import each other.
"""

from __future__ import annotations

import torch

from worldlm.config import RobustConfig
from worldlm.errors import ConfigError

# The rules' modules, imported for the registration they run.
from worldlm.strategies import fedavg, fedbuff, none, robust_rounds  # noqa: F401
from worldlm.strategies.norm_bound import NormBounded
from worldlm.strategies.registry import REQUIREMENTS, STRATEGIES, Strategy, StrategySettings

SUM_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def build_strategy(
    name: str, robust: RobustConfig | None = None, *, sum_dtype: str = "float32"
) -> Strategy:
    """The strategy `name`; with `robust.norm_bound` set, wrapped so that every reply's change
    is bounded before the rule sees it. `sum_dtype` is FedAvg's running-sum precision (the
    robust rules hold the replies themselves and have no running sum)."""
    settings = RobustConfig() if robust is None else robust
    strategy = STRATEGIES[name](StrategySettings(settings, SUM_DTYPES[sum_dtype]))
    if settings.norm_bound is not None:
        return NormBounded(strategy, settings.norm_bound)
    return strategy


def check_strategy(
    name: str, robust: RobustConfig | None, n_children: int, *, path: str | None = None
) -> None:
    """Raise ConfigError if `name` cannot honour `robust` with `n_children` replies per
    round (e.g. Krum with n <= 2f + 2); the message names the node, the rule, n and f."""
    requirement = REQUIREMENTS.get(name)
    settings = RobustConfig() if robust is None else robust
    problem = None if requirement is None else requirement(settings, n_children)
    if problem is None:
        return
    where = f"nodes.{path}" if path else "a node"
    raise ConfigError(
        f"{where}: strategy {name!r} with robust.byzantine f={settings.byzantine} cannot run "
        f"with n={n_children} children per round: {problem}"
    )


def strategy_names() -> list[str]:
    return sorted(STRATEGIES)
