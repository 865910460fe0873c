"""WorldLM and FedPer on the one engine: reductions, and what may cross a boundary."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worldlm.core.inprocess import InProcessTransport
from worldlm.core.messages import TrainTask, Update
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run
from worldlm.session import open_session

from .conftest import TWO_LEVEL, tiny_config
from .test_engine import StopAtRound, _root_states


def test_key_fraction_zero_reduces_worldlm_to_hierfavg(tmp_path: Path) -> None:
    # With K empty and leaves keeping nothing else of their own (key_mix_scope = "keys"),
    # nothing is personal: the hierarchy's FedAvg remains.
    overrides = ["worldlm.key_fraction=0", "worldlm.key_mix_scope=keys"]
    config = tiny_config(tmp_path, TWO_LEVEL, overrides)
    _, world = _root_states(config, "worldlm", 2, tmp_path / "w")
    _, hier = _root_states(config, "hierfavg", 2, tmp_path / "h")
    for key in hier:
        assert torch.equal(world[key], hier[key]), key


class RecordingTransport(InProcessTransport):
    """The in-process transport, also recording which parameter names each reply carried."""

    def __init__(self, inner: InProcessTransport) -> None:
        self.__dict__.update(inner.__dict__)
        self.seen: list[tuple[str, set[str]]] = []

    def train(self, tasks: Sequence[TrainTask]) -> Iterator[Update]:
        for update in super().train(tasks):
            self.seen.append((update.sender, set(update.state)))
            yield update


def _recorded_run(tmp_path: Path, method: str, rounds: int = 2, overrides: Sequence[str] = ()):
    config = tiny_config(tmp_path, TWO_LEVEL, [f"run.method='{method}'", *overrides])
    session = open_session(config, QuietProgress(), tmp_path / method)
    recorder = RecordingTransport(session.fed.transport)
    for aggregator in session.fed.aggregators.values():
        aggregator.transport = recorder
    state = session.fed.root.state
    for r in range(1, rounds + 1):
        state = session.fed.root.run_round(state, r).state
    return session, recorder


def test_no_raw_key_layers_leave_a_sub_federation(tmp_path: Path) -> None:
    session, recorder = _recorded_run(tmp_path, "worldlm")
    keys = next(iter(a.key_policy for a in session.fed.aggregators.values() if a.key_policy))
    assert keys is not None
    key_names = keys.partition.key_names
    to_root = [names for sender, names in recorder.seen if sender in ("world/med", "world/soft")]
    from_leaves = [names for sender, names in recorder.seen if sender.count("/") == 2]
    assert to_root and from_leaves
    assert all(not (names & key_names) for names in to_root)  # only B crosses into the root
    assert all(key_names <= names for names in from_leaves)  # inside, K travels
    med, soft = session.fed.aggregators["world/med"], session.fed.aggregators["world/soft"]
    assert any(not torch.equal(med.key_state[k], soft.key_state[k]) for k in key_names)


def test_fedper_keeps_key_layers_on_the_leaves(tmp_path: Path) -> None:
    session, recorder = _recorded_run(tmp_path, "fedper")
    leaf = next(iter(session.fed.leaves.values()))
    assert leaf.own_state and recorder.seen
    assert all(not (names & set(leaf.own_state)) for _, names in recorder.seen)


def test_worldlm_and_fedper_runs_improve_every_leaf(tmp_path: Path) -> None:
    for method in ("worldlm", "fedper"):
        result = run(
            tiny_config(tmp_path, TWO_LEVEL, [f"run.method='{method}'", f"run.name='{method}'"]),
            QuietProgress(),
        )
        for leaf in TWO_LEVEL:
            assert result.after[leaf].ppl < 0.8 * result.before[leaf].ppl, (method, leaf)
        if method == "worldlm":  # each sub-federation deploys global B + its own K
            assert (result.run_dir / "final" / "world" / "med" / "model.safetensors").is_file()


def test_without_attention_a_sub_federations_key_layers_are_its_childrens_mean(
    tmp_path: Path,
) -> None:
    """The default K_p is the token-weighted mean of the children's K: what attention gives at
    an infinite temperature (its weights are then the token shares), and not what it gives at
    a low temperature, where distances move the weights (observed gap 1.8e-3)."""
    keys = {}
    for name, extra in [
        ("mean", []),
        ("hot", ["worldlm.attention=true", "worldlm.tau=1e12"]),
        ("attention", ["worldlm.attention=true", "worldlm.tau=0.05"]),
    ]:
        (tmp_path / name).mkdir()
        session, _ = _recorded_run(tmp_path / name, "worldlm", rounds=1, overrides=extra)
        keys[name] = session.fed.aggregators["world/med"].keys.snapshot()
    assert keys["mean"]
    for k, value in keys["mean"].items():
        torch.testing.assert_close(keys["hot"][k], value, rtol=0, atol=1e-6)
    gap = max(float((keys["attention"][k] - v).abs().max()) for k, v in keys["mean"].items())
    assert gap > 1e-4


def test_leaves_can_deploy_their_own_key_layers(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path, TWO_LEVEL, ["run.method='worldlm'", "worldlm.leaf_key_layers='own'"]
    )
    result = run(config, QuietProgress(), out=tmp_path / "own")
    for leaf in TWO_LEVEL:
        assert result.after[leaf].ppl < 0.8 * result.before[leaf].ppl
        assert (result.run_dir / "final" / leaf / "model.safetensors").is_file()
    federation = ["worldlm.leaf_key_layers='federation'"]
    session, _ = _recorded_run(tmp_path / "s", "worldlm", overrides=federation)
    plain_leaf = session.fed.leaves["world/med/a"]
    assert not plain_leaf.adapted_state  # it deploys its federation's K


def test_attended_child_key_layers_personalize_each_leaf_and_resume(tmp_path: Path) -> None:
    # each leaf deploys the attended K it is sent: no own K, no personalization phase
    overrides = [
        "run.method='worldlm'",
        "worldlm.attention=true",
        "worldlm.child_key_layers='attended'",
        "worldlm.leaf_key_layers='federation'",
        "worldlm.key_fraction=0.3",
        "train.finetune_rounds=0",
        "stop.rounds=3",
    ]
    config = tiny_config(tmp_path, TWO_LEVEL, overrides)
    whole = run(config, QuietProgress(), out=tmp_path / "whole")
    for leaf in TWO_LEVEL:
        assert whole.after[leaf].ppl < 0.8 * whole.before[leaf].ppl
        assert (whole.run_dir / "final" / leaf / "model.safetensors").is_file()
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(3), out=tmp_path / "cut")
    resume(tmp_path / "cut", QuietProgress())
    final = "checkpoints/round-000003.wlm"
    assert (tmp_path / "cut" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()

    # the deployed models: the same B everywhere, but each leaf its own K, unlike K_p
    final = whole.run_dir / "final"
    a, b, fed_k = (
        load_file(final / p / "model.safetensors")
        for p in ("world/med/a", "world/med/b", "world/med")
    )
    embedding = next(k for k in a if "embed" in k)
    assert torch.equal(a[embedding], b[embedding])
    last_block = [k for k in a if ".layers.3." in k]
    assert last_block and all(not torch.equal(a[k], b[k]) for k in last_block)
    assert all(not torch.equal(a[k], fed_k[k]) for k in last_block)


@pytest.mark.parametrize("mix", [0.0, 0.25, 1.0])
def test_key_mix_starts_a_round_between_the_leafs_own_k_and_the_received_k(
    tmp_path: Path, mix: float
) -> None:
    overrides = ["run.method='worldlm'", "worldlm.leaf_key_layers='own'", f"worldlm.key_mix={mix}"]
    session = open_session(tiny_config(tmp_path, TWO_LEVEL, overrides), QuietProgress(), tmp_path)
    state = session.fed.root.run_round(session.fed.root.state, 1).state
    leaf = session.fed.leaves["world/med/a"]
    received = {**state, **session.fed.aggregators["world/med"].key_state}  # what it is sent
    start = leaf.training_start(received)
    assert leaf.adapted_state  # its own last-trained K
    for key, own in leaf.adapted_state.items():
        assert not torch.equal(own, received[key])  # (otherwise the check below says nothing)
        expected = own + mix * (received[key] - own)
        torch.testing.assert_close(start[key], expected, rtol=0, atol=1e-6)
    for key in set(start) - set(leaf.adapted_state):  # B: always what was received
        assert torch.equal(start[key], received[key])
