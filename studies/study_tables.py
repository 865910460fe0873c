"""Tables for issue 18's study from the runs of studies/federation_matters.sh.

Usage: python studies/study_tables.py RUNS_DIR [PLOTS_DIR]

RUNS_DIR holds one `worldlm compare` output per seed and setting:
RUNS_DIR/<tree>/<regime>/seed-<S>/<method>/ for the headline methods, and
RUNS_DIR/<tree>/<regime>/sweep-lr-<LR>/<method>/ for the learning-rate sweep (seed 0). For every
tree and regime found it prints, as markdown:

- the headline table: each method's mean per-leaf validation perplexity over seeds (mean ± std),
  its worst leaf, how many leaves beat `local` (seed-averaged perplexities), megabytes on the wire
  per leaf, and the mean against FedAvg;
- the per-leaf table (seed-averaged), with each leaf's unigram reference and how far below it
  the best method is;
- WorldLM's variants (RUNS_DIR/<tree>/<regime>/variants/<name>/<method>/, seed 0) against the
  seed-0 runs of local and FedAvg;
- ablations (RUNS_DIR/<tree>/<regime>/ablation-<name>/seed-<S>/<method>/): each against the
  headline run of the same method at the same seeds, seed by seed;
- the learning-rate sweep, when there is one.

Bytes on the wire are what the engine's aggregators sent and received; `local` and
`centralized` still send each leaf the (unused) global model every round, which a real
deployment of them would not.

A method's perplexity is that of the model each leaf deploys after the last round: the same rule
for every method (no best-round selection for anyone).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from worldlm.comparison import MethodResult, plot_curves, read_method
from worldlm.config_load import load_config


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def wire_bytes(run_dir: Path) -> int:
    """Bytes every aggregator sent down and received up over the run."""
    total = 0
    for line in (run_dir / "metrics.jsonl").read_text("utf-8").splitlines():
        row = json.loads(line)
        if row.get("kind") == "aggregate":
            total += int(row.get("bytes_down", 0)) + int(row.get("bytes_up", 0))
    return total


@dataclass(frozen=True)
class Seeds:
    """One method's results over seeds."""

    method: str
    runs: list[MethodResult]
    bytes: int  # of the first seed (the same for every seed)

    @property
    def leaves(self) -> list[str]:
        return sorted(self.runs[0].ppl)

    def leaf_mean(self, leaf: str) -> float:
        return statistics.fmean(r.ppl[leaf] for r in self.runs)

    @property
    def means(self) -> list[float]:
        return [r.mean for r in self.runs]

    @property
    def worst(self) -> float:
        return max(self.leaf_mean(leaf) for leaf in self.leaves)


def read_seeds(setting: Path) -> dict[str, Seeds]:
    """Each method run under setting/seed-*/, in the order of the first seed's directory."""
    seeds = sorted(setting.glob("seed-*"))
    found: dict[str, Seeds] = {}
    for seed_dir in seeds:
        for run_dir in sorted(seed_dir.iterdir()):
            if not (run_dir / "summary.json").is_file():
                continue
            result = read_method(run_dir, run_dir.name)
            if run_dir.name not in found:
                found[run_dir.name] = Seeds(run_dir.name, [], wire_bytes(run_dir))
            found[run_dir.name].runs.append(result)
    return found


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def headline(methods: dict[str, Seeds]) -> str:
    local = methods.get("local")
    fedavg = methods.get("fedavg")
    rows = []
    for seeds in methods.values():
        leaves = seeds.leaves
        better = (
            f"{sum(seeds.leaf_mean(x) < local.leaf_mean(x) for x in leaves)}/{len(leaves)}"
            if local is not None
            else "–"
        )
        mean = statistics.fmean(seeds.means)
        vs_fedavg = f"{statistics.fmean(fedavg.means) / mean:.2f}x" if fedavg else "–"
        rows.append(
            [
                seeds.method,
                str(len(seeds.runs)),
                spread(seeds.means),
                f"{seeds.worst:.1f}",
                better,
                f"{seeds.bytes / len(leaves) / 1e6:.0f}",
                vs_fedavg,
            ]
        )
    header = [
        "method",
        "seeds",
        "mean per-leaf ppl",
        "worst leaf",
        "leaves better than local",
        "MB on the wire per leaf",
        "FedAvg / it",
    ]
    return markdown_table(header, rows)


def per_leaf(methods: dict[str, Seeds]) -> str:
    names = list(methods)
    first = methods[names[0]]
    # Each seed splits and tokenizes anew, so the reference is averaged over seeds too.
    unigram = {
        leaf: statistics.fmean(r.unigram[leaf] for r in first.runs)
        for leaf in first.leaves
        if all(leaf in r.unigram for r in first.runs)
    }
    header = ["leaf", *names, "unigram", "unigram / best"]
    rows = []
    for leaf in first.leaves:
        values = [methods[m].leaf_mean(leaf) for m in names]
        ref = unigram.get(leaf)
        row = ["/".join(leaf.split("/")[-2:]), *[f"{v:.1f}" for v in values]]
        row += [f"{ref:.1f}", f"{ref / min(values):.1f}x"] if ref else ["–", "–"]
        rows.append(row)
    return markdown_table(header, rows)


