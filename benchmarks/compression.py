"""Compressed links against plain ones (issue 6, item 5d): bytes per round and validation
perplexity after the same budget for none, bf16, int8, top-k 10% and top-k 1%.

The embedded default tree (world / medical / {hpo, icd10cm}, world / software / {licenses,
python}; HierFAVG; the `small` preset, 9.1M parameters) with every link but the root's
compressed the same way: replies up with the codec (error feedback on), weights down cast to
bf16 for bf16 and quantized to int8 for int8 (top-k has no downlink form, so its weights travel
down uncompressed). Same seed, data and budget in every run; only the links change.

    python benchmarks/compression.py --out runs/compression               # about 15 min on 2 cores
    python benchmarks/compression.py --out runs/compression --rounds 2    # a quick look

Prints a table (bytes up and down per root round, summed over every aggregator, their ratio to
no compression, final mean validation perplexity and its change) and writes `results.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from worldlm.config import RunConfig
from worldlm.config_load import load_config
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.root_loop import mean_ppl
from worldlm.runner import run

# case -> (uplink codec, top-k fraction, downlink codec, error feedback)
CASES: dict[str, tuple[str, float, str, bool]] = {
    "none": ("none", 0.1, "none", True),
    "bf16": ("bf16", 0.1, "bf16", True),
    "int8": ("int8", 0.1, "int8", True),
    "top-k 10%": ("topk", 0.1, "none", True),
    "top-k 1%": ("topk", 0.01, "none", True),
    "top-k 10%, no error feedback": ("topk", 0.1, "none", False),
}
DEFAULT_CASES = ["none", "bf16", "int8", "top-k 10%", "top-k 1%"]


def case_config(base: Path | None, case: str, rounds: int) -> RunConfig:
    up, fraction, down, feedback = CASES[case]
    plain = load_config(base, [f"stop.rounds={rounds}", "monitor.tensorboard=false"])
    root = next(path for path in plain.nodes if "/" not in path)
    overrides = [f"stop.rounds={rounds}", "monitor.tensorboard=false"]
    for path in plain.nodes:
        if path == root:
            continue
        overrides += [
            f"nodes.{path}.link.up={up}",
            f"nodes.{path}.link.topk_fraction={fraction}",
            f"nodes.{path}.link.down={down}",
            f"nodes.{path}.link.error_feedback={str(feedback).lower()}",
        ]
    return load_config(base, overrides)


def run_case(config: RunConfig, out: Path) -> dict[str, Any]:
    result = run(config, QuietProgress(), out=out)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "aggregate"]
    rounds = max(len({r["round"] for r in rows}), 1)
    return {
        "bytes_up": sum(r["bytes_up"] for r in rows) / rounds,
        "bytes_down": sum(r["bytes_down"] for r in rows) / rounds,
        "ppl": mean_ppl(result.after),
        "ppl_before": mean_ppl(result.before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="federation config (default: embedded)")
    parser.add_argument("--out", type=Path, default=Path("runs/compression"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    args = parser.parse_args()
    console = Console()
    results: dict[str, dict[str, Any]] = {}
    for case in args.cases:
        console.print(f"{case} ...")
        slug = case.replace(" ", "").replace("%", "pct").replace(",", "-")
        results[case] = run_case(case_config(args.config, case, args.rounds), args.out / slug)
        console.print(f"  mean validation perplexity {results[case]['ppl']:,.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(table(results, args.rounds))


def table(results: dict[str, dict[str, Any]], rounds: int) -> Table:
    base = results.get("none")
    out = Table(title=f"compressed links, {rounds} rounds (bytes per root round, all links)")
    for column in ("links", "MB up", "MB down", "fewer bytes", "val ppl", "ppl vs none"):
        out.add_column(column, justify="left" if column == "links" else "right")
    for case, r in results.items():
        total = r["bytes_up"] + r["bytes_down"]
        if base is None:
            ratio = change = "-"
        else:
            ratio = f"{(base['bytes_up'] + base['bytes_down']) / total:.2f}x"
            change = f"{(r['ppl'] / base['ppl'] - 1) * 100:+.2f}%"
        out.add_row(
            case,
            f"{r['bytes_up'] / 1e6:,.1f}",
            f"{r['bytes_down'] / 1e6:,.1f}",
            ratio,
            f"{r['ppl']:,.1f}",
            change,
        )
    return out


if __name__ == "__main__":
    main()
