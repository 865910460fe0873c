"""`worldlm init [TEMPLATE] [--out PATH]`: write a starter config; `--list` shows them."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from worldlm.templates import DEFAULT, template_names, template_summary, write_template

FILL_IN = "FILL IN"  # how templates mark the lines a user must change


def add_init_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = sub.add_parser(
        "init", help="write a starter config from a template (`worldlm init --list`)"
    )
    init.add_argument(
        "template", nargs="?", default=DEFAULT, help=f"template name (default: {DEFAULT})"
    )
    init.add_argument(
        "--out", type=Path, help="the file to write (default: TEMPLATE.toml here); never replaced"
    )
    init.add_argument("--list", action="store_true", help="list the templates and exit")


def run_init(args: argparse.Namespace, console: Console) -> int:
    if args.list:
        for name in template_names():
            console.print(f"{name:12} {template_summary(name)}", highlight=False, markup=False)
        return 0
    out = write_template(args.template, args.out or Path(f"{args.template}.toml"))
    unfilled = FILL_IN in out.read_text("utf-8")
    todo = f"fill in the lines marked {FILL_IN}, then" if unfilled else "next"
    console.print(
        f"wrote {out} (template {args.template}); {todo}: worldlm check {out}",
        highlight=False,
        markup=False,
    )
    return 0
