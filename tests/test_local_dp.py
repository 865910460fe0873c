"""Local DP at leaves (issue 5): each leaf clips and noises its own change before sending it,
reports ε every round, and the parent only ever sees the noisy change."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch

from worldlm.config import DPConfig
from worldlm.errors import ConfigError
from worldlm.federation.local_privacy import LocalDP
from worldlm.metrics.jsonl import read_metrics
from worldlm.privacy.accountant import PrivacyAccountant
from worldlm.progress import QuietProgress
from worldlm.runner import run

from .conftest import TWO_LEVEL, tiny_config

LEAVES = sorted(TWO_LEVEL)


def _local(z: float, clip: float) -> list[str]:
    return [
        *(f"nodes.{leaf}.dp.local_noise_multiplier={z}" for leaf in LEAVES),
        *(f"nodes.{leaf}.dp.clip={clip}" for leaf in LEAVES),
        *(f"nodes.{leaf}.dp.seeded_noise=true" for leaf in LEAVES),
    ]


def test_a_release_is_the_clipped_change_plus_gaussian_noise_of_z_c() -> None:
    config = DPConfig(clip=0.5, local_noise_multiplier=2.0, seeded_noise=True)
    sent = {"w": torch.zeros(200_000), "b": torch.ones(3)}
    shared = {"w": torch.full((200_000,), 0.01), "b": torch.ones(3)}  # change norm 4.47 > C
    private, row = LocalDP(config, "world/a", 0).privatize(shared, sent, 1, 0)
    again, _ = LocalDP(config, "world/a", 0).privatize(shared, sent, 1, 0)
    assert all(torch.equal(private[k], again[k]) for k in private)  # seeded: reproducible
    assert private["w"].dtype == torch.float32
    noise = private["w"].double() - shared["w"].double() * (0.5 / math.sqrt(200_000 * 1e-4))
    assert noise.std().item() == pytest.approx(2.0 * 0.5, rel=0.01)
    assert abs(noise.mean().item()) < 0.01
    assert row["clipped"] == 1 and row["local"] is True and row["steps"] == 1
    assert row["epsilon"] == pytest.approx(
        PrivacyAccountant(2.0, 1.0, 1e-5).epsilon_after(1), rel=1e-9
    )


def test_leaves_report_epsilon_every_round_and_send_only_noisy_changes(tmp_path: Path) -> None:
    z, clip = 1.5, 0.25
    config = tiny_config(tmp_path, TWO_LEVEL, [*_local(z, clip), "stop.rounds=2"])
    result = run(config, QuietProgress(), out=tmp_path / "ldp")
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "privacy"]
    reference = PrivacyAccountant(z, 1.0, 1e-5)
    for r in (1, 2):
        assert sorted(row["node"] for row in rows if row["round"] == r) == LEAVES
        for row in (row for row in rows if row["round"] == r):
            assert row["local"] is True
            assert row["epsilon"] == pytest.approx(reference.epsilon_after(r), rel=1e-9)
    # What each parent received moved the model by about the noise's norm z C sqrt(P), not
    # by the leaf's own change (a few units after two rounds): it never saw the exact change.
    n_params = result.parameters
    expected = z * clip * math.sqrt(n_params)
    with sqlite3.connect(result.run_dir / "audit.sqlite") as conn:
        accepted = [
            json.loads(f)
            for (f,) in conn.execute("SELECT fields FROM entries WHERE event = 'update_accepted'")
        ]
    from_leaves = [e["change_norm"] for e in accepted if e["sender"] in LEAVES]
    assert len(from_leaves) == 2 * len(LEAVES)
    for norm in from_leaves:
        assert norm == pytest.approx(expected, rel=0.05)


def test_without_local_dp_the_parent_sees_the_small_exact_change(tmp_path: Path) -> None:
    """The teeth of the test above: the same run without local DP sends changes far smaller
    than the noise's norm, so that test would fail if leaves did not add noise."""
    config = tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=1"])
    result = run(config, QuietProgress(), out=tmp_path / "plain")
    n_params = result.parameters
    with sqlite3.connect(result.run_dir / "audit.sqlite") as conn:
        norms = [
            json.loads(f)["change_norm"]
            for (f,) in conn.execute("SELECT fields FROM entries WHERE event = 'update_accepted'")
        ]
    assert max(norms) < 0.5 * 1.5 * 0.25 * math.sqrt(n_params)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nodes.world/med/a.dp.enabled=true"], "a leaf privatizes its own change"),
        (["nodes.world/med.dp.local_noise_multiplier=1.0"], "world/med is an aggregator"),
    ],
)
def test_local_dp_in_the_wrong_place_is_refused(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, TWO_LEVEL, overrides)
