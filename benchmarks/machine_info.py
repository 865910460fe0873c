"""What every benchmark records about the machine and its own settings, so that a result can be
read against the load and the versions it was measured with."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import Any

import torch


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews every variant."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Date, platform, CPUs, Python and torch versions, load, the run's arguments, and `extra`."""
    return {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_before": load_average(),
        **extra,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
