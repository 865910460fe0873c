"""How `worldlm run` and `worldlm compare` show progress: the flags, and the observer they pick.

auto draws the live display where stderr is a terminal and writes plain lines where it is not
(nohup, SLURM, CI), so a redirected run is never silent for its whole length.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the observers pull in torch: not for building the parser (`--help`)
    from worldlm.session import RunObserver

MODES = ("auto", "rich", "plain", "json", "none")


def add_progress_args(parser: argparse.ArgumentParser) -> None:
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress",
        choices=MODES,
        help="rich = live display; plain = one line per round (and per leaf, see "
        "--leaf-lines-every) on stderr; json = the same events as JSON lines on stdout; none; "
        "default auto: rich where stderr is a terminal, else plain",
    )
    shown.add_argument(
        "--json",
        dest="progress",
        action="store_const",
        const="json",
        help="same as --progress json: JSON events on stdout, one per line, the last one the "
        "result; human text goes to stderr",
    )
    shown.add_argument(
        "--quiet",
        dest="progress",
        action="store_const",
        const="none",
        help="no progress display (same as --progress none)",
    )
    parser.set_defaults(progress="auto")
    parser.add_argument(
        "--leaf-lines-every",
        type=_steps,
        metavar="N",
        help="plain and json: a leaf line every N local steps; 0 = none; default: one line "
        "when a leaf finishes its round's training",
    )


def progress_mode(args: argparse.Namespace) -> str:
    """The mode asked for, auto resolved: rich, plain, json or none."""
    mode = str(args.progress)
    return auto_mode() if mode == "auto" else mode


def auto_mode() -> str:
    """rich where stderr is a terminal that redraws it, plain lines where it is not."""
    return "rich" if sys.stderr.isatty() else "plain"


def make_progress(
    mode: str, leaf_every: int | None = None, method: str | None = None
) -> AbstractContextManager[RunObserver]:
    """The observer of a resolved `mode` (see `progress_mode`)."""
    from worldlm.progress import QuietProgress, RichProgress
    from worldlm.progress_lines import JsonProgress, PlainProgress

    if mode == "rich":
        return RichProgress()
    if mode == "plain":
        return PlainProgress(leaf_every=leaf_every, method=method)
    if mode == "json":
        return JsonProgress(leaf_every=leaf_every, method=method)
    if mode == "none":
        return QuietProgress()
    raise ValueError(f"unknown progress mode {mode!r}; one of {', '.join(MODES)}")


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no leaf lines) or more, not {value}")
    return value
