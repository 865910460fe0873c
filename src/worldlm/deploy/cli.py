"""`worldlm serve` (an aggregator: the root or a sub-federation) and `worldlm join` (a leaf)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rich.console import Console

from worldlm.cli_args import add_override_arg
from worldlm.errors import ConfigError


def add_deploy_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve", help="run an aggregator of a deployment (the root runs the rounds)"
    )
    join = sub.add_parser("join", help="run a leaf of a deployment: dial its parent, train")
    for parser in (serve, join):
        parser.add_argument("config", type=Path, help="the federation config every node shares")
        # --node-file: the same option under a name torchrun's own parser lets through
        # (it reads --node as an ambiguous abbreviation of its --node-rank).
        parser.add_argument(
            "--node",
            "--node-file",
            dest="node",
            type=Path,
            required=True,
            help="this node's own file (identity, TLS, data); --node-file under torchrun",
        )
        add_override_arg(parser, "; every node must use the same overrides")
        parser.add_argument("--quiet", action="store_true", help="only warnings in the log")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="the root's run directory")
    where.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="restart the root from the last checkpoint in its run directory; its children "
        "(still running, or restarted) roll back to match",
    )

    local = sub.add_parser(
        "deploy-local",
        help="write a one-machine deployment of a config: certificates, node files, start.sh",
    )
    local.add_argument("config", type=Path, help="the federation config")
    local.add_argument("--out", type=Path, required=True, help="a new directory for the files")
    local.add_argument(
        "--base-port", type=int, default=7100, help="aggregators listen from this port on"
    )
    add_override_arg(local, "; written into the shared config")


def run_deploy_local(args: argparse.Namespace, console: Console) -> int:
    from worldlm.config_load import load_config
    from worldlm.deploy.local import write_local_deployment
    from worldlm.progress import RichProgress

    config = load_config(args.config, args.overrides)
    with RichProgress(console=Console(stderr=True)) as obs:
        made = write_local_deployment(config, args.out, obs, base_port=args.base_port)
    console.print(
        f"wrote {made.config}, {len(made.node_files)} node files with their certificates, "
        f"and {made.start_script}\nstart every node (one process each): bash {made.start_script}",
        highlight=False,
    )
    return 0


def run_deploy(args: argparse.Namespace, console: Console) -> int:
    from worldlm.config_load import load_config
    from worldlm.deploy.leaf_ranks import join_on_ranks, launched_ranks
    from worldlm.deploy.node import answer_as_child, check_tls_files, open_node, run_root
    from worldlm.deploy.node_file import load_node_file
    from worldlm.progress_cli import auto_mode, make_progress
    from worldlm.report_table import perplexity_table

    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    config = load_config(args.config, args.overrides)
    node_file = load_node_file(args.node)
    check_tls_files(node_file)  # before any data is read: a wrong certificate fails at once
    # Plain lines where stderr is no terminal: a node started by start.sh logs to a file.
    with make_progress("none" if args.quiet else auto_mode()) as obs:
        if args.command == "join" and launched_ranks() > 1:  # torchrun: one leaf, N processes
            answered = join_on_ranks(config, node_file, obs, answer_as_child)
            console.print(f"{node_file.node.path}: run over after {answered} tasks")
            return 0
        rt = open_node(config, node_file, obs)
        is_root = rt.node.path == rt.tree.path
        if args.command == "join" and not rt.node.is_leaf:
            raise ConfigError(f"{rt.node.path} is an aggregator: start it with `worldlm serve`")
        if args.command == "serve" and rt.node.is_leaf:
            raise ConfigError(f"{rt.node.path} is a leaf: start it with `worldlm join`")
        if not is_root and getattr(args, "resume", None) is not None:
            raise ConfigError(
                f"--resume is for the root; {rt.node.path} resumes from its node.state_dir"
            )
        if not is_root:
            answered = answer_as_child(rt, node_file)
            console.print(f"{rt.node.path}: run over after {answered} tasks", highlight=False)
            return 0
        result = run_root(rt, node_file, obs, args.out, resume=args.resume)
    console.print(
        perplexity_table(
            result.before,
            result.after,
            f"validation perplexity per leaf ({result.rounds} rounds over gRPC)",
        )
    )
    console.print(f"run directory: {result.run_dir}", highlight=False)
    return 0
