"""Serialization speed of a model: worldlm's wire format against Flower's ArrayRecord paths.

In memory, no link: what each side's CPU pays to turn a state dict of tensors into what goes
on the wire (encode) and back into tensors (decode). The model is GPT-2-like float32 tensors
(see aggregation_throughput.transformer_shapes) of `--sizes-mb` MB, plus one bfloat16 model of
`--bf16-mb` MB. Contestants, each timed per direction:

- `worldlm encode -> bytes / decode`: `wire.encode` (header, XXH3-128 of the body, joined
  into one `bytes`) and `wire.decode(payload)` (checks the digest, copies the body once);
- `worldlm encode_parts / decode(copy=False)`: `wire.encode_parts` (the XXH3-128, and buffers
  over the tensors' own memory: no copy) and `wire.decode(copy=False)` over a writable buffer
  holding the payload (checks the digest, tensors over the buffer: no copy). Joining the parts
  into that buffer is what a link's receiver does as it reassembles chunks; it is untimed and
  reported on its own (`join`);
- `Flower serde (RecordDict proto)`: `ArrayRecord(state_dict)` (`np.save` of each tensor),
  `flwr.common.serde.recorddict_to_proto(...).SerializeToString()`; back: `FromString`,
  `recorddict_from_proto`, `ArrayRecord.to_torch_state_dict()` (`np.load` of each array). This
  is how Flower's SQL state store writes a message's content; its 1.41 gRPC link sends message
  objects instead (next row);
- `Flower message objects (PushObject)`: what flwr 1.41 sends over gRPC: the `RecordDict` in a
  `Message`, its object tree (every `Array` cut into `ArrayChunk`s of 5 MB, each named by the
  SHA-256 of its deflated bytes), each object deflated into a `PushObjectRequest` and
  serialized; back: each request parsed and checked as the receiving `ObjectStore.put` does
  (SHA-256 against its id, `validate_object_content`), `inflate_object_from_contents`, then
  `to_torch_state_dict()`. One hop (ClientApp -> SuperLink); the pull from the SuperLink to the
  ServerApp costs another parse and serialize, not counted here.

bfloat16 travels as bfloat16 in worldlm (checked: the payload has 2 bytes per parameter and
decodes to bfloat16). Flower's `Array` goes through NumPy, which has no bfloat16: `ArrayRecord`
raises on it, so the Flower rows of that model are the workaround a user must write, casting
to float32 first (twice the bytes) and back after decoding.

GB/s = the model's bytes in its own dtype / 1e9 / seconds (so the bf16 rows compare the same
model across contestants; `payload MB` shows what would cross the link). Every contestant runs
once per repetition, in an order rotated each repetition, after `--warmup` untimed runs; the
table reports the minimum and the median.

    .benchvenv/bin/python benchmarks/wire_speed.py --json /tmp/bench/wire.json
    .benchvenv/bin/python benchmarks/wire_speed.py --quick

Options: `--sizes-mb` (float32 models, default 100 400), `--bf16-mb` (100; 0 to leave out),
`--reps` (5), `--warmup` (1), `--threads`, `--seed`, `--json PATH`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from aggregation_throughput import (
    Unit,
    flower_version,
    run_interleaved,
    state_bytes,
    transformer_state,
)
from machine_info import load_average, machine_info
from worldlm import wire

OURS_BYTES = "worldlm encode -> bytes / decode"
OURS_PARTS = "worldlm encode_parts / decode(copy=False)"
FLOWER_SERDE = "Flower serde (RecordDict proto)"
FLOWER_OBJECTS = "Flower message objects (PushObject)"
GB = 1e9


# --- worldlm ------------------------------------------------------------------------------------


def writable_copy(parts: list[Any]) -> bytearray:
    """The parts joined into one writable buffer, as a link's receiver holds a payload."""
    out = bytearray(sum(memoryview(p).nbytes for p in parts))
    offset = 0
    for part in parts:
        view = memoryview(part).cast("B")
        out[offset : offset + view.nbytes] = view
        offset += view.nbytes
    return out


def ours_bytes(state: dict[str, torch.Tensor]) -> dict[str, float]:
    t0 = time.perf_counter()
    payload = wire.encode(state)
    t1 = time.perf_counter()
    decoded, _ = wire.decode(payload)
    t2 = time.perf_counter()
    check_ours(state, decoded, len(payload))
    return {"encode": t1 - t0, "decode": t2 - t1, "payload_bytes": len(payload)}


def ours_parts(state: dict[str, torch.Tensor]) -> dict[str, float]:
    t0 = time.perf_counter()
    parts, total = wire.encode_parts(state)
    t1 = time.perf_counter()
    buffer = writable_copy(parts)
    t2 = time.perf_counter()
    del parts
    gc.collect()
    t3 = time.perf_counter()
    decoded, _ = wire.decode(buffer, copy=False)
    t4 = time.perf_counter()
    check_ours(state, decoded, total)
    return {"encode": t1 - t0, "decode": t4 - t3, "join": t2 - t1, "payload_bytes": total}


