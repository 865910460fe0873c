"""Privacy accounting of DP-FedAvg rounds with the RDP accountant of `dp_accounting`.

Each round at a DP aggregator is one Poisson-subsampled Gaussian mechanism: a child takes part
with probability q (the sampling rate: expected children / children) and the clipped sum gets
noise of multiplier z. Rényi DP composes additively over rounds (Mironov 2017), so the privacy
spent after n rounds is a function of (z, q, n) alone: the accountant's state is the number of
steps. It is saved with z and q, and a restore under other settings is refused, so that a resumed
run can never report a smaller ε than it has spent.

With adaptive clipping, pass the configured z here: the update carries the larger z_Δ and the
unclipped count its own noise, and together they spend exactly what z alone would (Andrew et al.
2021, Thm 1). Accounting with z_Δ would leave the count's release unpaid for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from worldlm.errors import CheckpointError


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence dp_accounting's warnings that a low RDP order did not converge: that order is
    left out of the minimum over orders, so ε stays a valid upper bound, and users need not see
    the series' iteration counts."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class PrivacyAccountant:
    """(ε, δ) spent by `steps` rounds of a Poisson-sampled Gaussian mechanism (z, q)."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        if not noise_multiplier >= 0:
            raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
        if not 0 <= sampling_rate <= 1:
            raise ValueError(f"sampling rate must be in [0, 1], got {sampling_rate}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self._steps = 0
        # Imported here: dp_accounting (with scipy) takes a second to import, and only a
        # run with DP builds an accountant.
        from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
        from dp_accounting.rdp import RdpAccountant

        # One round's RDP curve, computed once: n rounds spend exactly n times it.
        one = RdpAccountant()
        with _quiet_absl():
            one.compose(
                PoissonSampledDpEvent(self.sampling_rate, GaussianDpEvent(noise_multiplier))
            )
        self._orders: np.ndarray = one.orders
        self._rdp_per_step: np.ndarray = one.rdp

    @property
    def steps(self) -> int:
        """Rounds accounted so far."""
        return self._steps

    def step(self, n: int = 1) -> None:
        """Account `n` more rounds (call once per round that released a noisy aggregate)."""
        if n < 0:
            raise ValueError(f"steps must be >= 0, got {n}")
        self._steps += int(n)

    def epsilon(self) -> float:
        """ε spent so far at this accountant's δ: 0.0 before any step, inf when z == 0."""
        return self._epsilon(self._steps)

    def epsilon_after(self, extra_steps: int = 1) -> float:
        """ε that `extra_steps` more rounds would bring: check it against a budget *before* a
        round runs, so that a run stops without exceeding the budget."""
        if extra_steps < 0:
            raise ValueError(f"extra steps must be >= 0, got {extra_steps}")
        return self._epsilon(self._steps + extra_steps)

    def _epsilon(self, steps: int) -> float:
        if steps == 0:
            return 0.0  # (0 * an infinite RDP curve would be NaN)
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        # compute_epsilon gives inf when every order is infinite (z == 0 with q > 0).
        return float(compute_epsilon(self._orders, steps * self._rdp_per_step, self.delta)[0])

    def state_dict(self) -> dict[str, Any]:
        """The step count, with the (z, q) it was spent under."""
        return {
            "steps": self._steps,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count; refuse one spent under another (z, q), whose steps this
        accountant would price wrongly (δ is only where ε is read, so it may change)."""
        saved = (float(state["noise_multiplier"]), float(state["sampling_rate"]))
        if saved != (self.noise_multiplier, self.sampling_rate):
            raise CheckpointError(
                f"the checkpoint's privacy accountant spent its steps with noise multiplier "
                f"{saved[0]:g} and sampling rate {saved[1]:g}, this run has "
                f"{self.noise_multiplier:g} and {self.sampling_rate:g}: resume with the same DP "
                f"settings and number of children, or start a new run"
            )
        steps = int(state["steps"])
        if steps < 0:
            raise CheckpointError(f"the checkpoint's privacy accountant has {steps} steps")
        self._steps = steps
