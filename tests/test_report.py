"""`worldlm report`: every number in report.md traces back to metrics.jsonl, plots are real PNGs,
fairness and participation agree with independent computations."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from worldlm.config import AggregatorConfig, LeafConfig
from worldlm.config_load import load_config
from worldlm.metrics.jsonl import read_metrics
from worldlm.metrics.report import (
    fairness_of,
    fairness_series,
    incident_counts,
    last_privacy,
    participation,
)
from worldlm.metrics.report_cli import add_report_parser, run_report, write_report
from worldlm.metrics.report_markdown import participation_cell
from worldlm.progress import QuietProgress
from worldlm.runner import run
from worldlm.tree import FederationNode, build_tree

from .conftest import tiny_config

LEAVES = {
    "world/eu/berlin": "law",
    "world/eu/paris": "med",
    "world/us/nyc": "code",
    "world/us/sf": "med",
}
AGGREGATORS = ["world", "world/eu", "world/us"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny finished run (2 aggregators under a root, 2 leaves each, 2 rounds)."""
    tmp = tmp_path_factory.mktemp("report-run")
    return run(tiny_config(tmp, LEAVES), QuietProgress()).run_dir


@pytest.fixture(scope="module")
def report_text(run_dir: Path) -> str:
    return write_report(run_dir).read_text("utf-8")


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir / "metrics.jsonl")


def _evals(rows: list[dict[str, Any]], kind: str = "eval") -> dict[tuple[str, int], float]:
    return {(r["node"], r["round"]): float(r["ppl"]) for r in rows if r["kind"] == kind}


