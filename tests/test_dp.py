"""Differential privacy building blocks (TESTPLAN §G 26–29): clipping bounds, noise level and
count, the accountant against dp_accounting's own numbers, adaptive clipping's quantile."""

from __future__ import annotations

import math

import pytest
import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant

from worldlm.core.messages import State, Update
from worldlm.errors import CheckpointError, ConfigError, UpdateRejected
from worldlm.privacy.accountant import PrivacyAccountant
from worldlm.privacy.adaptive import AdaptiveClip, default_count_stddev, update_noise_multiplier
from worldlm.privacy.clipping import clip_delta, clip_factor, delta_norm, l2_norm
from worldlm.privacy.dp_round import DPRound, gaussian_like, local_dp, noise_generator


def _update(state: State, sender: str = "root/a", scale: float = 1.0) -> Update:
    return Update(sender, 0, "n", state, weight=1.0, scale=scale)


def _gen(*parts: object) -> torch.Generator:
    return noise_generator(True, 1234, *parts)


def _change(round_: DPRound) -> State:
    model, scale = round_.result()
    assert scale == 1.0
    return {k: model[k] - round_.current[k].double() for k in model}


# --- 26: every clipped change has norm <= C (1 + 1e-6) ----------------------------------------


def _adversarial_cases() -> list[tuple[str, State, float]]:
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (64, 64), generator=g).float() * 2 - 1
    return [
        ("small", {"w": torch.randn(50, 20, generator=g) * 1e-3}, 1.0),
        (
            "gaussian",
            {"w": torch.randn(50, 20, generator=g), "b": torch.randn(20, generator=g)},
            1.0,
        ),
        ("float32 1e30", {"w": signs * 1e30, "b": torch.full((7,), -1e30)}, 1.0),
        ("float32 max", {"w": torch.full((128, 128), 3.0e38)}, 0.5),
        ("float64 1e300", {"w": signs.double() * 1e300}, 1.0),
        ("many keys", {f"k{i}": torch.full((100,), 1e20) for i in range(200)}, 1.0),
        ("tiny C", {"w": torch.randn(300, generator=g) * 1e10}, 1e-12),
        ("denormals", {"w": torch.full((10,), 1e-310, dtype=torch.float64)}, 1e-320),
        ("zero", {"w": torch.zeros(5)}, 1.0),
    ]


@pytest.mark.parametrize("name,change,clip", _adversarial_cases())
def test_clipped_changes_are_within_the_bound(name: str, change: State, clip: float) -> None:
    bound = clip * (1 + 1e-6)
    assert l2_norm(clip_delta(change, clip).values()) <= bound, name
    # Through a round (z = 0, one expected child): the new model moves by the clipped change.
    current = {k: torch.zeros_like(v) for k, v in change.items()}
    round_ = DPRound(current, clip, 0.0, 1, _gen(name))
    norm, factor = round_.add(_update(change))
    assert delta_norm(_change(round_), current) <= bound, name
    assert (round_.last_norm, round_.last_clip_factor) == (norm, factor)
    assert round_.clipped == (norm > clip)


def test_clipping_has_teeth_and_norms_do_not_overflow() -> None:
    for name, change, clip in _adversarial_cases()[2:-1]:  # the adversarial ones
        # Unclipped, these changes break the bound (so the test above checks something).
        assert l2_norm(change.values()) > clip * (1 + 1e-6), name
    huge = torch.full((64, 64), 1e300, dtype=torch.float64)
    assert math.isinf(float(torch.linalg.vector_norm(huge)))  # the naive norm overflows
    assert l2_norm([huge]) == pytest.approx(64 * 1e300, rel=1e-12)


def test_a_change_with_nan_or_inf_is_an_error_never_a_clip() -> None:
    current = {"w": torch.zeros(4)}
    for bad in (math.inf, -math.inf, math.nan):
        model = {"w": torch.tensor([0.0, 1.0, bad, 2.0])}
        with pytest.raises(ValueError, match="NaN or infinite"):
            delta_norm(model, current)
        with pytest.raises(UpdateRejected, match="NaN or infinite"):
            DPRound(current, 1.0, 1.0, 2, _gen()).add(_update(model))
    # Finite float64 values whose difference overflows are refused too.
    big = {"w": torch.tensor([1.7e308], dtype=torch.float64)}
    with pytest.raises(UpdateRejected):
        DPRound({"w": -big["w"]}, 1.0, 1.0, 2, _gen()).add(_update(big))