def check_ours(state: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor], n: int) -> None:
    """Same names, dtypes (bf16 stays bf16) and a payload of the model's bytes plus a header."""
    assert list(decoded) == list(state)
    assert all(decoded[k].dtype == v.dtype for k, v in state.items())
    assert state_bytes(state) <= n <= state_bytes(state) + (1 << 20), n


# --- Flower -------------------------------------------------------------------------------------


def flower_input(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a Flower user can hand to ArrayRecord: NumPy has no bfloat16, so cast to float32."""
    if any(t.dtype == torch.bfloat16 for t in state.values()):
        return {k: v.float() for k, v in state.items()}
    return state


def flower_output(
    decoded: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Back to the model's dtypes (the bf16 workaround's second half)."""
    return {k: v if v.dtype == state[k].dtype else v.to(state[k].dtype) for k, v in decoded.items()}


def flower_serde(state: dict[str, torch.Tensor]) -> dict[str, float]:
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    t0 = time.perf_counter()
    record = ArrayRecord(flower_input(state))
    t1 = time.perf_counter()
    content = RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1})})
    payload = recorddict_to_proto(content).SerializeToString()
    t2 = time.perf_counter()
    del record, content
    gc.collect()
    t3 = time.perf_counter()
    back = recorddict_from_proto(ProtoRecordDict.FromString(payload))
    t4 = time.perf_counter()
    arrays = back["arrays"]
    assert isinstance(arrays, ArrayRecord)
    decoded = flower_output(arrays.to_torch_state_dict(), state)
    t5 = time.perf_counter()
    assert list(decoded) == list(state)
    return {
        "encode": t2 - t0,
        "decode": t5 - t3,
        "encode: ArrayRecord (np.save)": t1 - t0,
        "encode: to proto, serialize": t2 - t1,
        "decode: parse, from proto": t4 - t3,
        "decode: to_torch_state_dict (np.load)": t5 - t4,
        "payload_bytes": len(payload),
    }


def flower_objects(state: dict[str, torch.Tensor]) -> dict[str, float]:
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_id,
        get_object_tree,
        no_object_id_recompute,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        inflate_object_from_contents,
        validate_object_content,
    )

    t0 = time.perf_counter()
    record = ArrayRecord(flower_input(state))
    t1 = time.perf_counter()
    content = RecordDict({"arrays": record, "config": ConfigRecord({"server-round": 1})})
    message = Message(content=content, dst_node_id=1, message_type="train")
    with no_object_id_recompute():  # as flwr's push_message
        tree = get_object_tree(message)
        objects = get_all_nested_objects(message)
        t2 = time.perf_counter()
        frames = [
            PushObjectRequest(object_id=oid, object_content=obj.deflate()).SerializeToString()
            for oid, obj in objects.items()
        ]
    t3 = time.perf_counter()
    del record, content, message, objects
    gc.collect()
    t4 = time.perf_counter()
    contents: dict[str, bytes] = {}
    for frame in frames:
        request = PushObjectRequest.FromString(frame)
        # What the receiving ObjectStore.put checks (verify=True, its default).
        assert get_object_id(request.object_content) == request.object_id
        validate_object_content(request.object_content)
        contents[request.object_id] = request.object_content
    t5 = time.perf_counter()
    received = inflate_object_from_contents(tree.object_id, contents)
    arrays = received.content["arrays"]  # type: ignore[attr-defined]
    t6 = time.perf_counter()
    decoded = flower_output(arrays.to_torch_state_dict(), state)
    t7 = time.perf_counter()
    assert list(decoded) == list(state)
    return {
        "encode": t3 - t0,
        "decode": t7 - t4,
        "encode: ArrayRecord (np.save)": t1 - t0,
        "encode: object tree (SHA-256 ids)": t2 - t1,
        "encode: deflate, PushObjectRequest": t3 - t2,
        "decode: parse, SHA-256 check": t5 - t4,
        "decode: inflate": t6 - t5,
        "decode: to_torch_state_dict (np.load)": t7 - t6,
        "payload_bytes": sum(len(f) for f in frames),
        "objects": len(frames),
    }


