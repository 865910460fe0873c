"""Differential privacy in a real run (issue 5): ε reported every round, in metrics, audit,
summary and model card; the run stops before its budget; resume keeps ε and the noise exact."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from worldlm.errors import ConfigError
from worldlm.metrics.jsonl import read_metrics
from worldlm.privacy.accountant import PrivacyAccountant
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run
from worldlm.session import open_session

from .conftest import TWO_LEVEL, tiny_config
from .test_engine import StopAtRound

DP = [
    "run.method=fedavg",
    "nodes.world.dp.enabled=true",
    "nodes.world.dp.clip=0.5",
    "nodes.world.dp.noise_multiplier=1.2",
    "nodes.world.dp.seeded_noise=true",
    "nodes.world.sample.fraction=0.5",
]


def _privacy_rows(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "privacy"]


def test_epsilon_is_reported_every_round_everywhere(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, [*DP, "stop.rounds=3"])
    result = run(config, QuietProgress(), out=tmp_path / "dp")
    rows = _privacy_rows(result.run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    # The accountant's figures: 2 of 4 leaves sampled (q = 0.5), z = 1.2, one step per round.
    reference = PrivacyAccountant(1.2, 0.5, 1e-5)
    for row in rows:
        reference.step()
        assert row["epsilon"] == pytest.approx(reference.epsilon(), rel=1e-9)
        assert row["noise_stddev"] == pytest.approx(1.2 * 0.5 / 2)
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["privacy"]["world"]["epsilon"] == rows[-1]["epsilon"]
    card = (result.run_dir / "final" / "world" / "README.md").read_text()
    assert f"| world | {rows[-1]['epsilon']} | 1e-05 |" in card
    with sqlite3.connect(result.run_dir / "audit.sqlite") as conn:
        noise = [
            json.loads(f)
            for (f,) in conn.execute("SELECT fields FROM entries WHERE event = 'dp_noise'")
        ]
        factors = [
            json.loads(f)["clip_factor"]
            for (f,) in conn.execute("SELECT fields FROM entries WHERE event = 'update_accepted'")
        ]
    assert [n["epsilon"] for n in noise] == [r["epsilon"] for r in rows]
    assert len(factors) == 6 and all(0 < f <= 1 for f in factors)


def test_the_run_stops_before_its_budget_is_exceeded(tmp_path: Path) -> None:
    accountant = PrivacyAccountant(1.2, 0.5, 1e-5)
    accountant.step(2)
    after_two, after_three = accountant.epsilon(), accountant.epsilon_after(1)
    budget = (after_two + after_three) / 2  # room for two rounds, not three
    config = tiny_config(
        tmp_path, TWO_LEVEL, [*DP, "stop.rounds=6", f"nodes.world.dp.epsilon_budget={budget}"]
    )
    result = run(config, QuietProgress(), out=tmp_path / "budget")
    assert result.stop_reason == "privacy_budget"
    rows = _privacy_rows(result.run_dir)
    assert len(rows) == 2 and rows[-1]["epsilon"] <= budget
    statuses = [
        r["status"]
        for r in read_metrics(result.run_dir / "metrics.jsonl")
        if r["kind"] == "aggregate"
    ]
    assert statuses == ["ok", "ok", "privacy_budget_exhausted"]


def test_resume_keeps_the_privacy_spent_and_the_seeded_noise(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path,
        TWO_LEVEL,
        [
            *DP,
            "stop.rounds=3",
            "nodes.world.dp.adaptive_clip=true",
            "nodes.world.dp.clip_count_stddev=1.0",
        ],
    )
    whole = run(config, QuietProgress(), out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(3), out=tmp_path / "cut")
    resumed = resume(tmp_path / "cut", QuietProgress())
    final = "checkpoints/round-000003.wlm"
    assert (resumed.run_dir / final).read_bytes() == (whole.run_dir / final).read_bytes()
    # ε never goes down after recovery: the resumed run's rows equal the uninterrupted run's.
    assert _privacy_rows(resumed.run_dir) == _privacy_rows(whole.run_dir)
    clips = [r["clip"] for r in _privacy_rows(whole.run_dir)]
    assert len(set(clips)) == 3  # adaptive clipping moved C each round


def test_dp_where_it_cannot_hold_fails_at_start(tmp_path: Path) -> None:
    overrides = ["nodes.world.dp.enabled=true", "nodes.world.strategy=none"]
    config = tiny_config(tmp_path, TWO_LEVEL, overrides)
    with pytest.raises(ConfigError, match="needs strategy 'fedavg'"):
        open_session(config, QuietProgress(), tmp_path / "never")
    # Sampling by self-reported sizes breaks the accountant's uniform-subsampling assumption.
    overrides = ["nodes.world.dp.enabled=true", "nodes.world.sample.weighting=data_size"]
    config = tiny_config(tmp_path, TWO_LEVEL, overrides)
    with pytest.raises(ConfigError, match=r"nodes\.world\.sample\.weighting = 'uniform'"):
        open_session(config, QuietProgress(), tmp_path / "never2")


def test_attended_child_key_layers_are_off_under_dp(tmp_path: Path) -> None:
    """Each child's own attention mix of its siblings' raw K would release them without noise:
    under DP every child of the sub-federation is sent the same noisy K instead."""
    overrides = [
        "run.method=worldlm",
        "worldlm.attention=true",
        "worldlm.child_key_layers=attended",
    ]
    dp = ["nodes.world/med.dp.enabled=true", "nodes.world/med.dp.noise_multiplier=0.5"]
    for with_dp in (False, True):
        config = tiny_config(tmp_path, TWO_LEVEL, [*overrides, *(dp if with_dp else [])])
        fed = open_session(config, QuietProgress(), tmp_path / str(with_dp)).fed
        fed.root.run_round(fed.root.state, 1)
        med = fed.aggregators["world/med"]
        # without DP each child is sent its own attended K; with DP none is kept
        assert bool(med.keys.child_keys) is not with_dp


def test_worldlm_sub_federations_with_dp_keep_their_own_key_layers(tmp_path: Path) -> None:
    dp = [
        f"nodes.world/{sub}.dp.{key}"
        for sub in ("med", "soft")
        for key in ("enabled=true", "clip=0.5", "noise_multiplier=0.5", "seeded_noise=true")
    ]
    config = tiny_config(tmp_path, TWO_LEVEL, ["run.method=worldlm", "stop.rounds=2", *dp])
    result = run(config, QuietProgress(), out=tmp_path / "wdp")
    rows = _privacy_rows(result.run_dir)
    assert sorted({r["node"] for r in rows}) == ["world/med", "world/soft"]
    assert all(r["replies"] == 2 and r["epsilon"] > 0 for r in rows)
    # Each sub-federation deploys its own (noisy-mean) key layers: their models differ.
    med = (result.run_dir / "final/world/med/model.safetensors").read_bytes()
    soft = (result.run_dir / "final/world/soft/model.safetensors").read_bytes()
    assert med != soft
