"""The robust rules as strategies: each round buffers every reply, then applies its rule.

Registered as "median", "trimmed_mean", "krum", "multi_krum" and "bulyan". Each reply is kept
as the child's model (`state / scale`) in the model's own dtype: the result is cast to that
dtype anyway, and no robust rule forwards an exact sum upward, so float64 copies would double
the memory (n copies of the model) without changing what is kept. The rules then compute in
float64, one parameter at a time.

Every child counts once (its weight is ignored): a Byzantine child would lie about its weight,
and a sub-federation with many leaves is one voice here. `result()` returns the aggregate with
scale 1.0. A round with fewer replies than the rule needs to outvote f Byzantine children
(e.g. Krum below 2f + 3, after dropouts) leaves the model unchanged, like a round below
`min_replies`: a rule without its guarantee is not robust.
"""

from __future__ import annotations

from collections.abc import Callable

from worldlm.config import RobustConfig
from worldlm.core.messages import State, Update
from worldlm.strategies import robust
from worldlm.strategies.registry import register_robust_strategy

Rule = Callable[[list[State]], State]  # the children's models -> the float64 aggregate


def buffered_model(update: Update, current: State) -> State:
    """The child's model in the dtype of the current model (see the module docstring)."""
    if update.scale == 1.0:
        return {k: v.to(current[k].dtype) for k, v in update.state.items()}
    return {k: (v.double() / update.scale).to(current[k].dtype) for k, v in update.state.items()}


class RobustRound:
    """One round of a robust rule: every valid reply is held until `result`."""

    def __init__(self, current: State, rule: Rule, needed: int) -> None:
        self.current = current
        self.rule = rule
        self.needed = max(needed, 1)
        self.models: list[State] = []  # memory: one model copy per reply

    def add(self, update: Update) -> None:
        self.models.append(buffered_model(update, self.current))

    @property
    def count(self) -> int:
        return len(self.models)

    def result(self) -> tuple[State, float]:
        if len(self.models) < self.needed:
            return self.current, 1.0
        return self.rule(self.models), 1.0


class RobustStrategy:
    """A stateless robust rule at one aggregator."""

    def __init__(self, rule: Rule, needed: int) -> None:
        self.rule = rule
        self.needed = needed  # replies a round needs before the rule is applied

    def start_round(self, current: State) -> RobustRound:
        return RobustRound(current, self.rule, self.needed)

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        del state


# --- requirements: why settings cannot work with n children per round --------------------


def median_requirement(cfg: RobustConfig, n: int) -> str | None:
    f = cfg.byzantine
    return None if n >= 2 * f + 1 else f"median needs n >= 2f + 1 = {2 * f + 1}"


def trimmed_mean_requirement(cfg: RobustConfig, n: int) -> str | None:
    k = robust.trimmed_count(n, cfg.trim_fraction)
    if 2 * k >= n:
        return f"trim_fraction={cfg.trim_fraction:g} drops all {n} values (2*floor(trim*n) >= n)"
    if k < cfg.byzantine:
        return (
            f"trim_fraction={cfg.trim_fraction:g} drops {k} value(s) at each end, fewer than f; "
            f"needs trim_fraction >= f/n = {cfg.byzantine / n:.3g}"
        )
    return None


def krum_requirement(cfg: RobustConfig, n: int) -> str | None:
    f = cfg.byzantine
    return None if n > 2 * f + 2 else f"krum needs n > 2f + 2, i.e. n >= {2 * f + 3}"


def multi_krum_requirement(cfg: RobustConfig, n: int) -> str | None:
    f = cfg.byzantine
    if n <= 2 * f + 2:
        return f"multi_krum needs n > 2f + 2, i.e. n >= {2 * f + 3}"
    if cfg.multi_krum_keep is not None and cfg.multi_krum_keep > n - f:
        return f"robust.multi_krum_keep={cfg.multi_krum_keep} is above n - f = {n - f}"
    return None


def bulyan_requirement(cfg: RobustConfig, n: int) -> str | None:
    f = cfg.byzantine
    return None if n >= 4 * f + 3 else f"bulyan needs n >= 4f + 3 = {4 * f + 3}"


# --- registrations -------------------------------------------------------------------------


@register_robust_strategy("median", median_requirement)
def median_strategy(cfg: RobustConfig) -> RobustStrategy:
    """Coordinate-wise median."""
    return RobustStrategy(robust.coordinate_median, 2 * cfg.byzantine + 1)


@register_robust_strategy("trimmed_mean", trimmed_mean_requirement)
def trimmed_mean_strategy(cfg: RobustConfig) -> RobustStrategy:
    """Coordinate-wise trimmed mean, trimming `trim_fraction` of the replies at each end."""
    return RobustStrategy(lambda models: robust.trimmed_mean(models, cfg.trim_fraction), 1)


@register_robust_strategy("krum", krum_requirement)
def krum_strategy(cfg: RobustConfig) -> RobustStrategy:
    """Krum: the one reply closest to its n - f - 2 nearest neighbours."""
    return RobustStrategy(lambda models: robust.krum(models, cfg.byzantine), 2 * cfg.byzantine + 3)


def _multi_krum_rule(cfg: RobustConfig) -> Rule:
    def rule(models: list[State]) -> State:
        # With fewer replies than planned (dropouts), keep at most n - f of them.
        keep = len(models) - cfg.byzantine
        if cfg.multi_krum_keep is not None:
            keep = min(keep, cfg.multi_krum_keep)
        return robust.multi_krum(models, cfg.byzantine, keep)

    return rule


@register_robust_strategy("multi_krum", multi_krum_requirement)
def multi_krum_strategy(cfg: RobustConfig) -> RobustStrategy:
    """Multi-Krum: the mean of the m replies with the best Krum scores (m default n - f)."""
    return RobustStrategy(_multi_krum_rule(cfg), 2 * cfg.byzantine + 3)


@register_robust_strategy("bulyan", bulyan_requirement)
def bulyan_strategy(cfg: RobustConfig) -> RobustStrategy:
    """Bulyan: iterated Krum, then a trimmed mean around the median per coordinate."""
    f = cfg.byzantine
    return RobustStrategy(lambda models: robust.bulyan(models, f), 4 * f + 3)
