"""Compression on one link of the tree, at both of its ends.

Uplink (child -> parent): a child sends its change to the model it was sent,
`delta = state / scale - sent` (per floating tensor, in at least float32), as compact tensors,
with its `scale`; a lossy codec keeps an error-feedback residual at the child (`Uplink`). The
parent rebuilds `(sent + delta) * scale` (`decode_update`) before it checks the reply, so every
check of a plain reply still runs, and counts the compact bytes as what crossed the link.

Downlink (parent -> child): the parent casts or quantizes the absolute weights of a task
(`ChildLinks.send`) and the child decodes them before it trains (`decode_task`). The parent
decodes its own compact tensors too: a reply's change is relative to the weights the child
actually trained from, and decoding is deterministic, so both ends agree on them exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from worldlm import wire
from worldlm.compression.base import TensorCodec, split_compact
from worldlm.compression.feedback import ErrorFeedback
from worldlm.compression.registry import DOWN_CODECS, NONE, TOPK, make_codec
from worldlm.config import LinkConfig
from worldlm.core.messages import Layout, State, TrainTask, Update
from worldlm.errors import UpdateRejected, WireError

_DTYPE_NAMES = {dtype: name for name, dtype in wire.DTYPES.items()}


def update_delta(update: Update, sent: State) -> State:
    """The reply's change to the model it was sent, `state / scale - sent`, per floating tensor
    in at least float32; any other tensor (or one that was not sent) whole."""
    delta: State = {}
    for name, value in update.state.items():
        reference = sent.get(name)
        if reference is None or not value.is_floating_point():
            delta[name] = value  # the parent refuses a tensor it did not send, as before
            continue
        model = value.double() / update.scale if update.scale != 1.0 else value.double()
        dtype = torch.promote_types(reference.dtype, torch.float32)
        delta[name] = (model - reference.double()).to(dtype)
    return delta


class Uplink:
    """A child's end of the link to its parent: compresses its replies and keeps the
    error-feedback residual of a lossy codec (its state, saved in checkpoints)."""

    def __init__(self, config: LinkConfig) -> None:
        self.config = config
        self.codec: TensorCodec | None = (
            None if config.up == NONE else make_codec(config.up, config.topk_fraction)
        )
        self.feedback = ErrorFeedback() if self.codec and config.error_feedback else None

    def encode(self, update: Update, sent: State) -> Update:
        """The reply as it crosses the link: `update` itself, or its compressed change to
        `sent` (the decoded weights the child trained from)."""
        if self.codec is None:
            return update
        delta = update_delta(update, sent)
        if self.feedback is not None:
            compact = self.feedback.compress(self.codec, delta)
        else:
            compact = self.codec.compress(delta)
        fraction = self.config.topk_fraction if self.config.up == TOPK else None
        return replace(update, state=compact, encoding=self.config.up, topk_fraction=fraction)

    def state_dict(self) -> State:
        return self.feedback.state_dict() if self.feedback is not None else {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.feedback is not None:
            self.feedback.load_state_dict(state)


def decode_update(update: Update, sent: State) -> Update:
    """A plain update from a compressed one: `(sent + delta) * scale` per tensor (in float64
    when scale is not 1, as a forwarded sum travels; else in the sent dtype). `WireError` if
    the compact tensors are not exactly what the codec sends for tensors of `sent`."""
    if update.encoding == NONE:
        if update.topk_fraction is not None:
            raise WireError("an uncompressed update carries a topk_fraction")
        return update
    codec = make_codec(update.encoding, update.topk_fraction)
    if update.encoding != TOPK and update.topk_fraction is not None:
        raise WireError(f"a {update.encoding} update carries a topk_fraction")
    names = split_compact(update.state).keys()
    unknown = sorted(names - sent.keys())
    if unknown:
        raise WireError(f"compact tensors for {unknown[0]!r}, which the model it was sent lacks")
    delta = codec.decompress(update.state, {k: v for k, v in sent.items() if k in names})
    state = {name: _rebuild(sent[name], d, update.scale) for name, d in delta.items()}
    return replace(update, state=state, encoding=NONE, topk_fraction=None)


def _rebuild(reference: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    if not reference.is_floating_point():
        return delta  # sent whole
    value = reference.double() + delta.double()
    return value.to(reference.dtype) if scale == 1.0 else value * scale


def encode_weights(state: State, codec_name: str) -> tuple[dict[str, torch.Tensor], Layout]:
    """A downlink's compact tensors of `state` and the layout the child decodes them to."""
    layout = {k: (_DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in state.items()}
    return make_codec(codec_name).compress(state), layout


def decode_task(task: TrainTask) -> TrainTask:
    """The task with the weights it carries decoded (a task that is not compressed as is);
    `WireError` if its compact tensors do not match its codec and layout."""
    if task.encoding == NONE:
        if task.layout:
            raise WireError("an uncompressed train task carries a layout")
        return task
    if task.encoding not in DOWN_CODECS:
        raise WireError(
            f"train task encoding {task.encoding!r}; weights sent down are compressed with "
            f"one of {', '.join(DOWN_CODECS[1:])}"
        )
    like: State = {}
    for name, (dtype, shape) in task.layout.items():
        if dtype not in wire.DTYPES or any(n < 0 for n in shape):
            raise WireError(f"train task layout of {name!r}: dtype {dtype!r}, shape {shape}")
        # Meta tensors: a dtype and a shape to check against, no memory.
        like[name] = torch.empty(shape, dtype=wire.DTYPES[dtype], device="meta")
    state = make_codec(task.encoding).decompress(task.state, like)
    return replace(task, state=state, encoding=NONE, layout={})


class ChildLinks:
    """A parent's ends of the links to its children, each configured by that child
    (`nodes.<child>.link`)."""

    def __init__(self, links: Mapping[str, LinkConfig]) -> None:
        self.links = dict(links)

    def link(self, child: str) -> LinkConfig:
        return self.links.get(child, _PLAIN)

    def send(
        self, tasks: Mapping[str, TrainTask]
    ) -> tuple[dict[str, TrainTask], dict[str, TrainTask]]:
        """(the tasks as they cross the links, the tasks as each child decodes them). Children
        sent the same weights with the same codec share one encoding and its decoding."""
        wire_tasks: dict[str, TrainTask] = {}
        seen: dict[str, TrainTask] = {}
        done: dict[tuple[int, str], tuple[dict[str, torch.Tensor], Layout, State]] = {}
        for child, task in tasks.items():
            down = self.link(child).down
            if down == NONE:
                wire_tasks[child] = seen[child] = task
                continue
            key = (id(task.state), down)  # the tasks hold their states: ids stay unique
            if key not in done:
                compact, layout = encode_weights(task.state, down)
                decoded = make_codec(down).decompress(compact, task.state)
                done[key] = (compact, layout, decoded)
            compact, layout, decoded = done[key]
            wire_tasks[child] = replace(task, state=compact, encoding=down, layout=layout)
            seen[child] = replace(task, state=decoded)
        return wire_tasks, seen

    def receive(self, update: Update, seen: Mapping[str, TrainTask]) -> Update:
        """The plain update of a reply as it crossed the link; `UpdateRejected` if it is not
        compressed as its link is configured, or its compact tensors are malformed."""
        task = seen.get(update.sender)
        if task is None:
            return update  # not selected this round: `check_reply` refuses it by its sender
        link = self.link(update.sender)
        fraction = link.topk_fraction if link.up == TOPK else None
        if (update.encoding, update.topk_fraction) != (link.up, fraction):
            got = update.encoding + (f" {update.topk_fraction}" if update.topk_fraction else "")
            want = link.up + (f" {fraction}" if fraction else "")
            raise UpdateRejected(update.sender, f"compressed with {got}, the link with {want}")
        try:
            return decode_update(update, task.state)
        except WireError as exc:
            raise UpdateRejected(update.sender, f"malformed compressed reply: {exc}") from None


_PLAIN = LinkConfig()
