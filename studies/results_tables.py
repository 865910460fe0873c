"""Markdown tables for docs/results.md from the runs of studies/worldlm_results.sh.

Usage: python studies/results_tables.py RUNS_DIR PLOTS_DIR
Prints the tables and copies each tree's perplexity plot into PLOTS_DIR.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from worldlm.comparison import METHODS, MethodResult, read_method, table_rows

TREES = ("domains", "languages")
ABLATIONS = (
    ("key_fraction-0", "key_fraction 0 (B only: must equal HierFAVG)"),
    ("key_fraction-0.15", "key_fraction 0.15 (1 of 6 blocks)"),
    ("", "key_fraction 0.3 (2 of 6 blocks; the default, from the main table)"),
    ("key_fraction-0.5", "key_fraction 0.5 (3 of 6 blocks)"),
    ("plain-average-K", "plain (size-weighted) averaging of K: tau = 1e9"),
    ("routing-0.1", "routing on: lambda_route 0.1, top-1"),
    ("own-K", "leaves deploy their own last-trained K"),
    ("eps-0.5", "attention step eps 0.5"),
    ("inner-rounds-2", "2 inner rounds of 6 steps per root round (vs FedAvg 12 x 6)"),
    ("lr-4e-3", "learning rate 4e-3 for WorldLM and FedAvg (default 2e-3)"),
    ("attended-K", "each leaf sent its own attended K (child_key_layers = attended)"),
    ("rounds-12x6", "12 rounds of 6 steps, no inner rounds (FedAvg rerun the same way)"),
    ("inner-rounds-2-attended-K", "2 inner rounds of 6 steps and attended K (vs FedAvg 12 x 6)"),
)
# Variants compared with a FedAvg rerun elsewhere: the one with the same aggregation rhythm.
FEDAVG_REFERENCE = {"inner-rounds-2": "rounds-12x6", "inner-rounds-2-attended-K": "rounds-12x6"}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def method_of(run_dir: Path, method: str = "worldlm") -> MethodResult | None:
    path = run_dir / method
    return read_method(path, method) if (path / "summary.json").is_file() else None


def main(runs: Path, plots: Path) -> None:
    plots.mkdir(parents=True, exist_ok=True)
    for tree in TREES:
        main_dir = runs / tree
        results = [read_method(main_dir / m, m) for m in METHODS]
        by_name = {r.method: r for r in results}
        fedavg, local = by_name["fedavg"].mean, by_name["local"].mean
        print(f"## {tree}: all methods\n")
        print(markdown_table(*table_rows(results)))
        print(
            f"\nFedAvg / WorldLM: **{fedavg / by_name['worldlm'].mean:.2f}x**; "
            f"WorldLM / local: **{by_name['worldlm'].mean / local:.2f}x**\n"
        )
        shutil.copyfile(main_dir / "perplexity.png", plots / f"{tree}-perplexity.png")

        rows = []
        for name, label in ABLATIONS:
            run_dir = main_dir if not name else runs / "ablations" / tree / name
            result = method_of(run_dir)
            if result is None:
                continue
            # a variant that reran FedAvg (the learning rate) is compared with that rerun
            rerun = method_of(run_dir, "fedavg")
            if name in FEDAVG_REFERENCE:
                rerun = method_of(runs / "ablations" / tree / FEDAVG_REFERENCE[name], "fedavg")
            reference = rerun.mean if rerun is not None else fedavg
            rows.append(
                [
                    label,
                    f"{result.mean:.1f}",
                    f"{result.worst:.1f}",
                    f"{reference / result.mean:.2f}x",
                    f"{result.mean / local:.2f}x",
                ]
            )
        print(f"## {tree}: WorldLM ablations\n")
        header = ["WorldLM variant", "mean ppl", "worst leaf", "FedAvg / it", "it / local"]
        print(markdown_table(header, rows) + "\n")

        swapped = method_of(runs / "swap" / tree)
        if swapped is not None:
            print(f"## {tree}: one leaf swapped between sub-federations\n")
            leaves = sorted(by_name["worldlm"].ppl)
            rows = []
            for leaf in leaves:
                name = leaf.rsplit("/", 1)[-1]
                moved = next(p for p in swapped.ppl if p.endswith("/" + name))
                rows.append(
                    [
                        name,
                        f"{by_name['worldlm'].ppl[leaf]:.1f}",
                        moved,
                        f"{swapped.ppl[moved]:.1f}",
                    ]
                )
            rows.append(["mean", f"{by_name['worldlm'].mean:.1f}", "", f"{swapped.mean:.1f}"])
            header = ["leaf", "WorldLM, original tree", "path after the swap", "WorldLM, swapped"]
            print(markdown_table(header, rows) + "\n")


def scarce(runs: Path, plots: Path) -> None:
    """The small-data regime: the methods it ran, plus WorldLM with attended K."""
    base = runs / "scarce" / "domains"
    if not base.is_dir():
        return
    results = [m for m in (method_of(base, name) for name in METHODS) if m is not None]
    attended = method_of(runs / "scarce" / "domains-attended-K")
    if attended is not None:
        results.append(MethodResult("worldlm, attended K", attended.ppl, attended.curve))
    print("## domains, little data per leaf: methods\n")
    print(markdown_table(*table_rows(results)) + "\n")
    shutil.copyfile(base / "perplexity.png", plots / "scarce-domains-perplexity.png")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    scarce(Path(sys.argv[1]), Path(sys.argv[2]))
