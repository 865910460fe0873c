"""FedAvg aggregation throughput: worldlm's streaming FedAvg against a plain loop and Flower.

Each cell aggregates N client models of P float32 parameters (GPT-2-like tensors: an embedding,
then per block two LayerNorms, QKV, the output projection and the MLP, so big matrices mixed
with small vectors) into their example-weighted mean. The inputs are built before the clock
starts, in each contestant's own input type; a repetition times one whole aggregation:

- `worldlm FedAvgRound`: the registered `fedavg` strategy's round (`FedAvgRound.add(Update)`,
  one update at a time into the float32 `WeightedSum`, the default `sum_dtype`), then what
  `Aggregator.run_round` does with the result: each tensor divided by the total weight (in
  the model's dtype already);
- `worldlm FedAvgRound, float64 sum`: the same with `sum_dtype = "float64"` (float32 replies
  converted a cached chunk at a time), the mean cast back to float32;
- `plain torch add_`: a float32 accumulator, `acc.add_(t, alpha=w)` per tensor, then `div_`;
- `Flower aggregate_arrayrecords`: `flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`
  over one `RecordDict` per client (an `ArrayRecord` and a `MetricRecord` "num-examples"), as
  the message-API `FedAvg.aggregate_train` calls it;
- `Flower aggregate (legacy)`: `flwr.server.strategy.aggregate.aggregate` over
  (list of NumPy arrays, num_examples) pairs, as the legacy `FedAvg.aggregate_fit` calls it;
- `diag: f64 acc, fused cast` (unless `--no-diagnostics`): a float64 accumulator fed the float32
  tensors directly (`acc64.add_(t32, alpha=w)`, TensorIterator casts in its inner loop) instead
  of `WeightedSum`'s `t.double()` copy first: what avoiding that temporary would give.

GB/s = N * P * 4 bytes (the input) / 1e9 / seconds. Every contestant runs once per repetition,
in an order rotated each repetition, after `--warmup` untimed runs; the table reports the
minimum (the machine is noisy) and the median. `peak extra GB` is the process's peak resident
memory during one aggregation over its resident memory just before (Linux VmHWM, reset through
/proc/self/clear_refs). glibc mmaps tensors of 32 MB and more and unmaps them when freed, so
they show; smaller ones may reuse heap memory an earlier run freed but kept, which does not,
so the column is a lower bound (`copies` = it over one model, 4P bytes).

To keep memory bounded, the N clients cycle over `--distinct` different models (each far larger
than the CPU caches, so this saves memory without making the data cache-resident). Results are
checked once, outside the clock, against the float64 weighted mean.

Flower is optional: run it in the benchmark venv (benchmarks/README.md); without `flwr` the
Flower rows are skipped with a note.

    .benchvenv/bin/python benchmarks/aggregation_throughput.py --json /tmp/bench/agg.json
    .benchvenv/bin/python benchmarks/aggregation_throughput.py --quick

Options: `--clients` (default 10 50), `--params` (10M 50M; suffixes k/M/G), `--reps` (3),
`--warmup` (1), `--distinct` (4), `--threads` (torch's default), `--max-gb` (skip a contestant
whose estimated extra memory is larger; 16), `--no-diagnostics`, `--seed`, `--json PATH`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from machine_info import load_average, machine_info

# worldlm is imported where it is used, so that noop_round.py's Flower cells, which import
# this module's helpers, do not carry worldlm's imports in their memory.
State = dict[str, torch.Tensor]

OURS = "worldlm FedAvgRound"
OURS64 = "worldlm FedAvgRound, float64 sum"
PLAIN = "plain torch add_"
FLOWER = "Flower aggregate_arrayrecords"
LEGACY = "Flower aggregate (legacy)"
FUSED = "diag: f64 acc, fused cast"
GB = 1e9
TARGET_VS_FLOWER = 3.0  # ours at least 3x faster than Flower (issue 6)
TARGET_VS_PLAIN = 0.5  # ours at least 50% of the plain add_ loop's throughput


# --- shared with wire_speed.py and noop_round.py ------------------------------------------------


def parse_count(text: str) -> int:
    """`10M`, `2.5k`, `1e6` or `1000000` as an int."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (try 10M or 1e7)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def transformer_shapes(n_params: int) -> dict[str, tuple[int, ...]]:
    """GPT-2-like tensor names and shapes of about `n_params` parameters: the widest d_model
    (a multiple of 64, with d_model / 64 blocks) whose blocks take at most 80% of the budget,
    and a token embedding taking the rest."""

    def blocks_params(d: int) -> int:
        return max(1, d // 64) * (12 * d * d + 13 * d)

    d = 64
    while blocks_params(d + 64) <= 0.8 * n_params:
        d += 64
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(max(1, d // 64)):
        h = f"h.{i}"
        shapes |= {
            f"{h}.ln_1.weight": (d,),
            f"{h}.ln_1.bias": (d,),
            f"{h}.attn.c_attn.weight": (3 * d, d),
            f"{h}.attn.c_attn.bias": (3 * d,),
            f"{h}.attn.c_proj.weight": (d, d),
            f"{h}.attn.c_proj.bias": (d,),
            f"{h}.ln_2.weight": (d,),
            f"{h}.ln_2.bias": (d,),
            f"{h}.mlp.c_fc.weight": (4 * d, d),
            f"{h}.mlp.c_fc.bias": (4 * d,),
            f"{h}.mlp.c_proj.weight": (d, 4 * d),
            f"{h}.mlp.c_proj.bias": (d,),
        }
    shapes |= {"ln_f.weight": (d,), "ln_f.bias": (d,)}
    rest = n_params - sum(math.prod(s) for s in shapes.values())
    return {"wte.weight": (max(1, rest // d), d), **shapes}


def transformer_state(
    n_params: int, seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights (std 0.02) in the shapes of `transformer_shapes`."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        for name, shape in transformer_shapes(n_params).items()
    }


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


Timings = dict[str, list[float]]  # what was timed -> seconds, one per repetition
Unit = Callable[[], dict[str, float]]  # one repetition of a contestant: {what: seconds}


def run_interleaved(units: dict[str, Unit], reps: int, warmup: int) -> dict[str, Timings]:
    """Every unit once per repetition, in an order rotated each repetition, after a warm-up;
    the seconds of each unit by what it timed (`gc.collect()` runs outside the clock)."""
    names = list(units)
    for _ in range(warmup):
        for name in names:
            gc.collect()
            units[name]()
    out: dict[str, Timings] = {name: {} for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()
            for key, seconds in units[name]().items():
                out[name].setdefault(key, []).append(seconds)
    return out


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_gb(field_name: str = "VmRSS") -> float:
    """This process's resident (VmRSS) or peak resident (VmHWM) memory in GB (0 without /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return 0.0


def flower_version() -> str | None:
    try:
        import flwr
    except ImportError:
        return None
    return str(getattr(flwr, "__version__", "unknown"))


# --- the contestants ----------------------------------------------------------------------------


@dataclass
class Inputs:
    """One cell's inputs, in every contestant's own types (built before the clock starts)."""

    current: State  # the global model the round started from (dtypes of the result)
    states: list[State]  # N client models (cycling over `distinct` different ones)
    weights: list[int]  # examples per client
    updates: list[Any] = field(default_factory=list)  # worldlm Updates
    records: list[Any] = field(default_factory=list)  # Flower RecordDicts
    ndarrays: list[tuple[list[Any], int]] = field(default_factory=list)  # Flower legacy


def ours(inp: Inputs, sum_dtype: torch.dtype = torch.float32) -> State:
    from worldlm.strategies.fedavg import FedAvg

    rnd = FedAvg(sum_dtype).start_round(inp.current)
    for update in inp.updates:
        rnd.add(update)
    sums, total = rnd.result()
    return engine_mean(sums, total, inp.current)


def engine_mean(sums: State, total: float, current: State) -> State:
    """As Aggregator.run_round: each tensor over the total weight, in the model's dtype (a
    float32 sum divided in place, a float64 one a chunk at a time)."""
    from worldlm.core.chunked import ChunkBuffers, mean_like

    buffers = ChunkBuffers()
    return {
        k: v.div_(total)
        if v.dtype == current[k].dtype
        else mean_like(v, total, current[k], buffers)
        for k, v in sums.items()
    }


def ours64(inp: Inputs) -> State:
    return ours(inp, torch.float64)


def plain(inp: Inputs) -> State:
    acc: State = {}
    for state, weight in zip(inp.states, inp.weights, strict=True):
        if not acc:
            acc = {k: t.mul(weight) for k, t in state.items()}
            continue
        for key, t in state.items():
            acc[key].add_(t, alpha=weight)
    total = float(sum(inp.weights))
    for t in acc.values():
        t.div_(total)
    return acc


def fused_f64(inp: Inputs) -> State:
    from worldlm.core.state import cast_like

    acc: State = {}
    for state, weight in zip(inp.states, inp.weights, strict=True):
        if not acc:
            acc = {k: torch.zeros(t.shape, dtype=torch.float64) for k, t in state.items()}
        for key, t in state.items():
            acc[key].add_(t, alpha=weight)
    total = float(sum(inp.weights))
    return cast_like({k: v / total for k, v in acc.items()}, inp.current)


def flower_arrayrecords(inp: Inputs) -> Any:
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    return aggregate_arrayrecords(inp.records, "num-examples")


def flower_legacy(inp: Inputs) -> Any:
    from flwr.server.strategy.aggregate import aggregate

    return aggregate(inp.ndarrays)


CONTESTANTS: dict[str, Callable[[Inputs], Any]] = {
    OURS: ours,
    OURS64: ours64,
    PLAIN: plain,
    FLOWER: flower_arrayrecords,
    LEGACY: flower_legacy,
    FUSED: fused_f64,
}


def estimated_extra_gb(name: str, n: int, p: int) -> float:
    """A generous estimate of what a contestant allocates (to skip what would not fit)."""
    model = 4 * p / GB
    if name == LEGACY:  # every client's weighted arrays exist at once, then one sum per layer
        return (n + 2) * model
    return {OURS: 3.0, OURS64: 6.0, PLAIN: 2.0, FLOWER: 4.0, FUSED: 5.0}[name] * model


def max_error(result: Any, reference: State) -> float:
    """Largest |result - reference| over every parameter, relative to the largest |reference|.
    `result` is a dict of tensors, a Flower ArrayRecord (both by name) or a legacy list of
    arrays (in the input's order)."""
    worst = scale = 0.0
    for i, (name, ref) in enumerate(reference.items()):
        got = result[i] if isinstance(result, list) else result[name].numpy()
        value = torch.from_numpy(got).double()
        worst = max(worst, float((value - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    return worst / scale if scale else worst


def build_inputs(
    n: int, p: int, distinct: int, seed: int, names: Sequence[str]
) -> tuple[Inputs, State]:
    """The cell's inputs and the float64 reference mean."""
    models = [transformer_state(p, seed + 1 + k) for k in range(min(distinct, n))]
    gen = torch.Generator().manual_seed(seed)
    weights = [int(w) for w in torch.randint(100, 1000, (n,), generator=gen)]
    states = [models[i % len(models)] for i in range(n)]
    inp = Inputs(current=models[0], states=states, weights=weights)
    if OURS in names or OURS64 in names:
        from worldlm.core.messages import Update

        inp.updates = [
            Update(f"client-{i}", 0, f"nonce-{i}", s, float(w))
            for i, (s, w) in enumerate(zip(states, weights, strict=True))
        ]
    if FLOWER in names:
        from flwr.app import ArrayRecord, MetricRecord, RecordDict

        arrays = [ArrayRecord(m) for m in models]  # np.save of each tensor, made once
        inp.records = [
            RecordDict(
                {"arrays": arrays[i % len(arrays)], "metrics": MetricRecord({"num-examples": w})}
            )
            for i, w in enumerate(weights)
        ]
    if LEGACY in names:
        lists = [[t.numpy() for t in m.values()] for m in models]  # views, no copies
        inp.ndarrays = [(lists[i % len(lists)], w) for i, w in enumerate(weights)]
    # Reference: the clients cycle over the distinct models, so sum each model once with the
    # total weight of the clients holding it.
    per_model = [0.0] * len(models)
    for i, w in enumerate(weights):
        per_model[i % len(models)] += w
    total = float(sum(weights))
    reference = {
        key: sum(m[key].double() * (wk / total) for m, wk in zip(models, per_model, strict=True))
        for key in models[0]
    }
    return inp, reference


# --- one cell -----------------------------------------------------------------------------------


def run_cell(
    args: argparse.Namespace, n: int, p: int, names: list[str], console: Console
) -> dict[str, Any]:
    skipped: dict[str, str] = {}
    runnable = []
    for name in names:
        need = estimated_extra_gb(name, n, p)
        if need > args.max_gb:
            skipped[name] = f"needs about {need:.1f} GB > --max-gb {args.max_gb:g}"
        else:
            runnable.append(name)
    started = time.perf_counter()
    inp, reference = build_inputs(n, p, args.distinct, args.seed, runnable)
    p_real = sum(t.numel() for t in inp.current.values())
    console.print(
        f"cell N={n}, P={p_real:,} ({len(inp.current)} tensors): inputs built in "
        f"{time.perf_counter() - started:.1f} s; running {', '.join(runnable)} ..."
    )
    errors: dict[str, float] = {}
    peaks: dict[str, float] = {}

    def unit(name: str) -> Unit:
        def go() -> dict[str, float]:
            reset_peak_rss()
            before = rss_gb()
            t0 = time.perf_counter()
            result = CONTESTANTS[name](inp)
            seconds = time.perf_counter() - t0
            peaks[name] = max(peaks.get(name, 0.0), rss_gb("VmHWM") - before)
            if name not in errors:  # checked once, outside the clock
                errors[name] = max_error(result, reference)
            del result
            return {name: seconds}

        return go

    timed = run_interleaved({name: unit(name) for name in runnable}, args.reps, args.warmup)
    input_bytes = n * p_real * 4
    rows = []
    for name in runnable:
        xs = timed[name][name]
        best, median = min(xs), statistics.median(xs)
        rows.append(
            {
                "contestant": name,
                "min_s": best,
                "median_s": median,
                "gbps": input_bytes / best / GB,
                "gbps_median": input_bytes / median / GB,
                "peak_extra_gb": peaks.get(name),
                "peak_extra_model_copies": peaks.get(name, 0.0) / (4 * p_real / GB),
                "max_rel_error": errors.get(name),
                "seconds": xs,
            }
        )
    return {
        "clients": n,
        "params": p_real,
        "tensors": len(inp.current),
        "input_bytes": input_bytes,
        "rows": rows,
        "skipped": skipped,
    }


# --- report -------------------------------------------------------------------------------------


def ratios(cell: dict[str, Any]) -> dict[str, float]:
    """ours/other throughput (= other's seconds / ours), by the minimum."""
    by = {r["contestant"]: r for r in cell["rows"]}
    if OURS not in by:
        return {}
    mine = by[OURS]["min_s"]
    return {name: r["min_s"] / mine for name, r in by.items() if name != OURS}


def print_cells(console: Console, cells: list[dict[str, Any]], threads: int) -> None:
    table = Table(
        title=f"FedAvg aggregation throughput (GB/s of input = N*P*4 bytes / s; torch threads "
        f"{threads}, NumPy single-threaded)",
        caption="ours/x = ours' throughput over x's, by the minimum: > 1 means ours is faster",
    )
    for col in ("N", "P", "contestant"):
        table.add_column(col, no_wrap=True)
    for col in ("min s", "median s", "GB/s", "ours/x", "peak extra GB", "copies", "rel err"):
        table.add_column(col, justify="right")
    for cell in cells:
        rel = ratios(cell)
        for r in cell["rows"]:
            table.add_row(
                str(cell["clients"]),
                f"{cell['params'] / 1e6:.1f}M",
                r["contestant"],
                f"{r['min_s']:.3f}",
                f"{r['median_s']:.3f}",
                f"{r['gbps']:.2f}",
                f"{rel[r['contestant']]:.2f}" if r["contestant"] in rel else "-",
                f"{r['peak_extra_gb']:.2f}",
                f"{r['peak_extra_model_copies']:.1f}",
                f"{r['max_rel_error']:.1e}",
            )
        for name, why in cell["skipped"].items():
            table.add_row(str(cell["clients"]), f"{cell['params'] / 1e6:.1f}M", name, why)
        table.add_section()
    console.print(table)


def verdicts(cells: list[dict[str, Any]]) -> list[str]:
    out = []
    for cell in cells:
        rel = ratios(cell)
        where = f"N={cell['clients']}, P={cell['params'] / 1e6:.0f}M"
        for name, target, word in (
            (FLOWER, TARGET_VS_FLOWER, "x Flower"),
            (LEGACY, TARGET_VS_FLOWER, "x Flower (legacy)"),
            (PLAIN, TARGET_VS_PLAIN, "x the plain loop"),
        ):
            if name in rel:
                met = "met" if rel[name] >= target else "NOT met"
                out.append(f"{where}: ours = {rel[name]:.2f}{word}; target >= {target:g}: {met}")
            by = {r["contestant"]: r["min_s"] for r in cell["rows"]}
            if OURS64 in by and name in by:
                x = by[name] / by[OURS64]
                met = "met" if x >= target else "NOT met"
                out.append(
                    f"{where}: ours (float64 sum) = {x:.2f}{word}; target >= {target:g}: {met}"
                )
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50], help="N per cell")
    p.add_argument(
        "--params", type=parse_count, nargs="+", default=[10_000_000, 50_000_000], help="P"
    )
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per contestant")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--distinct", type=int, default=4, help="different client models per cell")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-gb", type=float, default=16.0, help="skip contestants needing more")
    p.add_argument("--no-diagnostics", action="store_true", help=f"leave out {FUSED!r}")
    p.add_argument("--quick", action="store_true", help="smoke mode: N 4 8, P 2M, 2 reps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.clients, args.params, args.reps, args.warmup = [4, 8], [2_000_000], 2, 0
    if min(args.clients) < 1 or args.reps < 1 or args.distinct < 1 or args.warmup < 0:
        p.error("--clients, --reps and --distinct must be at least 1, --warmup at least 0")
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 150))
    flwr_version = flower_version()
    names = [OURS, OURS64, PLAIN]
    notes = []
    if flwr_version is None:
        notes.append("flwr is not installed here: Flower rows skipped (see benchmarks/README.md)")
    else:
        names += [FLOWER, LEGACY]
    if not args.no_diagnostics:
        names.append(FUSED)
    info = machine_info(args, flwr=flwr_version, nice=os.nice(0))
    console.print(
        f"[bold]machine[/]: {info['processor']}, {info['cpu_count']} CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads), flwr {flwr_version}, Python {info['python']}, nice "
        f"{info['nice']}; load average {info['load_before']}"
    )
    for note in notes:
        console.print(f"[yellow]note[/]: {note}")
    cells = []
    for p in args.params:
        for n in args.clients:
            cells.append(run_cell(args, n, p, names, console))
            gc.collect()
    print_cells(console, cells, torch.get_num_threads())
    info["load_after"] = load_average()
    console.print(f"load average after: {info['load_after']}")
    for line in verdicts(cells):
        console.print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {**info, "notes": notes, "cells": cells}
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
