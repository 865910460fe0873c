"""What each simulated leaf of a partition holds: its examples per label, as numbers and a figure.

Computed from the leaves' own `data.shard` tables, so it works on a config with `[partition]`
and on a run directory's config.toml alike (`worldlm partition CONFIG --plot FILE`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldlm.data.hf_datasets import column_values, open_dataset, source_name
from worldlm.data.shards import shard_indices
from worldlm.errors import DataError
from worldlm.tree import FederationNode


@dataclass(frozen=True)
class LeafCounts:
    path: str
    examples: int
    labels: Counter[Hashable]  # examples per value of the label column; empty without one


def partition_counts(
    tree: FederationNode, cache_dir: Path, column: str | None = None
) -> tuple[str | None, list[LeafCounts]]:
    """The label column shown (`column`, else the shards' own: dirichlet's labels, column's
    values; None for iid and size_skew) and every sharded leaf's counts, in path order."""
    leaves = [leaf for leaf in tree.leaves() if leaf.data.shard is not None]
    if not leaves:
        raise DataError(
            "no leaf of this config reads a shard of a dataset; give a config with [partition] "
            "(or a run directory's config.toml made from one)"
        )
    first = leaves[0].data.shard
    assert first is not None
    shown = column or first.column
    counts = []
    read: dict[tuple[str, str | None], list[Any]] = {}  # a column per dataset, read once
    for leaf in leaves:
        where = f"nodes.{leaf.path}.data"
        rows = shard_indices(leaf.data, cache_dir, where)
        labels: Counter[Hashable] = Counter()
        if shown is not None:
            key = (source_name(leaf.data), leaf.data.split)
            if key not in read:
                ds = open_dataset(leaf.data, cache_dir)
                read[key] = column_values(ds, shown, f"{where} ({key[0]})")
            labels = Counter(read[key][int(i)] for i in rows)
        counts.append(LeafCounts(leaf.path, len(rows), labels))
    return shown, counts


def plot_partition(
    counts: list[LeafCounts], column: str | None, out: Path, title: str = ""
) -> Path:
    """A stacked bar per leaf, one colour per label (one bar of its size without labels);
    written as PNG (or any format matplotlib knows from `out`'s suffix)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    names = [c.path.split("/", 1)[-1] for c in counts]  # group/leaf, without the root
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(counts) + 2.5), 3.6))
    if column is None:
        ax.bar(names, [c.examples for c in counts], color="tab:blue")
    else:
        labels = sorted({v for c in counts for v in c.labels}, key=repr)
        cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
        bottom = [0] * len(counts)
        for k, label in enumerate(labels):
            heights = [c.labels.get(label, 0) for c in counts]
            ax.bar(names, heights, bottom=bottom, label=str(label), color=cmap(k % cmap.N))
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        if len(labels) <= 20:
            ax.legend(title=column, bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    ax.set_xlabel("leaf")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=45 if len(counts) > 8 else 0, labelsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def describe(counts: list[LeafCounts], column: str | None) -> list[str]:
    """One line per leaf: its examples and, with a label column, its largest label shares."""
    lines = []
    for c in counts:
        line = f"{c.path:32} {c.examples:8d} examples"
        if column is not None and c.examples:
            top = c.labels.most_common(3)
            shares = ", ".join(f"{label} {n / c.examples:.0%}" for label, n in top)
            more = len(c.labels) - len(top)
            line += f"  {column}: {shares}" + (f" (+{more} more)" if more > 0 else "")
        lines.append(line)
    return lines
