"""An aggregator's differential privacy policy: DP-FedAvg rounds, adaptive clipping, and the
accountant that says what each round spent and refuses a round that would exceed the budget.

A wrapper around aggregation, not a flag inside a strategy: the aggregator asks the policy for
the round's aggregation instead of its strategy's, and hands it each round's outcome. Each
federation (node) sets its own policy in its config (`[nodes."<path>".dp]`).

Under WorldLM a sub-federation with DP makes its key layers K_p the same noisy mean as the
backbone, instead of attending over its children's raw K (which would release them without
noise): everything it sends up (the backbone, the residual of K_p) and down (K_p) is then a
post-processing of DP outputs. K still never leaves the sub-federation, which is what keeps
WorldLM's personalization under DP; routed residuals are not mixed in under DP.

Accounting: each round of this aggregator is one step of the sampled Gaussian mechanism with
sampling rate q = children selected / children eligible that round (recomputed every round, so
a federation that shrinks pays more; fixed-size sampling, accounted as Poisson sampling, the
usual approximation) and the configured noise multiplier z. The children are drawn with the
OS's secure randomness unless `dp.seeded_noise` (simulation only): a draw every node can
recompute from the config seed justifies no amplification by subsampling. Rounds that ran
after the checkpoint a run resumes from released noisy models that were seen below, so they
are charged again on resume (`charge_lost`), on top of their re-runs. With adaptive
clipping the update is noised at z_delta > z so that update and clipped count together spend
what z alone would (Andrew et al. 2021, Thm 1); the accountant is given z.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worldlm.config import DPConfig
from worldlm.core.messages import Record, State
from worldlm.errors import CheckpointError, ConfigError
from worldlm.privacy.accountant import PrivacyAccountant
from worldlm.privacy.adaptive import AdaptiveClip, default_count_stddev, update_noise_multiplier
from worldlm.privacy.dp_round import DPRound, noise_generator

if TYPE_CHECKING:
    from worldlm.federation.round_rule import AuditFn
    from worldlm.federation.secure_round import SecureOutcome
    from worldlm.strategies.registry import RoundAggregation


class DPPolicy:
    """The DP state of one aggregator across rounds (clip bound, privacy spent)."""

    def __init__(self, config: DPConfig, path: str, seed: int) -> None:
        self.config, self.path, self.seed = config, path, seed
        self.clip = config.clip
        self.adaptive: AdaptiveClip | None = None
        self.accountant: PrivacyAccountant | None = None
        self._restored: dict[str, Any] = {}  # applied once the first round fixes q
        self._rate = 1.0  # this round's sampling rate
        self._lost: list[float] = []  # rates of rounds lost to a crash, not yet charged

    def _setup(self, n_children: int, n_selected: int) -> PrivacyAccountant:
        """Build the accountant (and adaptive clipping) once the tree fixes q and n."""
        if self.accountant is None:
            cfg = self.config
            if cfg.adaptive_clip:
                sigma_b = (
                    cfg.clip_count_stddev
                    if cfg.clip_count_stddev is not None
                    else default_count_stddev(n_selected)
                )
                update_noise_multiplier(cfg.noise_multiplier, sigma_b)  # checks 2 sigma_b > z
                self.adaptive = AdaptiveClip(
                    self.clip, cfg.target_quantile, cfg.clip_learning_rate, sigma_b
                )
            self.accountant = PrivacyAccountant(
                cfg.noise_multiplier, _rate(n_children, n_selected), cfg.delta
            )
            if self._restored:
                self.accountant.load_state_dict(self._restored["accountant"])
                if self.adaptive is not None and "adaptive" in self._restored:
                    self.adaptive.load_state_dict(self._restored["adaptive"])
                    self.clip = self.adaptive.clip
            self._charge_lost(self.accountant)
        return self.accountant

    def would_exceed_budget(self, n_children: int, n_selected: int) -> bool:
        """Whether one more round would take ε above the configured budget."""
        budget = self.config.epsilon_budget
        accountant = self._setup(n_children, n_selected)
        rate = _rate(n_children, n_selected)
        return budget is not None and accountant.epsilon_after(1, rate) > budget

    def start_round(
        self, current: State, n_children: int, n_selected: int, local_round: int
    ) -> DPRound:
        self._setup(n_children, n_selected)
        self._rate = _rate(n_children, n_selected)
        z = self.config.noise_multiplier
        if self.adaptive is not None:
            z = update_noise_multiplier(z, self.adaptive.count_stddev)
        generator = noise_generator(
            self.config.seeded_noise, self.seed, self.path, "dp", local_round
        )
        return DPRound(current, self.clip, z, n_selected, generator, self.adaptive)

    def finish_round(self, dp_round: DPRound, global_round: int) -> Record:
        """Count the round's step and return its `privacy` metrics row."""
        assert self.accountant is not None
        self.accountant.step(1, self._rate)
        if self.adaptive is not None:
            self.clip = self.adaptive.clip  # updated by the round's result
        return {
            "round": global_round,
            "node": self.path,
            "kind": "privacy",
            "epsilon": self.accountant.epsilon(),
            "delta": self.config.delta,
            "steps": self.accountant.steps,
            "sampling_rate": self._rate,
            "clip": dp_round.clip,
            "next_clip": self.clip,
            "noise_multiplier": dp_round.noise_multiplier,
            "noise_stddev": dp_round.mean_noise_stddev,
            "clipped": dp_round.clipped,
            "replies": dp_round.count,
        }

    def spent_rounds(self) -> list[float]:
        """The sampling rate of every round accounted so far, one entry per round: restored
        ones not yet loaded into an accountant (it is built at the next round) and lost ones
        not yet charged included."""
        if self.accountant is not None:
            state = self.accountant.state_dict()
        elif self._restored:
            state = self._restored["accountant"]
        else:
            return list(self._lost)
        by_rate = state.get("steps_by_rate") or [[state["sampling_rate"], state["steps"]]]
        return [float(rate) for rate, n in by_rate for _ in range(int(n))] + self._lost

    def charge_lost(self, rates: list[float]) -> None:
        """Charge rounds that released noise but were lost to a crash (their re-runs are
        charged again as they run), at their sampling rates as recorded."""
        self._lost.extend(rates)
        if self.accountant is not None:
            self._charge_lost(self.accountant)

    def _charge_lost(self, accountant: PrivacyAccountant) -> None:
        for rate in self._lost:
            accountant.step(1, rate)
        self._lost = []

    def state_dict(self) -> dict[str, Any]:
        if self.accountant is None:
            state = dict(self._restored)
        else:
            state = {"accountant": self.accountant.state_dict()}
            if self.adaptive is not None:
                state["adaptive"] = self.adaptive.state_dict()
        state.pop("lost", None)
        if self._lost:  # charges not applied yet (no round since): they must survive a crash
            state["lost"] = list(self._lost)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restored = {k: v for k, v in state.items() if k != "lost"}
        if restored and "accountant" not in restored:
            raise CheckpointError(f"{self.path}: the checkpoint's DP state has no accountant")
        lost = state.get("lost", [])
        if not isinstance(lost, list) or not all(isinstance(r, int | float) for r in lost):
            raise CheckpointError(f"{self.path}: the checkpoint's pending DP charges are invalid")
        self._restored = restored
        self._lost = [float(rate) for rate in lost]
        self.accountant = None  # rebuilt with the restored steps at the next round


