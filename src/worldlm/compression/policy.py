"""Which link settings a tree refuses at start, with the key to change."""

from __future__ import annotations

from collections.abc import Mapping

from worldlm.config import AggregatorConfig, LinkConfig
from worldlm.errors import ConfigError

# Casts change each value by a relative 2^-8 (bf16) or 2^-11 (fp16), nothing more.
PRIVATE_UP_CODECS = ("none", "bf16", "fp16")


def check_root_link(path: str, settings: AggregatorConfig) -> None:
    """The root has no parent, so no link of its own to compress."""
    if settings.link != LinkConfig():
        raise ConfigError(
            f"nodes.{path}.link: the root has no parent link to compress; set link on its "
            f'children instead (nodes."{path}/<child>".link)'
        )


def check_child_links(
    path: str, settings: AggregatorConfig, links: Mapping[str, LinkConfig]
) -> None:
    """Refuse codecs that an aggregator's secure aggregation or DP cannot work with."""
    secure = settings.secure_aggregation.enabled
    for child, link in sorted(links.items()):
        if (secure or settings.dp.enabled) and link.up not in PRIVATE_UP_CODECS:
            what = "secure_aggregation" if secure else "dp"
            raise ConfigError(
                f"nodes.{child}.link.up: {link.up!r} cannot be used below {path}, which has "
                f"{what} enabled: {_WHY[what]}; use one of {', '.join(PRIVATE_UP_CODECS)}"
            )
        if secure and link.down != "none":
            raise ConfigError(
                f"nodes.{child}.link.down: {link.down!r} cannot be used below {path}, which has "
                "secure_aggregation enabled: the parent adds the masked sum of the children's "
                "changes to the weights it holds, so it must send exactly those; use 'none'"
            )


_WHY = {
    "secure_aggregation": "the masked sum has its own fixed-point encoding (bits), so int8 "
    "and top-k would save nothing there, and their error feedback would carry changes the "
    "parent never checks into later rounds",
    "dp": "the parent clips each reply, which would silently drop part of what error "
    "feedback carries from round to round, and the privacy analysis covers no such state",
}
