"""The round engine's messages as wire payloads and back, for transports that cross machines.

One message is one `wire` payload. Tensors travel under prefixed names (`state/<param>`,
`routed/<i>/<param>/U|V`, `residual/<param>/U|V`) and keep their dtype; every other field is
in the JSON metadata, which also names the message kind. Secure aggregation's messages are
kinds of their own (`secure_codec`); its first request carries a train_task's fields too. The
bytes come from another machine, so decoding trusts nothing: the body size is checked against
the caller's limit before anything is allocated, then every metadata field and tensor name is
checked before a message is built.
On a compressed link (`compression`), `state/` holds compact tensors (`<param>::<part>`) and
the `encoding` field names the codec. A compressed train task is decoded here, on arrival,
into the weights it carries (its compact tensors are checked against its `layout`); an update
stays compact, for its parent to decode against the weights it sent.
Nothing here unpickles or evaluates. Tensor values are not checked: the aggregator does that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from worldlm import wire
from worldlm.compression.link import decode_task
from worldlm.compression.registry import UP_CODECS
from worldlm.core.messages import (
    EvalReport,
    EvalResult,
    EvalTask,
    Layout,
    Record,
    Residual,
    RoutedResidual,
    SignedStatement,
    State,
    TaskRefusal,
    TrainTask,
    Update,
)
from worldlm.core.secure_messages import SecureReply, SecureSetup, SecureStage, TrainedKeys
from worldlm.errors import WireError, shown
from worldlm.transport import secure_codec
from worldlm.transport.fields import (
    array,
    boolean,
    check_json,
    finite,
    integer,
    json_object,
    node_path,
    number,
    text,
)

__all__ = ["Message", "decode_message", "encode_message"]

Message = (
    TrainTask
    | EvalTask
    | Update
    | EvalReport
    | SecureSetup
    | SecureStage
    | SecureReply
    | TaskRefusal
)

_STATE, _ROUTED, _RESIDUAL = "state/", "routed/", "residual/"
_FACTORS = ("U", "V")

# Metadata fields of each kind (besides "kind" itself) and the tensor prefixes it may carry.
_FIELDS: dict[str, tuple[str, ...]] = {
    "train_task": (
        "run_id",
        "round",
        "global_round",
        "sender",
        "recipient",
        "nonce",
        "routed",
        "encoding",
        "layout",
        "signatures",
    ),
    "eval_task": (
        "run_id",
        "global_round",
        "sender",
        "recipient",
        "nonce",
        "deployed",
        "signatures",
    ),
    "update": (
        "sender",
        "round",
        "nonce",
        "weight",
        "scale",
        "records",
        "encoding",
        "topk_fraction",
    ),
    "eval_report": ("sender", "nonce", "results"),
    "task_refusal": ("sender", "nonce", "reason"),
}
_FIELDS.update(secure_codec.FIELDS)
_FIELDS["secagg_setup"] = (*_FIELDS["train_task"], *secure_codec.SETUP_FIELDS)
_FIELDS["secagg_trained"] += ("records",)
_PREFIXES: dict[str, tuple[str, ...]] = {
    "train_task": (_STATE, _ROUTED),
    "eval_task": (_STATE,),
    "update": (_STATE, _RESIDUAL),
    "eval_report": (),
    "task_refusal": (),
}
_PREFIXES.update(secure_codec.PREFIXES)
_PREFIXES["secagg_setup"] += _PREFIXES["train_task"]
_PREFIXES["secagg_trained"] += (_RESIDUAL,)


def encode_message(message: Message) -> tuple[str, bytes]:
    """The message's kind and its one wire payload; refuses what `decode_message` would refuse."""
    kind, parts = encode_message_parts(message)
    return kind, b"".join(parts)


