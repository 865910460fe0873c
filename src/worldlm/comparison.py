"""`worldlm compare`: every method on one config, one budget, one table and one plot.

All methods share the seed, model, tokenizer, splits, rounds and local steps per leaf; the
centralized baseline's single node takes `local_steps x n_leaves` steps per round so that it sees
the same total number of tokens. Finished methods are reused and an interrupted one is resumed.

A method name is `BASE` or `BASE+OPTIMIZER` (`parse_method`):

- BASE is one of METHODS (the engine's methods, `run.method`) or `fedprox`: FedAvg whose leaves
  add the proximal term (mu/2)·||w - w_received||² (Li et al. 2020) with mu = the config's
  `train.prox_mu`, or FEDPROX_MU when that is 0. The config's `train.prox_mu` is the mu of the
  fedprox methods only: every other method runs without the term, so that fedavg and fedprox
  differ by it alone.
- A BASE may end in `_ft` (`fedavg_ft`, `fedper_ft`, ...: FINETUNED): the method whose last
  `train.finetune_rounds` rounds (or FINETUNE_SHARE of stop.rounds when that is unset or 0) are
  a personalization phase, in which each leaf fine-tunes the model it would deploy on its own
  data and deploys the result. `fedavg_ft` is FedAvg + local fine-tuning. The budget is every
  method's: the same rounds of the same local steps. `worldlm` ends in that phase by default
  (so `worldlm_ft` is `worldlm` with a phase even where the config turns WorldLM's off); the
  other methods run without it.
- OPTIMIZER (one of SERVER_OPTIMIZERS) is the server optimizer of the global server, the root
  aggregator, at its defaults, or as the config's root sets it when it names the same optimizer
  (so its learning rate can be tuned there). Optimizers below the root, and the root's for a
  bare BASE, are whatever the config sets: plain FedAvg unless the config names one.
  `centralized` and `local` take none: nothing is aggregated at their root (centralized trains
  one model on the pooled data; local keeps every leaf's own model).

Each method runs as run.name = its full name in out_dir/<full name>.
"""

from __future__ import annotations

import difflib
import json
import shutil
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from worldlm.config import (
    Method,
    RunConfig,
    ServerOptimizerConfig,
    ServerOptimizerName,
    dump_config,
)
from worldlm.config_load import load_config
from worldlm.errors import CheckpointError, ConfigError
from worldlm.federation.methods import share_of_rounds
from worldlm.metrics.jsonl import read_metrics
from worldlm.runner import resume, run
from worldlm.session import RunObserver
from worldlm.tree import build_tree

METHODS = ("centralized", "local", "fedavg", "hierfavg", "fedper", "worldlm")
# Methods that can end in a personalization phase (centralized has one model, local only its own).
FINETUNED = ("fedavg", "hierfavg", "fedper", "worldlm", "fedprox")
BASES = (*METHODS, "fedprox", *(f"{base}_ft" for base in FINETUNED))
SERVER_OPTIMIZERS = ("fedavgm", "nesterov", "fedadam", "fedyogi", "fedadagrad")
# Bases whose root aggregates nothing a server optimizer could step on.
NO_SERVER_OPTIMIZER = ("centralized", "local")
# FedProx's mu when the config's train.prox_mu is 0: the middle of the grid Li et al. (2020)
# tune over (0.001, 0.01, 0.1, 1); a small pull that regularizes without stalling local training.
FEDPROX_MU = 0.01


@dataclass(frozen=True)
class MethodSpec:
    """A compare method: `name` = `base` or `base+optimizer`."""

    name: str
    base: str  # one of BASES
    optimizer: ServerOptimizerName | None  # the root's server optimizer, or the config's

    @property
    def method(self) -> Method:
        """The engine's method that runs it (run.method)."""
        base = self.base.removesuffix("_ft")
        return cast(Method, "fedavg" if base == "fedprox" else base)

    @property
    def finetunes(self) -> bool:
        return self.base.endswith("_ft")


def parse_method(name: str) -> MethodSpec:
    """`BASE` or `BASE+OPTIMIZER`; ConfigError naming the valid choices otherwise."""
    base, plus, optimizer = name.partition("+")
    if base not in BASES or (plus and optimizer not in SERVER_OPTIMIZERS):
        raise ConfigError(
            f"--methods: unknown method {name!r}; a method is BASE or BASE+OPTIMIZER, BASE one "
            f"of {', '.join(BASES)} and OPTIMIZER one of {', '.join(SERVER_OPTIMIZERS)} "
            "(e.g. fedavg+nesterov)"
        )
    if plus and base in NO_SERVER_OPTIMIZER:
        raise ConfigError(
            f"--methods: {name!r}: {base} aggregates nothing at its root, so it takes no server "
            f"optimizer; use {base} alone"
        )
    return MethodSpec(name, base, cast(ServerOptimizerName, optimizer) if plus else None)


