"""House rules that keep the layers apart and the receive paths safe (DESIGN §2, TESTPLAN D17)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "worldlm"


def test_core_imports_no_transport_library() -> None:
    code = (
        "import sys\n"
        "import worldlm.run, worldlm.federation.aggregator, worldlm.strategies.fedavg\n"
        "import worldlm.train.local, worldlm.data.prepare, worldlm.model.build, worldlm.wire\n"
        "import worldlm.cli, worldlm.compare, worldlm.transport.codec\n"
        "bad = [m for m in ('grpc', 'ray') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_unsafe_deserialization_in_source() -> None:
    pattern = re.compile(
        r"pickle\.loads?\(|allow_pickle=True|yaml\.load\(|weights_only=False|torch\.load\("
    )
    hits = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def test_ci_runs_the_readme_test_command() -> None:
    root = SRC.parent.parent
    readme = (root / "README.md").read_text("utf-8")
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (root / ".ci" / "run").read_text("utf-8")
