"""Transfer throughput and round overhead of worldlm's gRPC links, on loopback.

The parent runs in this process; every child is an OS process of its own (multiprocessing,
spawn), dialling in over 127.0.0.1 with mutual TLS, as deployed, and, as a second row for
reference, in plaintext.

1. Transfer: an fp32 model of `--sizes-mb` (a few square `torch.randn` matrices) goes
   parent -> child as a TrainTask and child -> parent as an Update, the way `GrpcTransport` and
   `answer_parent` move them: `encode_message_parts` (buffers over the tensors' memory),
   `send`, the other side's `receive` and `decode_message(copy=False)`; parent -> child ends
   with a small ack, child -> parent starts with a small request. As context, the same bytes
   over the link alone (no codec), the codec alone (in memory), and one plain copy, one
   SHA-256 and one XXH3-128 of the payload.
2. Round overhead: `Aggregator.run_round` (fedavg) over `--round-leaves` no-op leaves that answer
   with the state they were sent, in process (`InProcessTransport`) and over gRPC
   (`GrpcTransport`, every leaf its own process running `ChildLink` + `answer_parent`).

All variants run interleaved, repetition by repetition, after a warm-up; GB/s = payload bytes
(1e9 per GB) / seconds.

    python benchmarks/grpc_link.py --sizes-mb 100 1000 --reps 3 --json /tmp/bench/grpc.json

Results and how to read them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
import xxhash
from rich.console import Console
from rich.table import Table

from machine_info import load_average, machine_info
from worldlm.config import AggregatorConfig
from worldlm.core.inprocess import InProcessTransport
from worldlm.core.messages import EvalReport, EvalTask, State, TrainTask, Update
from worldlm.core.transport import ChildInfo
from worldlm.federation.aggregator import Aggregator
from worldlm.federation.context import RunContext
from worldlm.security.certs import create_ca, issue_node_cert
from worldlm.strategies.catalog import build_strategy
from worldlm.transport.codec import decode_message, encode_message_parts
from worldlm.transport.grpc import DEFAULT_CHUNK_BYTES, ChildLink, ParentLinkServer, TlsFiles
from worldlm.transport.grpc.child import STOP_KIND, answer_parent
from worldlm.transport.grpc.connection import ChildConnection
from worldlm.transport.grpc.transport import GrpcTransport, RoundPolicy

RUN_ID = "bench"
PARENT = "bench"
PEER = "bench/peer"  # the child of the transfer benchmark
MTLS, PLAIN = "mTLS", "plaintext"
IN_PROCESS = "in-process"
CPU = torch.device("cpu")
TIMEOUT_S = 900.0  # per send/receive; a 1 GB transfer takes seconds, not minutes
MAX_MESSAGE_BYTES = 16 << 30
GB = 1e9
TARGET_GBPS = 1.0  # for the 1 GB model, both directions, over mTLS
TARGET_SIZE_MB = 1000.0  # the model size the throughput target is for
TARGET_ROUND_RATIO = 2.0  # a no-op round over gRPC at most this many times the in-process one

# Messages between the parent and the transfer peer besides train_task / update.
ACK, RAW, WANT_UPDATE, WANT_RAW, STATS = "ack", "raw", "want_update", "want_raw", "stats"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--sizes-mb",
        type=float,
        nargs="+",
        default=[100.0, 1000.0],
        help="model sizes for the transfer benchmark, in MB (1e6 bytes) of fp32 weights",
    )
    p.add_argument("--tensors", type=int, default=8, help="square matrices per transfer model")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per transfer variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per variant first")
    p.add_argument(
        "--modes",
        nargs="+",
        choices=[MTLS, PLAIN],
        default=[MTLS, PLAIN],
        help="link security: mTLS (as deployed) and/or plaintext (loopback reference)",
    )
    p.add_argument(
        "--chunk-kib",
        type=int,
        default=DEFAULT_CHUNK_BYTES >> 10,
        help="chunk size of every link, KiB (the link's default unless given)",
    )
    p.add_argument("--round-leaves", type=int, default=10, help="no-op leaves of the round")
    p.add_argument(
        "--round-params", type=int, default=1_000_000, help="parameters of the round's model"
    )
    p.add_argument("--round-reps", type=int, default=20, help="timed rounds per variant")
    p.add_argument("--round-warmup", type=int, default=2, help="untimed rounds per variant first")
    p.add_argument("--skip-transfer", action="store_true", help="only the round benchmark")
    p.add_argument("--skip-round", action="store_true", help="only the transfer benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    for name in ("tensors", "reps", "round_leaves", "round_params", "round_reps", "chunk_kib"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(not s > 0 for s in args.sizes_mb):
        p.error("--sizes-mb must be positive")
    return args


# --- models and certificates -------------------------------------------------------------------


def make_state(n_params: int, n_tensors: int, seed: int) -> State:
    """fp32 square matrices holding about `n_params` parameters in all."""
    side = max(1, round(math.sqrt(n_params / n_tensors)))
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(side, side, generator=gen) for i in range(n_tensors)}


def state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class Pki:
    """A CA and node certificates in a temporary directory, made once per run."""

    def __init__(self, root: Path, paths: Sequence[str]) -> None:
        self.ca, self.nodes = root / "ca", root / "nodes"
        create_ca(self.ca)
        for path in paths:
            issue_node_cert(self.ca, path, self.nodes)

    def files(self, path: str, mode: str) -> TlsFiles | None:
        return TlsFiles.for_node(self.ca, self.nodes, path) if mode == MTLS else None


def serve(pki: Pki, mode: str, children: Sequence[str], chunk_bytes: int) -> ParentLinkServer:
    return ParentLinkServer(
        "127.0.0.1:0",
        PARENT,
        children,
        pki.files(PARENT, mode),
        allow_plaintext=mode == PLAIN,
        run_id=RUN_ID,
        chunk_bytes=chunk_bytes,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )


def dial(address: str, path: str, tls: TlsFiles | None, chunk_bytes: int) -> ChildLink:
    link = ChildLink(
        address,
        path,
        tls,
        allow_plaintext=tls is None,
        run_id=RUN_ID,
        train_tokens=1000,
        chunk_bytes=chunk_bytes,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    link.connect_with_backoff(300)
    return link


def quiet_logs() -> None:
    # The plaintext warning and per-task info lines would interleave with the tables.
    logging.basicConfig(level=logging.ERROR)


# --- child processes (module level, so that spawn can import them) -----------------------------


def transfer_peer(address: str, tls: TlsFiles | None, chunk_bytes: int) -> None:
    """The transfer benchmark's child: acks what it is sent, and sends back what it holds."""
    quiet_logs()
    torch.set_num_threads(1)
    link = dial(address, PEER, tls, chunk_bytes)
    task: TrainTask | None = None
    held: memoryview | None = None
    while True:
        kind, payload = link.receive(timeout=None)
        if kind == STOP_KIND:
            break
        if kind == "train_task":
            started = time.perf_counter()
            message = decode_message(
                kind, payload, max_bytes=MAX_MESSAGE_BYTES, copy=False, verify_body=False
            )
            decode_s = time.perf_counter() - started
            del payload
            assert isinstance(message, TrainTask)
            task = message
            del message  # the peer holds at most one model at a time
            link.send(ACK, json.dumps({"decode_s": decode_s}).encode(), TIMEOUT_S)
        elif kind == RAW:
            held = payload
            del payload
            link.send(ACK, b"{}", TIMEOUT_S)
        elif kind == WANT_UPDATE:
            assert task is not None, "want_update before any train_task"
            started = time.perf_counter()
            reply = Update(PEER, task.round, task.nonce, task.state, 1.0)
            kind, parts = encode_message_parts(reply, body_digest=False)
            encoded = time.perf_counter()
            del reply
            task = None  # the peer holds at most one model at a time
            link.send(kind, parts, TIMEOUT_S)
            sent = time.perf_counter()
            del parts
            stats = {"encode_s": encoded - started, "send_s": sent - encoded}
            link.send(STATS, json.dumps(stats).encode(), TIMEOUT_S)
        elif kind == WANT_RAW:
            assert held is not None, "want_raw before any raw payload"
            link.send(RAW, held, TIMEOUT_S)
            held = None
    link.close()