def encode_message_parts(
    message: Message, *, body_digest: bool = True
) -> tuple[str, list[wire.Buffer]]:
    """Like `encode_message`, but the payload as buffers that share the tensors' memory, for a
    link to stream without a copy (`wire.encode_parts`). `body_digest=False` is for a link that
    digests the whole payload itself."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(message, EvalTask):
        tensors.update(_prefixed(_STATE, message.state))
    if isinstance(message, TrainTask):
        kind = "train_task"
        meta: dict[str, Any] = _train_task_parts(message, tensors)
    elif isinstance(message, SecureSetup | SecureStage | SecureReply):
        kind, own, meta = secure_codec.encode(message)
        tensors.update(own)
        if isinstance(message, SecureSetup):
            meta.update(_train_task_parts(message.task, tensors))
        if isinstance(message, SecureReply) and isinstance(message.body, TrainedKeys):
            for i, record in enumerate(message.body.records):
                check_json(f"{kind} field records[{i}]", record)
            meta["records"] = message.body.records
            tensors.update(_factor_tensors(_RESIDUAL, message.body.residual))
    elif isinstance(message, EvalTask):
        kind = "eval_task"
        meta = {
            "run_id": message.run_id,
            "global_round": message.global_round,
            "sender": message.sender,
            "recipient": message.recipient,
            "nonce": message.nonce,
            "deployed": message.deployed,
            "signatures": _signature_fields(message.signatures),
        }
    elif isinstance(message, Update):
        kind = "update"
        for i, record in enumerate(message.records):
            check_json(f"update field records[{i}]", record)
        meta = {
            "sender": message.sender,
            "round": message.round,
            "nonce": message.nonce,
            "weight": message.weight,
            "scale": message.scale,
            "records": message.records,
            "encoding": message.encoding,
            "topk_fraction": message.topk_fraction,
        }
        tensors.update(_prefixed(_STATE, message.state))
        tensors.update(_factor_tensors(_RESIDUAL, message.residual))
    elif isinstance(message, EvalReport):
        kind = "eval_report"
        meta = {
            "sender": message.sender,
            "nonce": message.nonce,
            "results": [
                {"name": name, "loss": r.loss, "tokens": r.tokens}
                for name, r in message.results.items()
            ],
        }
    elif isinstance(message, TaskRefusal):
        kind = "task_refusal"
        meta = {"sender": message.sender, "nonce": message.nonce, "reason": message.reason}
    else:
        raise WireError(f"cannot encode a {type(message).__name__}: it is not a message")
    # The receiver runs the same checks; failing here names the field on the side that has it.
    _read_fields(kind, meta)
    return kind, wire.encode_parts(tensors, {"kind": kind, **meta}, body_digest=body_digest)[0]


def decode_message(
    kind: str,
    payload: bytes | bytearray | memoryview,
    *,
    max_bytes: int | None = None,
    copy: bool = True,
    verify_body: bool = True,
) -> Message:
    """The message in `payload`, which must be of `kind`; any malformed part raises `WireError`.

    `max_bytes` bounds the body size the payload declares, checked before allocation. With
    `copy=False` the tensors share the payload's memory (a buffer the caller gives up).
    `verify_body=False` trusts a digest the caller checked over the whole payload."""
    if kind not in _FIELDS:
        raise WireError(f"unknown message kind {kind!r}; expected one of {sorted(_FIELDS)}")
    tensors, meta = wire.decode(payload, max_bytes=max_bytes, copy=copy, verify_body=verify_body)
    sent = meta.get("kind")
    if sent != kind:
        what = "names no message kind" if sent is None else f"is of kind {sent!r}"
        raise WireError(f"payload {what}, expected {kind!r}")
    fields = _read_fields(kind, {k: v for k, v in meta.items() if k != "kind"})
    routed_meta: list[tuple[str, float]] = fields.get("routed", [])
    groups = _sort_tensors(kind, tensors, len(routed_meta))
    if kind == "train_task":
        return _train_task(kind, fields, groups)
    if kind == "secagg_setup":
        setup = secure_codec.read_setup(fields, groups.other.get(secure_codec.OWN, {}))
        return SecureSetup(_train_task(kind, fields, groups), setup, fields["dp_clip"])
    if kind == "secagg_trained":
        keys = secure_codec.read_keys(fields["sender"], groups.other.get(secure_codec.OWN, {}))
        residual = _pair(kind, "residual", groups.residual)
        trained = TrainedKeys(keys, fields["weight"], fields["names"], fields["records"], residual)
        return SecureReply(fields["sender"], fields["nonce"], trained)
    if kind in secure_codec.FIELDS:
        return secure_codec.decode(kind, fields, groups.other)
    if kind == "eval_task":
        return EvalTask(
            fields["run_id"],
            fields["global_round"],
            fields["sender"],
            fields["recipient"],
            fields["nonce"],
            groups.state,
            fields["deployed"],
            fields["signatures"],
        )
    if kind == "update":
        return Update(
            fields["sender"],
            fields["round"],
            fields["nonce"],
            groups.state,
            fields["weight"],
            fields["records"],
            fields["scale"],
            _pair(kind, "residual", groups.residual),
            fields["encoding"],
            fields["topk_fraction"],
        )
    if kind == "task_refusal":
        return TaskRefusal(fields["sender"], fields["nonce"], fields["reason"])
    return EvalReport(fields["sender"], fields["nonce"], fields["results"])


# --- encoding helpers ---------------------------------------------------------------------------


def _train_task_parts(task: TrainTask, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A train task's metadata; its tensors go into `tensors`."""
    tensors.update(_prefixed(_STATE, task.state))
    for i, routed in enumerate(task.routed):
        tensors.update(_factor_tensors(f"{_ROUTED}{i}/", routed.residual))
    return {
        "run_id": task.run_id,
        "round": task.round,
        "global_round": task.global_round,
        "sender": task.sender,
        "recipient": task.recipient,
        "nonce": task.nonce,
        "routed": [{"source": r.source, "weight": r.weight} for r in task.routed],
        "encoding": task.encoding,
        "layout": {name: [dtype, list(shape)] for name, (dtype, shape) in task.layout.items()},
        "signatures": _signature_fields(task.signatures),
    }


