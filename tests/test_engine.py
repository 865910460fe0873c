"""The round engine end to end on a tiny model: hierarchy equals flat, methods run, ppl drops."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from worldlm.checkpoint import list_checkpoints, load_latest
from worldlm.checkpoint_parts import PART_KEY, PartStore
from worldlm.config import RunConfig, apply_overrides
from worldlm.config_load import validate_config
from worldlm.errors import CheckpointError
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run
from worldlm.session import open_session

from .conftest import TWO_LEVEL, aggregator_paths, tiny_config, tiny_config_dict

# TESTPLAN A3: root -> 3 aggregators -> 12 leaves, one aggregator with 1 leaf and one with 8.
TWELVE = {
    **{"world/solo/s0": "med"},
    **{f"world/trio/t{i}": "law" for i in range(3)},
    **{f"world/eight/e{i}": ("code" if i % 2 else "med") for i in range(8)},
}


def _root_states(
    config: RunConfig, method: str, rounds: int, run_dir: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The root's model before and after `rounds` rounds of `method` (no evaluation)."""
    run_section = config.run.model_copy(update={"method": method})
    session = open_session(config.model_copy(update={"run": run_section}), QuietProgress(), run_dir)
    start = state = session.fed.root.state
    for r in range(1, rounds + 1):
        state = session.fed.root.run_round(state, r).state
    return start, state


@pytest.mark.parametrize("sum_dtype", ["float64", "float32"])
def test_hierarchy_with_one_inner_round_equals_flat_fedavg(tmp_path: Path, sum_dtype: str) -> None:
    """float64 sums: bit for bit. float32 sums (the default) add in another order in a tree
    than flat, so the two agree up to float32 rounding, carried through a second round."""
    sums = [f"nodes.{p}.sum_dtype={sum_dtype}" for p in aggregator_paths(TWELVE)]
    overrides = ["train.local_steps=2", *sums]
    config = tiny_config(tmp_path, TWELVE, overrides, n_docs=30)
    start, hier = _root_states(config, "hierfavg", 2, tmp_path / "h")
    _, flat = _root_states(config, "fedavg", 2, tmp_path / "f")
    moved = max((hier[k] - start[k]).abs().max().item() for k in hier)
    assert moved > 1e-3  # training really happened
    for key in flat:
        if sum_dtype == "float64":
            assert torch.equal(hier[key], flat[key]), key
        else:  # a few float32 roundings (seen: 3 ulps of 1.0), far below a wrong weighting's 1e-3
            torch.testing.assert_close(hier[key], flat[key], rtol=1e-5, atol=1e-6)


