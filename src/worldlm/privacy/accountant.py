"""Privacy accounting of DP-FedAvg rounds with the RDP accountant of `dp_accounting`.

Each round at a DP aggregator is one Poisson-subsampled Gaussian mechanism: a child takes part
with probability q (the sampling rate: expected children / children) and the clipped sum gets
noise of multiplier z. Rényi DP composes additively over rounds (Mironov 2017), so the privacy
spent is a function of z and the rounds spent at each q: the accountant's state is that count per
q (q is recomputed each round from the children actually eligible). It is saved with z, and a
restore under another z is refused, so that a resumed run can never report a smaller ε than it
has spent.

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
    """(ε, δ) spent by rounds of a Poisson-sampled Gaussian mechanism with noise multiplier z,
    each at its own sampling rate q (the constructor's, unless `step` names another): a
    federation whose eligible children change from round to round pays each round's price."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        if not noise_multiplier >= 0:
            raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
        _check_rate(sampling_rate)
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self._by_rate: dict[float, int] = {}  # sampling rate -> rounds spent at it
        self._curves: dict[float, np.ndarray] = {}  # sampling rate -> one round's RDP curve
        self._orders: np.ndarray = np.zeros(0)
        self._curve(self.sampling_rate)

    def _curve(self, rate: float) -> np.ndarray:
        """One round's RDP curve at `rate` (rounds at one rate spend exactly n times it)."""
        if rate not in self._curves:
            # Imported here: dp_accounting (with scipy) takes a second to import, and only a
            # run with DP builds an accountant.
            from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
            from dp_accounting.rdp import RdpAccountant

            one = RdpAccountant()
            with _quiet_absl():
                one.compose(PoissonSampledDpEvent(rate, GaussianDpEvent(self.noise_multiplier)))
            self._orders = one.orders
            self._curves[rate] = one.rdp
        return self._curves[rate]

    @property
    def steps(self) -> int:
        """Rounds accounted so far."""
        return sum(self._by_rate.values())

    def step(self, n: int = 1, sampling_rate: float | None = None) -> None:
        """Account `n` more rounds (call once per round that released a noisy aggregate) at
        `sampling_rate` (default: the constructor's)."""
        if n < 0:
            raise ValueError(f"steps must be >= 0, got {n}")
        rate = self.sampling_rate if sampling_rate is None else float(sampling_rate)
        _check_rate(rate)
        self._curve(rate)
        self._by_rate[rate] = self._by_rate.get(rate, 0) + int(n)

    def epsilon(self) -> float:
        """ε spent so far at this accountant's δ: 0.0 before any step, inf when z == 0."""
        return self._epsilon(self._by_rate)

    def epsilon_after(self, extra_steps: int = 1, sampling_rate: float | None = None) -> float:
        """ε that `extra_steps` more rounds at `sampling_rate` would bring: check it against a
        budget *before* a round runs, so that a run stops without exceeding the budget."""
        if extra_steps < 0:
            raise ValueError(f"extra steps must be >= 0, got {extra_steps}")
        rate = self.sampling_rate if sampling_rate is None else float(sampling_rate)
        _check_rate(rate)
        self._curve(rate)
        spent = dict(self._by_rate)
        spent[rate] = spent.get(rate, 0) + extra_steps
        return self._epsilon(spent)

    def _epsilon(self, by_rate: dict[float, int]) -> float:
        spent = {rate: n for rate, n in by_rate.items() if n}
        if not spent:
            return 0.0  # (0 * an infinite RDP curve would be NaN)
        from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

        # Rényi DP composes by adding curves. compute_epsilon gives inf when every order is
        # infinite (z == 0 with q > 0).
        total = sum(n * self._curves[rate] for rate, n in spent.items())
        return float(compute_epsilon(self._orders, total, self.delta)[0])

    def state_dict(self) -> dict[str, Any]:
        """The rounds spent at each sampling rate, with the z they were spent under."""
        return {
            "steps": self.steps,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps_by_rate": [[rate, n] for rate, n in sorted(self._by_rate.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rounds spent; refuse ones spent under another z, which this accountant
        would price wrongly (δ is only where ε is read, so it may change). A state without
        `steps_by_rate` (older checkpoints) spent every step at its `sampling_rate`, which must
        then be this accountant's."""
        z = float(state["noise_multiplier"])
        _same("noise multiplier", z, self.noise_multiplier, "settings")
        by_rate = state.get("steps_by_rate")
        if by_rate is None:
            rate = float(state["sampling_rate"])
            _same("sampling rate", rate, self.sampling_rate, "settings and number of children")
            by_rate = [[rate, state["steps"]]]
        restored: dict[float, int] = {}
        for rate, n in by_rate:
            rate, n = float(rate), int(n)
            _check_rate(rate)
            if n < 0:
                raise CheckpointError(f"the checkpoint's privacy accountant has {n} steps")
            self._curve(rate)
            restored[rate] = restored.get(rate, 0) + n
        if sum(restored.values()) != int(state["steps"]):
            raise CheckpointError(
                "the checkpoint's privacy accountant counts its steps inconsistently"
            )
        self._by_rate = restored


def _check_rate(rate: float) -> None:
    if not 0 <= rate <= 1:
        raise ValueError(f"sampling rate must be in [0, 1], got {rate}")


def _same(what: str, saved: float, ours: float, keep: str) -> None:
    """Refuse steps the checkpoint spent under another `what`: this accountant would price
    them wrongly."""
    if saved != ours:
        raise CheckpointError(
            f"the checkpoint's privacy accountant spent its steps with {what} {saved:g}, this "
            f"run has {ours:g}: resume with the same DP {keep}, or start a new run"
        )
