"""Byzantine leaves on real text (issue 5, experiment b): 20% sign-flipping leaves against
FedAvg, trimmed mean, coordinate-wise median and Multi-Krum, next to the clean FedAvg run.

Ten leaves, flat under one root: five corpora of `../shared/corpora/domains` (three general,
two medical), each split into two leaves by alternating documents. Two leaves (one general,
one medical) reply `current - k * (honest - current)` every round (`federation.attacks`).
Every run has the same seed, data and budget; only the root's rule and the attackers change.

    python benchmarks/robust_attack.py --out runs/robust            # about 20 min on 2 cores
    python benchmarks/robust_attack.py --out runs/robust --rounds 2 # a quick look

Prints the table and writes `results.json` to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from worldlm.config import apply_overrides
from worldlm.config_load import validate_config
from worldlm.federation.attacks import install_attack, sign_flip
from worldlm.progress import QuietProgress
from worldlm.root_loop import evaluate_tree, mean_ppl
from worldlm.session import open_session

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "domains"
SOURCES = [
    "general/wikipedia_en",
    "general/brown",
    "general/email_ham",
    "medical/gene_ontology",
    "medical/hpo",
]
ATTACKERS = ["world/brown_b", "world/hpo_b"]  # 2 of 10 leaves
RULES: dict[str, list[str]] = {
    "fedavg": [],
    "trimmed_mean": ["nodes.world.robust.trim_fraction=0.2"],
    "median": [],
    "multi_krum": ["nodes.world.robust.byzantine=2"],
}


def shard_corpora(out: Path, max_docs: int) -> dict[str, Path]:
    """Each source split into two JSONL files of alternating documents: leaf name -> file."""
    files: dict[str, Path] = {}
    out.mkdir(parents=True, exist_ok=True)
    for source in SOURCES:
        lines = (CORPORA / f"{source}.jsonl").read_text(encoding="utf-8").splitlines()[:max_docs]
        name = source.split("/")[1].split("_")[0]
        for half, suffix in ((0, "a"), (1, "b")):
            path = out / f"{name}_{suffix}.jsonl"
            path.write_text("\n".join(lines[half::2]) + "\n", encoding="utf-8")
            files[f"{name}_{suffix}"] = path
    return files


def config_for(files: dict[str, Path], rule: str, rounds: int, out: Path) -> dict[str, Any]:
    nodes: dict[str, Any] = {"world": {"strategy": rule}}
    for name, path in sorted(files.items()):
        nodes[f"world/{name}"] = {"data": {"paths": [str(path)]}}
    return {
        "run": {"name": "robust", "seed": 0, "method": "hierfavg", "out_dir": str(out)},
        "model": {"preset": "small", "block_size": 128},
        "tokenizer": {"vocab_size": 4096},
        "data": {"val_fraction": 0.1, "max_chars": 300_000},
        "train": {"local_steps": 8, "batch_size": 8, "lr": 2e-3, "warmup_steps": 4},
        "eval": {"max_blocks": 32, "global_model": False},
        "stop": {"rounds": rounds},
        "monitor": {"tensorboard": False},
        "nodes": nodes,
    }


def run_case(
    data: dict[str, Any], extra: list[str], attack_k: float | None, run_dir: Path
) -> float:
    config = validate_config(apply_overrides(data, extra))
    session = open_session(config, QuietProgress(), run_dir)
    if attack_k is not None:
        install_attack(session.fed, ATTACKERS, sign_flip(attack_k))
    state = session.fed.root.state
    for r in range(1, config.stop.rounds + 1):
        state = session.fed.root.run_round(state, r).state
    return mean_ppl(evaluate_tree(session, state, config.stop.rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/robust"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--k", type=float, default=4.0, help="sign-flip strength")
    parser.add_argument("--max-docs", type=int, default=4000)
    args = parser.parse_args()
    console = Console()
    files = shard_corpora(args.out / "data", args.max_docs)
    results: dict[str, float] = {}
    cases = [("clean fedavg", "fedavg", None)] + [(f"{r}, 20% flipping", r, args.k) for r in RULES]
    for i, (label, rule, k) in enumerate(cases):
        data = config_for(files, rule, args.rounds, args.out)
        console.print(f"{label} ...")
        results[label] = run_case(data, RULES[rule], k, args.out / f"run{i}")
        console.print(f"  mean validation perplexity {results[label]:,.1f}")
    clean = results["clean fedavg"]
    table = Table(title=f"10 leaves, 2 sign-flipping (k = {args.k:g}), {args.rounds} rounds")
    for column in ("case", "mean val ppl", "vs clean"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for label, ppl in results.items():
        table.add_row(label, f"{ppl:,.1f}", f"{(ppl / clean - 1) * 100:+.1f}%")
    console.print(table)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
