"""One table from the JSON files of `benchmarks/local_training.py` runs (gpu_check.sh's):
per run, tokens/s of worldlm's leaf step and of the plain loop, their ratio and MFU.

    python benchmarks/gpu_summary.py /tmp/gpu_check/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main(paths: list[str]) -> None:
    table = Table(title="Local training on the device: worldlm leaf vs plain PyTorch")
    for col in ("run", "device", "params", "block x batch", "worldlm tok/s", "plain tok/s"):
        table.add_column(col, justify="right" if "tok" in col else "left")
    for col in ("ratio min", "ratio median", "MFU worldlm", "MFU plain"):
        table.add_column(col, justify="right")
    for path in sorted(paths):
        data = json.loads(Path(path).read_text("utf-8"))
        rows, s = data["variants"], data["settings"]
        leaf, plain = rows["worldlm leaf"], rows["plain PyTorch"]

        def mfu(row: dict[str, float | None]) -> str:
            value = row.get("mfu_best")
            return "n/a" if value is None else f"{100 * value:.1f}%"

        table.add_row(
            Path(path).stem,
            str(data.get("device", "?")),
            f"{data['parameters'] / 1e6:.0f}M",
            f"{s['block_size']} x {s['batch_size']}" + (" compiled" if s.get("compile") else ""),
            f"{leaf['tokens_per_s_best']:,.0f}",
            f"{plain['tokens_per_s_best']:,.0f}",
            f"{leaf['ratio_min']:.3f}",
            f"{leaf['ratio_median']:.3f}",
            mfu(leaf),
            mfu(plain),
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
