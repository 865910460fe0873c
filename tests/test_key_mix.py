"""Where a WorldLM leaf starts a round (federation.key_mix): with key_mix_choice = "validated"
each leaf holds some of its training blocks out, never trains on them, and starts from the
candidate share whose start scores lowest on them, so that a leaf better off alone keeps its
own weights and one the federation serves takes its weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worldlm.errors import DataError
from worldlm.federation.key_mix import FixedMix, ValidatedMix, mixed_start, split_dev
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.runner import run
from worldlm.session import open_session

from .conftest import TWO_LEVEL, tiny_config

VALIDATED = [
    "run.method='worldlm'",
    "worldlm.key_mix_choice='validated'",
    "worldlm.dev_fraction=0.25",
]


def test_held_out_blocks_are_a_seeded_part_never_trained_on() -> None:
    blocks = torch.arange(40).reshape(20, 2)
    train, dev = split_dev(blocks, 0.25, seed=3, name="a")
    assert (train.shape[0], dev.shape[0]) == (15, 5)
    rows = {tuple(r) for r in train.tolist()} | {tuple(r) for r in dev.tolist()}
    assert len(rows) == 20  # disjoint, and together every block
    again, _ = split_dev(blocks, 0.25, seed=3, name="a")
    assert torch.equal(train, again)
    other = [split_dev(blocks, 0.25, seed=3, name=n)[1] for n in ("b", "c", "d")]
    assert any(not torch.equal(dev, d) for d in other)  # each leaf its own part
    assert split_dev(blocks[:2], 0.01, seed=0, name="a")[1].shape[0] == 1  # at least one
    assert split_dev(blocks[:2], 0.99, seed=0, name="a")[0].shape[0] == 1  # one left to train
    with pytest.raises(DataError, match="leaf a: 1 training block"):
        split_dev(blocks[:1], 0.5, seed=0, name="a")


def test_the_choice_is_the_lowest_held_out_loss_ties_to_the_first() -> None:
    losses = {0.0: 2.0, 0.5: 1.5, 1.0: 1.5}
    share, seen = ValidatedMix((0.0, 0.5, 1.0)).choose(losses.__getitem__)
    assert share == 0.5 and seen == {"0.0": 2.0, "0.5": 1.5, "1.0": 1.5}
    assert FixedMix(0.5).choose(lambda _: pytest.fail("a fixed share measures nothing")) == (
        0.5,
        {},
    )
    own, incoming = {"w": torch.zeros(3)}, {"w": torch.full((3,), 2.0)}
    assert torch.equal(mixed_start(own, incoming, 0.25)["w"], torch.full((3,), 0.5))


def test_a_leaf_starts_from_what_serves_its_held_out_text(tmp_path: Path) -> None:
    session = open_session(tiny_config(tmp_path, TWO_LEVEL, VALIDATED), QuietProgress(), tmp_path)
    state = session.fed.root.run_round(session.fed.root.state, 1).state
    leaf = session.fed.leaves["world/med/a"]
    received = {**state, **session.fed.aggregators["world/med"].key_state}
    own = dict(leaf.adapted_state)
    assert own and leaf.dev_blocks is not None

    # What it is sent is noise: it keeps its own weights (share 0), by their held-out loss.
    gen = torch.Generator().manual_seed(0)
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in received.items()}
    start, chosen = leaf.training_start(noise)
    assert chosen["key_mix"] == 0.0
    assert chosen["dev_losses"]["0.0"] < min(chosen["dev_losses"][s] for s in ("0.5", "1.0"))
    assert all(torch.equal(start[k], own[k]) for k in own)

    # Its own weights are noise: it takes what it is sent (share 1).
    leaf.adapted_state = {k: noise[k] for k in own}
    start, chosen = leaf.training_start(received)
    assert chosen["key_mix"] == 1.0
    assert all(torch.equal(start[k], received[k]) for k in own)


def test_a_validated_run_records_its_choices_and_trains_without_the_held_out_blocks(
    tmp_path: Path,
) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, [*VALIDATED, "stop.rounds=2"])
    fixed = open_session(
        tiny_config(tmp_path, TWO_LEVEL, ["run.method='worldlm'"]), QuietProgress(), tmp_path / "f"
    )
    validated = open_session(config, QuietProgress(), tmp_path / "v")
    for path, leaf in validated.fed.leaves.items():
        whole = fixed.fed.leaves[path].data.train_blocks.shape[0]
        assert leaf.dev_blocks is not None
        held = leaf.dev_blocks.shape[0]
        assert held == round(0.25 * whole) and leaf.data.train_blocks.shape[0] == whole - held
    result = run(config, QuietProgress(), out=tmp_path / "run")
    trains = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    # Round 1 starts from what it is sent (the leaf has no weights of its own yet); round 2
    # chooses.
    assert [r["round"] for r in trains if "key_mix" in r] == [2] * len(TWO_LEVEL)
    for row in (r for r in trains if "key_mix" in r):
        losses = row["dev_losses"]
        assert set(losses) == {"0.0", "0.5", "1.0"}
        assert losses[str(row["key_mix"])] == min(losses.values())
