"""`worldlm check CONFIG`: the config validated, then everything a run builds before training
(see `preflight`), so that a bad path, reader, tokenizer or model fails now, not an hour in."""

from __future__ import annotations

import argparse

from rich.console import Console


def run_check(args: argparse.Namespace, console: Console) -> int:
    # Imported here: the command line starts without torch and transformers.
    from worldlm.config_load import load_config
    from worldlm.preflight import preflight
    from worldlm.tree import build_tree, render

    config = load_config(args.config, args.overrides)
    report = preflight(config)
    for line in report.lines:
        console.print(line, highlight=False, markup=False)
    console.print(f"config OK (method {config.run.method})", highlight=False)
    console.print(render(build_tree(config.nodes)), highlight=False, markup=False)
    return 0
