"""Live terminal progress for a run: a bar over root rounds and a line for the current leaf;
and no progress at all. Plain lines and JSON events for logs are in `progress_lines`."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from worldlm.round_summary import RoundSummary


class RichProgress:
    """Draws rounds, the node being trained and its local steps; implements RunObserver."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.rounds: TaskID | None = None
        self.leaf: TaskID | None = None

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def status(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/dim]")

    def round_started(self, round_index: int, total: int) -> None:
        if self.rounds is None:
            self.rounds = self.progress.add_task("rounds", total=total, info="")
            self.leaf = self.progress.add_task("  leaf", total=1, info="")

    def round_finished(self, summary: RoundSummary) -> None:
        assert self.rounds is not None
        info = ""
        if summary.mean_ppl is not None and summary.worst_ppl is not None:
            info = f"val ppl mean {summary.mean_ppl:.1f}, worst {summary.worst_ppl:.1f}"
        self.progress.update(self.rounds, completed=summary.round, info=info)

    def leaf_started(self, path: str, steps: int) -> None:
        if self.leaf is not None:
            self.progress.update(self.leaf, description=f"  {path}", total=steps, completed=0)

    def leaf_step(self, path: str, step: int, loss: float | None) -> None:
        if self.leaf is None:
            return
        if loss is None:
            self.progress.update(self.leaf, completed=step)
        else:
            self.progress.update(self.leaf, completed=step, info=f"loss {loss:.3f}")


class QuietProgress:
    """No output (for --quiet and for tests)."""

    def __enter__(self) -> QuietProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        del exc

    def status(self, message: str) -> None:
        del message

    def round_started(self, round_index: int, total: int) -> None:
        del round_index, total

    def round_finished(self, summary: RoundSummary) -> None:
        del summary

    def leaf_started(self, path: str, steps: int) -> None:
        del path, steps

    def leaf_step(self, path: str, step: int, loss: float | None) -> None:
        del path, step, loss
