"""Error feedback: the sender remembers what lossy compression left out and sends it later.

Per tensor, with e the residual (zero at first) and C the codec:

    target = delta + e;   sent = decompress(compress(target));   e <- target - sent

so after any number of replies the sum of everything sent plus e equals the sum of every delta:
nothing is lost for good, only delayed (Seide et al. 2014 "1-bit SGD"; Karimireddy et al.
2019 "Error feedback fixes SignSGD"). For top-k and int8 the update of e is exact in floating
point: a top-k entry is either sent whole or kept whole, and an int8 value is within a factor
two of its target whenever it is not zero (Sterbenz), so `target - sent` rounds nothing.

The residual is the sender's state: it is saved in checkpoints and restored on resume.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from worldlm.compression.base import TensorCodec

State = dict[str, torch.Tensor]


def feedback_step(
    codec: TensorCodec, delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], State]:
    """(compact tensors to send, new residual) for `delta` given the old `residual`. Residuals
    of tensors not in `delta` are kept for a later reply."""
    target = {
        name: x + residual[name] if _carries(residual.get(name), x) else x
        for name, x in delta.items()
    }
    compact = codec.compress(target)
    sent = codec.decompress(compact, target)
    new = dict(residual)
    for name, x in target.items():
        if x.is_floating_point():
            new[name] = x - sent[name]
    return compact, new


def _carries(residual: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether a kept residual applies to x (the same floating tensor as before)."""
    return (
        residual is not None
        and x.is_floating_point()
        and residual.shape == x.shape
        and residual.dtype == x.dtype
    )


class ErrorFeedback:
    """The residual of one sender across its replies."""

    def __init__(self) -> None:
        self.residual: State = {}

    def compress(
        self, codec: TensorCodec, delta: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        compact, self.residual = feedback_step(codec, delta, self.residual)
        return compact

    def state_dict(self) -> State:
        return dict(self.residual)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.residual = {k: v.clone() for k, v in state.items()}
