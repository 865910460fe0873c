"""Logs a redirected run leaves: plain lines on stderr when it is no terminal, JSON events on
stdout with --json, both carrying the numbers metrics.jsonl records."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from worldlm.cli import build_parser, main
from worldlm.config import to_toml
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress_lines import PlainProgress

from .conftest import TWO_LEVEL, tiny_config_dict

ROUNDS = 2
LOCAL_STEPS = 4
ROUND_LINE = re.compile(
    r"round (\d+)/(\d+): val ppl mean ([\d.]+), worst ([\d.]+) \((\S+)\); "
    r"([\d,]+) tokens; ([\d.]+) (B|kB|MB|GB) sent; ([\d.]+) s; ETA \S+$"
)


def _config(tmp_path: Path) -> Path:
    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    data["stop"]["rounds"] = ROUNDS
    data["train"]["local_steps"] = LOCAL_STEPS
    path = tmp_path / "run.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    return path


def _by_round(rows: list[dict[str, Any]], kind: str, node: str = "world") -> dict[int, Any]:
    return {r["round"]: r for r in rows if r["kind"] == kind and r["node"] == node}


def _bytes_until(rows: list[dict[str, Any]], round_index: int) -> int:
    return sum(
        r["bytes_down"] + r["bytes_up"]
        for r in rows
        if r["kind"] == "aggregate" and r["round"] <= round_index
    )


def test_a_run_without_a_terminal_writes_plain_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "r"
    assert main(["run", str(_config(tmp_path)), "--out", str(run_dir)]) == 0
    captured = capsys.readouterr()
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals, fairness = _by_round(rows, "eval"), _by_round(rows, "fairness")
    matches = [m for line in captured.err.splitlines() if (m := ROUND_LINE.search(line))]
    assert [int(m[1]) for m in matches] == list(range(1, ROUNDS + 1))  # one line per round
    for m in matches:
        r = int(m[1])
        assert int(m[2]) == ROUNDS
        assert float(m[3]) == pytest.approx(evals[r]["ppl"], abs=0.006)
        assert float(m[4]) == pytest.approx(fairness[r]["worst_ppl"], abs=0.006)
        assert m[5] == fairness[r]["worst_leaf"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert int(matches[-1][6].replace(",", "")) == round(summary["tokens"])
    # every leaf says once per round that it finished its local steps
    done = [line for line in captured.err.splitlines() if line.endswith("(done)")]
    assert len(done) == ROUNDS * len(TWO_LEVEL)
    assert all(f"step {LOCAL_STEPS}/{LOCAL_STEPS}, loss " in line for line in done)
    assert any(line.endswith(" building the model") for line in captured.err.splitlines())
    # the human table still goes to stdout
    assert "validation perplexity per leaf" in captured.out


def test_json_events_carry_the_numbers_of_metrics_jsonl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "r"
    argv = ["run", str(_config(tmp_path)), "--out", str(run_dir), "--json"]
    assert main([*argv, "--leaf-lines-every", "2"]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]  # every line is JSON
    assert events and all(isinstance(e, dict) and "event" in e for e in events)
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals, fairness = _by_round(rows, "eval"), _by_round(rows, "fairness")

    rounds = [e for e in events if e["event"] == "round"]
    assert [e["round"] for e in rounds] == list(range(1, ROUNDS + 1))
    for e in rounds:
        r = e["round"]
        assert e["total"] == ROUNDS
        assert e["mean_ppl"] == pytest.approx(evals[r]["ppl"], rel=1e-12)
        assert e["worst_ppl"] == pytest.approx(fairness[r]["worst_ppl"], rel=1e-12)
        assert e["worst_leaf"] == fairness[r]["worst_leaf"]
        assert e["bytes_sent"] == _bytes_until(rows, r) > 0
        assert e["seconds"] > 0 and e["eta_seconds"] >= 0
    assert rounds[-1]["eta_seconds"] == 0

    leaves = [e for e in events if e["event"] == "leaf"]
    # every 2 of 4 local steps: steps 2 and 4, per leaf and round; the last one finishes
    assert len(leaves) == ROUNDS * len(TWO_LEVEL) * 2
    assert {(e["leaf"], e["round"], e["step"], e["finished"]) for e in leaves} == {
        (leaf, r, step, step == LOCAL_STEPS)
        for leaf in TWO_LEVEL
        for r in range(1, ROUNDS + 1)
        for step in (2, LOCAL_STEPS)
    }
    assert any(e["event"] == "status" and e["message"] == "building the model" for e in events)

    result = events[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["event"] == "result" and result["run_dir"] == str(run_dir)
    assert result["tokens"] == summary["tokens"] == rounds[-1]["tokens"]
    assert {row["leaf"]: row["ppl_after"] for row in result["leaves"]} == pytest.approx(
        {leaf: info["ppl_after"] for leaf, info in summary["leaves"].items()}
    )
    assert result["all_leaves"]["ppl_after"] == pytest.approx(rounds[-1]["mean_ppl"])
    # the human table went to stderr, out of the way of the JSON
    assert "validation perplexity per leaf" in captured.err


def test_leaf_lines_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    with PlainProgress(leaf_every=0) as progress:
        progress.leaf_started("world/a", 3)
        for step in (1, 2, 3):
            progress.leaf_step("world/a", step, 1.0)
        progress.status("saving final models")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(" saving final models")


@pytest.mark.parametrize(
    "argv",
    [
        ["--quiet", "--json"],
        ["--progress", "plain", "--json"],
        ["--progress", "fancy"],
        ["--leaf-lines-every", "-1"],
        ["--leaf-lines-every", "two"],
    ],
)
def test_conflicting_or_bad_progress_flags_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", *argv])
    assert exc.value.code == 2
    assert "--" in capsys.readouterr().err


def test_quiet_and_json_are_aliases_of_progress_modes() -> None:
    parse = build_parser().parse_args
    assert parse(["run"]).progress == "auto"
    assert parse(["run", "--quiet"]).progress == "none"
    assert parse(["run", "--json"]).progress == "json"
    assert parse(["compare", "--progress", "plain"]).progress == "plain"


def test_compare_json_names_the_method_in_every_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", str(_config(tmp_path)), "--out", str(out), "--methods", "fedavg,local"]
    assert main([*argv, "--json", "--set", "stop.rounds=1"]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    rounds = [e for e in events if e["event"] == "round"]
    assert [(e["method"], e["round"]) for e in rounds] == [("fedavg", 1), ("local", 1)]
    result = events[-1]
    assert result["event"] == "result" and set(result["methods"]) == {"fedavg", "local"}
    for method, found in result["methods"].items():
        summary = json.loads((out / method / "summary.json").read_text())
        assert found["leaves"] == pytest.approx(
            {leaf: info["ppl_after"] for leaf, info in summary["leaves"].items()}
        )
        assert found["worst"] == max(found["leaves"].values())
    assert "validation perplexity per leaf and method" in captured.err
