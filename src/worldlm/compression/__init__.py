"""Compression on the links of the tree, configured per link (`nodes.<path>.link`).

Codecs (`bf16`, `fp16`, `int8`, `topk`) are pure tensor functions with a small class each;
`feedback` keeps a sender's error-feedback residual; `link` applies them to messages at both
ends of a link; `policy` refuses settings that cannot work. See docs/compression.md.
"""

from worldlm.compression.base import TensorCodec
from worldlm.compression.feedback import ErrorFeedback, feedback_step
from worldlm.compression.link import ChildLinks, Uplink, decode_task, decode_update
from worldlm.compression.registry import DOWN_CODECS, UP_CODECS, make_codec

__all__ = [
    "DOWN_CODECS",
    "UP_CODECS",
    "ChildLinks",
    "ErrorFeedback",
    "TensorCodec",
    "Uplink",
    "decode_task",
    "decode_update",
    "feedback_step",
    "make_codec",
]
