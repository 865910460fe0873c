"""Cost of one secure aggregation round as the cohort grows: complete graph vs SecAgg+.

For each cohort size N, dropout rate (clients lost after sharing keys, before sending their
input: the costly case) and mode - the complete graph of Bonawitz et al. 2017 (k = 0) or the
SecAgg+ graph of Bell et al. 2020 with k = 2 ceil(log2 N) - one in-process round is run over
random float32 updates, and the table reports bytes sent and received per surviving client,
how many times the plain float32 update a client sends (Bonawitz et al. report 1.73x-1.98x
for their setting), mean client compute and the server's compute.

    python benchmarks/secagg_cost.py --length 100000 --json secagg.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from machine_info import machine_info
from worldlm.secagg.cost import CostRow, measure_cost, secagg_plus_neighbours


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100], help="cohort sizes")
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.2], help="dropout rates")
    p.add_argument("--length", type=int, default=100_000, help="float32 values per update")
    p.add_argument("--bits", type=int, default=32, help="field width (secagg.bits)")
    p.add_argument("--threshold", type=float, default=0.5, help="secagg.threshold")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs, dropouts and graph")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p.parse_args()


def kib(n: float) -> str:
    return f"{n / 1024:,.1f}"


def main() -> None:
    args = parse_args()
    console = Console(width=160)
    rows: list[CostRow] = []
    for n in args.clients:
        for k in (0, secagg_plus_neighbours(n)):
            for d in args.dropouts:
                console.log(f"N={n} k={k} dropout={d:.0%}")
                rows.append(
                    measure_cost(
                        n,
                        neighbours=k,
                        dropout=d,
                        length=args.length,
                        bits=args.bits,
                        threshold=args.threshold,
                        seed=args.seed,
                    )
                )
    table = Table(
        title=f"secure aggregation cost per round ({args.length:,} float32 values, "
        f"{args.bits}-bit field, threshold {args.threshold})"
    )
    for col in ("N", "mode", "neighbours", "dropout", "sent KiB/client", "recv KiB/client"):
        table.add_column(col, justify="right")
    for col in ("sent / float32", "client s", "server s"):
        table.add_column(col, justify="right")
    plain = 4 * args.length
    for r in rows:
        table.add_row(
            str(r.clients),
            "complete" if r.neighbours == 0 else f"SecAgg+ k={r.neighbours}",
            f"{r.degree:.0f}",
            f"{r.dropout:.0%}",
            kib(r.bytes_sent),
            kib(r.bytes_received),
            f"{r.bytes_sent / plain:.3f}x",
            f"{r.client_seconds:.3f}",
            f"{r.server_seconds:.3f}",
        )
    console.print(table)
    console.print(
        f"plain float32 update: {kib(plain)} KiB. Sent and received are means over the "
        "clients whose inputs were summed; client s is their mean compute."
    )
    if args.json:
        info = machine_info(args)
        info["rows"] = [{**vars(r), "expansion": r.expansion} for r in rows]
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
