"""No-op federated rounds: worldlm's round engine against a plain streaming loop and Flower.

Every client "trains" by returning the weights it received, so a round measures the machinery
alone: sending the model, collecting the replies, checking and folding them, the new model.
For each N clients and P float32 parameters (GPT-2-like tensors, see
aggregation_throughput.transformer_shapes), five contestants, each in a fresh process:

1. `plain loop`: per round, for each client, copy the global model (the client's reply) and
   fold it into a float32 accumulator (`add_(t, alpha=w)`), then divide. No checks, no
   metrics: the floor a streaming FedAvg round can reach in Python.
2. `worldlm in-process`: `Aggregator.run_round` (strategy fedavg, `AggregatorConfig()` defaults)
   over an `InProcessTransport` whose N children are no-op handlers that answer each
   `TrainTask` with a copy (`clone`) of the state they were sent, as a trained `Leaf` answers
   with a fresh copy of its weights. That is the whole round engine: selection, tasks with
   nonces, reply checks (`check_reply`: keys, shapes, dtypes, finiteness, the change's bound;
   with no audit log the bound is settled from the reply's own norm, see reply_check.py), the
   streaming float32 sum (the default `sum_dtype`), the mean in place and the metrics rows.
   (SHA-256 digests for the audit trail are only taken when an audit log records them; the
   breakdown below times one.) A real federation of `Leaf`s cannot train zero steps:
   `train.local_steps` is refused below 1, so a no-op `Leaf` does not exist; the handlers stand
   in for it.
   `worldlm-f64`: the same with the aggregator's running sum in float64
   (`nodes.<path>.sum_dtype = "float64"`: 2 model copies, the mean cast back to float32).
3. `Flower simulation`: `flwr.simulation.run_simulation` with N virtual SuperNodes on the Ray
   backend (`init_args.num_cpus` 2, one CPU per ClientApp, so two actors), a `ServerApp`
   running the message-API `FedAvg` (`fraction_evaluate=0`: train rounds only) from an
   `ArrayRecord` of the same model, and a `ClientApp` whose `train` returns the `ArrayRecord`
   it received with a "num-examples" metric. A round is timed from `configure_train` to the end
   of `aggregate_train` (a subclass of FedAvg records both).
4. `worldlm on Ray`: the engine of (2) driving `worldlm.transport.ray_transport.RayTransport`
   (`run.backend = "ray"`), the no-op handlers living in Ray actors (one CPU each, one actor per
   core) behind `RemoteLeaf`. Skipped with a note where that module is not there.

Reported per contestant: the round time (minimum and median over the rounds after the first:
the machine is noisy), the start-up (first round done, from the process's start after its
imports, minus the steady round), the import time of worldlm's and Flower's modules (a fresh
interpreter, after torch), and memory:

- `tree peak`: a thread samples every `--sample-ms` ms the memory of the cell's process and all
  its descendants (Ray's GCS, raylet, workers): the sum of PSS (proportional set size: pages
  shared between processes, as Ray's object store in /dev/shm, count once, split among the
  processes mapping them) and of RSS (shared pages counted in every process). Peaks shorter
  than the interval are missed.
- `agg peak`: the aggregating process's peak resident memory over its resident memory before
  any model existed (Python, torch and the imports), in GB and in model copies (4P bytes; the
  global model a round starts from is one of them). In process (plain loop, worldlm): the
  largest Linux VmHWM over the rounds after the first, reset through /proc/self/clear_refs
  before each round. For Ray and Flower: the whole run's VmHWM of the driver (worldlm; the
  replies wait in Ray's object store, outside it) or of the server process (Flower: ServerApp
  and SuperLink state). Python's tracemalloc cannot see tensor memory (torch allocates outside
  Python's allocator); the kernel's counter sees every page, including freed heap memory glibc
  keeps for reuse (which is memory the process holds all the same).

Also for `worldlm in-process`, where its round time goes (each part timed on its own, min of
3): the no-op leaf's clone, `check_reply` and the fold of one update, and the mean of the
result; apart, what an audit log would add per update (the check measuring the change, and
`state_digest`).

    .benchvenv/bin/python benchmarks/noop_round.py --json /tmp/bench/noop.json
    .benchvenv/bin/python benchmarks/noop_round.py --quick

Options: `--clients` (default 10 50), `--params` (1M 25M; suffixes k/M/G), `--rounds` (timed
rounds after the first for the plain loop and worldlm, 5), `--flower-rounds` (rounds of the
Flower simulation including the first, 4), `--contestants` (plain worldlm worldlm-f64 flower
worldlm-ray), `--sample-ms` (100), `--threads` (torch threads in each cell; default torch's),
`--max-gb` (skip a cell whose estimated memory is larger, 20), `--timeout` (seconds per cell,
3600), `--glibc-default` (leave glibc's adaptive malloc thresholds alone; by default every
cell runs with the fixed ones in `GLIBC_STEADY`, see there why), `--seed`, `--json PATH`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table

from aggregation_throughput import (
    engine_mean,
    flower_version,
    parse_count,
    reset_peak_rss,
    rss_gb,
    state_bytes,
    transformer_state,
)
from machine_info import load_average, machine_info

PLAIN, OURS, FLOWER, OURS_RAY = "plain", "worldlm", "flower", "worldlm-ray"
OURS_F64 = "worldlm-f64"
LABELS = {
    PLAIN: "plain loop",
    OURS: "worldlm in-process",
    OURS_F64: "worldlm in-process, float64 sum",
    FLOWER: "Flower simulation (Ray)",
    OURS_RAY: "worldlm on Ray",
}
PARENT = "bench"
# The same glibc malloc settings for every cell's processes (and Ray's and Flower's workers,
# which inherit them). By default glibc adapts its mmap threshold as memory is freed and
# returns a freed top of the heap to the kernel past a threshold; whether a freed 100 MB reply
# lands there decides whether the next one is a page-faulting fresh allocation (30 ms) or a
# reuse (5 ms), per process, at random: the plain loop's N=50, P=25M round took 0.46 or 2.45 s.
# Fixed thresholds (tensors up to 32 MiB from the heap, freed memory kept) make every
# contestant reuse its memory, run to run. `--glibc-default` leaves glibc alone.
GLIBC_STEADY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}
GB = 1e9
TARGET_VS_PLAIN = 1.5  # our no-op round at most 1.5x the plain streaming loop
TARGET_VS_FLOWER = 5.0  # and at least 5x faster than Flower's
TARGET_COPIES = 3.0  # aggregator peak at most 3 model copies (global model included), largest N
FLAT_TOLERANCE = 0.25  # "flat in N": the peak grows by at most a quarter of a model copy,
FLAT_MB = 10.0  # or by at most this (Python objects: records, tasks; matters for tiny models)
CELL_DONE = "cell done"


def tokens_of(i: int) -> int:
    """Client i's example count (its FedAvg weight); the same for every contestant."""
    return 1000 + 10 * i


