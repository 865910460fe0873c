"""The epoch a deployed root signs its tasks with (`security.replay_window`): larger at each start
of the root, so that its children accept the rounds a resume runs again and refuse every older
statement of those rounds.

The epoch is the root's wall clock in microseconds when it starts, and at least one more than
the last epoch its run directory used. The clock makes a fresh start of the same config (a new
run directory, the same run id) newer than any earlier run; the file keeps a resume newer even
if the clock went back. It is not in the checkpoint: a resumed run writes the same checkpoint
bytes as an uninterrupted one, and the epoch only ever lives in signed statements.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from worldlm.errors import WorldLMError

EPOCH_FILE = "downlink-epoch"


def next_epoch(run_dir: Path, now_us: int | None = None) -> int:
    """This start's epoch, recorded in `run_dir` (atomically) before any task is signed."""
    path = run_dir / EPOCH_FILE
    last = -1
    if path.is_file():
        try:
            last = int(path.read_text(encoding="ascii").strip())
        except (ValueError, UnicodeDecodeError):
            raise WorldLMError(
                f"{path}: not an epoch; remove it only if the root's clock is right (its "
                "children refuse tasks of an epoch older than one they accepted)"
            ) from None
    epoch = max(time.time_ns() // 1000 if now_us is None else now_us, last + 1)
    tmp = path.with_name(EPOCH_FILE + ".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{epoch}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return epoch
