"""`worldlm certs`: a development CA and node certificates for mutual TLS (not for production:
keys are written unencrypted; use your organization's PKI there)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from worldlm.tree import FederationNode

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def add_certs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser("certs", help="create a development CA and node certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)

    ca = certs_sub.add_parser("ca", help="create a CA (ca.pem, ca.key) in a directory")
    ca.add_argument("out", type=Path, help="directory for ca.pem and ca.key")
    ca.add_argument("--name", default="worldlm dev CA", help="the CA's common name")
    _add_common(ca)

    node = certs_sub.add_parser("node", help="issue a certificate bound to one node path")
    node.add_argument("node_path", help="the node's path in the tree, e.g. world/eu/paris")
    node.add_argument("--ca", type=Path, required=True, help="directory holding ca.pem, ca.key")
    node.add_argument("--out", type=Path, required=True, help="directory for the node's files")
    _add_hosts(node)
    _add_common(node)

    tree = certs_sub.add_parser(
        "tree", help="a CA plus one certificate for every node of a config's tree"
    )
    tree.add_argument("config", type=Path, help="the federation config (TOML)")
    tree.add_argument("--out", type=Path, required=True, help="directory for all the files")
    tree.add_argument(
        "--host",
        dest="hosts",
        action="append",
        metavar="[PATH=]NAME_OR_IP",
        help="DNS name or IP an aggregator is reached at: PATH=NAME for the aggregator at PATH, "
        "NAME alone for every aggregator without its own (repeatable; default: localhost, "
        "127.0.0.1). Leaves get none: they only dial out, so a leaf's certificate cannot pose "
        "as a parent",
    )
    _add_common(tree)


def _add_hosts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        dest="hosts",
        action="append",
        metavar="NAME_OR_IP",
        help="DNS name or IP the node is reached at (repeatable; default: localhost, 127.0.0.1)",
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


def run_certs(args: argparse.Namespace, console: Console) -> int:
    from worldlm.security.certs import create_ca, issue_node_cert  # cryptography loads lazily

    hosts = tuple(getattr(args, "hosts", None) or DEFAULT_HOSTS)
    if args.certs_command == "ca":
        ca = create_ca(args.out, name=args.name, days=args.days, force=args.force)
        console.print(f"wrote {ca.cert} and {ca.key}", highlight=False)
        return 0
    if args.certs_command == "node":
        files = issue_node_cert(
            args.ca, args.node_path, args.out, hosts=hosts, days=args.days, force=args.force
        )
        console.print(f"{args.node_path}: wrote {files.cert} and {files.key}", highlight=False)
        return 0
    from worldlm.config_load import load_config
    from worldlm.tree import build_tree

    config = load_config(args.config)
    tree = build_tree(config.nodes)
    per_node = tree_hosts(getattr(args, "hosts", None) or list(DEFAULT_HOSTS), tree)
    create_ca(args.out, days=args.days, force=args.force)
    for node in tree.walk():
        names = per_node.get(node.path, ())
        files = issue_node_cert(
            args.out, node.path, args.out, hosts=names, days=args.days, force=args.force
        )
        where = ", ".join(names) if names else "no host names (a leaf)"
        console.print(f"{node.path:32} {files.cert.name}  {where}", highlight=False)
    console.print(f"wrote the CA and node certificates to {args.out}", highlight=False)
    return 0


def tree_hosts(entries: list[str], tree: FederationNode) -> dict[str, tuple[str, ...]]:
    """The host names of each aggregator from `--host` entries (PATH=NAME, or NAME for every
    aggregator without its own); leaves get none. ConfigError for a PATH that is no aggregator."""
    from worldlm.errors import ConfigError

    aggregators = [node.path for node in tree.walk() if not node.is_leaf]
    shared = [e for e in entries if "=" not in e]
    own: dict[str, list[str]] = {}
    for entry in entries:
        if "=" in entry:
            path, _, name = entry.partition("=")
            if path not in aggregators:
                raise ConfigError(
                    f"--host {entry}: {path!r} is not an aggregator of the tree "
                    f"({', '.join(aggregators)})"
                )
            own.setdefault(path, []).append(name)
    return {path: tuple(own.get(path, shared)) for path in aggregators}
