"""`worldlm compare`: every method on one config, one budget, one table and one plot.

All methods share the seed, model, tokenizer, splits, rounds and local steps per leaf; the
centralized baseline's single node takes `local_steps x n_leaves` steps per round so that it sees
the same total number of tokens. Finished methods are reused and an interrupted one is resumed.
"""

from __future__ import annotations

import difflib
import json
import shutil
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from worldlm.config import RunConfig, dump_config, load_config
from worldlm.errors import CheckpointError, ConfigError
from worldlm.metrics.jsonl import read_metrics
from worldlm.run import RunObserver, resume, run
from worldlm.tree import build_tree

METHODS = ("centralized", "local", "fedavg", "hierfavg", "fedper", "worldlm")


@dataclass(frozen=True)
class MethodResult:
    method: str
    ppl: dict[str, float]  # leaf path -> validation perplexity of its deployed model, at the end
    curve: list[tuple[int, float]]  # (round, mean per-leaf perplexity)

    @property
    def mean(self) -> float:
        return sum(self.ppl.values()) / len(self.ppl)

    @property
    def worst(self) -> float:
        return max(self.ppl.values())


def method_config(config: RunConfig, method: str) -> RunConfig:
    """`config` running `method`, with the centralized node given the whole token budget."""
    run_section = config.run.model_copy(update={"method": method, "name": method})
    update: dict[str, object] = {"run": run_section}
    if method == "centralized":
        n_leaves = len(list(build_tree(config.nodes).leaves()))
        steps = config.train.local_steps * n_leaves
        update["train"] = config.train.model_copy(update={"local_steps": steps})
    return config.model_copy(update=update)


def run_method(
    config: RunConfig, method: str, out_dir: Path, observer: RunObserver
) -> MethodResult:
    """One method's run under out_dir/<method>: reused if finished, resumed if interrupted."""
    run_dir = out_dir / method
    expected = method_config(config, method)
    if (run_dir / "config.toml").is_file():
        check_same_config(run_dir, expected)
    if not (run_dir / "summary.json").is_file():
        if (run_dir / "config.toml").is_file():
            try:
                resume(run_dir, observer)
            except CheckpointError:
                shutil.rmtree(run_dir)  # finished without its summary, or unusable: run again
        if not (run_dir / "summary.json").is_file():
            run(expected, observer, out=run_dir)
    return read_method(run_dir, method)


def check_same_config(run_dir: Path, expected: RunConfig) -> None:
    """Refuse to reuse or resume a run made with another config (stale results would be mixed
    into the table silently)."""
    stored = dump_config(load_config(run_dir / "config.toml")).splitlines()
    wanted = dump_config(expected).splitlines()
    if stored == wanted:
        return
    diff = [
        line
        for line in difflib.unified_diff(stored, wanted, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    was = "; ".join(line[1:].strip() for line in diff if line[0] == "-")
    now = "; ".join(line[1:].strip() for line in diff if line[0] == "+")
    raise ConfigError(
        f"{run_dir} holds a run made with a different config (it has {was}; asked: {now}); "
        "choose another --out, or delete that directory to run it again"
    )


def read_method(run_dir: Path, method: str) -> MethodResult:
    summary = json.loads((run_dir / "summary.json").read_text("utf-8"))
    ppl = {leaf: float(v["ppl_after"]) for leaf, v in summary["leaves"].items()}
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    by_round: dict[int, list[float]] = {}
    for row in rows:
        if row["node"] in ppl:
            by_round.setdefault(int(row["round"]), []).append(float(row["ppl"]))
    curve = [(r, sum(v) / len(v)) for r, v in sorted(by_round.items())]
    return MethodResult(method, ppl, curve)


def compare(
    config: RunConfig,
    out_dir: Path,
    observer_for: Callable[[str], AbstractContextManager[RunObserver]],
    methods: Sequence[str] = METHODS,
) -> list[MethodResult]:
    """Run (or reuse) each method, then write results.md and perplexity.png into out_dir."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for method in methods:
        with observer_for(method) as observer:
            results.append(run_method(config, method, out_dir, observer))
    plot_curves(results, out_dir / "perplexity.png")
    (out_dir / "results.md").write_text(results_markdown(results), encoding="utf-8")
    return results


def table_rows(results: Sequence[MethodResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per leaf, then the mean and the worst leaf."""
    header = ["leaf", *[r.method for r in results]]
    leaves = sorted(results[0].ppl)
    rows = [[leaf, *[f"{r.ppl[leaf]:.1f}" for r in results]] for leaf in leaves]
    rows.append(["mean", *[f"{r.mean:.1f}" for r in results]])
    rows.append(["worst leaf", *[f"{r.worst:.1f}" for r in results]])
    return header, rows


def fedavg_to_worldlm(results: Sequence[MethodResult]) -> float | None:
    by_name = {r.method: r for r in results}
    if "fedavg" in by_name and "worldlm" in by_name:
        return by_name["fedavg"].mean / by_name["worldlm"].mean
    return None


def results_markdown(results: Sequence[MethodResult]) -> str:
    header, rows = table_rows(results)
    lines = [
        "# Method comparison",
        "",
        "Validation perplexity of each leaf's deployed model after the last round "
        "(lower is better).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(row) + " |" for row in rows],
    ]
    ratio = fedavg_to_worldlm(results)
    if ratio is not None:
        lines += ["", f"FedAvg / WorldLM mean per-leaf perplexity: **{ratio:.2f}x**"]
    lines += ["", "![mean per-leaf perplexity per round](perplexity.png)", ""]
    return "\n".join(lines)


def plot_curves(results: Sequence[MethodResult], path: Path) -> None:
    """Mean per-leaf validation perplexity per round, one line per method (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        rounds = [r for r, _ in result.curve]
        values = [v for _, v in result.curve]
        ax.plot(rounds, values, marker="o", label=result.method)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("mean per-leaf validation perplexity")
    if all(v > 0 for r in results for _, v in r.curve) and any(r.curve for r in results):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