class NoOpLeaf:
    """A leaf that trains for zero steps: it answers with the state it was sent, after
    `delay` seconds."""

    def __init__(self, path: str, delay: float = 0.0) -> None:
        self.path, self.delay = path, delay

    def info(self) -> ChildInfo:
        return ChildInfo(self.path, 1000)

    def handle_train(self, task: TrainTask) -> Update:
        if self.delay:
            time.sleep(self.delay)
        return Update(self.path, task.round, task.nonce, task.state, 1.0)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        return EvalReport(self.path, task.nonce, {})


def leaf_process(
    path: str, parents: list[tuple[str, TlsFiles | None]], chunk_bytes: int, delay: float = 0.0
) -> None:
    """A no-op leaf serving each parent (one per link mode) on a thread of its own."""
    quiet_logs()
    torch.set_num_threads(1)
    links = [dial(address, path, tls, chunk_bytes) for address, tls in parents]
    threads = [
        threading.Thread(
            target=answer_parent, args=(link, NoOpLeaf(path, delay)), kwargs={"run_id": RUN_ID}
        )
        for link in links
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for link in links:
        link.close()


# --- timing helpers -----------------------------------------------------------------------------

Timings = dict[str, list[float]]  # what was timed -> seconds, one per repetition
Unit = Callable[[], dict[str, float]]  # one repetition of a variant: {what: seconds}


def run_interleaved(units: dict[str, Unit], reps: int, warmup: int) -> dict[str, Timings]:
    """Every unit once per repetition, in an order rotated each repetition, after a warm-up;
    the seconds of each unit by what it timed."""
    names = list(units)
    for _ in range(warmup):
        for name in names:
            units[name]()
            gc.collect()
    out: dict[str, Timings] = {name: {} for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()  # outside the clock
            for key, seconds in units[name]().items():
                out[name].setdefault(key, []).append(seconds)
    return out


def peak_rss_gb(pid: int | str = "self") -> float | None:
    """Peak resident memory of a process in GB (VmHWM; None without Linux's /proc).

    Not `getrusage`: a spawned child's `ru_maxrss` starts at its parent's peak before exec."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GB
    except (OSError, ValueError, IndexError):
        pass
    return None


def record_peak(peaks: dict[str, float | None], name: str, pid: int | None) -> None:
    """Keep the largest peak RSS seen under `name`."""
    gb = peak_rss_gb(pid) if pid is not None else None
    if gb is not None:
        peaks[name] = max(gb, peaks.get(name) or 0.0)


# --- transfer -----------------------------------------------------------------------------------


class TransferLink:
    """One parent server and its transfer peer (a child process) in one link mode."""

    def __init__(self, ctx: Any, pki: Pki, mode: str, chunk_bytes: int) -> None:
        self.mode = mode
        self.server = serve(pki, mode, [PEER], chunk_bytes)
        self.process = ctx.Process(
            target=transfer_peer,
            args=(self.server.address, pki.files(PEER, mode), chunk_bytes),
            name=f"transfer-peer-{mode}",
        )
        self.process.start()
        self.conn: ChildConnection = self.server.wait_for_children(timeout=300)[PEER]

    def codec_round_trip(self, task: TrainTask) -> dict[str, float]:
        """TrainTask parent -> child, then the child's Update child -> parent, with their parts."""
        conn = self.conn
        started = time.perf_counter()
        kind, parts = encode_message_parts(task, body_digest=False)
        encoded = time.perf_counter()
        conn.send(kind, parts, TIMEOUT_S)
        sent = time.perf_counter()
        del parts
        ack_kind, ack = conn.receive(TIMEOUT_S)
        acked = time.perf_counter()
        assert ack_kind == ACK, ack_kind
        child_decode = json.loads(bytes(ack))["decode_s"]

        gc.collect()
        asked = time.perf_counter()
        conn.send(WANT_UPDATE, b"", TIMEOUT_S)
        kind, payload = conn.receive(TIMEOUT_S)
        received = time.perf_counter()
        reply = decode_message(
            kind, payload, max_bytes=MAX_MESSAGE_BYTES, copy=False, verify_body=False
        )
        decoded = time.perf_counter()
        assert isinstance(reply, Update) and reply.nonce == task.nonce
        del reply, payload
        stats_kind, stats = conn.receive(TIMEOUT_S)
        assert stats_kind == STATS, stats_kind
        child = json.loads(bytes(stats))
        return {
            "p2c": acked - started,
            "p2c encode (parent)": encoded - started,
            "p2c send (parent; returns once gRPC took the last chunk)": sent - encoded,
            "p2c then until the ack (child: receive rest, decode)": acked - sent,
            "p2c decode (child; part of the previous)": child_decode,
            "c2p": decoded - asked,
            "c2p request until the whole payload is in (child encodes, sends)": received - asked,
            "c2p encode (child; part of the previous)": child["encode_s"],
            "c2p send (child; part of the previous)": child["send_s"],
            "c2p decode (parent)": decoded - received,
        }

    def raw_round_trip(self, payload: bytes) -> dict[str, float]:
        """The same bytes without the codec: parent -> child (until acked), then back."""
        conn = self.conn
        started = time.perf_counter()
        conn.send(RAW, payload, TIMEOUT_S)
        kind, _ = conn.receive(TIMEOUT_S)
        acked = time.perf_counter()
        assert kind == ACK, kind
        gc.collect()
        asked = time.perf_counter()
        conn.send(WANT_RAW, b"", TIMEOUT_S)
        kind, back = conn.receive(TIMEOUT_S)
        received = time.perf_counter()
        assert kind == RAW and len(back) == len(payload)
        del back
        return {"p2c": acked - started, "c2p": received - asked}

    def close(self, peaks: dict[str, float | None]) -> None:
        record_peak(peaks, "transfer peer", self.process.pid)
        try:
            self.conn.send(STOP_KIND, b"", 10.0)
        except Exception as exc:  # the report matters more than a clean stop
            print(f"could not stop the {self.mode} peer: {exc}")
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self.server.stop(0.5)


def joined(parts: Sequence[Any]) -> memoryview:
    """The parts in one writable buffer of its own, as the link's receiver hands it over."""
    total = sum(memoryview(part).nbytes for part in parts)
    out = np.empty(total, dtype=np.uint8).data.cast("B")
    offset = 0
    for part in parts:
        n = memoryview(part).nbytes
        out[offset : offset + n] = memoryview(part).cast("B")
        offset += n
    return out


def codec_only(task: TrainTask) -> dict[str, float]:
    """Encode a TrainTask and decode it, then the Update answering it, in memory: the codec's
    share of a transfer. Joining the parts into one buffer (the link's one copy) is untimed."""
    started = time.perf_counter()
    kind, parts = encode_message_parts(task, body_digest=False)
    encoded = time.perf_counter()
    payload = joined(parts)
    del parts
    gc.collect()
    decode_started = time.perf_counter()
    decoded_task = decode_message(
        kind, payload, max_bytes=MAX_MESSAGE_BYTES, copy=False, verify_body=False
    )
    decoded = time.perf_counter()
    assert isinstance(decoded_task, TrainTask)
    reply_started = time.perf_counter()
    kind, parts = encode_message_parts(
        Update(PEER, task.round, task.nonce, decoded_task.state, 1.0), body_digest=False
    )
    reply_encoded = time.perf_counter()
    payload = joined(parts)
    del parts, decoded_task
    gc.collect()
    reply_decode_started = time.perf_counter()
    decode_message(kind, payload, max_bytes=MAX_MESSAGE_BYTES, copy=False, verify_body=False)
    reply_decoded = time.perf_counter()
    encode_s, decode_s = encoded - started, decoded - decode_started
    reply_encode_s, reply_decode_s = (
        reply_encoded - reply_started,
        reply_decoded - reply_decode_started,
    )
    return {
        "p2c": encode_s + decode_s,
        "p2c encode (encode_message_parts)": encode_s,
        "p2c decode (decode_message, copy=False)": decode_s,
        "c2p": reply_encode_s + reply_decode_s,
        "c2p encode (encode_message_parts)": reply_encode_s,
        "c2p decode (decode_message, copy=False)": reply_decode_s,
    }


def primitives(payload: bytes) -> dict[str, float]:
    """Passes over the payload for scale: a copy into new memory, a SHA-256, an XXH3-128."""
    started = time.perf_counter()
    copy = bytes(memoryview(payload))
    copied = time.perf_counter()
    del copy
    hashlib.sha256(payload).digest()
    hashed = time.perf_counter()
    xxhash.xxh3_128_digest(payload)
    xxhashed = time.perf_counter()
    return {
        "one copy into new memory": copied - started,
        "one sha256": hashed - copied,
        "one xxh3_128": xxhashed - hashed,
    }


def transfer_benchmark(
    args: argparse.Namespace,
    pki: Pki,
    ctx: Any,
    console: Console,
    peaks: dict[str, float | None],
) -> list[dict[str, Any]]:
    chunk_bytes = args.chunk_kib << 10
    links = {mode: TransferLink(ctx, pki, mode, chunk_bytes) for mode in args.modes}
    try:
        results = []
        for size_mb in args.sizes_mb:
            results.append(transfer_one_size(args, links, size_mb, console))
            gc.collect()  # the previous model and payload are gone before the next is made
        return results
    finally:
        for link in links.values():
            link.close(peaks)


def transfer_one_size(
    args: argparse.Namespace, links: dict[str, TransferLink], size_mb: float, console: Console
) -> dict[str, Any]:
    state = make_state(round(size_mb * 1e6 / 4), args.tensors, args.seed)
    task = TrainTask(RUN_ID, 0, 0, PARENT, PEER, "nonce-0", state)
    raw = b"".join(encode_message_parts(task, body_digest=False)[1])
    units: dict[str, Unit] = {}
    for mode, link in links.items():
        units[f"{mode}|codec + link"] = lambda link=link: link.codec_round_trip(task)
        units[f"{mode}|link only"] = lambda link=link: link.raw_round_trip(raw)
    units["-|codec only"] = lambda: codec_only(task)
    units["-|primitives"] = lambda: primitives(raw)
    side = next(iter(state.values())).shape[0]
    console.print(
        f"transfer: {size_mb:g} MB model, {len(state)} tensors of {side}x{side}, payload "
        f"{len(raw):,} bytes ..."
    )
    result: dict[str, Any] = {
        "size_mb": size_mb,
        "model_bytes": state_bytes(state),
        "payload_bytes": len(raw),
        "unit_seconds": run_interleaved(units, args.reps, args.warmup),
    }
    result["rows"] = transfer_rows(result)
    return result


# --- round overhead -----------------------------------------------------------------------------


def round_benchmark(
    args: argparse.Namespace,
    pki: Pki,
    ctx: Any,
    console: Console,
    peaks: dict[str, float | None],
) -> tuple[Timings, dict[str, Any]]:
    chunk_bytes = args.chunk_kib << 10
    leaves = [f"{PARENT}/leaf-{i:02d}" for i in range(args.round_leaves)]
    servers = {mode: serve(pki, mode, leaves, chunk_bytes) for mode in args.modes}
    processes = [
        ctx.Process(
            target=leaf_process,
            args=(
                path,
                [(servers[m].address, pki.files(path, m)) for m in args.modes],
                chunk_bytes,
            ),
            name=f"leaf-{path}",
        )
        for path in leaves
    ]
    console.print(f"round: starting {len(leaves)} leaf processes ...")
    for p in processes:
        p.start()
    transports: dict[str, GrpcTransport] = {}
    try:
        for server in servers.values():
            server.wait_for_children(timeout=600)
        in_process = InProcessTransport({PARENT: leaves})
        for path in leaves:
            in_process.register(NoOpLeaf(path))
        run_ctx = RunContext(run_id=RUN_ID, seed=args.seed, device=CPU)

        def aggregator(transport: Any) -> Aggregator:
            return Aggregator(
                PARENT,
                AggregatorConfig(),
                transport=transport,
                strategy=build_strategy("fedavg"),
                ctx=run_ctx,
            )

        aggregators = {IN_PROCESS: aggregator(in_process)}
        for mode, server in servers.items():
            transports[mode] = GrpcTransport(server, RoundPolicy(round_timeout=TIMEOUT_S))
            aggregators[f"gRPC, {mode}"] = aggregator(transports[mode])
        state = make_state(args.round_params, 4, args.seed)
        rounds = [0]

        def one_round(name: str, agg: Aggregator) -> dict[str, float]:
            started = time.perf_counter()
            outcome = agg.run_round(state, rounds[0])
            seconds = time.perf_counter() - started
            rounds[0] += 1
            answered = outcome.records[-1]["participants"]
            assert len(answered) == len(leaves), f"{name}: only {len(answered)} leaves answered"
            return {name: seconds}

        units: dict[str, Unit] = {
            name: lambda name=name, agg=agg: one_round(name, agg)
            for name, agg in aggregators.items()
        }
        timed = run_interleaved(units, args.round_reps, args.round_warmup)
        seconds = {name: timed[name][name] for name in units}
        info = {"params": state_bytes(state) // 4, "leaves": len(leaves)}
        return seconds, info
    finally:
        for p in processes:
            record_peak(peaks, "leaf", p.pid)
        shut_down(transports.values(), processes, servers.values())


def shut_down(
    transports: Iterable[GrpcTransport],
    processes: Iterable[mp.process.BaseProcess],
    servers: Iterable[ParentLinkServer],
) -> None:
    """Tell the leaves the run is over, wait for their processes, stop the servers."""
    for transport in transports:
        transport.stop_children()
    for p in processes:
        p.join(30)
        if p.is_alive():
            p.terminate()
            p.join(10)
    for server in servers:
        server.stop(0.5)


# --- report -------------------------------------------------------------------------------------


def stats(xs: Sequence[float]) -> tuple[float, float]:
    return min(xs), statistics.median(xs)


def transfer_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (link mode, what, direction), with GB/s of the payload."""
    n = result["payload_bytes"]
    rows = []
    order = [(MTLS, "codec + link"), (PLAIN, "codec + link"), (MTLS, "link only")]
    order += [(PLAIN, "link only"), ("-", "codec only")]
    for mode, what in order:
        for direction, label in (("p2c", "parent -> child"), ("c2p", "child -> parent")):
            secs = result["unit_seconds"].get(f"{mode}|{what}", {}).get(direction)
            if secs is None:
                continue
            best, median = stats(secs)
            rows.append(
                {
                    "size_mb": result["size_mb"],
                    "link": mode,
                    "what": what,
                    "direction": label,
                    "min_s": best,
                    "median_s": median,
                    "gbps_best": n / best / GB,
                    "gbps_median": n / median / GB,
                }
            )
    return rows


def print_transfer(console: Console, results: list[dict[str, Any]]) -> None:
    table = Table(
        title="Transfer of a model over loopback gRPC (GB/s = payload bytes / 1e9 / s)",
        caption="codec + link: encode, send, receive, decode (plus a small ack or request); "
        "link only: the encoded bytes; codec only: encode + decode in memory",
    )
    for col in ("model", "link", "what", "direction"):
        table.add_column(col, no_wrap=True)
    for col in ("min s", "median s", "GB/s best", "GB/s median"):
        table.add_column(col, justify="right")
    for result in results:
        for r in result["rows"]:
            table.add_row(
                f"{r['size_mb']:g} MB",
                r["link"],
                r["what"],
                r["direction"],
                f"{r['min_s']:.3f}",
                f"{r['median_s']:.3f}",
                f"{r['gbps_best']:.2f}",
                f"{r['gbps_median']:.2f}",
            )
        table.add_section()
    console.print(table)

    parts = Table(title="Where the time goes (median seconds of each part)")
    for col in ("model", "link", "part"):
        parts.add_column(col, no_wrap=True)
    parts.add_column("median s", justify="right")
    parts.add_column("GB/s", justify="right")
    for result in results:
        n = result["payload_bytes"]
        for unit, secs in result["unit_seconds"].items():
            mode, _, what = unit.partition("|")
            for key, xs in secs.items():
                if key in ("p2c", "c2p"):
                    continue
                median = statistics.median(xs)
                parts.add_row(
                    f"{result['size_mb']:g} MB",
                    mode,
                    f"{what}: {key}",
                    f"{median:.3f}",
                    f"{n / median / GB:.2f}" if median > 0 else "-",
                )
        parts.add_section()
    console.print(parts)


def round_rows(seconds: Timings) -> list[dict[str, Any]]:
    base_min, base_median = stats(seconds[IN_PROCESS])
    rows = []
    for name, xs in seconds.items():
        best, median = stats(xs)
        rows.append(
            {
                "variant": name,
                "min_s": best,
                "median_s": median,
                "ratio_min": best / base_min,
                "ratio_median": median / base_median,
            }
        )
    return rows


def print_round(console: Console, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    table = Table(
        title=f"One fedavg round over {info['leaves']} no-op leaves, {info['params']:,} parameters",
        caption="ratio = seconds of the variant / seconds in process",
    )
    table.add_column("variant", no_wrap=True)
    for col in ("min ms", "median ms", "ratio min", "ratio median"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["variant"],
            f"{1e3 * r['min_s']:.1f}",
            f"{1e3 * r['median_s']:.1f}",
            f"{r['ratio_min']:.2f}",
            f"{r['ratio_median']:.2f}",
        )
    console.print(table)


def verdicts(transfer: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> list[str]:
    out = []
    for result in transfer:
        for r in result["rows"]:
            if r["link"] == MTLS and r["what"] == "codec + link":
                if r["size_mb"] < TARGET_SIZE_MB:
                    verdict = f"(the target is for {TARGET_SIZE_MB:g} MB)"
                else:
                    verdict = "met" if r["gbps_median"] >= TARGET_GBPS else "NOT met"
                    verdict = f"target {TARGET_GBPS:g} GB/s by the median: {verdict}"
                out.append(
                    f"{r['size_mb']:g} MB over mTLS, {r['direction']}: {r['gbps_median']:.2f} GB/s "
                    f"by the median ({r['gbps_best']:.2f} best); {verdict}"
                )
    for r in rounds:
        if r["variant"] != IN_PROCESS:
            met = r["ratio_median"] <= TARGET_ROUND_RATIO
            out.append(
                f"round {r['variant']}: {r['ratio_median']:.2f}x in-process by the median "
                f"({r['ratio_min']:.2f}x by the min); target <= {TARGET_ROUND_RATIO:g}x: "
                f"{'met' if met else 'NOT met'}"
            )
    return out


def machine(args: argparse.Namespace) -> dict[str, Any]:
    return machine_info(args, grpcio=grpc.__version__, nice=os.nice(0))


def main() -> None:
    args = parse_args()
    quiet_logs()
    console = Console(width=max(Console().width, 150))
    info = machine(args)
    console.print(
        f"[bold]machine[/]: {info['processor']}, {info['cpu_count']} CPUs "
        f"({info['cpus_usable']} usable), torch {info['torch']} ({info['torch_threads']} "
        f"threads), grpcio {info['grpcio']}, Python {info['python']}, nice {info['nice']}; "
        f"load average {info['load_before']}; chunks of {args.chunk_kib} KiB"
    )
    ctx = mp.get_context("spawn")
    leaves = [f"{PARENT}/leaf-{i:02d}" for i in range(args.round_leaves)]
    transfer: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    round_info: dict[str, Any] = {}
    peaks: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="grpc-bench-") as tmp:
        pki = Pki(Path(tmp), [PARENT, PEER, *leaves])
        if not args.skip_transfer:
            transfer = transfer_benchmark(args, pki, ctx, console, peaks)
            print_transfer(console, transfer)
        if not args.skip_round:
            seconds, round_info = round_benchmark(args, pki, ctx, console, peaks)
            rounds = round_rows(seconds)
            round_info["seconds"] = seconds
            print_round(console, rounds, round_info)
    info["load_after"] = load_average()
    record_peak(peaks, "parent", os.getpid())
    info["peak_rss_gb"] = peaks
    console.print(
        f"load average after: {info['load_after']}; peak RSS (GB): "
        + ", ".join(f"{name} {gb:.2f}" for name, gb in peaks.items() if gb is not None)
    )
    for line in verdicts(transfer, rounds):
        console.print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {**info, "transfer": transfer, "round": {**round_info, "rows": rounds}}
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
