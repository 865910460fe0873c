"""Progress as lines for logs: plain text on stderr, where no terminal redraws a live display
(nohup, SLURM, CI), or JSON objects on stdout, one per line, for programs. Both write the same
events, each flushed as it happens: a run killed half-way leaves every line up to its end.

Events: "status" (a message), "round" (a root round's `RoundSummary` and an ETA), "leaf" (a
leaf's local training: every `leaf_every` steps, or once when it finishes) and, written by the
command at the end, "result".
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Any, TextIO

from worldlm.round_summary import RoundSummary

Event = dict[str, Any]


class LineProgress(ABC):
    """Implements RunObserver by writing one line per event; subclasses say how and where.

    `leaf_every`: None = a leaf line when a leaf finishes its local steps, N > 0 = every N
    steps as well, 0 = no leaf lines. `method` names the run in every event (`compare` runs
    one per method)."""

    def __init__(self, *, leaf_every: int | None = None, method: str | None = None) -> None:
        if leaf_every is not None and leaf_every < 0:
            raise ValueError(f"leaf_every must be None or >= 0, not {leaf_every}")
        self.leaf_every = leaf_every
        self.method = method
        self.round = 0
        self.steps: dict[str, int] = {}  # local steps of the leaves training now, by path
        self.round_seconds: list[float] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        del exc

    def status(self, message: str) -> None:
        self.emit({"event": "status", "message": message})

    def round_started(self, round_index: int, total: int) -> None:
        del total
        self.round = round_index

    def round_finished(self, summary: RoundSummary) -> None:
        self.round_seconds.append(summary.seconds)
        # The mean round of this process so far: a resumed run knows nothing of earlier ones.
        mean = sum(self.round_seconds) / len(self.round_seconds)
        eta = mean * (summary.total - summary.round)
        self.emit({"event": "round", **dataclasses.asdict(summary), "eta_seconds": eta})

    def leaf_started(self, path: str, steps: int) -> None:
        self.steps[path] = steps

    def leaf_step(self, path: str, step: int, loss: float | None) -> None:
        steps = self.steps.get(path, step)
        finished = step >= steps
        if self.leaf_every == 0:
            return
        if not finished and (self.leaf_every is None or step % self.leaf_every != 0):
            return
        self.emit(
            {
                "event": "leaf",
                "round": self.round,
                "leaf": path,
                "step": step,
                "steps": steps,
                "loss": loss,  # None at steps where training did not read the loss back
                "finished": finished,
            }
        )

    def emit(self, event: Event) -> None:
        stamped: Event = {"event": event["event"], "time": _now().isoformat(timespec="seconds")}
        if self.method is not None:
            stamped["method"] = self.method
        stamped.update(event)
        stream = self.stream()
        stream.write(self.render(stamped) + "\n")
        stream.flush()

    @abstractmethod
    def stream(self) -> TextIO: ...

    @abstractmethod
    def render(self, event: Event) -> str: ...


class PlainProgress(LineProgress):
    """Human-readable lines on stderr, each starting with the local date and time."""

    def stream(self) -> TextIO:
        return sys.stderr  # looked up per line: the stream may be replaced (tests, redirects)

    def render(self, event: Event) -> str:
        when = datetime.fromisoformat(event["time"]).strftime("%Y-%m-%d %H:%M:%S")
        prefix = f"{when} " + (f"[{event['method']}] " if "method" in event else "")
        return prefix + plain_text(event)


class JsonProgress(LineProgress):
    """One JSON object per line on stdout (non-finite numbers written as strings)."""

    def stream(self) -> TextIO:
        return sys.stdout

    def render(self, event: Event) -> str:
        return json_line(event)


def plain_text(event: Event) -> str:
    """An event as a sentence; the numbers are the JSON event's, rounded."""
    kind = event["event"]
    if kind == "round":
        parts = [f"round {event['round']}/{event['total']}:"]
        if event["mean_ppl"] is None:
            parts.append("not evaluated this round;")
        else:
            parts.append(
                f"val ppl mean {event['mean_ppl']:.2f}, worst {event['worst_ppl']:.2f} "
                f"({event['worst_leaf']});"
            )
        parts.append(f"{event['tokens']:,.0f} tokens;")
        if event["bytes_sent"] is not None:
            parts.append(f"{human_bytes(event['bytes_sent'])} sent;")
        parts.append(f"{event['seconds']:.1f} s; ETA {human_duration(event['eta_seconds'])}")
        return " ".join(parts)
    if kind == "leaf":
        loss = "" if event["loss"] is None else f", loss {event['loss']:.4f}"
        done = " (done)" if event["finished"] else ""
        return (
            f"round {event['round']} leaf {event['leaf']}: "
            f"step {event['step']}/{event['steps']}{loss}{done}"
        )
    if kind == "status":
        return str(event["message"])
    return json_line(event)


def json_line(event: Event) -> str:
    return json.dumps({key: _finite(value) for key, value in event.items()}, allow_nan=False)


def write_event(event: Event) -> None:
    """One JSON event on stdout, outside any observer (a command's "result")."""
    sys.stdout.write(json_line(event) + "\n")
    sys.stdout.flush()


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _finite(value: Any) -> Any:
    # JSON has no NaN or infinity; metrics.jsonl writes them as strings too.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _now() -> datetime:
    return datetime.now().astimezone()