# --- memory -------------------------------------------------------------------------------------


class TreeMemory(threading.Thread):
    """Samples the summed PSS and RSS of this process and all its descendants."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.root = psutil.Process()
        self.done = threading.Event()
        self.peak_pss = self.peak_rss = 0.0
        self.peak_processes = 0
        self.baseline = self.sample()

    def sample(self) -> tuple[float, float, int]:
        pss = rss = 0.0
        procs = [self.root, *self.root.children(recursive=True)]
        for proc in procs:
            try:
                mem = proc.memory_full_info()
            except psutil.Error:  # gone, or not ours to read
                continue
            pss += getattr(mem, "pss", mem.rss) / GB
            rss += mem.rss / GB
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        self.peak_processes = max(self.peak_processes, len(procs))
        return pss, rss, len(procs)

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.sample()

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        self.sample()
        return {
            "tree_peak_pss_gb": self.peak_pss,
            "tree_peak_rss_gb": self.peak_rss,
            "tree_baseline_pss_gb": self.baseline[0],
            "tree_baseline_rss_gb": self.baseline[1],
            "tree_peak_processes": self.peak_processes,
        }


# --- the contestants, each run in a process of its own ------------------------------------------


class RoundLoop:
    """Times `rounds` + 1 calls of `one_round` (the first is the warm-up) and, in process, the
    process's peak resident memory during each round."""

    def __init__(self, started: float, in_process: bool) -> None:
        self.started = started
        self.in_process = in_process
        self.seconds: list[float] = []
        self.peak_gb: list[float] = []  # VmHWM during each round after the first
        self.first_done = 0.0

    def run(self, rounds: int, one_round: Callable[[int], None]) -> None:
        for r in range(rounds + 1):
            if self.in_process:
                reset_peak_rss()
            t0 = time.perf_counter()
            one_round(r)
            self.seconds.append(time.perf_counter() - t0)
            if r == 0:
                self.first_done = time.perf_counter() - self.started
            elif self.in_process:
                self.peak_gb.append(rss_gb("VmHWM"))