def _signature_fields(signatures: tuple[SignedStatement, ...]) -> list[dict[str, str]]:
    return [
        {
            "statement": s.statement,
            "signature": s.signature.hex(),
            "certificate": s.certificate.decode("ascii"),
        }
        for s in signatures
    ]


def _train_task(kind: str, fields: Mapping[str, Any], groups: _Groups) -> TrainTask:
    routed = tuple(
        RoutedResidual(source, weight, _pair(kind, f"routed[{i}]", groups.routed.get(i, {})))
        for i, (source, weight) in enumerate(fields["routed"])
    )
    for i, entry in enumerate(routed):
        if not entry.residual:
            raise WireError(f"{kind} field routed[{i}] has no factor tensors")
    task = TrainTask(
        fields["run_id"],
        fields["round"],
        fields["global_round"],
        fields["sender"],
        fields["recipient"],
        fields["nonce"],
        groups.state,
        routed,
        fields["encoding"],
        fields["layout"],
        fields["signatures"],
    )
    try:
        return decode_task(task)  # the child trains from the weights; check them here
    except WireError as exc:
        raise WireError(f"{kind} payload: {exc}") from None


def _prefixed(prefix: str, state: State) -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in state.items()}


def _factor_tensors(prefix: str, residual: Residual) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for param, factors in residual.items():
        for which, tensor in zip(_FACTORS, factors, strict=True):
            out[f"{prefix}{param}/{which}"] = tensor
    return out


# --- metadata checks ----------------------------------------------------------------------------


