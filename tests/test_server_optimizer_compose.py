"""The root's server optimizer composes with DP-FedAvg, robust rules, secure aggregation,
compression and an inner aggregator's own optimizer: it steps on what the rule alone gives.

Each case runs one round twice, the feature alone (A) and the feature with the root's optimizer
at nesterov, momentum 0, lr L (B), and reads x0, the model the root sent, from a session of A's
config (the initial weights: a fixed seed). Round 1's children all train from x0 whatever the
root's optimizer, and DP noise is seeded by run seed, path and round, so the rule's aggregate is
the same in both runs and is A's final model: the documented step is B = x0 - L (x0 - A).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from worldlm.checkpoint import load_latest
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.runner import run
from worldlm.session import open_session

from .conftest import TWO_LEVEL, tiny_config

LR = 0.5
NESTEROV = [
    "nodes.world.server_optimizer.name=nesterov",
    "nodes.world.server_optimizer.momentum=0",
    f"nodes.world.server_optimizer.lr={LR}",
]
ONE_ROUND = ["stop.rounds=1", "train.local_steps=2"]

FOUR = {f"world/l{i}": ("med", "law")[i % 2] for i in range(4)}
FIVE = {f"world/l{i}": ("med", "law")[i % 2] for i in range(5)}
TRIO = {f"world/t{i}": topic for i, topic in enumerate(["med", "law", "code"])}

# float32 rounding: with g = fl(x0 - A), B = fl(x0 - L g) is within about one ulp of
# max(|x0|, |A|) of x0 - L (x0 - A) (the product by L = 0.5 is exact). The tiny model's weights
# are below 8 in magnitude (asserted), where an ulp is under 1e-6 (measured: 6e-8, the weights
# being near 1); 1e-5 leaves 10x room, and is still 50x below the smallest move the optimizer is
# required to make (MOVED; measured 1.7e-3 to 1.6e-2, half of the round's change).
ATOL = 1e-5
MOVED = 5e-4

Record = dict[str, Any]


class Final(NamedTuple):
    model: dict[str, torch.Tensor]  # the root's
    tensors: dict[str, torch.Tensor]  # the whole checkpoint
    run_dir: Path


def _root_model(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "node/world#model/"
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _final(tmp: Path, leaves: dict[str, str], overrides: list[str], name: str) -> Final:
    """The root's model and the whole checkpoint after one round of `overrides`."""
    config = tiny_config(tmp, leaves, [*ONE_ROUND, *overrides], n_docs=30)
    result = run(config, QuietProgress(), out=tmp / name)
    _, tensors, _ = load_latest(result.run_dir / "checkpoints")
    return Final(_root_model(tensors), tensors, result.run_dir)


def _initial(tmp: Path, leaves: dict[str, str], overrides: list[str]) -> dict[str, torch.Tensor]:
    """x0: the model the root holds before round 1 (and sends in it)."""
    config = tiny_config(tmp, leaves, [*ONE_ROUND, *overrides], n_docs=30)
    session = open_session(config, QuietProgress(), tmp / "x0")
    try:
        return {k: v.clone() for k, v in session.fed.root.state.items()}
    finally:
        session.fed.close()


def _assert_documented_step(tmp: Path, leaves: dict[str, str], feature: list[str]) -> Final:
    """B = x0 - LR (x0 - A), with the optimizer clearly moving the model off A; returns B's run,
    for the caller to check that its feature was at work."""
    x0 = _initial(tmp, leaves, feature)
    alone = _final(tmp, leaves, feature, "alone").model
    run_b = _final(tmp, leaves, [*feature, *NESTEROV], "stepped")
    stepped = run_b.model
    assert alone.keys() == stepped.keys() == x0.keys()
    moved = 0.0
    for key, a in alone.items():
        x, b = x0[key].double(), stepped[key].double()
        assert stepped[key].dtype == a.dtype == torch.float32
        assert max(x.abs().max(), a.abs().max()) < 8.0  # the scale ATOL is set for
        expected = x - LR * (x - a.double())
        torch.testing.assert_close(b, expected, rtol=0, atol=ATOL, msg=key)
        moved = max(moved, float((b - a.double()).abs().max()))
    # Skipping the optimizer would leave B = A; it moves half the round's change back.
    assert moved > MOVED, moved
    changed = max(float((a.double() - x0[k].double()).abs().max()) for k, a in alone.items())
    assert changed > 2 * MOVED, changed  # the rule itself moved the model
    return run_b


def _root_row(final: Final, kind: str) -> Record:
    """The root's one `kind` row of a one-round run."""
    rows = read_metrics(final.run_dir / "metrics.jsonl")
    (row,) = [r for r in rows if r["kind"] == kind and r.get("node") == "world"]
    return row


def _root_aggregate(final: Final) -> Record:
    row = _root_row(final, "aggregate")
    assert row["status"] == "ok"
    return row


def test_dp_fedavg_noisy_mean_is_what_the_optimizer_steps_on(tmp_path: Path) -> None:
    dp = [
        "run.method=fedavg",
        "nodes.world.dp.enabled=true",
        "nodes.world.dp.clip=0.5",
        "nodes.world.dp.noise_multiplier=0.05",
        "nodes.world.dp.seeded_noise=true",
    ]
    privacy = _root_row(_assert_documented_step(tmp_path, FOUR, dp), "privacy")
    # z C / n = 0.05 * 0.5 / 4 on each weight of the mean: an optimizer stepping on the mean
    # before the noise would miss the documented step by LR times that, about 3e-3, 300x ATOL.
    assert privacy["noise_stddev"] == 0.05 * 0.5 / 4


def test_trimmed_mean_is_what_the_optimizer_steps_on(tmp_path: Path) -> None:
    robust = ["nodes.world.strategy=trimmed_mean", "nodes.world.robust.trim_fraction=0.2"]
    row = _root_aggregate(_assert_documented_step(tmp_path, FIVE, robust))
    assert len(row["participants"]) == 5  # all five replies: 1 trimmed at each end


def test_a_secure_sum_is_what_the_optimizer_steps_on(tmp_path: Path) -> None:
    secure = ["nodes.world.secure_aggregation.enabled=true"]
    row = _root_aggregate(_assert_documented_step(tmp_path, TRIO, secure))
    assert row["secure_aggregation"] is True and len(row["participants"]) == 3


def test_int8_uplinks_decode_into_what_the_optimizer_steps_on(tmp_path: Path) -> None:
    links = [f"nodes.{leaf}.link.up=int8" for leaf in sorted(FOUR)]
    row = _root_aggregate(_assert_documented_step(tmp_path, FOUR, links))
    assert 3.5 < row["bytes_down"] / row["bytes_up"] < 4.0  # int8 up, float32 down


def test_an_inner_fedadam_and_the_root_nesterov_compose(tmp_path: Path) -> None:
    inner = ["nodes.world/med.server_optimizer.name=fedadam"]
    tensors = _assert_documented_step(tmp_path, TWO_LEVEL, inner).tensors
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    slots: dict[str, set[str]] = {}
    for key in tensors:
        if "#server_opt/" in key:
            node, name = key.split("#server_opt/")
            slots.setdefault(node, set()).add(name.rsplit("#", 1)[1])
    assert slots == {"node/world": {"momentum"}, "node/world/med": {"m", "v"}}
    model = _root_model(tensors)
    for node, names in (("node/world", ["momentum"]), ("node/world/med", ["m", "v"])):
        for key in model:  # every weight has its slots (the hierfavg backbone is all of them)
            for name in names:
                assert f"{node}#server_opt/{key}#{name}" in tensors, (node, key, name)
