"""Local differential privacy at a leaf: the leaf privatizes its own change before it leaves.

User-level DP at an aggregator (`privacy_policy`) protects each leaf from everyone downstream
of that aggregator, but the aggregator itself sees each leaf's exact change. A leaf that trusts
no one clips its change to C and adds N(0, (z_local C)²) per coordinate itself
(`nodes."<leaf>".dp.local_noise_multiplier`, with that leaf's `dp.clip`, `dp.delta` and
`dp.seeded_noise`), so its parent only ever sees the noisy change.

Accounting: each training session is one release of the Gaussian mechanism with sensitivity C
(the leaf's whole data moves its change by at most C after clipping) and noise multiplier
z_local, on every round the leaf is selected (no sampling amplification: the leaf knows it
took part). The number of releases is the leaf's session count, which checkpoints already
keep, plus the releases a deployed leaf's journal undid when its parent resumed (`lost`): those
were sent, and their re-runs draw fresh noise, so both count.
"""

from __future__ import annotations

from worldlm.config import DPConfig
from worldlm.core.messages import Record, State
from worldlm.privacy.accountant import PrivacyAccountant
from worldlm.privacy.clipping import l2_norm
from worldlm.privacy.dp_round import local_dp, noise_generator


class LocalDP:
    """A leaf's local DP: clip, add noise, and report ε after each release."""

    def __init__(self, config: DPConfig, path: str, seed: int) -> None:
        self.config, self.path, self.seed = config, path, seed
        self.accountant = PrivacyAccountant(config.local_noise_multiplier, 1.0, config.delta)

    def privatize(
        self, shared: State, sent: State, global_round: int, release: int, lost: int = 0
    ) -> tuple[State, Record]:
        """`sent + clip(shared - sent) + noise` in the dtypes of `shared`, and the leaf's
        `privacy` row; `release` counts from 0 (the leaf's sessions before this one), and
        `lost` releases undone by rewinds are charged on top."""
        cfg = self.config
        change = {k: v.double() - sent[k].double() for k, v in shared.items()}
        norm = l2_norm(change.values())
        generator = noise_generator(cfg.seeded_noise, self.seed, self.path, "local_dp", release)
        noisy = local_dp(change, cfg.clip, cfg.local_noise_multiplier, generator)
        private = {k: (sent[k].double() + noisy[k]).to(v.dtype) for k, v in shared.items()}
        releases = release + 1 + lost
        record: Record = {
            "round": global_round,
            "node": self.path,
            "kind": "privacy",
            "local": True,
            "epsilon": self.accountant.epsilon_after(releases),  # the accountant stays at 0
            "delta": cfg.delta,
            "steps": releases,
            "clip": cfg.clip,
            "noise_multiplier": cfg.local_noise_multiplier,
            "noise_stddev": cfg.local_noise_multiplier * cfg.clip,
            "clipped": int(norm > cfg.clip),
            "replies": 1,
        }
        return private, record
