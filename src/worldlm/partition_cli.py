"""`worldlm partition CONFIG [--plot FILE]`: what each simulated leaf of a partition holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from worldlm.cli_args import add_override_arg


def add_partition_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    part = sub.add_parser(
        "partition",
        help="show each simulated leaf's examples per label ([partition]); --plot draws them",
    )
    part.add_argument(
        "config", type=Path, help="a config with [partition], or a run directory's config.toml"
    )
    add_override_arg(part)
    part.add_argument("--plot", type=Path, metavar="FILE", help="write a bar chart (PNG) here")
    part.add_argument(
        "--column",
        help="the label column to count (default: the partition's own column, if it has one)",
    )


def run_partition(args: argparse.Namespace, console: Console) -> int:
    from worldlm.config_load import load_config
    from worldlm.data.partition_plot import describe, partition_counts, plot_partition
    from worldlm.model.workspace import cache_dir_of
    from worldlm.tree import build_tree

    config = load_config(args.config, args.overrides)
    tree = build_tree(config.nodes)
    column, counts = partition_counts(tree, cache_dir_of(config), args.column)
    for line in describe(counts, column):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    total = sum(c.examples for c in counts)
    console.print(f"{len(counts)} leaves, {total} examples", highlight=False)
    if args.plot is not None:
        shard = next(leaf.data.shard for leaf in tree.leaves() if leaf.data.shard is not None)
        assert shard is not None
        params = {"alpha": shard.alpha, "sigma": shard.sigma, "seed": shard.seed}
        title = f"{shard.kind} partition, " + ", ".join(
            f"{k} {v}" for k, v in params.items() if v is not None
        )
        plot_partition(counts, column, args.plot, title)
        console.print(f"wrote {args.plot}", highlight=False)
    return 0
