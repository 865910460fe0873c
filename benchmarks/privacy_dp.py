"""WorldLM, HierFAVG and FedAvg under user-level differential privacy (issue 5, experiment a).

For each method, a run without DP and one run per target ε (at δ = 1e-5 over the whole run):
DP-FedAvg at the federations that aggregate leaves — the root for flat FedAvg, each
sub-federation for HierFAVG and WorldLM — with the noise multiplier z found by bisection so
that the accountant reports the target ε after the run's rounds, and the clip bound C set to
the median change norm of the run without DP (read from its audit log). Noise is seeded, so a
rerun gives the same numbers.

    python benchmarks/privacy_dp.py --out runs/privacy-dp            # about 35 min on 2 cores
    python benchmarks/privacy_dp.py --out runs/privacy-dp --rounds 2  # a quick look

Prints a table of final perplexities and writes `results.json` and `perplexity.png` to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from worldlm.config import RunConfig
from worldlm.config_load import load_config
from worldlm.metrics.jsonl import read_metrics
from worldlm.privacy.accountant import PrivacyAccountant
from worldlm.progress import QuietProgress
from worldlm.runner import run

METHODS = ("fedavg", "hierfavg", "worldlm")


def noise_for_epsilon(epsilon: float, steps: int, sampling_rate: float, delta: float) -> float:
    """The smallest z (to 0.1%) whose accountant reports at most `epsilon` after `steps`."""
    low, high = 0.05, 200.0
    for _ in range(60):
        mid = math.sqrt(low * high)
        accountant = PrivacyAccountant(mid, sampling_rate, delta)
        accountant.step(steps)
        if accountant.epsilon() > epsilon:
            low = mid
        else:
            high = mid
        if high / low < 1.001:
            break
    return high


def dp_nodes(config: RunConfig, method: str) -> list[str]:
    """Where DP goes: the root for flat FedAvg, else every parent of leaves."""
    if method == "fedavg":
        return [next(p for p in config.nodes if "/" not in p)]
    return sorted({p.rsplit("/", 1)[0] for p, node in config.nodes.items() if node.data})


def median_change_norm(run_dir: Path) -> float:
    with sqlite3.connect(run_dir / "audit.sqlite") as conn:
        rows = conn.execute("SELECT fields FROM entries WHERE event = 'update_accepted'").fetchall()
    norms = [json.loads(f)["change_norm"] for (f,) in rows]
    return float(statistics.median(norms))


def run_once(config: RunConfig, out: Path) -> dict[str, Any]:
    """Run `config` into `out` unless a finished run is already there; return its figures."""
    if not (out / "summary.json").is_file():
        run(config, QuietProgress(), out=out)
    summary = json.loads((out / "summary.json").read_text())
    rows = read_metrics(out / "metrics.jsonl")
    root = next(p for p in config.nodes if "/" not in p)
    curve = [(r["round"], r["ppl"]) for r in rows if r["kind"] == "eval" and r["node"] == root]
    return {
        "final_ppl": curve[-1][1],
        "curve": curve,
        "leaves": {leaf: v["ppl_after"] for leaf, v in summary["leaves"].items()},
        "privacy": summary.get("privacy", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="federation config (default: embedded)")
    parser.add_argument("--out", type=Path, default=Path("runs/privacy-dp"))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    console = Console()
    results: dict[str, dict[str, Any]] = {}
    for method in args.methods:
        plain = load_config(args.config, [f"run.method={method}", f"stop.rounds={args.rounds}"])
        console.print(f"{method}: without DP")
        results[f"{method}|none"] = run_once(plain, args.out / f"{method}-none")
        clip = median_change_norm(args.out / f"{method}-none")
        nodes = dp_nodes(plain, method)
        for epsilon in args.epsilons:
            # Every child is sampled every round (q = 1); one step per round.
            z = noise_for_epsilon(epsilon, args.rounds, 1.0, args.delta)
            overrides = [f"run.method={method}", f"stop.rounds={args.rounds}"]
            for node in nodes:
                overrides += [
                    f"nodes.{node}.dp.enabled=true",
                    f"nodes.{node}.dp.clip={clip}",
                    f"nodes.{node}.dp.noise_multiplier={z}",
                    f"nodes.{node}.dp.delta={args.delta}",
                    f"nodes.{node}.dp.seeded_noise=true",
                ]
            config = load_config(args.config, overrides)
            console.print(f"{method}: ε = {epsilon:g}, z = {z:.3f}, C = {clip:.3g} at {nodes}")
            figures = run_once(config, args.out / f"{method}-eps{epsilon:g}")
            figures.update(epsilon=epsilon, noise_multiplier=z, clip=clip, dp_nodes=nodes)
            results[f"{method}|{epsilon:g}"] = figures
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(_table(results, args.methods, args.epsilons))
    _plot(results, args.out / "perplexity.png")


def _table(results: dict[str, dict[str, Any]], methods: list[str], epsilons: list[float]) -> Table:
    table = Table(title="final mean validation perplexity (root's token-weighted merge)")
    table.add_column("method")
    settings = ["none", *[f"{e:g}" for e in epsilons]]
    for setting in settings:
        table.add_column("no DP" if setting == "none" else f"ε = {setting}", justify="right")
    for method in methods:
        cells = []
        for setting in settings:
            figures = results.get(f"{method}|{setting}")
            cells.append("-" if figures is None else f"{figures['final_ppl']:,.1f}")
        table.add_row(method, *cells)
    return table


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(7, 4.5))
    for key, figures in sorted(results.items()):
        rounds, ppl = zip(*figures["curve"], strict=True)
        method, setting = key.split("|")
        label = f"{method}, " + ("no DP" if setting == "none" else f"ε = {setting}")
        style = "-" if setting == "none" else ("--" if setting == "8" else ":")
        ax.plot(rounds, ppl, style, marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("root round")
    ax.set_ylabel("mean validation perplexity")
    ax.legend(fontsize=7)
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    plt.close()


if __name__ == "__main__":
    main()