def test_clip_factor() -> None:
    assert clip_factor(0.0, 1.0) == 1.0
    assert clip_factor(0.5, 1.0) == 1.0
    assert clip_factor(4.0, 1.0) == 0.25
    for norm, clip in ((math.inf, 1.0), (math.nan, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, -1.0)):
        with pytest.raises(ValueError):
            clip_factor(norm, clip)


# --- 27: noise at z C / expected children, added once per round -------------------------------


def _noise_draws(updates: int, draws: int = 500) -> torch.Tensor:
    """(draws, 1000): the change of the model over rounds whose children did not move it."""
    current = {"w": torch.zeros(1000)}
    gen = _gen("noise", updates)
    out = []
    for _ in range(draws):
        round_ = DPRound(current, 0.7, 1.3, 10, gen)
        for i in range(updates):
            round_.add(_update({"w": torch.zeros(1000)}, sender=f"root/c{i}"))
        out.append(_change(round_)["w"])
    return torch.stack(out)


def test_noise_std_is_z_c_over_expected_children() -> None:
    target = 1.3 * 0.7 / 10
    draws = _noise_draws(1)
    per_coordinate = draws.std(dim=0)  # (1000,): over the 500 rounds
    assert abs(float(per_coordinate.mean()) / target - 1) < 0.15
    assert abs(float(draws.std()) / target - 1) < 0.15
    assert abs(float(draws.mean())) < 0.05 * target
    assert DPRound({"w": torch.zeros(1)}, 0.7, 1.3, 10, _gen()).mean_noise_stddev == target


def test_noise_is_added_once_per_round_not_per_update() -> None:
    k = 8
    one, many = float(_noise_draws(1).std()), float(_noise_draws(k).std())
    assert abs(many / one - 1) < 0.15
    # Teeth: noise drawn per update would be sqrt(k) times larger, far outside the band.
    gen = _gen("per-update")
    zeros = torch.zeros(500, 1000)
    per_update = sum(gaussian_like(zeros, 1.3 * 0.7, gen) for _ in range(k)) / 10
    assert abs(float(per_update.std()) / one - 1) > 0.15
    assert float(per_update.std()) / one == pytest.approx(math.sqrt(k), rel=0.1)


def test_mean_divides_by_expected_children_with_equal_weights() -> None:
    current = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
    d = {"w": torch.tensor([0.1, -0.2, 0.0]), "b": torch.tensor([0.1])}
    round_ = DPRound(current, 1.0, 0.0, 10, _gen())
    for i, weight in enumerate((1.0, 50.0, 1e6)):  # token weights are ignored
        model = {k: current[k] + d[k] for k in current}
        round_.add(Update(f"root/c{i}", 0, "n", model, weight=weight))
    far = {"w": current["w"] + torch.tensor([300.0, 0.0, 400.0]), "b": current["b"]}
    round_.add(_update(far, sender="root/far", scale=1.0))
    forwarded = {k: 2 * (current[k] + d[k]).double() for k in current}  # a sum with scale 2
    round_.add(_update(forwarded, sender="root/sub", scale=2.0))
    assert (round_.count, round_.clipped) == (5, 1)
    assert round_.last_norm == pytest.approx(math.sqrt(d["w"].square().sum() + 0.01), rel=1e-6)
    change = _change(round_)
    # 4 children moved by d, one clipped to (0.6, 0, 0.8): the sum over 10 expected, not 5.
    expected_w = (4 * d["w"].double() + torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)) / 10
    torch.testing.assert_close(change["w"], expected_w, rtol=0, atol=1e-7)
    torch.testing.assert_close(change["b"], 4 * d["b"].double() / 10, rtol=0, atol=1e-7)


def test_result_is_float64_drawn_once_and_leaves_current_alone() -> None:
    current = {"w": torch.randn(6, dtype=torch.float64)}
    kept = current["w"].clone()
    round_ = DPRound(current, 1.0, 2.0, 3, _gen())
    round_.add(_update({"w": current["w"] + 0.1}))
    first, second = round_.result(), round_.result()
    assert first[0]["w"].dtype == torch.float64 and first[1] == 1.0
    assert torch.equal(first[0]["w"], second[0]["w"])
    assert torch.equal(current["w"], kept)
    with pytest.raises(RuntimeError, match="after result"):
        round_.add(_update(current))