class LiveTensors:
    """The most tensor memory Python could reach at any `sample()`: every CPU tensor found by
    the garbage collector, each storage counted once. It sees what the round keeps alive, not
    what the allocator keeps mapped, so it tells the two apart in `agg peak`. Slow (a walk over
    every object): used in one extra, untimed round."""

    def __init__(self) -> None:
        self.max_bytes = 0

    def sample(self) -> None:
        storages: dict[int, int] = {}
        with warnings.catch_warnings():  # isinstance() on some torch modules warns
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        self.max_bytes = max(self.max_bytes, sum(storages.values()))


def plain_cell(args: argparse.Namespace, started: float) -> dict[str, Any]:
    state = transformer_state(args.p, args.seed)
    weights = [tokens_of(i) for i in range(args.n)]
    total = float(sum(weights))
    loop = RoundLoop(started, in_process=True)

    def one_round(r: int, probe: Callable[[], None] = lambda: None) -> None:
        nonlocal state
        acc = {k: torch.zeros_like(v) for k, v in state.items()}
        for w in weights:
            client = {k: v.clone() for k, v in state.items()}  # the client's no-op "training"
            probe()
            for key, t in client.items():
                acc[key].add_(t, alpha=w)
            del client
        for t in acc.values():
            t.div_(total)
        state = acc

    loop.run(args.rounds, one_round)
    live = LiveTensors()
    one_round(args.rounds + 1, live.sample)
    return {"loop": loop, "model_bytes": state_bytes(state), "live_bytes": live.max_bytes}


class NoOpLeaf:
    """A child that trains for zero steps: it answers with a copy of the state it was sent."""

    def __init__(self, path: str, tokens: int) -> None:
        self.path = path
        self.tokens = tokens

    def info(self) -> Any:
        from worldlm.core.transport import ChildInfo

        return ChildInfo(self.path, self.tokens)

    def handle_train(self, task: Any) -> Any:
        from worldlm.core.messages import Update

        state = {k: v.clone() for k, v in task.state.items()}
        return Update(self.path, task.round, task.nonce, state, float(self.tokens))

    def handle_eval(self, task: Any) -> Any:
        from worldlm.core.messages import EvalReport

        return EvalReport(self.path, task.nonce, {})


class NoOpWorker:
    """The Ray actor of `worldlm on Ray`: hosts some no-op leaves, with `LeafWorker`'s calls."""

    def __init__(self, tokens: dict[str, int]) -> None:
        torch.set_num_threads(1)  # as LeafWorker: one core per actor
        self.tokens = tokens

    def paths(self) -> list[str]:
        return sorted(self.tokens)

    def answer(self, method: str, calls: list[Any], *models: Any) -> list[Any]:
        from worldlm.transport.ray_codec import answer_batch

        return answer_batch(self._handle, method, calls, models)

    def _handle(self, method: str, task: Any) -> Any:
        from worldlm.core.messages import EvalReport, Update

        if method == "handle_eval":
            return EvalReport(task.recipient, task.nonce, {})
        copy = {k: v.clone() for k, v in task.state.items()}
        return Update(
            task.recipient, task.round, task.nonce, copy, float(self.tokens[task.recipient])
        )


def leaf_paths(n: int) -> list[str]:
    return [f"{PARENT}/leaf-{i:03d}" for i in range(n)]


