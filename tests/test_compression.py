"""Compression on the links of the tree (issue 6, item 3): codecs against their stated error
bounds, error feedback, hostile compact payloads, the wire, settings that are refused, and tiny
federated runs (bytes, perplexity, exact resume, gRPC, secure aggregation)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from worldlm import wire
from worldlm.checkpoint import load_latest, save_checkpoint
from worldlm.compression import ChildLinks, Uplink, decode_task, decode_update, make_codec
from worldlm.compression.feedback import feedback_step
from worldlm.compression.int8 import quantize
from worldlm.compression.topk import kept_count
from worldlm.config import LinkConfig
from worldlm.core.messages import Record, State, TrainTask, Update
from worldlm.errors import ConfigError, UpdateRejected, WireError
from worldlm.federation.snapshot import restore, snapshot
from worldlm.progress import QuietProgress
from worldlm.root_loop import evaluate_tree, mean_ppl
from worldlm.session import Session, open_session
from worldlm.transport.codec import decode_message, encode_message

from .conftest import TWO_LEVEL, tiny_config
from .test_grpc_transport import over_grpc

FLAT = {"world/a": "med", "world/b": "law"}
TRIO = {f"world/t{i}": topic for i, topic in enumerate(["med", "law", "code"])}


def _tensors(seed: int = 0) -> State:
    gen = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(6, 5, generator=gen),
        "blocks.0.w": torch.randn(4, 3, 2, generator=gen) * 1e-3,  # 3-D: rows are dim 0
        "norm.bias": torch.randn(7, generator=gen),
        "steps": torch.arange(3, dtype=torch.int64),  # not floating: travels whole
    }


def _floats(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


# --- codecs against their error bounds -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bound", "floor"),
    [("bf16", 2.0**-8, 0.0), ("fp16", 2.0**-11, 2.0**-25)],  # fp16: absolute below 2^-14
)
def test_casts_round_within_their_relative_error(name: str, bound: float, floor: float) -> None:
    x = _tensors()
    codec = make_codec(name)
    compact = codec.compress(x)
    half = torch.bfloat16 if name == "bf16" else torch.float16
    assert {compact[f"{k}::cast"].dtype for k in _floats(x)} == {half}
    y = codec.decompress(compact, x)
    assert torch.equal(y["steps"], x["steps"])
    for key in _floats(x):
        assert y[key].dtype == x[key].dtype
        error = (y[key].double() - x[key].double()).abs()
        assert bool((error <= (bound * x[key].double().abs()).clamp(min=floor)).all()), key


def test_fp16_clips_a_finite_overflow_instead_of_sending_infinity() -> None:
    x = {"w": torch.tensor([1e6, -1e6, 1.0, math.inf])}
    y = make_codec("fp16").decompress(make_codec("fp16").compress(x), x)["w"]
    assert y.tolist() == [65504.0, -65504.0, 1.0, math.inf]  # a diverged value stays refused


def test_int8_error_is_at_most_half_a_step_per_row() -> None:
    x = _tensors()
    x["zero_row"] = torch.cat([torch.zeros(1, 4), torch.randn(2, 4)])
    codec = make_codec("int8")
    compact = codec.compress(x)
    assert compact["emb.weight::scale"].shape == (6,)  # one scale per output row
    assert compact["blocks.0.w::scale"].shape == (4,)
    assert compact["norm.bias::scale"].shape == (1,)  # 1-D: one scale per tensor
    y = codec.decompress(compact, x)
    for key in _floats(x):
        q, scale = compact[f"{key}::q"], compact[f"{key}::scale"].double()
        assert q.dtype == torch.int8 and int(q.abs().max()) == 127  # the row maximum hits 127
        rows = scale.shape[0]
        error = (y[key].double() - x[key].double()).reshape(rows, -1).abs()
        ulp = 2.0**-23 * x[key].double().abs().reshape(rows, -1)  # the final float32 cast
        assert bool((error <= scale[:, None] / 2 + ulp).all()), key
    assert torch.equal(y["zero_row"][0], torch.zeros(4))  # scale 0 comes back exactly
    assert torch.equal(y["steps"], x["steps"])


def test_int8_reference_values_by_hand() -> None:
    q, scale = quantize(torch.tensor([[1.27, -0.635, 0.004], [0.0, 0.0, 0.0]]))
    assert scale.tolist() == pytest.approx([0.01, 0.0])
    assert q.tolist() == [[127, -64, 0], [0, 0, 0]]  # -63.5 rounds half to even


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1.0])
def test_topk_keeps_exactly_k_largest_entries(fraction: float) -> None:
    x = _tensors()
    codec = make_codec("topk", fraction)
    compact = codec.compress(x)
    y = codec.decompress(compact, x)
    for key in _floats(x):
        n = x[key].numel()
        k = kept_count(n, fraction)
        assert k == max(1, round(fraction * n))
        assert compact[f"{key}::idx"].dtype == torch.int32
        assert compact[f"{key}::val"].dtype == x[key].dtype and compact[f"{key}::val"].numel() == k
        kept = y[key].reshape(-1) != 0
        assert int(kept.sum()) == k
        # What was kept is exact, and no dropped entry is larger than a kept one.
        assert torch.equal(y[key].reshape(-1)[kept], x[key].reshape(-1)[kept])
        flat = x[key].reshape(-1).abs()
        if k < n:
            assert float(flat[~kept].max()) <= float(flat[kept].min())


@pytest.mark.parametrize("name", ["topk", "int8", "bf16"])
def test_sent_plus_new_residual_is_exactly_delta_plus_old_residual(name: str) -> None:
    codec = make_codec(name, 0.2)
    delta, old = _tensors(1), {k: v for k, v in _tensors(2).items() if k != "steps"}
    compact, new = feedback_step(codec, delta, old)
    target = {k: delta[k] + old[k] if k in old else delta[k] for k in delta}
    sent = codec.decompress(compact, target)
    for key in _floats(delta):
        assert torch.equal(sent[key] + new[key], delta[key] + old[key]), key
    assert "steps" not in new


def test_error_feedback_makes_the_cumulative_sent_sum_follow_the_cumulative_delta() -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 25, generator=gen)
    codec = make_codec("topk", 0.05)
    rounds = 200
    totals = {"with": torch.zeros_like(base), "without": torch.zeros_like(base)}
    residual: State = {}
    truth = torch.zeros_like(base)
    for _ in range(rounds):
        delta = {"w": base + 0.1 * torch.randn(40, 25, generator=gen)}  # a drift plus noise
        truth += delta["w"]
        compact, residual = feedback_step(codec, delta, residual)
        totals["with"] += codec.decompress(compact, delta)["w"]
        totals["without"] += codec.decompress(codec.compress(delta), delta)["w"]
        # The invariant behind convergence: everything sent plus the residual is every delta.
        assert torch.allclose(totals["with"] + residual["w"], truth, atol=1e-3)

    def gap(total: torch.Tensor) -> float:
        return float((total - truth).norm() / truth.norm())

    # The gap with feedback is one residual, which stays bounded while the sum grows.
    assert gap(totals["with"]) < 0.05
    assert gap(totals["without"]) > 0.5  # top-k alone never sends most entries


# --- hostile compact tensors ---------------------------------------------------------------

Edit = Callable[[dict[str, torch.Tensor]], None]


def _drop(key: str) -> Edit:
    return lambda c: c.__delitem__(key)


def _put(key: str, value: torch.Tensor) -> Edit:
    return lambda c: c.__setitem__(key, value)


def _poke(key: str, index: int, value: float) -> Edit:
    def edit(compact: dict[str, torch.Tensor]) -> None:
        compact[key] = compact[key].clone()
        compact[key].view(-1)[index] = value

    return edit


HOSTILE: list[tuple[str, Edit, str]] = [
    ("int8", _drop("norm.bias::scale"), r"'norm.bias': parts \['q'\], expected"),
    ("int8", _put("norm.bias::extra", torch.zeros(1)), r"parts \['extra', 'q', 'scale'\]"),
    ("int8", _put("ghost::q", torch.zeros(1, dtype=torch.int8)), "'ghost', not an expected"),
    ("int8", _put("no_separator", torch.zeros(1)), "not named <tensor>::<part>"),
    ("int8", lambda c: _drop("norm.bias::q")(c) or _drop("norm.bias::scale")(c), "no compact"),
    ("int8", _put("emb.weight::q", torch.zeros(6, 5, dtype=torch.int16)), "dtype int16"),
    ("int8", _put("emb.weight::scale", torch.ones(5)), r"shape \(5,\), expected \(6,\)"),
    ("int8", _poke("emb.weight::scale", 2, math.nan), "NaN or infinite"),
    ("int8", _poke("emb.weight::scale", 2, math.inf), "NaN or infinite"),
    ("int8", _poke("emb.weight::scale", 2, -1.0), "negative"),
    ("int8", _poke("emb.weight::q", 0, -128), "-128"),
    ("int8", _put("steps::raw", torch.arange(3, dtype=torch.int32)), "dtype int32"),
    ("topk", _poke("emb.weight::idx", 0, 30), "outside 0..29"),
    ("topk", _poke("emb.weight::idx", 0, -1), "outside 0..29"),
    ("topk", _put("emb.weight::idx", torch.tensor([4, 4, 5, 6, 7, 8], dtype=torch.int32)), "rep"),
    ("topk", _put("emb.weight::idx", torch.arange(7, dtype=torch.int32)), r"shape \(7,\)"),
    ("topk", _put("emb.weight::idx", torch.arange(6.0)), "dtype float32"),
    ("topk", _put("emb.weight::val", torch.zeros(6, dtype=torch.float64)), "dtype float64"),
    ("bf16", _put("emb.weight::cast", torch.zeros(6, 5, dtype=torch.float16)), "dtype float16"),
    ("bf16", _put("emb.weight::cast", torch.zeros(5, 6, dtype=torch.bfloat16)), "shape"),
]


@pytest.mark.parametrize(("name", "edit", "message"), HOSTILE)
def test_hostile_compact_tensors_are_refused_with_a_typed_error(
    name: str, edit: Edit, message: str
) -> None:
    x = _tensors()
    codec = make_codec(name, 0.2)
    compact = codec.compress(x)
    codec.decompress(compact, x)  # the honest payload decodes
    edit(compact)
    with pytest.raises(WireError, match=message):
        codec.decompress(compact, x)


def _update(state: State, **fields: Any) -> Update:
    return Update("world/a", 0, "n0nce", state, 10.0, [], **fields)


def test_a_reply_is_rebuilt_from_the_weights_sent_and_its_scale() -> None:
    sent = _tensors(0)
    model = {k: v + 0.5 if v.is_floating_point() else v for k, v in sent.items()}
    for scale in (1.0, 4.0):
        state = {k: v.double() * scale if v.is_floating_point() else v for k, v in model.items()}
        if scale == 1.0:
            state = model
        reply = Uplink(LinkConfig(up="bf16")).encode(_update(state, scale=scale), sent)
        assert reply.encoding == "bf16" and reply.topk_fraction is None
        got = decode_update(reply, sent)
        assert got.encoding == "none" and got.scale == scale
        for key, value in state.items():
            # Scale 1 comes back in the model's dtype; a forwarded sum in float64, as it went.
            assert got.state[key].dtype == value.dtype, key
            assert torch.allclose(got.state[key].double(), value.double(), rtol=1e-6), key


def test_hostile_replies_are_refused_by_the_parent() -> None:
    sent = _tensors(0)
    task = TrainTask("run", 0, 1, "world", "world/a", "n0nce", sent)
    links = ChildLinks({"world/a": LinkConfig(up="topk", topk_fraction=0.25)})
    honest = Uplink(links.link("world/a")).encode(_update(dict(sent)), sent)
    assert links.receive(honest, {"world/a": task}).encoding == "none"
    cases: list[tuple[Update, str]] = [
        (replace(honest, encoding="int8", topk_fraction=None), "compressed with int8, the link"),
        (replace(honest, topk_fraction=0.5), "with topk 0.5, the link with topk 0.25"),
        (replace(honest, state={**honest.state, "ghost::idx": torch.zeros(1)}), "'ghost'"),
        (replace(honest, state={}, encoding="none", topk_fraction=None), "compressed with none"),
    ]
    for reply, message in cases:
        with pytest.raises(UpdateRejected, match=message):
            links.receive(reply, {"world/a": task})
    with pytest.raises(WireError, match="unknown codec 'zip'"):
        decode_update(replace(honest, encoding="zip"), sent)
    with pytest.raises(WireError, match="int8 update carries a topk_fraction"):
        decode_update(replace(honest, encoding="int8"), sent)


def test_the_downlink_casts_or_quantizes_weights_and_the_child_decodes_them() -> None:
    state = {**_tensors(0), "half": torch.randn(3, 2).to(torch.bfloat16)}
    tasks = {
        child: TrainTask("run", 0, 1, "world", child, "n", state)
        for child in ("world/a", "world/b", "world/c")
    }
    links = ChildLinks({"world/a": LinkConfig(down="int8"), "world/b": LinkConfig(down="int8")})
    sent, seen = links.send(tasks)
    assert sent["world/c"] is tasks["world/c"] and seen["world/c"] is tasks["world/c"]
    assert sent["world/a"].encoding == "int8" and "emb.weight::q" in sent["world/a"].state
    assert sent["world/a"].state is sent["world/b"].state  # the same weights encoded once
    decoded = decode_task(sent["world/a"])
    assert decoded.encoding == "none" and not decoded.layout
    for key, value in state.items():
        # The child trains from exactly what the parent decodes, in the model's dtypes.
        assert decoded.state[key].dtype == value.dtype
        assert torch.equal(decoded.state[key], seen["world/a"].state[key])
    with pytest.raises(WireError, match="weights sent down are compressed with one of"):
        decode_task(replace(sent["world/a"], encoding="topk"))
    layout = {**sent["world/a"].layout, "emb.weight": ("float32", (5, 6))}
    with pytest.raises(WireError, match=r"shape \(6, 5\), expected \(5, 6\)"):
        decode_task(replace(sent["world/a"], layout=layout))
    with pytest.raises(WireError, match=r"layout of 'emb\.weight': dtype 'complex64'"):
        decode_task(replace(sent["world/a"], layout={"emb.weight": ("complex64", (6, 5))}))


# --- the wire ---------------------------------------------------------------------------------


def test_compressed_messages_cross_the_wire() -> None:
    sent = _tensors(0)
    reply = Uplink(LinkConfig(up="topk", topk_fraction=0.25)).encode(_update(dict(sent)), sent)
    kind, payload = encode_message(reply)
    got = decode_message(kind, payload)
    assert isinstance(got, Update)
    assert (got.encoding, got.topk_fraction) == ("topk", 0.25)
    assert list(got.state) == list(reply.state)  # stays compact for the parent to decode
    assert all(torch.equal(got.state[k], v) for k, v in reply.state.items())

    task = TrainTask("run", 0, 1, "world", "world/a", "n", sent)
    wire_task = ChildLinks({"world/a": LinkConfig(down="int8")}).send({"world/a": task})[0][
        "world/a"
    ]
    kind, payload = encode_message(wire_task)
    arrived = decode_message(kind, payload)
    assert isinstance(arrived, TrainTask) and arrived.encoding == "none"  # decoded on arrival
    want = decode_task(wire_task).state
    assert all(torch.equal(arrived.state[k], v) for k, v in want.items())


def _tampered(
    message: Any, edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None]
) -> bytes:
    _, payload = encode_message(message)
    tensors, meta = wire.decode(payload)
    edit(meta, tensors)
    return wire.encode(tensors, meta)


def test_hostile_compression_fields_on_the_wire_are_refused() -> None:
    sent = _tensors(0)
    reply = Uplink(LinkConfig(up="topk")).encode(_update(dict(sent)), sent)
    task = TrainTask("run", 0, 1, "world", "world/a", "n", sent)
    wire_task = ChildLinks({"world/a": LinkConfig(down="int8")}).send({"world/a": task})[0]
    cases: list[tuple[Any, str, Callable[[dict[str, Any], dict[str, torch.Tensor]], None], str]] = [
        (reply, "update", lambda m, t: m.__setitem__("encoding", "zip"), "not one of none"),
        (reply, "update", lambda m, t: m.__setitem__("topk_fraction", 1.5), r"in \(0, 1\]"),
        (reply, "update", lambda m, t: m.__setitem__("topk_fraction", "a"), "must be a number"),
        (reply, "update", lambda m, t: m.pop("encoding"), "lacks field 'encoding'"),
        (
            wire_task["world/a"],
            "train_task",
            lambda m, t: m["layout"].__setitem__("emb.weight", ["float32", [6, -5]]),
            "negative dimension",
        ),
        (
            wire_task["world/a"],
            "train_task",
            lambda m, t: t.__setitem__("state/emb.weight::scale", torch.full((6,), math.nan)),
            "train_task payload: int8 'emb.weight': scale has NaN",
        ),
        (
            wire_task["world/a"],
            "train_task",
            lambda m, t: m.__setitem__("layout", {}),
            "compact tensors for 'blocks.0.w', not an expected tensor",
        ),
    ]
    for message, kind, edit, error in cases:
        with pytest.raises(WireError, match=error):
            decode_message(kind, _tampered(message, edit))


# --- settings that cannot work ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("leaves", "overrides", "message"),
    [
        (FLAT, ["nodes.world.link.up=int8"], r"nodes\.world\.link: the root has no parent link"),
        (
            TRIO,
            ["nodes.world.secure_aggregation.enabled=true", "nodes.world/t1.link.up=topk"],
            r"nodes\.world/t1\.link\.up: 'topk' cannot be used below world, which has "
            "secure_aggregation",
        ),
        (
            FLAT,
            ["nodes.world.dp.enabled=true", "nodes.world/a.link.up=int8"],
            r"nodes\.world/a\.link\.up: 'int8' .* dp enabled",
        ),
        (
            TRIO,
            ["nodes.world.secure_aggregation.enabled=true", "nodes.world/t0.link.down=bf16"],
            r"nodes\.world/t0\.link\.down: 'bf16' cannot be used",
        ),
        (FLAT, ["nodes.world/a.link.topk_fraction=0"], r"topk_fraction"),
        (FLAT, ["nodes.world/a.link.down=topk"], r"link\.down"),
    ],
)
def test_links_that_cannot_work_are_refused_at_start(
    tmp_path: Path, leaves: dict[str, str], overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _session(tmp_path, leaves, overrides, "refused")


# --- tiny federated runs ------------------------------------------------------------------------


def _session(tmp: Path, leaves: dict[str, str], overrides: list[str], name: str) -> Session:
    config = tiny_config(tmp, leaves, ["train.local_steps=2", *overrides], n_docs=30)
    return open_session(config, QuietProgress(), tmp / name)


def _links(leaves: dict[str, str], setting: str) -> list[str]:
    """`setting` (e.g. "up=int8") on the link of every node but the root."""
    nodes = {p for leaf in leaves for p in _ancestors(leaf)} - {"world"}
    return [f"nodes.{path}.link.{setting}" for path in sorted(nodes)]


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _rounds(session: Session, n: int, first: int = 1) -> tuple[State, list[Record]]:
    root = session.fed.root
    state, records = root.state, []
    for r in range(first, first + n):
        outcome = root.run_round(state, r)
        state = outcome.state
        records += outcome.records
    return state, records


def _aggregates(records: list[Record]) -> list[Record]:
    return [r for r in records if r["kind"] == "aggregate"]


def test_an_int8_uplink_moves_a_quarter_of_the_bytes_and_still_learns(tmp_path: Path) -> None:
    _, plain = _rounds(_session(tmp_path, FLAT, [], "plain"), 2)
    session = _session(tmp_path, FLAT, _links(FLAT, "up=int8"), "int8")
    start = mean_ppl(evaluate_tree(session, session.fed.root.state, 0))
    state, records = _rounds(session, 2)
    assert not [r for r in records if r["kind"] == "rejected"]
    for before, after in zip(_aggregates(plain), _aggregates(records), strict=True):
        assert after["participants"] == before["participants"] == ["world/a", "world/b"]
        assert after["bytes_down"] == before["bytes_down"]  # the downlink is not compressed
        # One byte per value instead of four, plus one float32 scale per row.
        assert 3.5 < before["bytes_up"] / after["bytes_up"] < 4.0
    ppl = mean_ppl(evaluate_tree(session, state, 2))
    assert math.isfinite(ppl) and ppl < start


def _saved_and_loaded(session: Session, tmp: Path, round_index: int) -> tuple[State, Any]:
    tensors, meta = snapshot(session.fed, round_index, 0.0, session.fed.root.ctx.run_id)
    save_checkpoint(tmp, round_index, tensors, meta, keep=2)
    _, tensors, meta = load_latest(tmp)
    return tensors, meta


def test_a_resumed_topk_run_ends_with_the_uninterrupted_model(tmp_path: Path) -> None:
    overrides = [*_links(TWO_LEVEL, "up=topk"), *_links(TWO_LEVEL, "topk_fraction=0.05")]
    whole, _ = _rounds(_session(tmp_path, TWO_LEVEL, overrides, "whole"), 2)

    cut = _session(tmp_path, TWO_LEVEL, overrides, "cut")
    _rounds(cut, 1)  # the root keeps its model, which the checkpoint saves
    tensors, meta = _saved_and_loaded(cut, tmp_path / "checkpoints", 1)
    residuals = {k: v for k, v in tensors.items() if "#link/" in k}
    # Every leaf and sub-federation keeps a residual, and it holds what top-k left out.
    assert {k.split("#")[0] for k in residuals} == {
        f"node/{p}" for leaf in TWO_LEVEL for p in _ancestors(leaf)[1:]
    }
    assert all(float(v.abs().max()) > 0 for v in residuals.values())

    resumed = _session(tmp_path, TWO_LEVEL, overrides, "resumed")
    restore(resumed.fed, tensors, meta)
    final, _ = _rounds(resumed, 1, first=2)
    for key, value in whole.items():
        assert torch.equal(final[key], value), key


def test_the_same_compressed_links_over_grpc_give_the_in_process_model(tmp_path: Path) -> None:
    overrides = [*_links(TWO_LEVEL, "up=int8"), *_links(TWO_LEVEL, "down=int8")]
    reference, records = _rounds(_session(tmp_path, TWO_LEVEL, overrides, "in-process"), 1)
    session = _session(tmp_path, TWO_LEVEL, overrides, "grpc")
    with over_grpc(session, tmp_path / "pki") as transports:
        state, grpc_records = _rounds(session, 1)
    assert all(not t.dropped for t in transports.values())
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    # The bytes counted are the compact tensors', whatever the transport.
    traffic = [(r["node"], r["bytes_down"], r["bytes_up"]) for r in _aggregates(records)]
    assert traffic == [
        (r["node"], r["bytes_down"], r["bytes_up"]) for r in _aggregates(grpc_records)
    ]


def test_a_bf16_uplink_under_secure_aggregation_masks_the_decoded_change(tmp_path: Path) -> None:
    secure = ["nodes.world.secure_aggregation.enabled=true"]
    plain_state, _ = _rounds(_session(tmp_path, TRIO, secure, "plain"), 1)
    session = _session(tmp_path, TRIO, [*secure, *_links(TRIO, "up=bf16")], "bf16")
    start = dict(session.fed.root.state)
    state, records = _rounds(session, 1)
    (row,) = _aggregates(records)
    assert row["status"] == "ok" and row["participants"] == sorted(TRIO)
    assert any(not torch.equal(state[k], v) for k, v in plain_state.items())  # rounded
    # Each change is rounded to bf16 (relative 2^-8) before it is masked: close to plain.
    for key, value in plain_state.items():
        moved = float((value - start[key]).abs().max())
        assert float((state[key] - value).abs().max()) <= 2.0**-7 * moved + 1e-7, key