def set_flower_identity() -> None:
    """A `Message` takes its run id from the process's task identity, which flwr's runtime
    sets; outside a run it must be set by hand."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1


# --- the benchmark ------------------------------------------------------------------------------


def one_model(
    args: argparse.Namespace, mb: float, dtype: torch.dtype, contestants: dict[str, Any]
) -> dict[str, Any]:
    params = round(mb * 1e6 / torch.empty((), dtype=dtype).element_size())
    state = transformer_state(params, args.seed, dtype)
    units: dict[str, Unit] = {name: (lambda fn=fn: fn(state)) for name, fn in contestants.items()}
    timed = run_interleaved(units, args.reps, args.warmup)
    model_bytes = state_bytes(state)
    rows = []
    for name, secs in timed.items():
        row: dict[str, Any] = {"contestant": name, "payload_bytes": secs["payload_bytes"][0]}
        for direction in ("encode", "decode"):
            xs = secs[direction]
            row[f"{direction}_min_s"] = min(xs)
            row[f"{direction}_median_s"] = statistics.median(xs)
            row[f"{direction}_gbps"] = model_bytes / min(xs) / GB
        trips = [e + d for e, d in zip(secs["encode"], secs["decode"], strict=True)]
        row["round_trip_min_s"] = min(trips)
        row["round_trip_gbps"] = model_bytes / min(trips) / GB
        row["parts_median_s"] = {
            k: statistics.median(v)
            for k, v in secs.items()
            if k not in ("encode", "decode", "payload_bytes", "objects")
        }
        row["seconds"] = secs
        rows.append(row)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "params": sum(t.numel() for t in state.values()),
        "tensors": len(state),
        "model_bytes": model_bytes,
        "rows": rows,
    }


def print_results(console: Console, results: list[dict[str, Any]]) -> None:
    table = Table(
        title="Serialization of a model, in memory (GB/s = the model's bytes in its dtype / s)",
        caption="ours/x = x's seconds / ours' (encode + decode, by the minimum); Flower's bf16 "
        "rows cast to float32 and back (NumPy has no bfloat16)",
    )
    for col in ("model", "contestant"):
        table.add_column(col, no_wrap=True)
    cols = ("payload MB", "encode s", "GB/s", "decode s", "GB/s", "trip GB/s", "ours/x")
    for col in cols:
        table.add_column(col, justify="right")
    for res in results:
        best = {r["contestant"]: r["round_trip_min_s"] for r in res["rows"]}
        mine = best.get(OURS_PARTS)
        for r in res["rows"]:
            ratio = best[r["contestant"]] / mine if mine and r["contestant"] != OURS_PARTS else None
            table.add_row(
                f"{res['model_bytes'] / 1e6:.0f} MB {res['dtype']}",
                r["contestant"],
                f"{r['payload_bytes'] / 1e6:.1f}",
                f"{r['encode_min_s']:.3f}",
                f"{r['encode_gbps']:.2f}",
                f"{r['decode_min_s']:.3f}",
                f"{r['decode_gbps']:.2f}",
                f"{r['round_trip_gbps']:.2f}",
                f"{ratio:.1f}" if ratio is not None else "-",
            )
        table.add_section()
    console.print(table)
    parts = Table(title="Where the time goes (median seconds of each part)")
    for col in ("model", "contestant", "part"):
        parts.add_column(col, no_wrap=True)
    parts.add_column("median s", justify="right")
    parts.add_column("GB/s", justify="right")
    for res in results:
        for r in res["rows"]:
            for part, seconds in r["parts_median_s"].items():
                parts.add_row(
                    f"{res['model_bytes'] / 1e6:.0f} MB {res['dtype']}",
                    r["contestant"],
                    part,
                    f"{seconds:.3f}",
                    f"{res['model_bytes'] / seconds / GB:.2f}" if seconds > 0 else "-",
                )
        parts.add_section()
    console.print(parts)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[100.0, 400.0])
    p.add_argument("--bf16-mb", type=float, default=100.0, help="bf16 model size; 0: none")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per contestant")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke mode: 10 MB models, 2 reps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.sizes_mb, args.bf16_mb, args.reps, args.warmup = [10.0], 10.0, 2, 0
    if args.reps < 1 or args.warmup < 0 or any(s <= 0 for s in args.sizes_mb):
        p.error("--reps must be at least 1, --warmup at least 0, sizes positive")
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 150))
    flwr_version = flower_version()
    contestants: dict[str, Any] = {OURS_BYTES: ours_bytes, OURS_PARTS: ours_parts}
    notes = []
    if flwr_version is None:
        notes.append("flwr is not installed here: Flower rows skipped (see benchmarks/README.md)")
    else:
        set_flower_identity()
        contestants |= {FLOWER_SERDE: flower_serde, FLOWER_OBJECTS: flower_objects}
        notes.append(
            "Flower bf16 rows: ArrayRecord refuses bfloat16 (NumPy has none); timed "
            "with the user's cast to float32 and back"
        )
    info = machine_info(args, flwr=flwr_version, nice=os.nice(0))
    console.print(
        f"[bold]machine[/]: {info['processor']}, {info['cpu_count']} CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads), flwr {flwr_version}, Python {info['python']}, nice "
        f"{info['nice']}; load average {info['load_before']}"
    )
    for note in notes:
        console.print(f"[yellow]note[/]: {note}")
    models = [(mb, torch.float32) for mb in args.sizes_mb]
    if args.bf16_mb > 0:
        models.append((args.bf16_mb, torch.bfloat16))
    results = []
    for mb, dtype in models:
        console.print(f"{mb:g} MB {dtype} ...")
        results.append(one_model(args, mb, dtype, contestants))
        gc.collect()
    print_results(console, results)
    info["load_after"] = load_average()
    console.print(f"load average after: {info['load_after']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {**info, "notes": notes, "models": results}
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
