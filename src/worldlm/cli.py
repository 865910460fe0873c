"""The `worldlm` command line: parse, load the config, call the library, report errors plainly."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from worldlm.audit.cli import add_audit_parser, run_audit
from worldlm.check_cli import run_check
from worldlm.cli_args import add_backend_args, add_override_arg, backend_overrides
from worldlm.deploy.cli import add_deploy_parsers, run_deploy, run_deploy_local
from worldlm.errors import WorldLMError
from worldlm.init_cli import add_init_parser, run_init
from worldlm.metrics.report_cli import add_report_parser, run_report
from worldlm.partition_cli import add_partition_parser, run_partition
from worldlm.progress_cli import add_progress_args, make_progress, progress_mode
from worldlm.security.certs_cli import add_certs_parser, run_certs
from worldlm.version import __version__

if TYPE_CHECKING:
    from worldlm.session import RunObserver


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", type=Path, help="run config (TOML); default: the embedded demo"
    )
    add_override_arg(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldlm", description="Federated training of language models across federations."
    )
    parser.add_argument("--version", action="version", version=f"worldlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated training job")
    _add_config_args(run)
    run.add_argument("--out", type=Path, help="run directory (default: run.out_dir/run.name)")
    add_progress_args(run)
    run.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last checkpoint (uses its own config.toml)",
    )
    add_backend_args(run)

    comp = sub.add_parser(
        "compare", help="run every method on one config; write results.md and a plot"
    )
    _add_config_args(comp)
    comp.add_argument("--out", type=Path, help="output directory (default: runs/compare-NAME)")
    comp.add_argument(
        "--methods",
        default=",".join(("centralized", "local", "fedavg", "hierfavg", "fedper", "worldlm")),
        help="comma-separated methods, each BASE or BASE+OPTIMIZER: BASE one of centralized, "
        "local, fedavg, hierfavg, fedper, worldlm, fedprox (fedavg with the proximal term, mu "
        "= train.prox_mu or 0.01); fedavg, hierfavg, fedper, worldlm or fedprox may end in _ft "
        "(their last train.finetune_rounds, or a fifth of the rounds, fine-tune at each leaf: "
        "fedavg_ft is FedAvg + fine-tuning); OPTIMIZER the root aggregator's server optimizer: "
        "fedavgm, nesterov, fedadam, fedyogi or fedadagrad (e.g. fedavg+nesterov, "
        "worldlm+fedadam); "
        "default: the six methods without one",
    )
    add_progress_args(comp)
    add_backend_args(comp)

    check = sub.add_parser(
        "check",
        help="validate a config and build what a run builds (data readers on the first "
        "records, tokenizer, model), without training",
    )
    _add_config_args(check)
    add_init_parser(sub)

    gen = sub.add_parser("generate", help="sample text from a node's final model")
    gen.add_argument(
        "run_dir", type=Path, help="a run directory, or a model directory (`worldlm export`)"
    )
    gen.add_argument("prompt")
    gen.add_argument("--node", help="node path (default: the global model)")
    gen.add_argument(
        "--base", type=Path, help="LoRA adapters: their base model directory (default: as named)"
    )
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the chat template; print the reply"
    )
    gen.add_argument("--max-new-tokens", type=int, default=60)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--seed", type=int, default=0)

    export = sub.add_parser(
        "export", help="write a node's final model: merged with its base, or LoRA adapters"
    )
    export.add_argument("run_dir", type=Path)
    export.add_argument("--node", help="node path (default: the global model)")
    export.add_argument("--out", type=Path, required=True, help="new or empty directory")
    export.add_argument(
        "--adapters",
        action="store_true",
        help="LoRA runs: the adapters alone in PEFT format (default: merged into the base)",
    )
    export.add_argument(
        "--base", type=Path, help="LoRA: the base model directory (default: the run's)"
    )

    data = sub.add_parser("data", help="build named corpora trees from their packages")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser(
        "build", help="build the domains, languages or families tree as JSONL per leaf"
    )
    build.add_argument("tree", choices=["domains", "languages", "families"])
    build.add_argument("--out", type=Path, default=Path("data"), help="default: ./data/<tree>")
    build.add_argument("--cache", type=Path, help="download cache (default: the worldlm cache)")
    build.add_argument("--leaves", help="comma-separated leaf paths (default: all)")
    build.add_argument("--max-docs", type=int, help="documents per leaf at most")

    add_certs_parser(sub)
    add_report_parser(sub)
    add_audit_parser(sub)
    add_partition_parser(sub)
    add_deploy_parsers(sub)
    sub.add_parser("presets", help="list model size presets")
    sub.add_parser("corpora", help="list the named corpora a leaf can use")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return _dispatch(args, console)
    except WorldLMError as exc:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print(
            "interrupted; continue from the last checkpoint with: worldlm run --resume RUN_DIR"
        )
        return 130
    except (OSError, sqlite3.OperationalError) as exc:
        # The machine refused (a full disk, a read-only or vanished directory): not a bug to
        # show as a traceback. Checkpoints are written atomically, so the last one is whole.
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        Console(stderr=True).print(
            f"[bold red]error:[/bold red] {what}{where}; a run stopped by this continues from "
            "its last checkpoint with: worldlm run --resume RUN_DIR",
            highlight=False,
        )
        return 1


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.command == "run":
        return _run(args, console)
    if args.command == "compare":
        return _compare(args, console)
    if args.command == "check":
        return run_check(args, console)
    if args.command == "init":
        return run_init(args, console)
    if args.command == "generate":
        from worldlm.generate import generate_text, model_dir_of

        text = generate_text(
            model_dir_of(args.run_dir, args.node),
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            base=args.base,
            chat=args.chat,
        )
        print(text)
        return 0
    if args.command == "export":
        from worldlm.model.export import export_model

        out = export_model(
            args.run_dir, args.out, node=args.node, adapters=args.adapters, base=args.base
        )
        kind = "adapters" if args.adapters else "model"
        console.print(f"wrote the {kind} of {args.node or 'the global model'} to {out}")
        return 0
    if args.command == "data":
        return _build_tree_data(args, console)
    if args.command == "certs":
        return run_certs(args, console)
    if args.command == "report":
        return run_report(args, console)
    if args.command == "audit":
        return run_audit(args, console)
    if args.command == "partition":
        return run_partition(args, console)
    if args.command in ("serve", "join"):
        return run_deploy(args, console)
    if args.command == "deploy-local":
        return run_deploy_local(args, console)
    if args.command == "presets":
        from worldlm.presets import PRESETS

        for name, p in PRESETS.items():
            console.print(
                f"{name:6} hidden={p.hidden} layers={p.layers} heads={p.heads} "
                f"ffn={p.intermediate}  {p.description}",
                highlight=False,
            )
        return 0
    if args.command == "corpora":
        from worldlm.data.corpora import CORPORA

        for name, spec in CORPORA.items():
            source = f"{spec.package}=={spec.version}" if spec.package else "this Python"
            console.print(f"{name:14} {source:32} {spec.description}", highlight=False)
        return 0
    raise AssertionError(args.command)


def _run(args: argparse.Namespace, console: Console) -> int:
    from worldlm.config_load import load_config
    from worldlm.errors import ConfigError
    from worldlm.progress_lines import write_event
    from worldlm.report_table import perplexity_table
    from worldlm.result_events import run_result_event
    from worldlm.runner import resume, run
    from worldlm.tree import build_tree, render

    if args.resume is not None:
        if args.config is not None or args.overrides or args.out is not None:
            raise ConfigError("--resume uses the run's own config.toml; drop CONFIG/--set/--out")
        if not (args.resume / "config.toml").is_file():
            raise ConfigError(f"--resume {args.resume}: not a run directory (no config.toml)")
    backend = backend_overrides(args)
    config = load_config(
        args.resume / "config.toml" if args.resume else args.config, args.overrides + backend
    )
    mode = progress_mode(args)
    if mode == "json":
        console = Console(stderr=True)  # stdout carries the JSON events and nothing else
    console.print(
        f"[bold]worldlm[/bold] run {config.run.name!r}: method {config.run.method}, "
        f"model {config.model.path or config.model.preset}, {config.stop.rounds} rounds"
        + (", leaves on Ray workers" if config.run.backend == "ray" else ""),
        highlight=False,
    )
    console.print(render(build_tree(config.nodes)), highlight=False, markup=False)
    with make_progress(mode, args.leaf_lines_every) as progress:
        result = (
            resume(args.resume, progress, backend=backend)
            if args.resume is not None
            else run(config, progress, out=args.out)
        )
    if mode == "json":
        write_event(run_result_event(result))
    console.print(
        perplexity_table(
            result.before,
            result.after,
            f"validation perplexity per leaf ({result.rounds} rounds, "
            f"{result.tokens:,.0f} tokens, {result.parameters / 1e6:.1f}M "
            f"{'adapter parameters' if config.model.lora.enabled else 'parameters'})",
        )
    )
    console.print(
        f"run directory: {result.run_dir}  (stopped by {result.stop_reason})", highlight=False
    )
    return 0


def _build_tree_data(args: argparse.Namespace, console: Console) -> int:
    from importlib import import_module

    from worldlm.data.corpora import default_cache_dir

    builder = import_module(f"worldlm.data.build.{args.tree}")
    out = args.out / args.tree
    cache = args.cache or default_cache_dir() / "build"
    leaves = [leaf.strip() for leaf in args.leaves.split(",")] if args.leaves else None
    counts = builder.build(out, cache, leaves=leaves, max_docs=args.max_docs)
    for leaf, docs in counts.items():
        console.print(f"{leaf:28} {docs:7d} documents", highlight=False)
    console.print(f"wrote {out}; use it with: --set data.root={out}", highlight=False)
    return 0


def _compare(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from worldlm.comparison import compare, fedavg_to_worldlm, table_rows
    from worldlm.config_load import load_config
    from worldlm.progress_lines import write_event
    from worldlm.result_events import compare_result_event

    config = load_config(args.config, args.overrides + backend_overrides(args))
    out = args.out or Path(config.run.out_dir) / f"compare-{config.run.name}"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    mode = progress_mode(args)
    if mode == "json":
        console = Console(stderr=True)  # stdout carries the JSON events and nothing else

    def observer_for(method: str) -> AbstractContextManager[RunObserver]:
        console.print(f"[bold]{method}[/bold]", highlight=False)
        return make_progress(mode, args.leaf_lines_every, method=method)

    results = compare(config, out, observer_for, methods)
    if mode == "json":
        write_event(compare_result_event(out, results, fedavg_to_worldlm(results)))
    header, rows = table_rows(results)
    table = Table(title=f"validation perplexity per leaf and method ({out})")
    for name in header:
        if name == "leaf":
            table.add_column(name, overflow="fold")
        else:
            table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    ratio = fedavg_to_worldlm(results)
    if ratio is not None:
        console.print(f"FedAvg / WorldLM mean per-leaf perplexity: {ratio:.2f}x", highlight=False)
    console.print(f"wrote {out / 'results.md'} and {out / 'perplexity.png'}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