def engine_rounds(
    args: argparse.Namespace, started: float, transport: Any, in_process: bool
) -> dict[str, Any]:
    """Rounds of worldlm's Aggregator over `transport`, whose children are no-op leaves."""
    from worldlm.config import AggregatorConfig
    from worldlm.federation.aggregator import Aggregator
    from worldlm.federation.context import RunContext
    from worldlm.strategies.catalog import build_strategy

    sum_dtype = getattr(args, "sum_dtype", "float32")
    agg = Aggregator(
        PARENT,
        AggregatorConfig(sum_dtype=sum_dtype),
        transport=transport,
        strategy=build_strategy("fedavg", sum_dtype=sum_dtype),
        ctx=RunContext(run_id="bench", seed=args.seed, device=torch.device("cpu")),
    )
    state = transformer_state(args.p, args.seed)
    loop = RoundLoop(started, in_process=in_process)

    def one_round(r: int) -> None:
        nonlocal state
        outcome = agg.run_round(state, r)
        answered = outcome.records[-1]["participants"]
        assert len(answered) == args.n, f"only {len(answered)} of {args.n} leaves answered"
        state = outcome.state

    loop.run(args.rounds, one_round)
    out = {"loop": loop, "model_bytes": state_bytes(state)}
    if in_process:  # one more round, untimed, looking at the live tensors at every fold
        from worldlm.strategies.fedavg import FedAvgRound

        live, add = LiveTensors(), FedAvgRound.add

        def probed(self: FedAvgRound, update: Any) -> None:
            live.sample()
            add(self, update)

        FedAvgRound.add = probed  # type: ignore[method-assign]
        try:
            one_round(args.rounds + 1)
        finally:
            FedAvgRound.add = add  # type: ignore[method-assign]
        out["live_bytes"] = live.max_bytes
    return out | {"state": state}


def ours_cell(args: argparse.Namespace, started: float) -> dict[str, Any]:
    from worldlm.core.inprocess import InProcessTransport

    paths = leaf_paths(args.n)
    transport = InProcessTransport({PARENT: paths})
    for i, path in enumerate(paths):
        transport.register(NoOpLeaf(path, tokens_of(i)))
    out = engine_rounds(args, started, transport, in_process=True)
    out["breakdown"] = breakdown(out.pop("state"), args.n, getattr(args, "sum_dtype", "float32"))
    return out


