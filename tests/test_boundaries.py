"""House rules that keep the layers apart and the receive paths safe (DESIGN §2, TESTPLAN D17)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "worldlm"


def test_core_imports_no_transport_library() -> None:
    code = (
        "import sys\n"
        "import worldlm.runner, worldlm.federation.aggregator, worldlm.strategies.fedavg\n"
        "import worldlm.train.local, worldlm.data.prepare, worldlm.model.build, worldlm.wire\n"
        "import worldlm.cli, worldlm.comparison, worldlm.transport.codec\n"
        "bad = [m for m in ('grpc', 'ray') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _module_imports() -> dict[str, set[str]]:
    """Each worldlm module -> the worldlm modules it imports, from the source's import
    statements: lazy and type-checking-only imports included (`from worldlm.a import b` names
    the module `worldlm.a.b` when there is one, else `worldlm.a`)."""
    modules = {
        ".".join(p for p in path.relative_to(SRC.parent).with_suffix("").parts if p != "__init__")
        for path in SRC.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        here = ".".join(p for p in rel.parts if p != "__init__")
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[here] = {t for t in targets if t in modules and t != here}
    return graph


def _package_imports() -> dict[str, set[str]]:
    """Each top-level part of worldlm (a package, or a module at the top) -> the parts it
    imports."""

    def part(module: str) -> str:
        pieces = module.split(".")
        return pieces[1] if len(pieces) > 1 else "worldlm"

    graph: dict[str, set[str]] = {}
    for module, targets in _module_imports().items():
        here = part(module)
        graph.setdefault(here, set()).update(part(t) for t in targets if part(t) != here)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle between parts, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_layers_point_one_way() -> None:
    modules = _module_imports()
    assert _cycle(modules) is None, " -> ".join(_cycle(modules) or [])
    graph = _package_imports()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    # The shared types sit at the bottom: they import no package that builds on them.
    assert graph["core"] <= {"errors", "secagg"}, graph["core"]
    # Strategies, codecs, privacy and data are plugged into the engine, never above it.
    for lower in ("strategies", "compression", "privacy", "data", "secagg", "train", "model"):
        assert not graph.get(lower, set()) & {"federation", "transport", "session", "runner"}, lower
    # The engine knows the transport protocol (core), not the transports that implement it.
    assert "transport" not in graph["federation"]
    # Nothing but the entry points uses the orchestrator.
    users = {part for part, targets in graph.items() if "runner" in targets}
    assert users <= {"cli", "comparison", "api"}, users
    assert "runner" in graph["api"]  # the check names a part that exists (not vacuous)


def test_the_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


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
