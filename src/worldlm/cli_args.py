"""Command-line arguments shared by several `worldlm` commands."""

from __future__ import annotations

import argparse
import json


def add_override_arg(parser: argparse.ArgumentParser, extra_help: str = "") -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set train.lr=3e-4 (repeatable){extra_help}",
    )


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=["inprocess", "ray"],
        help="where leaves train (run.backend): ray = in parallel on Ray actors, one per core "
        "(pip install 'worldlm[ray]')",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="an existing Ray cluster, auto or host:port (run.ray_address; implies --backend ray)",
    )


def backend_overrides(args: argparse.Namespace) -> list[str]:
    """--backend and --ray-address as the --set overrides they stand for."""
    backend = args.backend or ("ray" if args.ray_address is not None else None)
    overrides = [] if backend is None else [f"run.backend={backend}"]
    if args.ray_address is not None:
        overrides.append(f"run.ray_address={json.dumps(args.ray_address)}")
    return overrides
