"""How the Ray backend's messages cross Ray's object store: weights as NumPy byte arrays, calls
in batches.

Ray pickles a torch tensor (a copy into the pickle, another out of it) but maps a NumPy array
out of its shared-memory object store without copying. A state therefore crosses as one
`uint8` array per tensor plus its dtype and shape, which keeps every dtype (bfloat16 has no
NumPy type) and every bit. The receiving side copies each array once into memory of its own:
the store's pages are read-only, and the engine may write into what it receives (DP clipping,
sums in place).

An actor answers a batch of calls at once (`answer_batch`): one round trip through Ray for
several leaves' tasks instead of one each. A WorldLM error raised for one message of a batch
comes back as that message's answer (`Raised`) and is raised by the driver at its turn, as
with one call per message; any other exception fails the whole batch (and the run, as a
failed call did). Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from worldlm.core.messages import EvalTask, State, TrainTask, Update
from worldlm.errors import TransportError, WorldLMError, shown

# name -> (the tensor's bytes, its dtype's name in torch, its shape)
Packed = dict[str, tuple[np.ndarray, str, tuple[int, ...]]]


def pack_state(state: State) -> Packed:
    """`state` as byte arrays that share the tensors' memory where they are contiguous CPU
    tensors (Ray copies them into its store once)."""
    packed: Packed = {}
    for name, tensor in state.items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        packed[name] = (flat.view(torch.uint8).numpy(), str(flat.dtype), tuple(tensor.shape))
    return packed


def unpack_state(packed: Packed) -> State:
    """The tensors of `pack_state`, bit for bit, each in writable memory of its own."""
    state: State = {}
    for name, (raw, dtype, shape) in packed.items():
        kind = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(kind, torch.dtype):
            raise TransportError(f"a packed tensor {shown(name)!r} names no dtype: {shown(dtype)}")
        if raw.size == 0:  # (a view of no bytes has no stride to reinterpret)
            state[name] = torch.empty(shape, dtype=kind)
            continue
        owned = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True))
        state[name] = owned.view(kind).reshape(shape)
    return state


def packed_bytes(packed: Packed) -> int:
    return sum(raw.nbytes for raw, _, _ in packed.values())


@dataclass(frozen=True)
class Raised:
    """A WorldLM error raised while answering one message of a batch."""

    error: WorldLMError


@dataclass(frozen=True)
class PackedReply:
    """An `Update` whose state travels packed."""

    update: Update
    state: Packed


def unpack_reply(answer: Any) -> Any:
    """A batch's answer for one message, as the handler returned it (or its error, raised)."""
    if isinstance(answer, Raised):
        raise answer.error
    if isinstance(answer, PackedReply):
        return replace(answer.update, state=unpack_state(answer.state))
    return answer


def answer_batch(
    handle: Callable[[str, Any], Any],
    method: str,
    calls: Sequence[tuple[Any, int | None]],
    models: Sequence[Packed],
) -> list[Any]:
    """Each call's answer, in order: `handle(method, message)` with the message's model (the
    `models` entry it names, None for a message that carries its own) in memory of its own,
    unpacked once for all the calls that name it: the messages of a batch share it, as the
    messages of an in-process round share the one model their parent sends (a leaf reads what
    it is sent, never writes into it)."""
    answers: list[Any] = []
    unpacked: dict[int, State] = {}
    for message, index in calls:
        try:
            if index is not None and isinstance(message, TrainTask | EvalTask):
                if index not in unpacked:
                    unpacked[index] = unpack_state(models[index])
                message = replace(message, state=unpacked[index])
            reply = handle(method, message)
        except WorldLMError as exc:
            answers.append(Raised(exc))
            continue
        if isinstance(reply, Update):
            reply = PackedReply(replace(reply, state={}), pack_state(reply.state))
        answers.append(reply)
    return answers