def ours_f64_cell(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """As `ours_cell`, with the aggregator's running sum in float64 (`sum_dtype`)."""
    args.sum_dtype = "float64"
    return ours_cell(args, started)


def breakdown(state: dict[str, torch.Tensor], n: int, sum_dtype: str) -> dict[str, float]:
    """Seconds of each part of an in-process no-op round (each the min of 3), per update and
    per round; the parts an audit log adds are timed apart and left out of the estimate."""
    from worldlm.audit.digest import state_digest
    from worldlm.config import AggregatorConfig
    from worldlm.core.messages import TrainTask, Update
    from worldlm.federation.reply_check import check_reply
    from worldlm.strategies.catalog import SUM_DTYPES
    from worldlm.strategies.fedavg import FedAvgRound

    def best(fn: Callable[[], object]) -> float:
        """Min of 3 timings; NaN if the call fails (the engine's API may have moved on)."""
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            try:
                fn()
            except Exception:
                return math.nan
            times.append(time.perf_counter() - t0)
        return min(times)

    limit = AggregatorConfig().max_change
    task = TrainTask("bench", 0, 0, PARENT, "leaf", "nonce", state)
    update = Update("leaf", 0, "nonce", {k: v.clone() for k, v in state.items()}, 1000.0)
    rnd = FedAvgRound(state, SUM_DTYPES[sum_dtype])
    rnd.add(update)
    norms: dict[int, dict[str, float]] = {}  # the model sent's norms, once a round (as the engine)
    check_reply(update, {"leaf": task}, set(), None, limit, norms)
    per_update = {
        "leaf: clone the state": best(lambda: {k: v.clone() for k, v in state.items()}),
        "check_reply": best(
            lambda: check_reply(update, {"leaf": task}, set(), None, limit, norms, measure=False)
        ),
        "fold (FedAvgRound.add)": best(lambda: rnd.add(update)),
    }
    sums, total = rnd.result()
    per_round = {  # (a float32 sum divided in place again on each timing: harmless here)
        "result: mean": best(lambda: engine_mean(sums, total, state)),
    }
    audited = {
        "check_reply measuring the change": best(
            lambda: check_reply(update, {"leaf": task}, set(), None, limit, norms, measure=True)
        ),
        "state_digest (SHA-256)": best(lambda: state_digest(update.state)),
    }
    out = {f"per update: {k}": v for k, v in per_update.items()}
    out |= {f"per round: {k}": v for k, v in per_round.items()}
    out["estimate: N updates + result"] = n * sum(per_update.values()) + sum(per_round.values())
    out |= {f"with an audit log, per update: {k}": v for k, v in audited.items()}
    return out


def ours_ray_cell(args: argparse.Namespace, started: float) -> dict[str, Any]:
    try:
        import ray

        from worldlm.core.leaf_data import LeafData
        from worldlm.federation.context import SilentObserver
        from worldlm.transport.ray_transport import RayTransport, RemoteLeaf, start_ray
    except ImportError as exc:
        return {"skipped": f"worldlm's Ray backend is not importable here ({exc})"}
    owns_ray = start_ray(None)  # a local Ray instance with every core, as `run.backend = "ray"`
    try:
        paths = leaf_paths(args.n)
        tokens = {p: tokens_of(i) for i, p in enumerate(paths)}
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        count = min(len(paths), cpus)
        worker_class = ray.remote(num_cpus=1)(NoOpWorker)
        actors = [
            worker_class.remote({p: tokens[p] for p in paths[k::count]}) for k in range(count)
        ]
        ray.get([a.paths.remote() for a in actors])
        transport = RayTransport({PARENT: paths}, SilentObserver())
        for i, path in enumerate(paths):
            blocks = torch.zeros((1, tokens[path]), dtype=torch.long)  # train_tokens only
            transport.register(RemoteLeaf(path, LeafData(path, blocks, {}), actors[i % count]))
        out = engine_rounds(args, started, transport, in_process=False)
        out.pop("state")
        out["notes"] = [f"{count} Ray actors on {cpus} CPUs"]
        return out
    finally:
        if owns_ray:
            ray.shutdown()


def flower_cell(args: argparse.Namespace, started: float) -> dict[str, Any]:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    state = transformer_state(args.p, args.seed)
    marks: list[tuple[str, float]] = []
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        # A no-op client: the arrays it received, and its example count for the weighting.
        partition = int(context.node_config.get("partition-id", 0))
        content = RecordDict(
            {
                "arrays": msg.content["arrays"],
                "metrics": MetricRecord({"num-examples": tokens_of(partition)}),
            }
        )
        return Message(content=content, reply_to=msg)

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Any:
            marks.append(("start", time.perf_counter()))
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            out = super().aggregate_train(server_round, replies)
            marks.append(("end", time.perf_counter()))
            return out

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=args.n,
            min_available_nodes=args.n,
        )
        strategy.start(grid=grid, initial_arrays=ArrayRecord(state), num_rounds=args.flower_rounds)

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=args.n,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2},
        },
    )
    starts = [t for kind, t in marks if kind == "start"]
    ends = [t for kind, t in marks if kind == "end"]
    if len(ends) != args.flower_rounds:
        raise RuntimeError(f"Flower finished {len(ends)} of {args.flower_rounds} rounds")
    loop = RoundLoop(started, in_process=False)
    loop.seconds = [e - s for s, e in zip(starts, ends, strict=True)]
    loop.first_done = ends[0] - started
    return {"loop": loop, "model_bytes": state_bytes(state)}


CELLS = {
    PLAIN: plain_cell,
    OURS: ours_cell,
    OURS_F64: ours_f64_cell,
    FLOWER: flower_cell,
    OURS_RAY: ours_ray_cell,
}
ENGINE = ["worldlm.federation.aggregator", "worldlm.core.inprocess", "worldlm.config"]
# Imported before the clock and the memory baseline: their cost is reported on its own.
IMPORTS = {
    PLAIN: [],
    OURS: ENGINE,
    OURS_F64: ENGINE,
    FLOWER: ["flwr.simulation", "flwr.serverapp", "flwr.clientapp", "flwr.app"],
    OURS_RAY: [*ENGINE, "ray", "worldlm.transport.ray_transport"],
}


