"""Size presets of Llama-style causal LMs, built from random initialization (`model.build`).

A module of its own at the top of the package, importing nothing, so that the config schema can
refuse an unknown `model.preset` when it is loaded (the model package imports the config).

Parameter counts depend on the vocabulary; the comments give them at the default 4096 tokens
(for the paper-sized presets, at a 32k vocabulary as in the paper's setting).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    description: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset(128, 4, 4, 352, "~1M parameters; for tests"),
    "mini": Preset(192, 6, 6, 512, "~3M parameters; quick experiments"),
    "small": Preset(288, 8, 6, 768, "~9M parameters; the embedded demo"),
    "75m": Preset(640, 11, 10, 1792, "~75M parameters at 32k vocab (paper size)"),
    "125m": Preset(768, 14, 12, 2048, "~125M parameters at 32k vocab (paper size)"),
    "250m": Preset(1024, 17, 16, 2816, "~250M parameters at 32k vocab (paper size)"),
}


# Model builders that plugins register (worldlm.register_model_builder): a name that
# `model.preset` may take besides the sizes above. Typed loosely here, this module importing
# nothing; `model.build` calls each as factory(model_config, vocab_size) under a seeded RNG.
MODEL_BUILDERS: dict[str, object] = {}


def preset_names() -> list[str]:
    """Every name model.preset accepts: the built-in sizes, then registered builders."""
    return [*PRESETS, *sorted(MODEL_BUILDERS)]