@dataclass(frozen=True)
class MethodResult:
    method: str
    ppl: dict[str, float]  # leaf path -> validation perplexity of its deployed model, at the end
    curve: list[tuple[int, float]]  # (round, mean per-leaf perplexity)
    # leaf path -> perplexity of a unigram model of its own training text (train.unigram)
    unigram: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.ppl.values()) / len(self.ppl)

    @property
    def worst(self) -> float:
        return max(self.ppl.values())


def method_config(config: RunConfig, method: str) -> RunConfig:
    """`config` running `method` (a name `parse_method` accepts): run.method its engine method,
    run.name its full name; the centralized node given the whole token budget, train.prox_mu
    on for fedprox only, train.finetune_rounds for the _ft methods only, and the root's server
    optimizer set for `+OPTIMIZER`."""
    spec = parse_method(method)
    run_section = config.run.model_copy(update={"method": spec.method, "name": spec.name})
    train: dict[str, object] = {}
    if spec.base == "centralized":
        n_leaves = len(list(build_tree(config.nodes).leaves()))
        train["local_steps"] = config.train.local_steps * n_leaves
    if spec.base.removesuffix("_ft") == "fedprox":
        train["prox_mu"] = config.train.prox_mu if config.train.prox_mu > 0 else FEDPROX_MU
    elif config.train.prox_mu > 0:
        train["prox_mu"] = 0.0
    if spec.finetunes:
        train["finetune_rounds"] = phase_rounds(config)
    elif spec.method != "worldlm" and config.train.finetune_rounds:
        train["finetune_rounds"] = 0  # (unset is already none for every method but worldlm)
    update: dict[str, object] = {"run": run_section}
    if train:
        update["train"] = config.train.model_copy(update=train)
    if spec.optimizer is not None:
        tree = build_tree(config.nodes)
        root, settings = tree.path, tree.aggregator
        if settings.server_optimizer.name != spec.optimizer:
            server = ServerOptimizerConfig(name=spec.optimizer)
            settings = settings.model_copy(update={"server_optimizer": server})
            update["nodes"] = {**config.nodes, root: settings}
    return config.model_copy(update=update)


def phase_rounds(config: RunConfig) -> int:
    """The _ft methods' personalization phase: the config's, or FINETUNE_SHARE of the rounds."""
    if config.train.finetune_rounds:
        return config.train.finetune_rounds
    return max(1, share_of_rounds(config.stop.rounds))


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
    unigram = {
        leaf: float(v["unigram_ppl"])
        for leaf, v in summary["leaves"].items()
        if v.get("unigram_ppl") is not None  # (runs written before it was recorded)
    }
    return MethodResult(method, ppl, curve, unigram)


def compare(
    config: RunConfig,
    out_dir: Path,
    observer_for: Callable[[str], AbstractContextManager[RunObserver]],
    methods: Sequence[str] = METHODS,
) -> list[MethodResult]:
    """Run (or reuse) each method, then write results.md and perplexity.png into out_dir."""
    for method in methods:
        parse_method(method)  # every name checked before anything runs
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for method in methods:
        with observer_for(method) as observer:
            results.append(run_method(config, method, out_dir, observer))
    plot_curves(results, out_dir / "perplexity.png")
    (out_dir / "results.md").write_text(results_markdown(results), encoding="utf-8")
    return results


def table_rows(results: Sequence[MethodResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per leaf, then the mean and the worst leaf; a last column holds
    each leaf's unigram reference when the runs recorded it."""
    header = ["leaf", *[r.method for r in results]]
    leaves = sorted(results[0].ppl)
    rows = [[leaf, *[f"{r.ppl[leaf]:.1f}" for r in results]] for leaf in leaves]
    rows.append(["mean", *[f"{r.mean:.1f}" for r in results]])
    rows.append(["worst leaf", *[f"{r.worst:.1f}" for r in results]])
    unigram = next((r.unigram for r in results if set(r.unigram) == set(leaves)), None)
    if unigram is not None:
        header.append("unigram")
        values = [unigram[leaf] for leaf in leaves]
        for row, value in zip(rows, [*values, sum(values) / len(values), max(values)], strict=True):
            row.append(f"{value:.1f}")
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
    if header[-1] == "unigram":
        lines += [
            "",
            "unigram: the perplexity of a table of the leaf's own training-token frequencies "
            "(add-one smoothed) on the same validation tokens. A method above it has learned "
            "less than those frequencies, and its column says nothing about federation.",
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