def run_cell_here(args: argparse.Namespace) -> None:
    """The child process: one contestant, one (N, P); writes its JSON to `--out`."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for module in IMPORTS[args.cell]:
        with contextlib.suppress(ImportError):  # the cell says what is missing
            importlib.import_module(module)
    started = time.perf_counter()
    runtime_gb = rss_gb()  # Python, torch and the imports: before any model exists
    memory = TreeMemory(args.sample_ms / 1000)
    memory.start()
    out = CELLS[args.cell](args, started)
    result: dict[str, Any] = {"contestant": args.cell, "clients": args.n, "params": args.p}
    result |= memory.stop()
    result |= {"runtime_rss_gb": runtime_gb, "main_peak_gb": rss_gb("VmHWM")}
    if "skipped" in out:
        result["skipped"] = out["skipped"]
    else:
        loop: RoundLoop = out["loop"]
        steady = loop.seconds[1:]
        # In process: the peak of the rounds after the first; otherwise the whole run's peak
        # of the driver (worldlm) or server (Flower: ServerApp and SuperLink) process.
        peak = max(loop.peak_gb) if loop.peak_gb else result["main_peak_gb"]
        result |= {
            "model_bytes": out["model_bytes"],
            "round_seconds": loop.seconds,
            "steady_min_s": min(steady),
            "steady_median_s": statistics.median(steady),
            "first_round_done_s": loop.first_done,
            "startup_s": loop.first_done - min(steady),
            "agg_peak_gb": peak - runtime_gb,
            "agg_peak_copies": (peak - runtime_gb) * GB / out["model_bytes"],
            "agg_peak_scope": "rounds after the first" if loop.peak_gb else "whole run",
            "live_tensor_copies": (
                out["live_bytes"] / out["model_bytes"] if "live_bytes" in out else None
            ),
            "breakdown": out.get("breakdown", {}),
            "notes": out.get("notes", []),
        }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(CELL_DONE, flush=True)


# --- the parent: runs every cell in a fresh process ---------------------------------------------


def estimated_gb(contestant: str, n: int, p: int) -> float:
    model = 4 * p / GB
    if contestant == FLOWER:  # every reply is held at once, in the SuperLink and the ServerApp
        return (2 * n + 4) * model + 1.5
    if contestant == OURS_RAY:  # replies that finish early wait in Ray's object store
        return (n + 6) * model + 1.0
    return 7 * model + 0.5


def import_seconds(code: str) -> float | None:
    """Seconds to run `code` in a fresh interpreter after `import torch` (None if it fails)."""
    script = f"import time, torch\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
        )
        return float(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def spawn_cell(
    args: argparse.Namespace, contestant: str, n: int, p: int, logs: Path
) -> dict[str, Any]:
    out = logs / f"{contestant}-{n}-{p}.json"
    log = logs / f"{contestant}-{n}-{p}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", contestant]
    cmd += ["--n", str(n), "--p", str(p), "--out", str(out), "--seed", str(args.seed)]
    cmd += ["--rounds", str(args.rounds), "--flower-rounds", str(args.flower_rounds)]
    cmd += ["--sample-ms", str(args.sample_ms)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_DEDUP_LOGS": "1"}
    if not args.glibc_default:
        env |= GLIBC_STEADY
    with log.open("w") as fh:
        try:
            subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=args.timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout:g} s (log: {log})"}
    if not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"no result (log: {log})"}
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def run_all(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    cells = []
    with tempfile.TemporaryDirectory(prefix="noop-round-") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for p in args.params:
            for n in args.clients:
                for contestant in args.contestants:
                    need = estimated_gb(contestant, n, p)
                    if need > args.max_gb:
                        result = {"skipped": f"needs about {need:.0f} GB > --max-gb"}
                    else:
                        console.print(f"N={n}, P={p:,}: {LABELS[contestant]} ...")
                        started = time.perf_counter()
                        result = spawn_cell(args, contestant, n, p, logs)
                        result["wall_s"] = time.perf_counter() - started
                    cells.append({"contestant": contestant, "clients": n, "params": p} | result)
    return cells


# --- report -------------------------------------------------------------------------------------


def find(cells: list[dict[str, Any]], contestant: str, n: int, p: int) -> dict[str, Any] | None:
    for c in cells:
        if (c["contestant"], c["clients"], c["params"]) == (contestant, n, p):
            return c if "steady_min_s" in c else None
    return None


def print_cells(console: Console, cells: list[dict[str, Any]], imports: dict[str, Any]) -> None:
    table = Table(
        title="No-op rounds (each contestant in a fresh process; round = min over rounds after "
        "the first)",
        caption=f"x plain / x worldlm = the round's min over that of the plain loop / of worldlm "
        f"in-process; agg peak = the aggregating process's peak over its runtime before any "
        f"model (in process: during the rounds after the first; Ray/Flower: whole run, driver or "
        f"server process); copies = GB / (4P bytes); live copies = the most tensor memory "
        f"Python could reach at a fold, in one extra round (in process). Import after torch: "
        f"worldlm {fmt(imports.get('worldlm'), 2)} s, flwr {fmt(imports.get('flwr'), 2)} s",
    )
    for col in ("N", "P", "contestant"):
        table.add_column(col, no_wrap=True)
    cols = ["round min s", "median s", "x plain", "x worldlm", "start-up s", "tree PSS GB"]
    cols += ["tree RSS GB", "procs", "agg peak GB", "copies", "live copies"]
    for col in cols:
        table.add_column(col, justify="right")
    for c in cells:
        n, p = c["clients"], c["params"]
        head = [str(n), f"{p / 1e6:g}M", LABELS[c["contestant"]]]
        if "steady_min_s" not in c:
            table.add_row(*head, c.get("skipped") or f"[red]{c.get('error')}[/]")
            continue
        plain, ours = find(cells, PLAIN, n, p), find(cells, OURS, n, p)
        table.add_row(
            *head,
            f"{c['steady_min_s']:.3f}",
            f"{c['steady_median_s']:.3f}",
            fmt(c["steady_min_s"] / plain["steady_min_s"] if plain else None, 2),
            fmt(c["steady_min_s"] / ours["steady_min_s"] if ours else None, 2),
            f"{c['startup_s']:.2f}",
            f"{c['tree_peak_pss_gb']:.2f}",
            f"{c['tree_peak_rss_gb']:.2f}",
            str(c["tree_peak_processes"]),
            fmt(c["agg_peak_gb"], 3),
            fmt(c["agg_peak_copies"], 2),
            fmt(c.get("live_tensor_copies"), 2),
        )
    console.print(table)
    parts = Table(title="worldlm in-process: where a round's time goes (min of 3 each)")
    for col in ("N", "P", "part"):
        parts.add_column(col, no_wrap=True)
    parts.add_column("ms", justify="right")
    for c in cells:
        if c["contestant"] != OURS or not c.get("breakdown"):
            continue
        for part, seconds in c["breakdown"].items():
            parts.add_row(
                str(c["clients"]), f"{c['params'] / 1e6:g}M", part, f"{1e3 * seconds:.2f}"
            )
        parts.add_row(
            str(c["clients"]),
            f"{c['params'] / 1e6:g}M",
            "measured round (min)",
            f"{1e3 * c['steady_min_s']:.2f}",
        )
        parts.add_section()
    console.print(parts)


def fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def verdicts(cells: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    out = []
    for p in args.params:
        for n in args.clients:
            where = f"N={n}, P={p / 1e6:g}M"
            ours, plain = find(cells, OURS, n, p), find(cells, PLAIN, n, p)
            flower = find(cells, FLOWER, n, p)
            for cell, label in (
                (ours, "worldlm"),
                (find(cells, OURS_F64, n, p), "worldlm (float64 sum)"),
            ):
                if cell and plain:
                    x = cell["steady_min_s"] / plain["steady_min_s"]
                    ok = "met" if x <= TARGET_VS_PLAIN else "NOT met"
                    out.append(
                        f"{where}: {label} round = {x:.2f}x the plain loop; target <= "
                        f"{TARGET_VS_PLAIN:g}x: {ok}"
                    )
            for name in (OURS, OURS_F64, OURS_RAY):
                mine = find(cells, name, n, p)
                if mine and flower:
                    x = flower["steady_min_s"] / mine["steady_min_s"]
                    ok = "met" if x >= TARGET_VS_FLOWER else "NOT met"
                    out.append(
                        f"{where}: Flower's round = {x:.2f}x {LABELS[name]}'s; target >= "
                        f"{TARGET_VS_FLOWER:g}x: {ok}"
                    )
        for name in (OURS, OURS_F64):
            out += memory_verdicts(cells, name, p, args.clients)
    return out


def memory_verdicts(
    cells: list[dict[str, Any]], name: str, p: int, clients: list[int]
) -> list[str]:
    out = []
    extra = {n: find(cells, name, n, p) for n in clients}
    copies = {n: c["agg_peak_copies"] for n, c in extra.items() if c}
    if copies:
        top = max(copies)
        ok = "met" if copies[top] <= TARGET_COPIES else "NOT met"
        out.append(
            f"P={p / 1e6:g}M: {LABELS[name]} round allocates {copies[top]:.2f} model copies at "
            f"N={top}; target <= {TARGET_COPIES:g}: {ok}"
        )
        live = extra[top]["live_tensor_copies"] if extra[top] else None
        if live is not None:
            plain = find(cells, PLAIN, top, p)
            besides = (
                f" (the plain loop: {plain['live_tensor_copies']:.2f} live, "
                f"{plain['agg_peak_copies']:.2f} allocated)"
                if plain and plain.get("live_tensor_copies") is not None
                else ""
            )
            ok = "met" if live <= TARGET_COPIES + 0.005 else "NOT met"
            out.append(
                f"P={p / 1e6:g}M: {LABELS[name]} keeps at most {live:.2f} model copies of live "
                f"tensors at N={top}{besides}; target <= {TARGET_COPIES:g}: {ok}"
            )
    if len(copies) > 1:
        low, high = min(copies), max(copies)
        grow = copies[high] - copies[low]
        grow_mb = grow * 4 * p / 1e6
        ok = "met" if grow <= FLAT_TOLERANCE or grow_mb <= FLAT_MB else "NOT met"
        out.append(
            f"P={p / 1e6:g}M: {LABELS[name]}, N {low} -> {high}: {copies[low]:.2f} -> "
            f"{copies[high]:.2f} copies ({grow_mb:+.1f} MB); flat (within {FLAT_TOLERANCE:g} "
            f"copies or {FLAT_MB:g} MB): {ok}"
        )
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50], help="N per cell")
    p.add_argument("--params", type=parse_count, nargs="+", default=[1_000_000, 25_000_000])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after the first")
    p.add_argument("--flower-rounds", type=int, default=4, help="Flower rounds, first included")
    p.add_argument(
        "--contestants",
        nargs="+",
        choices=list(CELLS),
        default=[PLAIN, OURS, OURS_F64, FLOWER, OURS_RAY],
    )
    p.add_argument("--sample-ms", type=float, default=100.0, help="memory sampling interval")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-gb", type=float, default=20.0, help="skip cells estimated larger")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell")
    p.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's adaptive malloc thresholds alone (default: fixed, see GLIBC_STEADY)",
    )
    p.add_argument("--logs", default=None, help="keep each cell's log and JSON in this directory")
    p.add_argument("--quick", action="store_true", help="smoke mode: N 3 6, P 200k, few rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    # Internal: run one cell in this process (the parent starts one process per cell).
    p.add_argument("--cell", choices=list(CELLS), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--p", type=parse_count, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.clients, args.params, args.rounds, args.flower_rounds = [3, 6], [200_000], 3, 3
    if args.rounds < 1 or args.flower_rounds < 2 or min(args.clients) < 1:
        p.error("--rounds must be at least 1, --flower-rounds at least 2, --clients at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.cell is not None:
        run_cell_here(args)
        return
    console = Console(width=max(Console().width, 160))
    flwr_version = flower_version()
    if flwr_version is None and FLOWER in args.contestants:
        args.contestants.remove(FLOWER)
        console.print("[yellow]note[/]: flwr is not installed here: Flower skipped")
    imports = {
        "worldlm": import_seconds("import " + ", ".join(ENGINE)),
        "flwr": import_seconds("import " + ", ".join(IMPORTS[FLOWER])) if flwr_version else None,
    }
    info = machine_info(args, flwr=flwr_version, nice=os.nice(0), import_seconds=imports)
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    threads = args.threads if args.threads is not None else info["torch_threads"]
    console.print(
        f"[bold]machine[/]: {info['processor']}, {info['cpu_count']} CPUs, torch {info['torch']} "
        f"({threads} threads in each cell), flwr {flwr_version}, ray {info['ray']}, Python "
        f"{info['python']}, nice {info['nice']}; load average {info['load_before']}"
    )
    cells = run_all(args, console)
    print_cells(console, cells, imports)
    info["load_after"] = load_average()
    console.print(f"load average after: {info['load_after']}")
    for line in verdicts(cells, args):
        console.print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {**info, "cells": cells}
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