def _read_fields(kind: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Every field `kind` needs, type-checked and normalised; no more, no fewer."""
    expected = _FIELDS[kind]
    missing = [name for name in expected if name not in meta]
    if missing:
        raise WireError(f"{kind} payload lacks field {missing[0]!r}")
    unknown = sorted(set(meta) - set(expected))
    if unknown:
        raise WireError(f"{kind} payload has unknown field {unknown[0]!r}")
    return {name: _CHECKS[name](f"{kind} field {name}", meta[name]) for name in expected}


def _routed(where: str, value: Any) -> list[tuple[str, float]]:
    out = []
    for i, item in enumerate(array(where, value)):
        entry = json_object(f"{where}[{i}]", item, ("source", "weight"))
        out.append(
            (
                node_path(f"{where}[{i}].source", entry["source"]),
                finite(f"{where}[{i}].weight", entry["weight"]),
            )
        )
    return out


def _encoding(where: str, value: Any) -> str:
    name = text(where, value)
    if name not in UP_CODECS:
        raise WireError(f"{where} is {shown(repr(name))}, not one of {', '.join(UP_CODECS)}")
    return name


def _topk_fraction(where: str, value: Any) -> float | None:
    if value is None:
        return None
    fraction = finite(where, value)
    if not 0.0 < fraction <= 1.0:
        raise WireError(f"{where} must be in (0, 1], got {fraction}")
    return fraction


def _layout(where: str, value: Any) -> Layout:
    """name -> (dtype, shape) of each weight a compressed train task decodes to."""
    out: Layout = {}
    for name, entry in json_object(where, value).items():
        pair = array(f"{where}[{name!r}]", entry)
        if len(pair) != 2:
            raise WireError(f"{where}[{name!r}] must be [dtype, shape]")
        dtype = text(f"{where}[{name!r}] dtype", pair[0])
        if dtype not in wire.DTYPES:
            raise WireError(f"{where}[{name!r}] has unknown dtype {dtype!r}")
        shape = [integer(f"{where}[{name!r}] shape", n) for n in array(where, pair[1])]
        if any(n < 0 for n in shape):
            raise WireError(f"{where}[{name!r}] has a negative dimension: {shape}")
        out[name] = (dtype, tuple(shape))
    return out


def _records(where: str, value: Any) -> list[Record]:
    return [json_object(f"{where}[{i}]", item) for i, item in enumerate(array(where, value))]


# A chain has one statement per level of the tree; a statement lists a digest per tensor.
_MAX_SIGNATURES = 16
_MAX_STATEMENT = 4 << 20
_MAX_CERTIFICATE = 16 << 10


def _signatures(where: str, value: Any) -> tuple[SignedStatement, ...]:
    items = array(where, value)
    if len(items) > _MAX_SIGNATURES:
        raise WireError(f"{where} has {len(items)} statements, more than {_MAX_SIGNATURES}")
    out = []
    for i, item in enumerate(items):
        entry = json_object(f"{where}[{i}]", item, ("statement", "signature", "certificate"))
        statement, signature, certificate = (
            entry["statement"],
            entry["signature"],
            entry["certificate"],
        )
        if not all(isinstance(v, str) for v in (statement, signature, certificate)):
            raise WireError(f"{where}[{i}]: statement, signature and certificate are strings")
        if len(statement) > _MAX_STATEMENT or len(certificate) > _MAX_CERTIFICATE:
            raise WireError(f"{where}[{i}] is longer than a signed statement can be")
        if len(signature) > 512:
            raise WireError(f"{where}[{i}].signature is longer than a signature can be")
        try:
            raw = bytes.fromhex(signature)
            pem = certificate.encode("ascii")
        except (ValueError, UnicodeEncodeError):
            raise WireError(f"{where}[{i}]: signature or certificate is malformed") from None
        out.append(SignedStatement(statement, raw, pem))
    return tuple(out)


def _results(where: str, value: Any) -> dict[str, EvalResult]:
    out: dict[str, EvalResult] = {}
    for i, item in enumerate(array(where, value)):
        entry = json_object(f"{where}[{i}]", item, ("name", "loss", "tokens"))
        name = node_path(f"{where}[{i}].name", entry["name"])
        if name in out:
            raise WireError(f"{where}[{i}].name repeats {name!r}")
        # A diverged model's loss may be NaN or inf: that is a result to report, not malformed.
        loss = number(f"{where}[{i}].loss", entry["loss"])
        tokens = integer(f"{where}[{i}].tokens", entry["tokens"])
        if tokens < 0:
            raise WireError(f"{where}[{i}].tokens must not be negative, got {tokens}")
        out[name] = EvalResult(loss, tokens)
    return out


# One checker per field name: a field means the same thing in every kind that has it.
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "run_id": text,
    "round": integer,
    "global_round": integer,
    "sender": node_path,
    "recipient": node_path,
    "nonce": text,
    "weight": finite,
    "scale": finite,
    "routed": _routed,
    "records": _records,
    "results": _results,
    "signatures": _signatures,
    "deployed": boolean,
    "encoding": _encoding,
    "layout": _layout,
    "topk_fraction": _topk_fraction,
    **secure_codec.CHECKS,
}


# --- tensor names -------------------------------------------------------------------------------

_Halves = dict[str, dict[str, torch.Tensor]]  # param -> {"U": ..., "V": ...}, possibly incomplete


@dataclass
class _Groups:
    state: State = field(default_factory=dict)
    residual: _Halves = field(default_factory=dict)
    routed: dict[int, _Halves] = field(default_factory=dict)
    other: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # prefix -> rest


def _sort_tensors(kind: str, tensors: Mapping[str, torch.Tensor], n_routed: int) -> _Groups:
    """Tensors by the field they belong to; a name `kind` cannot carry is refused."""
    groups = _Groups()
    allowed = _PREFIXES[kind]
    for name, tensor in tensors.items():
        prefix = next((p for p in allowed if name.startswith(p)), None)
        rest = name[len(prefix) :] if prefix else ""
        if prefix is None or not rest:
            raise WireError(f"{kind} payload carries unexpected tensor {name!r}")
        if prefix == _STATE:
            groups.state[rest] = tensor
        elif prefix == _RESIDUAL:
            _add_half(groups.residual, name, rest, tensor)
        elif prefix != _ROUTED:
            groups.other.setdefault(prefix, {})[rest] = tensor
        else:
            index_text, _, rest = rest.partition("/")
            # Canonical decimal only, so "routed/01/..." cannot alias "routed/1/...".
            if not (index_text.isascii() and index_text.isdigit()) or (
                str(int(index_text)) != index_text
            ):
                raise WireError(f"{kind} payload tensor {name!r} has no valid routed index")
            index = int(index_text)
            if index >= n_routed:
                raise WireError(
                    f"{kind} payload tensor {name!r} belongs to routed[{index}], but field "
                    f"'routed' lists {n_routed} entries"
                )
            _add_half(groups.routed.setdefault(index, {}), name, rest, tensor)
    return groups


def _add_half(halves: _Halves, name: str, rest: str, tensor: torch.Tensor) -> None:
    param, _, which = rest.rpartition("/")
    if not param or which not in _FACTORS:
        raise WireError(f"factor tensor {name!r} is not named <param>/U or <param>/V")
    halves.setdefault(param, {})[which] = tensor


def _pair(kind: str, label: str, halves: _Halves) -> Residual:
    """Complete (U, V) pairs of matching rank, in the order they arrived."""
    residual: Residual = {}
    for param, half in halves.items():
        for which in _FACTORS:
            if which not in half:
                raise WireError(f"{kind} field {label}: factors of {param!r} lack {which}")
        left, right = half["U"], half["V"]
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[1]:
            raise WireError(
                f"{kind} field {label}: factors of {param!r} have shapes "
                f"{tuple(left.shape)} and {tuple(right.shape)}, not (m, r) and (n, r)"
            )
        residual[param] = (left, right)
    return residual
