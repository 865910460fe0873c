"""DP accounting that holds in deployment (issue 19, item 6): q is recomputed each round from
the children actually eligible, children are drawn with the OS's randomness (the seeded draw
is for simulation), and rounds lost to a crash are charged on resume besides their re-runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant

from worldlm import root_loop
from worldlm.config import DPConfig
from worldlm.federation.privacy_policy import DPPolicy
from worldlm.metrics.jsonl import read_metrics
from worldlm.privacy.accountant import PrivacyAccountant
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run
from worldlm.session import open_session

from .conftest import TWO_LEVEL, tiny_config
from .test_dp_run import DP
from .test_engine import StopAtRound


def test_each_round_is_charged_at_the_sampling_rate_of_its_eligible_children() -> None:
    policy = DPPolicy(DPConfig(enabled=True, noise_multiplier=1.0, seeded_noise=True), "w", 0)
    rows = []
    for r, eligible in enumerate([10, 10, 2, 2]):  # the federation shrinks to two children
        dp_round = policy.start_round({"x": torch.zeros(3)}, eligible, 2, r)
        rows.append(policy.finish_round(dp_round, r + 1))
    assert [row["sampling_rate"] for row in rows] == [0.2, 0.2, 1.0, 1.0]
    reference = RdpAccountant()
    reference.compose(PoissonSampledDpEvent(0.2, GaussianDpEvent(1.0)), 2)
    reference.compose(PoissonSampledDpEvent(1.0, GaussianDpEvent(1.0)), 2)
    assert rows[-1]["epsilon"] == pytest.approx(float(reference.get_epsilon(1e-5)), rel=0.01)


def _draws(tmp_path: Path, name: str, seeded: bool) -> list[list[str]]:
    overrides = [*DP, f"nodes.world.dp.seeded_noise={str(seeded).lower()}"]
    config = tiny_config(tmp_path, TWO_LEVEL, overrides)
    root = open_session(config, QuietProgress(), tmp_path / name).fed.root
    return [root._select(r)[1] for r in range(24)]


def test_children_are_drawn_with_os_randomness_unless_seeded_for_simulation(
    tmp_path: Path,
) -> None:
    # Seeded, every node that knows the config can predict the sample: no amplification.
    assert _draws(tmp_path, "s1", seeded=True) == _draws(tmp_path, "s2", seeded=True)
    # From the OS: two runs of one config draw differently (24 draws of 2 of 4 agree by
    # chance with probability 6^-24).
    assert _draws(tmp_path, "o1", seeded=False) != _draws(tmp_path, "o2", seeded=False)


def _epsilon_by_round(run_dir: Path) -> dict[int, float]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {r["round"]: r["epsilon"] for r in rows if r["kind"] == "privacy"}


def _lost_round_2(tmp_path: Path, name: str) -> Path:
    """A run cut as round 3 starts whose round-2 checkpoint was lost: round 2 ran (its noisy
    model went down the tree) and runs again."""
    config = tiny_config(tmp_path, TWO_LEVEL, [*DP, "stop.rounds=3", "train.local_steps=1"])
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(3), out=tmp_path / name)
    (tmp_path / name / "checkpoints" / "round-000002.wlm").unlink()
    return resume(tmp_path / name, QuietProgress()).run_dir


def test_a_round_lost_to_a_crash_is_charged_besides_its_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    charged = _epsilon_by_round(_lost_round_2(tmp_path, "charged"))
    reference = PrivacyAccountant(1.2, 0.5, 1e-5)
    reference.step(3)  # rounds 1, the lost 2, and 2 again
    assert charged[2] == pytest.approx(reference.epsilon(), rel=1e-9)
    # The attack on the books, undefended: the rerun alone is charged, and ε reads as if
    # round 2 had been released once.
    monkeypatch.setattr(root_loop, "_charge_lost_rounds", lambda *args: None)
    uncharged = _epsilon_by_round(_lost_round_2(tmp_path, "uncharged"))
    reference_two = PrivacyAccountant(1.2, 0.5, 1e-5)
    reference_two.step(2)
    assert uncharged[2] == pytest.approx(reference_two.epsilon(), rel=1e-9)
    assert uncharged[2] < charged[2]