def test_inner_rounds_change_the_result(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, ["nodes.world/med.inner_rounds=2"])
    base = tiny_config(tmp_path / "b", TWO_LEVEL)
    _, a = _root_states(config, "hierfavg", 1, tmp_path / "a")
    _, b = _root_states(base, "hierfavg", 1, tmp_path / "b")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_tiny_tree_trains_and_every_leaf_improves(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=3", "train.local_steps=8"])
    result = run(config, QuietProgress())
    assert set(result.after) == set(TWO_LEVEL)
    for leaf in TWO_LEVEL:
        assert result.after[leaf].ppl < 0.7 * result.before[leaf].ppl, leaf
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    evals = {(r["round"], r["node"]) for r in rows if r["kind"] == "eval"}
    for node in ["world", "world/med", "world/soft", *TWO_LEVEL]:
        assert {(r, node) for r in range(4)} <= evals
    trains = [r for r in rows if r["kind"] == "train"]
    assert len(trains) == 3 * 4 and all(r["tokens"] == 8 * 4 * 32 for r in trains)
    assert (result.run_dir / "config.toml").is_file()
    assert len(list_checkpoints(result.run_dir / "checkpoints")) == 3


def test_two_runs_give_identical_checkpoints(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL)
    digests = []
    for name in ("one", "two"):
        result = run(config, QuietProgress(), out=tmp_path / name)
        newest = list_checkpoints(result.run_dir / "checkpoints")[-1]
        digests.append(hashlib.sha256(newest.read_bytes()).hexdigest())
    assert digests[0] == digests[1]  # and so the leaves' state files it names by digest
    checkpoints = tmp_path / "one" / "checkpoints"
    _, _, meta = load_latest(checkpoints, parts=PartStore(checkpoints))
    assert meta["global_round"] == 2
    leaf, _ = PartStore(checkpoints).load(meta["nodes"]["world/med/a"][PART_KEY])
    assert any(k.startswith("opt/") for k in leaf)


def test_final_model_loads_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run(tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=1"]), QuietProgress())
    directory = result.run_dir / "final" / "world"
    assert (directory / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    ids = tokenizer("The fever of the patient is", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_local_and_centralized_run_on_the_same_engine(tmp_path: Path) -> None:
    local = run(
        tiny_config(tmp_path, TWO_LEVEL, ["run.method='local'", "run.name='l'"]), QuietProgress()
    )
    for leaf in TWO_LEVEL:  # each leaf deploys its own model, saved under its own path
        assert (local.run_dir / "final" / leaf / "model.safetensors").is_file()
    central = run(
        tiny_config(tmp_path, TWO_LEVEL, ["run.method='centralized'", "run.name='c'"]),
        QuietProgress(),
    )
    assert set(central.after) == set(TWO_LEVEL)
    for leaf in TWO_LEVEL:
        assert central.after[leaf].ppl < central.before[leaf].ppl
        assert local.after[leaf].ppl < local.before[leaf].ppl
    rows = read_metrics(central.run_dir / "metrics.jsonl")
    assert {r["node"] for r in rows if r["kind"] == "train"} == {"world/centralized"}


def test_a_local_hf_directory_is_a_model_and_tokenizer_source(tmp_path: Path) -> None:
    first = run(
        tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=1", "run.name='a'"]), QuietProgress()
    )
    pretrained = first.run_dir / "final" / "world"
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    data["model"] = {"path": str(pretrained), "block_size": 32}
    config = validate_config(apply_overrides(data, ["stop.rounds=1", "run.name='b'"]))
    second = run(config, QuietProgress())
    # Continuing from the trained model starts where the first run ended, not from scratch.
    for leaf in TWO_LEVEL:
        assert second.before[leaf].loss == pytest.approx(first.after[leaf].loss, rel=1e-5)
        assert second.after[leaf].ppl < second.before[leaf].ppl


def test_stop_conditions_end_the_run_early(tmp_path: Path) -> None:
    by_tokens = run(
        tiny_config(
            tmp_path,
            TWO_LEVEL,
            [
                "stop.rounds=5",
                "stop.max_tokens=1000",
                "train.keep_optimizer_state=false",
                "run.name='t'",
            ],
        ),
        QuietProgress(),
    )
    assert by_tokens.rounds == 1 and by_tokens.stop_reason == "max_tokens"
    by_ppl = run(
        tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=5", "stop.target_ppl=1e9", "run.name='p'"]),
        QuietProgress(),
    )
    assert by_ppl.rounds == 1 and by_ppl.stop_reason == "target_ppl"


class StopAtRound(QuietProgress):
    """Interrupts the run as round `at` starts, as a crash or Ctrl-C would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def round_started(self, round_index: int, total: int) -> None:
        if round_index == self.at:
            raise KeyboardInterrupt


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, ["stop.rounds=3"])
    whole = run(config, QuietProgress(), out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(3), out=tmp_path / "cut")
    # a half-written checkpoint of the interrupted round must not be picked up
    (tmp_path / "cut" / "checkpoints" / "round-000003.wlm").write_bytes(b"torn")
    # nor a row without an integer round, nor a metrics line the crash cut short
    with (tmp_path / "cut" / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"kind": "train", "node": "world/med/a", "round": "x"}\n{"kind": "ev')
    resumed = resume(tmp_path / "cut", QuietProgress())
    assert resumed.rounds == 3
    final = "checkpoints/round-000003.wlm"
    assert (tmp_path / "cut" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()
    rows_whole = [r for r in read_metrics(whole.run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    rows_cut = [r for r in read_metrics(resumed.run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert rows_cut == rows_whole
    with pytest.raises(CheckpointError, match="already finished"):
        resume(tmp_path / "cut", QuietProgress())
