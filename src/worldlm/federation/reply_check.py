"""An aggregator's checks of one reply before it is summed (TESTPLAN D16): is it this round's
answer of a child that was asked, and could its tensors be part of the model it was sent."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from worldlm.core.chunked import ChunkBuffers, change_norm, state_squares, sum_of_squares
from worldlm.core.messages import TrainTask, Update
from worldlm.errors import UpdateRejected

HALF = (torch.bfloat16, torch.float16)


def check_reply(
    update: Update,
    tasks: dict[str, TrainTask],
    answered: set[str],
    round_keys: set[str] | None,
    max_change: float,
    reference_norms: dict[int, dict[str, float]] | None = None,
    buffers: ChunkBuffers | None = None,
    *,
    measure: bool = True,
    weight_bounds: Mapping[str, float] | None = None,
) -> float | None:
    """Refuse a reply that is not this round's answer of its sender, or whose tensors could
    not be part of the model it was sent (TESTPLAN D16). Each refusal names its check.
    Returns the L2 norm of the change the reply makes to the model it was sent; with
    `measure=False` (nothing records it) None, unless the reply needed measuring to decide.
    `reference_norms` caches the squared norms of the models sent, across one round's replies;
    `buffers` are the round's chunk buffers (`core.chunked`). `weight_bounds` are the most
    tokens each child may claim in a round (`weight_bounds.round_weight_bounds`); a weight or
    scale outside [1, bound] is refused (without bounds, [1, inf))."""
    buffers = ChunkBuffers() if buffers is None else buffers
    task = tasks.get(update.sender)
    if task is None:
        raise UpdateRejected(update.sender, "not selected this round")
    if update.sender in answered:
        raise UpdateRejected(update.sender, "duplicate reply")
    if update.round != task.round or update.nonce != task.nonce:
        raise UpdateRejected(update.sender, "reply to another round or task")
    bound = math.inf if weight_bounds is None else weight_bounds.get(update.sender, math.inf)
    for name, claimed in (("weight", update.weight), ("scale", update.scale)):
        # `not <=` refuses NaN too; below 1 a reply would count toward min_replies unweighted,
        # and a tiny scale divides the sum into infinity.
        if not 1.0 <= claimed <= bound:
            raise UpdateRejected(
                update.sender,
                f"{name} {claimed:g} is outside [1, {bound:g}], the tokens its subtree can train "
                "in one round",
            )
    sent = task.state
    if not update.state.keys() <= sent.keys():
        extra = sorted(update.state.keys() - sent.keys())
        raise UpdateRejected(update.sender, f"parameter names the model does not have: {extra}")
    if round_keys is not None and set(update.state) != round_keys:
        missing = sorted(round_keys - update.state.keys())
        raise UpdateRejected(
            update.sender,
            f"parameter names differ from this round's other replies (missing {missing})",
        )
    for key, value in update.state.items():
        reference = sent[key]
        if value.shape != reference.shape:
            raise UpdateRejected(
                update.sender,
                f"{key}: shape {tuple(value.shape)}, expected {tuple(reference.shape)}",
            )
        # A forwarded sum travels in float64, or in float32 for a half-precision model
        # (train.precision = "bf16"); anything else comes in the model's own dtype.
        allowed = {reference.dtype, torch.float64}
        if reference.dtype in HALF and update.scale != 1.0:
            allowed.add(torch.float32)
        if value.dtype not in allowed:
            raise UpdateRejected(
                update.sender, f"{key}: dtype {value.dtype}, expected {reference.dtype}"
            )
    sent_norms = reference_norms.setdefault(id(sent), {}) if reference_norms is not None else {}
    for key in update.state:
        # The model sent is the same for many replies: once each. (Its float32 dot products
        # make a model with values beyond about 1e19 infinitely large: nothing exceeds it.)
        if key not in sent_norms:
            sent_norms[key] = sum_of_squares(sent[key], 1.0, buffers)
    norm = math.sqrt(sum(sent_norms[key] for key in update.state))
    if not measure and _surely_within(update, norm, max_change, buffers):
        return None
    change = math.sqrt(_measured_change(update, sent, buffers))
    if norm > 0 and change > max_change * norm:  # (a zero model: no scale)
        raise UpdateRejected(
            update.sender,
            f"the update moves the model by {change:.3g}, more than max_change "
            f"{max_change:g} times the model's norm {norm:.3g}",
        )
    return change


def _surely_within(update: Update, norm: float, max_change: float, buffers: ChunkBuffers) -> bool:
    """True when the reply is finite and ||reply|| + ||sent|| <= max_change ||sent||: by the
    triangle inequality its change is then within the bound, and this reads the reply alone
    (half the bytes of measuring the change). False sends the reply to the exact measure,
    which also names the tensor of a refusal."""
    squares = state_squares(list(update.state.values()), update.scale, buffers)
    if not math.isfinite(squares):  # a NaN, an infinity, or squares beyond float32
        return False
    if norm == 0:  # a zero model has no scale to bound a change by: finiteness is all
        return True
    # Each chunk's float32 dot product is within 2^18 float32 roundings of its true sum of
    # squares (1.6%, a bound far above the error seen): 2% of margin keeps the shortcut sound.
    return math.sqrt(squares * 1.02) + norm <= max_change * norm


def _measured_change(update: Update, sent: dict[str, torch.Tensor], buffers: ChunkBuffers) -> float:
    """||reply / scale - sent||², refusing a tensor with NaN or infinite values."""
    change = 0.0
    for key, value in update.state.items():
        # One pass over the reply: the norm of its change is non-finite if any value is NaN
        # or infinite, so it is the finiteness check too. A finite change whose squares
        # overflow float32 (values beyond about 1e19) is refused here too; max_change would
        # refuse it anyway. Which of the two it was is worked out only for the refusal.
        moved = change_norm(value, sent[key], update.scale, buffers)
        if not math.isfinite(moved):
            if bool(torch.isfinite(value).all()):
                raise UpdateRejected(update.sender, f"{key}: a change too large to measure")
            raise UpdateRejected(update.sender, f"{key}: NaN or infinite values")
        change += moved * moved
    return change


def is_abstention(update: Update, tasks: dict[str, TrainTask], answered: set[str]) -> bool:
    """Whether `update` is this round's first answer of a child that was asked and trained
    nothing (weight exactly 0): an inner aggregator whose own round had no valid replies. Any
    other weight below 1 is refused by `check_reply`."""
    task = tasks.get(update.sender)
    return (
        update.weight == 0.0
        and task is not None
        and update.sender not in answered
        and update.round == task.round
        and update.nonce == task.nonce
    )