def _table(text: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table after `heading`, as dicts keyed by the header cells."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = block[0], block[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


def _num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def _close(cell: str, value: float, decimals: int = 2) -> bool:
    return abs(_num(cell) - value) <= 0.5 * 10**-decimals + 1e-9


def test_leaf_table_numbers_equal_the_metrics(run_dir: Path, report_text: str) -> None:
    rows = _rows(run_dir)
    evals, global_evals = _evals(rows), _evals(rows, "eval_global")
    summary = json.loads((run_dir / "summary.json").read_text("utf-8"))
    table = _table(report_text, "## Perplexity per leaf")
    assert [row["leaf"] for row in table] == sorted(LEAVES)
    for row in table:
        leaf = row["leaf"]
        last = max(r for node, r in evals if node == leaf)
        before, after = evals[(leaf, 0)], evals[(leaf, last)]
        assert last == 2 and row["after round"] == "2"
        assert _close(row["ppl before (round 0)"], before)
        assert _close(row["ppl after"], after)
        assert _close(row["change"], (after - before) / before * 100, decimals=1)
        assert after == pytest.approx(summary["leaves"][leaf]["ppl_after"])
        if global_evals:  # an engine that records the global model on each leaf's data
            assert _close(row["global model ppl"], global_evals[(leaf, last)])
        else:
            assert "global model ppl" not in row


def test_header_reports_the_summary(run_dir: Path, report_text: str) -> None:
    summary = json.loads((run_dir / "summary.json").read_text("utf-8"))
    assert "- method: hierfavg" in report_text
    assert f"- rounds done: {summary['rounds']} of 2" in report_text
    assert f"- stop reason: {summary['stop_reason']}" in report_text
    assert f"- parameters: {summary['parameters']:,}" in report_text
    assert f"- tokens trained: {summary['tokens']:,.0f}" in report_text
    assert "Unfinished" not in report_text


def test_plots_are_linked_valid_pngs(run_dir: Path, report_text: str) -> None:
    links = [
        line.split("](", 1)[1].rstrip(")")
        for line in report_text.splitlines()
        if line.startswith("![")
    ]
    expected = [f"report/ppl-{a.replace('/', '.')}.png" for a in AGGREGATORS]
    assert links == [*expected, "report/fairness.png"]
    for link in links:
        data = (run_dir / link).read_bytes()  # relative to report.md's directory
        assert data[:8] == PNG_MAGIC, link
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 300 and height > 200 and len(data) > 10_000, link


def test_tree_text_names_every_node_with_its_final_ppl(run_dir: Path, report_text: str) -> None:
    tree = build_tree(load_config(run_dir / "config.toml").nodes)
    text = report_text.split("```text\n", 1)[1].split("```", 1)[0]
    lines = text.splitlines()
    assert len(lines) == len(list(tree.walk()))
    evals = _evals(_rows(run_dir))
    for line, node in zip(lines, tree.walk(), strict=True):
        assert line.index(node.name) == 4 * node.path.count("/")  # indented by depth
        assert f"ppl {evals[(node.path, 2)]:,.2f} (round 2)" in line


def _independent_fairness(
    evals: dict[tuple[str, int], float], aggregator: str, round_index: int
) -> dict[str, Any]:
    ppl = {n: v for (n, r), v in evals.items() if r == round_index and n in LEAVES}
    ppl = {n: v for n, v in ppl.items() if n.startswith(aggregator + "/")}
    worst, best = max(ppl, key=ppl.__getitem__), min(ppl, key=ppl.__getitem__)
    return {
        "leaves": len(ppl),
        "mean": statistics.mean(ppl.values()),
        "worst": (worst, ppl[worst]),
        "best": (best, ppl[best]),
        "gap": ppl[worst] - ppl[best],
        "spread": statistics.pstdev(ppl.values()),
    }


def test_fairness_table_equals_an_independent_computation(run_dir: Path, report_text: str) -> None:
    evals = _evals(_rows(run_dir))
    table = _table(report_text, "## Fairness")
    assert [row["aggregator"] for row in table] == AGGREGATORS
    for row in table:
        want = _independent_fairness(evals, row["aggregator"], 2)
        assert row["round"] == "2" and int(row["leaves"]) == want["leaves"]
        assert (row["worst leaf"], row["best leaf"]) == (want["worst"][0], want["best"][0])
        assert _close(row["worst ppl"], want["worst"][1])
        assert _close(row["best ppl"], want["best"][1])
        assert _close(row["mean ppl"], want["mean"])
        assert _close(row["gap"], want["gap"])
        assert _close(row["spread"], want["spread"])
    assert "No differential privacy configured" in report_text


def test_computed_fairness_equals_the_runs_recorded_rows(run_dir: Path) -> None:
    rows = _rows(run_dir)
    recorded = [r for r in rows if r["kind"] == "fairness"]
    if not recorded:
        pytest.skip("this engine writes no fairness rows yet")
    tree = build_tree(load_config(run_dir / "config.toml").nodes)
    computed = fairness_series([r for r in rows if r["kind"] != "fairness"], tree)
    by_key = {(f.node, f.round): f for series in computed.values() for f in series}
    assert len(by_key) == len(recorded)
    for row in recorded:
        f = by_key[(row["node"], row["round"])]
        assert (f.leaves, f.worst_leaf, f.best_leaf) == (
            row["leaves"],
            row["worst_leaf"],
            row["best_leaf"],
        )
        for key in ("mean_ppl", "worst_ppl", "best_ppl", "gap", "spread"):
            assert getattr(f, key) == pytest.approx(row[key], rel=1e-12), key


def test_participation_table_counts_every_aggregation(run_dir: Path, report_text: str) -> None:
    rows = [r for r in _rows(run_dir) if r["kind"] == "aggregate"]
    table = _table(report_text, "## Participation")
    assert [row["round"] for row in table] == ["1", "2"]
    for row in table:
        for node in AGGREGATORS:
            (agg,) = [r for r in rows if r["node"] == node and str(r["round"]) == row["round"]]
            assert row[node] == f"{len(agg['participants'])}/{len(agg['selected'])}"
    assert report_text.rstrip().endswith("None.")  # no rejected, refused or dropped


def test_fairness_of_hand_made_leaves() -> None:
    f = fairness_of("w", 3, {"w/b": 30.0, "w/a": 10.0, "w/c": 20.0, "w/d": 30.0})
    assert (f.leaves, f.worst_leaf, f.worst_ppl, f.best_leaf, f.best_ppl) == (
        4,
        "w/b",  # a tie goes to the first path
        30.0,
        "w/a",
        10.0,
    )
    assert f.mean_ppl == 22.5 and f.gap == 20.0
    assert f.spread == pytest.approx(math.sqrt((12.5**2 + 2.5**2 + 7.5**2 * 2) / 4))
    assert fairness_of("w", 0, {"w/a": 5.0}).spread == 0.0
    with pytest.raises(ValueError):
        fairness_of("w", 0, {})


def _hand_tree() -> FederationNode:
    leaf = LeafConfig.model_validate({"data": {"paths": ["x.jsonl"]}})
    inner = AggregatorConfig()
    return build_tree(
        {path: leaf for path in ("w/e/a", "w/e/b", "w/u/c")}
        | {path: inner for path in ("w", "w/e", "w/u")}
    )


def test_fairness_prefers_recorded_rows_and_computes_the_rest() -> None:
    rows: list[dict[str, Any]] = [
        {"round": r, "node": leaf, "kind": "eval", "ppl": ppl}
        for r, values in ((0, (90.0, 80.0, 70.0)), (1, (40.0, 20.0, 30.0)))
        for leaf, ppl in zip(("w/e/a", "w/e/b", "w/u/c"), values, strict=True)
    ]
    recorded = {
        "round": 1,
        "node": "w",
        "kind": "fairness",
        "leaves": 3,
        "mean_ppl": 31.0,
        "worst_leaf": "w/e/a",
        "worst_ppl": 41.0,
        "best_leaf": "w/e/b",
        "best_ppl": 21.0,
        "gap": 20.0,
        "spread": 8.0,
    }
    series = fairness_series([*rows, recorded], _hand_tree())
    assert [f.round for f in series["w"]] == [0, 1]
    assert series["w"][1].source == "recorded" and series["w"][1].worst_ppl == 41.0
    assert series["w"][0].source == "computed" and series["w"][0].worst_leaf == "w/e/a"
    assert (series["w/e"][1].worst_leaf, series["w/e"][1].gap) == ("w/e/a", 20.0)
    assert series["w/u"][1].leaves == 1 and series["w/u"][1].spread == 0.0


def test_participation_and_incidents_from_hand_made_rows() -> None:
    def agg(
        round_index: int, local: int, selected: list[str], answered: list[str]
    ) -> dict[str, Any]:
        return {
            "round": round_index,
            "node": "w/e",
            "kind": "aggregate",
            "local_round": local,
            "status": "ok" if answered else "too_few_replies",
            "selected": selected,
            "participants": answered,
            "missing": sorted(set(selected) - set(answered)),
            "benched": ["w/e/z"] if not answered else [],
        }

    rows = [
        agg(2, 3, ["w/e/a"], []),
        agg(1, 1, ["w/e/a", "w/e/b"], ["w/e/a"]),
        agg(1, 0, ["w/e/a", "w/e/b"], ["w/e/a", "w/e/b"]),
        {"round": 1, "node": "w/e", "kind": "dropped", "sender": "w/e/b", "reason": "timeout"},
        {"round": 2, "node": "w/e", "kind": "dropped", "sender": "w/e/a", "reason": "timeout"},
        {"round": 2, "node": "w", "kind": "rejected", "sender": "w/u", "reason": "nan"},
    ]
    found = participation(rows)
    assert [(p.round, p.local_round) for p in found] == [(1, 0), (1, 1), (2, 3)]
    assert found[1].missing == ("w/e/b",) and found[2].status == "too_few_replies"
    assert participation_cell(found[:2], "w/e") == "2/2; 1/2 missing: b"
    assert participation_cell(found[2:], "w/e") == "0/1 missing: a benched: z **too_few_replies**"
    counts = [(i.kind, i.reason, i.count, i.senders) for i in incident_counts(rows)]
    assert counts == [
        ("dropped", "timeout", 2, ("w/e/a", "w/e/b")),
        ("rejected", "nan", 1, ("w/u",)),
    ]


def test_last_privacy_takes_each_nodes_latest_round() -> None:
    rows = [
        {"round": r, "node": n, "kind": "privacy", "epsilon": e, "delta": 1e-5}
        for r, n, e in ((1, "w/a", 0.5), (2, "w/a", 0.9), (1, "w/b", 0.4))
    ]
    assert [(p.node, p.round, p.epsilon) for p in last_privacy(rows)] == [
        ("w/a", 2, 0.9),
        ("w/b", 1, 0.4),
    ]


def test_newer_row_kinds_fill_the_global_column_fairness_and_privacy(
    run_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.toml", "summary.json"):
        shutil.copy(run_dir / name, copy / name)
    rows = [r for r in _rows(run_dir) if r["kind"] not in ("eval_global", "fairness")]
    rows += [
        {**r, "kind": "eval_global", "ppl": r["ppl"] * 1.5} for r in rows if r["kind"] == "eval"
    ]
    rows.append({"round": 2, "node": "world/eu", "kind": "privacy", "epsilon": 1.25, "delta": 1e-5})
    fairness = {"leaves": 2, "mean_ppl": 5.0, "worst_leaf": "world/us/nyc", "worst_ppl": 7.0}
    fairness |= {"best_leaf": "world/us/sf", "best_ppl": 3.0, "gap": 4.0, "spread": 2.0}
    rows.append({"round": 2, "node": "world/us", "kind": "fairness"} | fairness)
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")

    text = write_report(copy).read_text("utf-8")
    evals = _evals(rows)
    for row in _table(text, "## Perplexity per leaf"):
        assert _close(row["global model ppl"], evals[(row["leaf"], 2)] * 1.5)
    by_node = {row["aggregator"]: row for row in _table(text, "## Fairness")}
    assert by_node["world/us"]["source"] == "recorded" and by_node["world/us"]["gap"] == "4.00"
    assert by_node["world/eu"]["source"] == "computed"
    (privacy,) = _table(text, "## Privacy")
    assert privacy == {"node": "world/eu", "round": "2", "epsilon": "1.25", "delta": "1e-05"}


def test_an_unfinished_run_is_reported_from_its_metrics(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run_dir / "config.toml", copy / "config.toml")
    metrics = (run_dir / "metrics.jsonl").read_text("utf-8")
    (copy / "metrics.jsonl").write_text(metrics + '{"round": 3, "node', encoding="utf-8")
    text = write_report(copy).read_text("utf-8")
    summary = json.loads((run_dir / "summary.json").read_text("utf-8"))
    assert "**Unfinished run**" in text and "- rounds done: 2 of 2" in text
    assert f"- tokens trained: {summary['tokens']:,.0f} (summed" in text
    assert len(_table(text, "## Perplexity per leaf")) == len(LEAVES)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    return run_report(parser.parse_args(argv), Console(quiet=True))


def test_cli_writes_to_out_and_refuses_non_run_dirs(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "elsewhere"
    assert _cli(["report", str(run_dir), "--out", str(out)]) == 0
    text = (out / "report.md").read_text("utf-8")
    assert "](report/fairness.png)" in text and (out / "report" / "fairness.png").is_file()
    capsys.readouterr()
    for bad in (tmp_path / "missing", out / "report"):
        assert _cli(["report", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
