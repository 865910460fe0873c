"""Issue 22's resume check at scale: a run of N leaves killed with SIGKILL mid-run, then resumed,
ends with the same checkpoint and leaf-state files, byte for byte, as the same run uninterrupted.

The federation is `scale.py`'s (a flat `fedavg` tree of N leaves with synthetic text of their
own). The killed run is stopped by SIGKILL as soon as its checkpoint of round `--kill-after`
exists, so the kill lands in the next round's training or checkpoint; `worldlm run --resume`
then finishes it in a new process.

    python benchmarks/scale_resume.py --leaves 1000 --rounds 4 --leaf-state disk --sample 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale import config  # benchmarks/ is the script's directory, first on sys.path
from worldlm.checkpoint import list_checkpoints, read_meta
from worldlm.checkpoint_parts import parts_named

CHILD = """
import json, sys
from pathlib import Path
from worldlm import config_from_dict, run
run(config_from_dict(json.loads(Path(sys.argv[1]).read_text())), out=Path(sys.argv[2]))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--leaves", type=int, default=1000)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--kill-after", type=int, default=2, help="kill once this round's checkpoint exists"
    )
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--docs", type=int, default=30, help="documents per leaf")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--leaf-state", default="disk", choices=("memory", "disk"))
    p.add_argument("--sample", type=float, default=0.1)
    return p.parse_args()


def child(spec: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(spec), str(out)], env=env)


def files_of(run_dir: Path) -> dict[str, bytes]:
    """The newest checkpoint and every leaf-state file it names, by name."""
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    named = parts_named(read_meta(newest))
    objects = run_dir / "checkpoints" / "objects"
    out = {newest.name: newest.read_bytes()}
    out.update({d: (objects / f"{d}.wlm").read_bytes() for d in sorted(set(named))})
    return out


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="worldlm-scale-resume-") as tmp:
        root = Path(tmp)
        spec = root / "config.json"
        spec.write_text(json.dumps(config(root, args.leaves, args)), encoding="utf-8")
        started = time.perf_counter()
        whole = root / "whole"
        if child(spec, whole).wait() != 0:
            raise SystemExit("the uninterrupted run failed")
        print(f"uninterrupted run: {time.perf_counter() - started:.0f} s")

        cut = root / "cut"
        proc = child(spec, cut)
        mark = cut / "checkpoints" / f"round-{args.kill_after:06d}.wlm"
        while not mark.exists() and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is not None:
            raise SystemExit("the run ended before it could be killed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"killed (SIGKILL) after the checkpoint of round {args.kill_after}")
        resumed = subprocess.run(
            [sys.executable, "-m", "worldlm", "run", "--resume", str(cut), "--progress", "none"],
            stdout=subprocess.DEVNULL,  # the per-leaf table of N rows
            check=False,
        )
        if resumed.returncode != 0:
            raise SystemExit("the resume failed")
        left, right = files_of(whole), files_of(cut)
        same = left.keys() == right.keys() and all(left[k] == right[k] for k in left)
        size = sum(len(v) for v in left.values()) / 1e6
        print(
            f"N = {args.leaves}: final checkpoint and its {len(left) - 1} leaf-state files "
            f"({size:.1f} MB): {'bit-identical' if same else 'DIFFERENT'}"
        )
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
