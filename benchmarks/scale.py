"""Simulation at scale (issue 22): how worldlm's simulation grows with the number of leaves N:
peak memory, seconds per round, checkpoint bytes per round, in process or on Ray (`--backend`).

Each N runs `worldlm.run` in a fresh process on a flat federation of N leaves (`fedavg`), each
leaf with its own small synthetic text, the `tiny` (or `--preset`) model, a few local steps per
round, a checkpoint after every round. Measured:

- `peak RSS`: the child process's peak resident memory (`ru_maxrss` of the finished child);
- `tree PSS`: the peak of the summed PSS of the child and all its descendants, sampled every
  0.2 s (on Ray: the actors, raylet and the object store too);
- `s/round`: the median over rounds of the root's aggregate row `seconds` (training included);
- `ckpt MB/round`: the median over checkpoints of the bytes each wrote (its `checkpoint` metrics
  row: the checkpoint file and the leaf-state files of the leaves that changed since the last
  one), that over the model's own bytes (4 bytes per parameter), and its median seconds;
- `leaf files`: the median number of leaf-state files a checkpoint wrote.

    python benchmarks/scale.py --leaves 10,100,1000 --rounds 3 --leaf-state disk --sample 0.1

Flower at the same N runs in `noop_round.py` (no-op clients: the machinery alone), since
Flower has no trainer of this model. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

WORDS = [
    "river",
    "bridge",
    "harbour",
    "ferry",
    "canal",
    "tide",
    "quay",
    "barge",
    "lock",
    "court",
    "judge",
    "appeal",
    "statute",
    "verdict",
    "clause",
    "tenant",
    "lease",
    "deed",
    "oven",
    "flour",
    "butter",
    "knife",
    "recipe",
    "dough",
    "pan",
    "salt",
    "sugar",
    "planet",
    "orbit",
    "rocket",
    "comet",
    "moon",
    "crater",
    "star",
    "probe",
    "launch",
]

CHILD = """
import json, sys, time
from pathlib import Path
from worldlm import config_from_dict, run
data = json.loads(Path(sys.argv[1]).read_text())
result = run(config_from_dict(data))
print(json.dumps({"run_dir": str(result.run_dir), "parameters": result.parameters}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--leaves", default="10,100", help="comma-separated numbers of leaves")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--docs", type=int, default=30, help="documents per leaf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=1, help="checkpoint.every (root rounds)")
    p.add_argument(
        "--leaf-state", default="memory", choices=("memory", "disk"), help="run.leaf_state"
    )
    p.add_argument(
        "--backend", default="inprocess", choices=("inprocess", "ray"), help="run.backend"
    )
    p.add_argument(
        "--sample", type=float, default=1.0, help="share of leaves the root samples per round"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args()


def leaf_file(path: Path, seed: int, docs: int) -> str:
    rng = random.Random(seed)
    topic = rng.sample(WORDS, 8)  # each leaf its own mix of words
    lines = []
    for _ in range(docs):
        text = " ".join(f"The {rng.choice(topic)} of the {rng.choice(topic)}." for _ in range(6))
        lines.append(json.dumps({"text": text}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def config(root: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    data = root / "data"
    data.mkdir()
    nodes: dict[str, Any] = {"world": {"sample": {"fraction": args.sample}}}
    for i in range(n):
        file = leaf_file(data / f"leaf{i:04d}.jsonl", args.seed * 100_003 + i, args.docs)
        nodes[f"world/leaf{i:04d}"] = {"data": {"paths": [file]}}
    return {
        "run": {
            "name": f"scale-{n}",
            "out_dir": str(root / "runs"),
            "cache_dir": str(root / "cache"),
            "device": "cpu",
            "method": "fedavg",
            "seed": args.seed,
            "leaf_state": args.leaf_state,
            "backend": args.backend,
        },
        "model": {"preset": args.preset, "block_size": 32},
        "tokenizer": {"vocab_size": 320},
        "data": {"val_fraction": 0.2, "max_chars": 0, "chunk_chars": 200},
        "train": {"local_steps": args.local_steps, "batch_size": 4, "warmup_steps": 1},
        "eval": {"max_blocks": 2, "batch_size": 8, "every": args.rounds},
        "stop": {"rounds": args.rounds},
        "checkpoint": {"every": args.checkpoint_every, "keep": 2},
        "monitor": {"trackers": []},
        "nodes": nodes,
    }


class TreePeak(threading.Thread):
    """The peak over time of the summed PSS of a process and all its descendants (Ray's
    workers, raylet and object store included; shared pages count once), sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.done = threading.Event()
        self.peak = 0.0

    def sample(self) -> None:
        total = 0.0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                total += proc.memory_full_info().pss / 2**20
            except psutil.Error:  # gone, or not ours to read
                continue
        self.peak = max(self.peak, total)

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.sample()

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak


def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"worldlm-scale-{n}-") as tmp:
        root = Path(tmp)
        spec = root / "config.json"
        spec.write_text(json.dumps(config(root, n, args)), encoding="utf-8")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        tree = TreePeak(child.pid)
        tree.start()
        stdout, stderr = child.communicate()
        tree_peak = tree.stop()
        if child.returncode != 0:
            raise SystemExit(f"N={n} failed:\n{stderr[-3000:]}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        out = json.loads(stdout.strip().splitlines()[-1])
        run_dir = Path(out["run_dir"])
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        seconds = [r["seconds"] for r in rows if r["kind"] == "aggregate" and r["node"] == "world"]
        written = [r for r in rows if r["kind"] == "checkpoint"]
        ckpt = statistics.median(r["bytes"] for r in written)
        model_bytes = 4 * int(out["parameters"])
        return {
            "leaves": n,
            # ru_maxrss of children is the largest child so far: exact for the first N, and
            # a lower bound (the larger N run later) otherwise; runs go in increasing N.
            "peak_rss_mb": max(peak_kb, before) / 1024,
            "tree_peak_pss_mb": tree_peak,
            "seconds_per_round": statistics.median(seconds),
            "checkpoint_mb": ckpt / 1e6,
            "checkpoint_over_model": ckpt / model_bytes,
            "checkpoint_seconds": statistics.median(r["seconds"] for r in written),
            "leaf_files": statistics.median(r["leaf_files"] for r in written),
            "parameters": out["parameters"],
        }


def main() -> None:
    args = parse_args()
    counts = sorted(int(x) for x in args.leaves.split(",") if x.strip())
    results = [measure(n, args) for n in counts]
    table = Table(
        title=f"worldlm in process, preset {args.preset}, {args.rounds} rounds, "
        f"leaf state in {args.leaf_state}, sample {args.sample}, backend {args.backend}"
    )
    columns = (
        "leaves",
        "peak RSS MB",
        "x smallest N",
        "tree PSS MB",
        "s/round",
        "ckpt MB/round",
        "ckpt / model",
        "ckpt s",
        "leaf files",
    )
    for col in columns:
        table.add_column(col, justify="right")
    base = results[0]["peak_rss_mb"]
    for r in results:
        table.add_row(
            str(r["leaves"]),
            f"{r['peak_rss_mb']:,.0f}",
            f"{r['peak_rss_mb'] / base:.2f}",
            f"{r['tree_peak_pss_mb']:,.0f}",
            f"{r['seconds_per_round']:.2f}",
            f"{r['checkpoint_mb']:.1f}",
            f"{r['checkpoint_over_model']:.1f}",
            f"{r['checkpoint_seconds']:.2f}",
            f"{r['leaf_files']:.0f}",
        )
    Console().print(table)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"settings": vars(args) | {"json": None}, "results": results}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