def test_seeded_noise_repeats_and_secure_noise_does_not() -> None:
    def draw(gen: torch.Generator) -> torch.Tensor:
        return gaussian_like(torch.zeros(8), 1.0, gen)

    a, b = noise_generator(True, 7, "world", 3), noise_generator(True, 7, "world", 3)
    assert torch.equal(draw(a), draw(b))
    assert not torch.equal(draw(noise_generator(True, 7, "world", 4)), draw(_gen("x")))
    assert not torch.equal(draw(noise_generator(False, 7)), draw(noise_generator(False, 7)))


def test_local_dp_clips_then_adds_noise() -> None:
    delta = {"w": torch.full((20000,), 1e6)}
    without = local_dp(delta, 2.0, 0.0, _gen())
    assert l2_norm(without.values()) <= 2.0 * (1 + 1e-6)
    noisy = local_dp(delta, 2.0, 0.5, _gen())
    noise = noisy["w"] - without["w"]
    assert abs(float(noise.std()) / (0.5 * 2.0) - 1) < 0.05


# --- 28: the accountant --------------------------------------------------------------------


def _reference_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """dp_accounting's own composition of `steps` events (not the wrapper's cached curve)."""
    accountant = RdpAccountant()
    accountant.compose(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(
    "z,q,steps,delta",
    [(1.1, 0.01, 300, 1e-5), (0.8, 0.1, 40, 1e-6), (4.0, 1.0, 10, 1e-5)],
)
def test_accountant_reproduces_dp_accounting(z: float, q: float, steps: int, delta: float) -> None:
    accountant = PrivacyAccountant(z, q, delta)
    accountant.step(steps)
    reference = _reference_epsilon(z, q, steps, delta)
    assert accountant.steps == steps
    assert accountant.epsilon() == pytest.approx(reference, rel=0.01)
    assert 0 < reference < math.inf


def test_accountant_matches_a_published_figure() -> None:
    # dp_accounting's own test (test_compute_epsilon_delta_gaussian): one Gaussian mechanism with
    # z = 4.530877117 is exactly (1, 1e-6)-DP (the analytic Gaussian mechanism, Balle & Wang 2018).
    accountant = PrivacyAccountant(4.530877117, 1.0, 1e-6)
    accountant.step()
    assert accountant.epsilon() == pytest.approx(1.0, rel=0.01)


def test_epsilon_is_zero_before_a_step_monotone_and_infinite_without_noise() -> None:
    accountant = PrivacyAccountant(1.0, 0.2, 1e-5)
    assert accountant.epsilon() == 0.0
    previous = 0.0
    for _ in range(30):
        accountant.step()
        eps = accountant.epsilon()
        assert eps > previous
        previous = eps
    noiseless = PrivacyAccountant(0.0, 0.2, 1e-5)
    assert noiseless.epsilon() == 0.0
    noiseless.step()
    assert noiseless.epsilon() == math.inf


def test_epsilon_after_stops_a_run_before_its_budget() -> None:
    budget = 4.0
    accountant = PrivacyAccountant(1.0, 0.1, 1e-5)
    while accountant.epsilon_after(1) <= budget:
        accountant.step()
    assert 0 < accountant.epsilon() <= budget < accountant.epsilon_after(1)
    assert accountant.epsilon_after(0) == accountant.epsilon()
    # Teeth: checking only after each round overshoots the budget.
    naive = PrivacyAccountant(1.0, 0.1, 1e-5)
    while naive.epsilon() <= budget:
        naive.step()
    assert naive.epsilon() > budget


def test_accountant_restore_keeps_the_privacy_spent() -> None:
    accountant = PrivacyAccountant(1.2, 0.05, 1e-5)
    accountant.step(17)
    state = accountant.state_dict()
    assert state == {
        "steps": 17,
        "noise_multiplier": 1.2,
        "sampling_rate": 0.05,
        "steps_by_rate": [[0.05, 17]],
    }
    restored = PrivacyAccountant(1.2, 0.05, 1e-5)
    restored.load_state_dict(state)
    assert restored.steps == 17 and restored.epsilon() == accountant.epsilon()
    # Restored under another q, the steps keep their own price.
    elsewhere = PrivacyAccountant(1.2, 0.01, 1e-5)
    elsewhere.load_state_dict(state)
    assert elsewhere.epsilon() == pytest.approx(accountant.epsilon(), rel=1e-12)
    with pytest.raises(CheckpointError, match="same DP settings"):  # a cheaper noise price
        PrivacyAccountant(2.0, 0.05, 1e-5).load_state_dict(state)
    # An older state (no steps_by_rate) spent every step at its q: only that q may restore it.
    old = {"steps": 17, "noise_multiplier": 1.2, "sampling_rate": 0.05}
    with pytest.raises(CheckpointError, match="sampling rate"):
        PrivacyAccountant(1.2, 0.01, 1e-5).load_state_dict(old)


def test_rounds_at_different_sampling_rates_compose_at_their_own_rates() -> None:
    """A federation that shrinks from 10 eligible children to 2 (q 0.2 -> 1.0) pays the higher
    price for its later rounds; pricing them all at the first round's q under-reports ε."""
    accountant = PrivacyAccountant(1.0, 0.2, 1e-5)
    accountant.step(5, 0.2)
    accountant.step(5, 1.0)
    reference = RdpAccountant()
    reference.compose(PoissonSampledDpEvent(0.2, GaussianDpEvent(1.0)), 5)
    reference.compose(PoissonSampledDpEvent(1.0, GaussianDpEvent(1.0)), 5)
    assert accountant.epsilon() == pytest.approx(float(reference.get_epsilon(1e-5)), rel=0.01)
    fixed_q = PrivacyAccountant(1.0, 0.2, 1e-5)  # the attack: q fixed at the first round
    fixed_q.step(10)
    assert fixed_q.epsilon() < 0.7 * accountant.epsilon()
    assert accountant.epsilon_after(1, 1.0) > accountant.epsilon_after(1, 0.2)


# --- 29: adaptive clipping -----------------------------------------------------------------


def _lognormal_changes(n: int, gen: torch.Generator) -> list[State]:
    """n changes in 4 dimensions whose norms are lognormal(0, 1) (median 1)."""
    directions = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=1)
    norms = torch.exp(torch.randn(n, 1, generator=gen))
    return [{"w": row} for row in directions * norms]