def _rate(n_children: int, n_selected: int) -> float:
    return min(n_selected / n_children, 1.0) if n_children else 1.0


def check_dp_settings(
    path: str, config: DPConfig, strategy: str, weighting: str = "uniform"
) -> None:
    """Refuse DP where this engine cannot give its guarantee (yet). (WorldLM's attention, per
    child or not, is off under DP — `DPRule.attends_keys` — so every child is sent the same
    noisy K.)"""
    if not config.enabled:
        return
    if strategy != "fedavg":
        raise ConfigError(
            f"nodes.{path}.dp: differential privacy runs DP-FedAvg and needs strategy "
            f"'fedavg', not {strategy!r}"
        )
    if weighting != "uniform":
        # The accountant's amplification by subsampling assumes each child is drawn with the
        # same probability; data_size draws by sizes the children report themselves.
        raise ConfigError(
            f"nodes.{path}.dp: the privacy accountant assumes uniform sampling of children; "
            f"set nodes.{path}.sample.weighting = 'uniform' (not {weighting!r})"
        )


class DPRule:
    """DP-FedAvg wrapped around an aggregator's round (a `round_rule.RoundRule`): the policy's
    budget decides whether a round runs, each reply is clipped into a DPRound in place of the
    strategy's aggregation, and the finished round is accounted and audited."""

    attends_keys = False  # attention over raw K would release it without noise

    def __init__(self, policy: DPPolicy) -> None:
        self.policy = policy

    def admits(self, n_children: int, n_expected: int) -> bool:
        return not self.policy.would_exceed_budget(n_children, n_expected)

    def start_round(
        self, current: State, n_children: int, n_selected: int, local_round: int
    ) -> DPRound:
        return self.policy.start_round(current, n_children, n_selected, local_round)

    def secure_clip(self, aggregation: RoundAggregation) -> float | None:
        return _dp_round(aggregation).clip

    def secure_fold(
        self, aggregation: RoundAggregation, current: State, out: SecureOutcome
    ) -> tuple[RoundAggregation, float]:
        del current
        dp_round = _dp_round(aggregation)
        if out.changes is None:
            return dp_round, 0.0
        dp_round.add_sum(out.changes, len(out.included), out.dp_clipped)
        return dp_round, out.error / dp_round.expected_children

    def finish_round(
        self, aggregation: RoundAggregation, global_round: int, local_round: int, audit: AuditFn
    ) -> list[Record]:
        privacy = self.policy.finish_round(_dp_round(aggregation), global_round)
        audit(
            "dp_noise",
            global_round,
            local_round=local_round,
            noise_stddev=privacy["noise_stddev"],
            clip=privacy["clip"],
            clipped=privacy["clipped"],
            epsilon=privacy["epsilon"],
            delta=privacy["delta"],
        )
        return [privacy]

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        del state

    def meta(self) -> dict[str, Any]:
        return {"dp": self.policy.state_dict()}

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.policy.load_state_dict(meta.get("dp", {}))


def _dp_round(aggregation: RoundAggregation) -> DPRound:
    # The rule made this aggregation in start_round; anything else is a wiring bug.
    assert isinstance(aggregation, DPRound), type(aggregation)
    return aggregation
