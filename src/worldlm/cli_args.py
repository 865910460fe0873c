"""Command-line arguments shared by several `worldlm` commands."""

from __future__ import annotations

import argparse


def add_override_arg(parser: argparse.ArgumentParser, extra_help: str = "") -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set train.lr=3e-4 (repeatable){extra_help}",
    )