def _share_unclipped(clip: float) -> float:
    """P(norm <= C) for lognormal(0, 1) norms."""
    return 0.5 * math.erfc(-math.log(clip) / math.sqrt(2))


@pytest.mark.parametrize("start,target", [(0.05, 0.5), (20.0, 0.5), (1.0, 0.8)])
def test_adaptive_clipping_tracks_its_target_quantile(start: float, target: float) -> None:
    n = 100
    adaptive = AdaptiveClip(start, target, 0.2, default_count_stddev(n))
    gen, data = _gen("adaptive", start, target), torch.Generator().manual_seed(5)
    current = {"w": torch.zeros(4)}
    z_delta = update_noise_multiplier(1.0, adaptive.count_stddev)
    assert abs(_share_unclipped(start) - target) > 0.2  # teeth: the start is far off
    for _ in range(50):
        round_ = DPRound(current, adaptive.clip, z_delta, n, gen, adaptive)
        for i, change in enumerate(_lognormal_changes(n, data)):
            round_.add(_update(change, sender=f"root/c{i}"))
        before = adaptive.clip
        round_.result()
        assert adaptive.clip != before
    assert abs(_share_unclipped(adaptive.clip) - target) <= 0.05
    # The same on fresh norms, counted rather than read off the distribution.
    fresh = _lognormal_changes(20000, data)
    unclipped = sum(l2_norm(c.values()) <= adaptive.clip for c in fresh) / len(fresh)
    assert abs(unclipped - target) <= 0.05


def test_update_noise_multiplier_keeps_the_total_at_z() -> None:
    z, sigma_b = 1.0, 5.0
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta > z
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)
    assert update_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(ConfigError, match="clip_count_stddev > noise_multiplier / 2"):
        update_noise_multiplier(1.0, 0.5)


def test_adaptive_clip_update_and_checkpoint() -> None:
    adaptive = AdaptiveClip(1.0, 0.5, 0.2, 0.0)
    assert adaptive.update(10, 10, _gen()) == pytest.approx(math.exp(-0.1))  # all unclipped
    assert adaptive.update(0, 10, _gen()) == pytest.approx(1.0)  # none unclipped
    adaptive.clip = 3.5
    restored = AdaptiveClip(1.0, 0.5, 0.2, 0.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.clip == 3.5
    with pytest.raises(ValueError, match="not the adaptive clip"):
        DPRound({"w": torch.zeros(1)}, 1.0, 1.0, 2, _gen(), restored)
    with pytest.raises(ConfigError, match="target_quantile"):
        AdaptiveClip(1.0, 1.0, 0.2, 0.0)
