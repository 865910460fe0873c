"""What a run leaves for operators and auditors: fairness, global vs deployed perplexity, bytes
per round, TensorBoard curves, model cards and an audit log that tells the same story."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import statistics
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from worldlm.checkpoint import list_checkpoints, load_checkpoint
from worldlm.cli import main
from worldlm.metrics.jsonl import read_metrics
from worldlm.outputs import RunResult
from worldlm.progress import QuietProgress
from worldlm.runner import run

from .conftest import TWO_LEVEL, synthetic_documents, tiny_config

ROUNDS = 2


Ran = tuple[RunResult, list[dict[str, Any]]]


def _run(tmp_path: Path, method: str) -> Ran:
    config = tiny_config(tmp_path, TWO_LEVEL, [f"stop.rounds={ROUNDS}", f"run.method={method}"])
    result = run(config, QuietProgress(), out=tmp_path / method)
    return result, read_metrics(result.run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def hierfavg(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    return _run(tmp_path_factory.mktemp("hierfavg"), "hierfavg")


def _rows(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["kind"] == kind]


def test_fairness_rows_match_the_leaves_perplexities(hierfavg: Ran) -> None:
    _, rows = hierfavg
    leaves = sorted(TWO_LEVEL)
    for fair in _rows(rows, "fairness"):
        below = [p for p in leaves if p.startswith(fair["node"] + "/")]
        ppl = {
            r["node"]: r["ppl"]
            for r in _rows(rows, "eval")
            if r["round"] == fair["round"] and r["node"] in below
        }
        assert fair["leaves"] == len(below) == len(ppl)
        assert fair["worst_ppl"] == max(ppl.values()) and fair["best_ppl"] == min(ppl.values())
        assert ppl[fair["worst_leaf"]] == fair["worst_ppl"]
        assert fair["gap"] == pytest.approx(max(ppl.values()) - min(ppl.values()))
        assert fair["mean_ppl"] == pytest.approx(statistics.mean(ppl.values()))
        assert fair["spread"] == pytest.approx(statistics.pstdev(ppl.values()))
    nodes = {(r["node"], r["round"]) for r in _rows(rows, "fairness")}
    assert nodes == {
        (n, r) for n in ("world", "world/med", "world/soft") for r in range(ROUNDS + 1)
    }


def test_global_and_deployed_perplexity(hierfavg: Ran, tmp_path: Path) -> None:
    _, rows = hierfavg
    # HierFAVG deploys the global model everywhere: the two kinds of rows agree.
    plain = {(r["node"], r["round"]): r["ppl"] for r in _rows(rows, "eval")}
    assert {(r["node"], r["round"]): r["ppl"] for r in _rows(rows, "eval_global")} == plain
    # WorldLM personalizes key layers per sub-federation: after training they differ.
    _, wrows = _run(tmp_path, "worldlm")
    deployed = {(r["node"], r["round"]): r["ppl"] for r in _rows(wrows, "eval")}
    global_ = {(r["node"], r["round"]): r["ppl"] for r in _rows(wrows, "eval_global")}
    assert deployed.keys() == global_.keys()
    assert all(deployed[k] == global_[k] for k in deployed if k[1] == 0)  # nothing personal yet
    assert any(deployed[k] != global_[k] for k in deployed if k[1] == ROUNDS)


def test_bytes_per_round_are_the_tensors_that_moved(hierfavg: Ran) -> None:
    result, rows = hierfavg
    tensors, _ = load_checkpoint(list_checkpoints(result.run_dir / "checkpoints")[-1])
    model_bytes = sum(
        t.numel() * t.element_size()
        for k, t in tensors.items()
        if k.startswith("node/world#model/")
    )
    for row in _rows(rows, "aggregate"):
        assert row["bytes_down"] == len(row["selected"]) * model_bytes
        # Leaves send their fp32 weights; a FedAvg aggregator with the default float32 sum
        # forwards its float32 mean (a float64 sum would travel whole: twice the bytes).
        assert row["bytes_up"] == len(row["participants"]) * model_bytes


def test_tensorboard_holds_the_metrics_curves(hierfavg: Ran) -> None:
    result, rows = hierfavg
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for wanted in ("val_ppl/world", "val_ppl/world/med/a", "fairness_gap/world", "bytes_up/world"):
        assert wanted in tags
    curve = [(e.step, e.value) for e in events.Scalars("val_ppl/world")]
    expected = [(r["round"], r["ppl"]) for r in _rows(rows, "eval") if r["node"] == "world"]
    assert [s for s, _ in curve] == [s for s, _ in expected]
    assert [v for _, v in curve] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_every_final_model_carries_a_card_with_digests_not_data(hierfavg: Ran) -> None:
    result, _ = hierfavg
    summary = json.loads((result.run_dir / "summary.json").read_text())
    card = (result.run_dir / "final" / "world" / "README.md").read_text()
    assert card.startswith("---\n") and "hierfavg" in card
    for leaf, info in summary["leaves"].items():
        assert f"| {leaf} | {ROUNDS} | `{info['data_sha256']}` |" in card
    assert "None configured" in card
    for i, topic in enumerate(["med", "law", "code"]):
        sentence = synthetic_documents(topic, 1, i)[0].split(".")[0]
        assert sentence not in card  # digests, never text


def test_the_audit_log_tells_the_run_and_catches_an_edit(
    hierfavg: Ran, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result, rows = hierfavg
    run_dir = tmp_path / "run"  # a copy: the edit below must not reach the other tests
    shutil.copytree(result.run_dir, run_dir)
    with sqlite3.connect(run_dir / "audit.sqlite") as conn:
        entries = conn.execute("SELECT seq, event, node, round, fields FROM entries").fetchall()
    events = [e[1] for e in entries]
    assert events[0] == "run_start" and events[-1] == "run_end"
    accepted = [e for e in entries if e[1] == "update_accepted"]
    assert len(accepted) == sum(len(r["participants"]) for r in _rows(rows, "aggregate"))
    assert events.count("checkpoint") == ROUNDS
    end = json.loads(entries[-1][4])
    for node, digest in end["final_models"].items():
        model = run_dir / "final" / node / "model.safetensors"
        assert hashlib.sha256(model.read_bytes()).hexdigest() == digest
    assert main(["audit", "verify", str(run_dir)]) == 0
    assert "audit log OK" in capsys.readouterr().out

    seq = accepted[1][0]
    with sqlite3.connect(run_dir / "audit.sqlite") as conn:
        conn.execute(
            "UPDATE entries SET fields = replace(fields, '\"weight\"', '\"weigh\"') WHERE seq = ?",
            (seq,),
        )
    assert main(["audit", "verify", str(run_dir)]) == 1
    assert f"row {seq}: its hash does not match its content" in capsys.readouterr().out


def test_the_summary_records_each_leafs_unigram_reference(hierfavg: Ran) -> None:
    result, _ = hierfavg
    summary = json.loads((result.run_dir / "summary.json").read_text())
    vocab = 320  # conftest's tokenizer.vocab_size
    refs = {leaf: info["unigram_ppl"] for leaf, info in summary["leaves"].items()}
    assert refs.keys() == result.after.keys()
    # Templated topic words: far better than uniform over the vocabulary, far worse than 1.
    assert all(2.0 < ppl < vocab for ppl in refs.values()), refs