def variants(setting: Path, methods: dict[str, Seeds]) -> str | None:
    """Each variant run (seed 0) against seed 0's local and FedAvg."""
    runs = sorted(p for p in setting.glob("variants/*/*") if (p / "summary.json").is_file())
    if not runs:
        return None
    local = methods["local"].runs[0] if "local" in methods else None
    fedavg = methods["fedavg"].runs[0] if "fedavg" in methods else None
    rows = []
    for run_dir in runs:
        result = read_method(run_dir, run_dir.name)
        leaves = sorted(result.ppl)
        better = (
            f"{sum(result.ppl[x] < local.ppl[x] for x in leaves)}/{len(leaves)}" if local else "–"
        )
        rows.append(
            [
                f"{run_dir.parent.name} ({run_dir.name})",
                f"{result.mean:.1f}",
                f"{result.worst:.1f}",
                better,
                f"{fedavg.mean / result.mean:.2f}x" if fedavg else "–",
                f"{result.mean / local.mean:.2f}x" if local else "–",
                f"{wire_bytes(run_dir) / len(leaves) / 1e6:.0f}",
            ]
        )
    header = [
        "variant (method)",
        "mean ppl",
        "worst leaf",
        "leaves better than local",
        "FedAvg / it",
        "it / local",
        "MB on the wire per leaf",
    ]
    return markdown_table(header, rows)


def ablations(setting: Path) -> str | None:
    """Each ablation's mean per-leaf perplexity against the headline run of its method, at
    the seeds both have (the change it makes, seed by seed, and its mean)."""
    rows = []
    for ablation in sorted(setting.glob("ablation-*")):
        by_method: dict[str, list[tuple[str, float, float]]] = {}
        for run_dir in sorted(ablation.glob("seed-*/*")):
            headline_dir = setting / run_dir.parent.name / run_dir.name
            if not (run_dir / "summary.json").is_file():
                continue
            if not (headline_dir / "summary.json").is_file():
                continue
            mine = read_method(run_dir, run_dir.name).mean
            base = read_method(headline_dir, run_dir.name).mean
            by_method.setdefault(run_dir.name, []).append((run_dir.parent.name, mine, base))
        for method, pairs in by_method.items():
            changes = " / ".join(f"{m - b:+.1f}" for _, m, b in pairs)
            rows.append(
                [
                    f"{ablation.name[len('ablation-') :]} ({method})",
                    ", ".join(seed for seed, _, _ in pairs),
                    spread([m for _, m, _ in pairs]),
                    spread([b for _, _, b in pairs]),
                    changes,
                ]
            )
    if not rows:
        return None
    header = ["ablation (method)", "seeds", "its mean ppl", "default's", "change per seed"]
    return markdown_table(header, rows)


def sweep(setting: Path) -> str | None:
    """method x learning rate: mean per-leaf perplexity (seed 0, whose own rate is the middle)."""
    points = {p.name[len("sweep-lr-") :]: p for p in setting.glob("sweep-lr-*")}
    if not points or not (setting / "seed-0").is_dir():
        return None
    table: dict[str, dict[float, float]] = {}
    for name, point in [*points.items(), ("", setting / "seed-0")]:
        for run_dir in sorted(point.iterdir()):
            if (run_dir / "summary.json").is_file():
                lr = load_config(run_dir / "config.toml").train.lr if not name else float(name)
                table.setdefault(run_dir.name, {})[lr] = read_method(run_dir, run_dir.name).mean
    lrs = sorted({lr for by_lr in table.values() for lr in by_lr})
    rows = []
    for method, by_lr in table.items():
        best = min(by_lr, key=lambda lr: by_lr[lr])
        cells = [
            ("**" if lr == best else "")
            + (f"{by_lr[lr]:.1f}" if lr in by_lr else "–")
            + ("**" if lr == best else "")
            for lr in lrs
        ]
        rows.append([method, *cells])
    return markdown_table(["method", *[f"lr {lr:g}" for lr in lrs]], rows)


def main(runs: Path, plots: Path | None) -> None:
    for tree_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        for setting in sorted(p for p in tree_dir.iterdir() if p.is_dir()):
            methods = read_seeds(setting)
            if not methods:
                continue
            title = f"{tree_dir.name}, {setting.name}"
            print(f"## {title}: headline\n\n{headline(methods)}\n")
            print(f"## {title}: per leaf (mean over seeds)\n\n{per_leaf(methods)}\n")
            table = variants(setting, methods)
            if table is not None:
                print(f"## {title}: WorldLM variants (seed 0)\n\n{table}\n")
            table = ablations(setting)
            if table is not None:
                print(f"## {title}: ablations against the defaults\n\n{table}\n")
            table = sweep(setting)
            if table is not None:
                print(f"## {title}: learning-rate sweep (seed 0)\n\n{table}\n")
            if plots is not None:  # each method's first seed, one line per method
                plots.mkdir(parents=True, exist_ok=True)
                plot = plots / f"study-{tree_dir.name}-{setting.name}.png"
                plot_curves([seeds.runs[0] for seeds in methods.values()], plot)
                link = f"{plots.name}/{plot.name}"
                print(f"![mean per-leaf perplexity per round, first seed]({link})\n")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else None)
