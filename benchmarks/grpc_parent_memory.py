"""A gRPC parent's memory while its children's replies pile up, with and without the receive gate.

The parent runs `Aggregator.run_round` (FedAvg, float32 sum) in this process over
`GrpcTransport`; every leaf is an OS process of its own dialling in over 127.0.0.1 with mutual
TLS, and answers each task with the state it was sent. The first leaf waits `--slow-seconds`
before answering, so with ordered delivery (the deployment's default) every other reply arrives
before the one the round needs first: the worst case for a parent's memory. Each
`--held` value is a `ParentLinkServer(held_messages=...)`, all served by the same leaf
processes, rounds interleaved; 1000 stands for no gate (more than the leaves).

Reported per variant: the round time and the parent's peak resident memory during the round
over its resident memory just before it (VmHWM reset through /proc/self/clear_refs), in GB and
in model copies (the round's running sum is one of them). Minimum and maximum over the rounds
after the first.

    python benchmarks/grpc_parent_memory.py --leaves 10 --params 25M --json /tmp/bench/gate.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from aggregation_throughput import parse_count, reset_peak_rss, rss_gb
from grpc_link import (
    MTLS,
    PARENT,
    RUN_ID,
    Pki,
    leaf_process,
    make_state,
    quiet_logs,
    shut_down,
    state_bytes,
)
from machine_info import load_average, machine_info
from worldlm.config import AggregatorConfig
from worldlm.federation.aggregator import Aggregator
from worldlm.federation.context import RunContext
from worldlm.strategies.catalog import build_strategy
from worldlm.transport.grpc import DEFAULT_CHUNK_BYTES, ParentLinkServer
from worldlm.transport.grpc.transport import GrpcTransport, RoundPolicy

GB = 1024**3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaves", type=int, default=10)
    parser.add_argument("--params", type=parse_count, default=25_000_000)
    parser.add_argument("--held", type=int, nargs="+", default=[2, 1000])
    parser.add_argument("--slow-seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the first")
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    console = Console()
    quiet_logs()
    leaves = [f"{PARENT}/leaf-{i:02d}" for i in range(args.leaves)]
    with tempfile.TemporaryDirectory() as tmp:
        pki = Pki(Path(tmp), [PARENT, *leaves])
        servers = {
            held: ParentLinkServer(
                "127.0.0.1:0",
                PARENT,
                leaves,
                pki.files(PARENT, MTLS),
                run_id=RUN_ID,
                held_messages=held,
            )
            for held in args.held
        }
        ctx = mp.get_context("spawn")
        processes = [
            ctx.Process(
                target=leaf_process,
                args=(
                    path,
                    [(s.address, pki.files(path, MTLS)) for s in servers.values()],
                    DEFAULT_CHUNK_BYTES,
                    args.slow_seconds if i == 0 else 0.0,
                ),
            )
            for i, path in enumerate(leaves)
        ]
        console.print(f"starting {len(leaves)} leaf processes ...")
        for p in processes:
            p.start()
        transports = {}
        try:
            for server in servers.values():
                server.wait_for_children(timeout=600)
            run_ctx = RunContext(run_id=RUN_ID, seed=0, device=torch.device("cpu"))
            aggregators = {}
            for held, server in servers.items():
                transports[held] = GrpcTransport(server, RoundPolicy(round_timeout=600))
                aggregators[held] = Aggregator(
                    PARENT,
                    AggregatorConfig(sum_dtype="float32"),
                    transport=transports[held],
                    strategy=build_strategy("fedavg", sum_dtype="float32"),
                    ctx=run_ctx,
                )
            state = make_state(args.params, 8, 0)
            model_gb = state_bytes(state) / GB
            cells: dict[int, dict[str, list[float]]] = {h: {"s": [], "gb": []} for h in servers}
            for r in range(args.rounds + 1):
                for held, agg in aggregators.items():
                    before = rss_gb("VmRSS")
                    reset_peak_rss()
                    started = time.perf_counter()
                    outcome = agg.run_round(state, r)
                    seconds = time.perf_counter() - started
                    peak = rss_gb("VmHWM") - before
                    answered = outcome.records[-1]["participants"]
                    assert len(answered) == len(leaves), f"only {len(answered)} answered"
                    del outcome
                    if r:
                        cells[held]["s"].append(seconds)
                        cells[held]["gb"].append(peak)
        finally:
            shut_down(transports.values(), processes, servers.values())
    table = Table(
        title=f"gRPC parent, {len(leaves)} leaves, P = {args.params / 1e6:g}M "
        f"({model_gb * GB / 1e6:.0f} MB), first leaf {args.slow_seconds:g} s late"
    )
    for col in ("held_messages", "round s (min)", "peak GB (min-max)", "copies (min-max)"):
        table.add_column(col, justify="right")
    rows = []
    for held, c in cells.items():
        copies = [g / model_gb for g in c["gb"]]
        rows.append({"held_messages": held, "seconds": c["s"], "peak_gb": c["gb"]})
        table.add_row(
            str(held) if held < len(leaves) else f"{held} (no gate)",
            f"{min(c['s']):.2f}",
            f"{min(c['gb']):.2f}-{max(c['gb']):.2f}",
            f"{min(copies):.1f}-{max(copies):.1f}",
        )
    console.print(table)
    if args.json:
        info = machine_info(args, model_gb=model_gb, load_after=load_average())
        args.json.write_text(json.dumps(info | {"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
