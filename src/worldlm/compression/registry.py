"""Codec names as the config and the wire spell them, and the codec each one builds."""

from __future__ import annotations

from worldlm.compression.base import TensorCodec
from worldlm.compression.cast import bf16, fp16
from worldlm.compression.int8 import Int8Codec
from worldlm.compression.topk import TopKCodec
from worldlm.errors import WireError

NONE = "none"  # no codec: a reply carries the model itself, a task the weights themselves
TOPK = "topk"
UP_CODECS = (NONE, "bf16", "fp16", "int8", TOPK)  # child -> parent: changes to the model
DOWN_CODECS = (NONE, "bf16", "fp16", "int8")  # parent -> child: absolute weights, no top-k


def make_codec(name: str, topk_fraction: float | None = None) -> TensorCodec:
    """The codec called `name` (not "none"); top-k needs its fraction."""
    if name == "bf16":
        return bf16()
    if name == "fp16":
        return fp16()
    if name == "int8":
        return Int8Codec()
    if name == TOPK:
        if topk_fraction is None or not 0.0 < topk_fraction <= 1.0:
            raise WireError(f"topk needs a fraction in (0, 1], got {topk_fraction}")
        return TopKCodec(topk_fraction)
    raise WireError(f"unknown codec {name!r}; expected one of {', '.join(UP_CODECS[1:])}")
