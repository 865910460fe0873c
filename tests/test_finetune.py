"""train.finetune_rounds: a personalization phase at the end of a run (FedAvg + fine-tuning)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worldlm.comparison import method_config, parse_method
from worldlm.errors import ConfigError
from worldlm.federation.methods import FINETUNE_SHARE, finetune_rounds
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run
from worldlm.session import open_session

from .conftest import TWO_LEVEL, aggregator_paths, tiny_config
from .test_engine import StopAtRound

# float64 sums: the mean of identical float32 models is that model, bit for bit.
EXACT = [f"nodes.{p}.sum_dtype=float64" for p in aggregator_paths(TWO_LEVEL)]


def test_fine_tuning_rounds_keep_everything_home_and_send_back_what_came(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, ["train.finetune_rounds=1", "stop.rounds=3", *EXACT])
    session = open_session(config, QuietProgress(), tmp_path / "r")
    fed = session.fed
    assert session.personalized  # fedavg's leaves now deploy their own models
    state = fed.root.state
    for r in (1, 2):
        state = fed.root.run_round(state, r).state
    federated = {k: v.clone() for k, v in state.items()}
    for leaf in fed.leaves.values():
        assert leaf.own_state == {}  # plain FedAvg so far: nothing kept at the leaves
    after = fed.root.run_round(state, 3).state
    # The fine-tuned weights stayed at the leaves: the global model did not move ...
    for key, value in federated.items():
        assert torch.equal(after[key], value), key
    # ... while each leaf trained, from the federated model, a model of its own, which it deploys.
    for leaf in fed.leaves.values():
        assert set(leaf.own_state) == set(federated)
        moved = max((leaf.own_state[k] - federated[k]).abs().max().item() for k in federated)
        assert moved > 1e-4
        deployed = leaf.deployed_state(after)
        assert all(torch.equal(deployed[k], leaf.own_state[k]) for k in federated)


def test_without_the_phase_the_last_round_moves_the_global_model(tmp_path: Path) -> None:
    """The check above would pass vacuously if a round never moved the model."""
    config = tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=3", *EXACT])
    fed = open_session(config, QuietProgress(), tmp_path / "r").fed
    state = fed.root.state
    for r in (1, 2):
        state = fed.root.run_round(state, r).state
    after = fed.root.run_round(state, 3).state
    assert any(not torch.equal(after[k], state[k]) for k in state)
    assert all(leaf.own_state == {} for leaf in fed.leaves.values())


def test_fine_tuned_leaves_beat_the_global_model_and_resume_exactly(tmp_path: Path) -> None:
    overrides = ["train.finetune_rounds=2", "stop.rounds=4", "train.local_steps=6"]
    config = tiny_config(tmp_path, TWO_LEVEL, overrides)
    result = run(config, QuietProgress(), out=tmp_path / "whole")
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    last = {
        (row["kind"], row["node"]): float(row["loss"])
        for row in rows
        if row["round"] == 4 and row["kind"] in ("eval", "eval_global")
    }
    for leaf in TWO_LEVEL:
        assert last[("eval", leaf)] < last[("eval_global", leaf)], leaf

    # interrupted inside the phase (its first round done), resumed: the same run, bit for bit
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(4), out=tmp_path / "cut")
    resume(tmp_path / "cut", QuietProgress())
    final = "checkpoints/round-000004.wlm"
    assert (tmp_path / "cut" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()


def test_a_phase_as_long_as_the_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="finetune_rounds = 2 leaves no federated round"):
        tiny_config(tmp_path, TWO_LEVEL, ["train.finetune_rounds=2", "stop.rounds=2"])


def test_fedavg_ft_is_fedavg_with_the_phase_and_the_others_run_without(tmp_path: Path) -> None:
    assert parse_method("fedavg_ft").method == "fedavg"
    assert parse_method("fedavg_ft+nesterov").optimizer == "nesterov"
    config = tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=10"])
    ft = method_config(config, "fedavg_ft")
    assert ft.run.method == "fedavg" and ft.run.name == "fedavg_ft"
    assert ft.train.finetune_rounds == round(10 * FINETUNE_SHARE)
    assert ft.stop == config.stop and ft.train.local_steps == config.train.local_steps
    tuned = tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=10", "train.finetune_rounds=3"])
    assert method_config(tuned, "fedavg_ft").train.finetune_rounds == 3
    assert parse_method("fedprox_ft").method == "fedavg"
    both = method_config(tuned, "fedprox_ft")
    assert both.train.finetune_rounds == 3 and both.train.prox_mu > 0
    assert parse_method("worldlm_ft").method == "worldlm"
    assert method_config(tuned, "worldlm_ft").train.finetune_rounds == 3
    for bad in ("local_ft", "centralized_ft", "fedavg_ft_ft"):
        with pytest.raises(ConfigError, match="unknown method"):
            parse_method(bad)
    for other in ("fedavg", "fedper", "local"):
        assert method_config(tuned, other).train.finetune_rounds == 0
    # WorldLM ends in its phase by default: the config's length, or a fifth of the rounds
    assert method_config(tuned, "worldlm").train.finetune_rounds == 3
    assert method_config(config, "worldlm").train.finetune_rounds is None
    assert finetune_rounds("worldlm", config.train, config.stop) == 2
    assert finetune_rounds("fedavg", config.train, config.stop) == 0
