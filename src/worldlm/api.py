"""The public Python API: configs composed in code, a run or a comparison of methods as one
call, and their results as objects (see docs/api.md). The command line is built on the same
calls."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from worldlm import comparison, runner
from worldlm.config import RunConfig, default_config_text
from worldlm.config_load import compose_config, load_config
from worldlm.outputs import RunResult
from worldlm.progress import QuietProgress
from worldlm.session import RunObserver

__all__ = ["compare", "config_from_dict", "default_config", "load_config", "resume", "run"]


def entered(observer: RunObserver) -> AbstractContextManager[RunObserver]:
    """`observer` as a context manager: itself if it is one (a live display starts and stops
    with the run), else a no-op around it."""
    if isinstance(observer, AbstractContextManager):
        return observer
    return nullcontext(observer)


def default_config() -> dict[str, Any]:
    """The embedded default config (what `worldlm run` runs) as a plain dict to edit."""
    return tomllib.loads(default_config_text())


def config_from_dict(
    data: dict[str, Any], overrides: Sequence[str] = (), *, base: Path | None = None
) -> RunConfig:
    """Validate a config written as a dict (the TOML's tables as nested dicts), after
    `overrides` ("key.path=value", as `--set` takes them). Relative data, model and tokenizer
    paths are taken from `base` (default: the current directory)."""
    return compose_config(copy.deepcopy(data), list(overrides), base or Path.cwd())


def run(
    config: RunConfig | None = None,
    *,
    observer: RunObserver | None = None,
    out: Path | str | None = None,
) -> RunResult:
    """Run `config` (default: the embedded default) and return its result: per-leaf
    perplexities before and after, final model directories, and `summary()`. `out` is the
    run directory (new or empty); by default run.out_dir/run.name with a free suffix. Quiet
    unless an `observer` is given (worldlm.progress has terminal and plain-line ones)."""
    watcher = observer or QuietProgress()
    with entered(watcher):
        return runner.run(
            config if config is not None else load_config(),
            watcher,
            out=Path(out) if out is not None else None,
        )


def resume(run_dir: Path | str, *, observer: RunObserver | None = None) -> RunResult:
    """Continue a run from its newest usable checkpoint (the result equals an uninterrupted
    run)."""
    watcher = observer or QuietProgress()
    with entered(watcher):
        return runner.resume(Path(run_dir), watcher)


def compare(
    config: RunConfig,
    methods: Sequence[str] = comparison.METHODS,
    *,
    out: Path | str | None = None,
    observer: RunObserver | None = None,
) -> list[comparison.MethodResult]:
    """Run each of `methods` on `config` at the same budget (the names `worldlm compare
    --methods` takes, e.g. "fedavg", "fedper", "worldlm", "local", "fedavg_ft",
    "fedavg+fedadam") and write results.md and perplexity.png into `out` (default
    run.out_dir/compare-<run.name>). A method already finished there is reused."""
    out_dir = (
        Path(out) if out is not None else Path(config.run.out_dir) / f"compare-{config.run.name}"
    )

    def observer_for(method: str) -> AbstractContextManager[RunObserver]:
        del method
        watcher = observer or QuietProgress()
        return entered(watcher)

    return comparison.compare(config, out_dir, observer_for, list(methods))
