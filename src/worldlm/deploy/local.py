"""`worldlm deploy-local`: everything a deployment needs, for every node on this machine.

Writes a directory with the shared federation config, a shared tokenizer, a development CA with
one certificate per node, one node file per node (loopback addresses), and `start.sh`, which
starts each node as its own process. It is the README's way to try a deployment before
spreading it over machines: the files are the same ones each organization would hold.

The tokenizer is trained here on every leaf's training text, exactly as `worldlm run` trains
it, which only a local trial may do; a real deployment trains it on public text or takes a
pretrained model's (`tokenizer.path`, `model.path`).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from worldlm.config import RunConfig, dump_config
from worldlm.data.prepare import check_sources, choose_tokenizer, read_splits, training_union
from worldlm.errors import ConfigError
from worldlm.model.workspace import cache_dir_of
from worldlm.security.certs import create_ca, issue_node_cert, safe_name
from worldlm.session import RunObserver
from worldlm.tree import FederationNode, build_tree

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class LocalDeployment:
    directory: Path
    config: Path
    node_files: dict[str, Path]  # by node path
    start_script: Path


def write_local_deployment(
    config: RunConfig, out: Path, observer: RunObserver, *, base_port: int = 7100
) -> LocalDeployment:
    """Write the files of a one-machine deployment of `config` into `out` (new or empty)."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} already holds files; choose a new directory")
    if not 1024 <= base_port <= 65535 - 256:
        raise ConfigError(f"--base-port {base_port}: choose a port from 1024 to 65279")
    tree = build_tree(config.nodes)
    check_sources(tree)
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if config.tokenizer.path is None and config.model.path is None:
        observer.status("training the shared tokenizer on the leaves' training text")
        tokenizer_file = out / "tokenizer.json"
        splits, _ = read_splits(
            tree, config.data, config.run.seed, cache_dir_of(config), observer.status
        )
        tokenizer = choose_tokenizer(
            config.tokenizer, None, training_union(splits), cache_dir_of(config)
        )
        tokenizer.save(str(tokenizer_file))
        config = config.model_copy(
            update={"tokenizer": config.tokenizer.model_copy(update={"path": str(tokenizer_file)})}
        )
    shared = out / "federation.toml"
    shared.write_text(dump_config(config), encoding="utf-8")

    pki = out / "pki"
    create_ca(pki)
    addresses: dict[str, str] = {}
    for port, node in enumerate(n for n in tree.walk() if not n.is_leaf):
        addresses[node.path] = f"{LOOPBACK}:{base_port + port}"
    files: dict[str, Path] = {}
    (out / "nodes").mkdir()
    for node in tree.walk():
        issue_node_cert(pki, node.path, pki, hosts=("localhost", LOOPBACK))
        files[node.path] = _write_node_file(out, node, addresses)
    script = _write_start_script(out, shared, tree, files)
    return LocalDeployment(out, shared, files, script)


def _write_node_file(out: Path, node: FederationNode, addresses: dict[str, str]) -> Path:
    name = safe_name(node.path)
    lines = ["[node]", f'path = "{node.path}"']
    if not node.is_leaf:
        lines.append(f'listen = "{addresses[node.path]}"')
    parent = node.path.rpartition("/")[0]
    if parent:
        lines.append(f'parent = "{addresses[parent]}"')
    lines += [
        "",
        "[tls]",
        'ca = "../pki/ca.pem"',
        f'cert = "../pki/{name}.pem"',
        f'key = "../pki/{name}.key"',
        "",
    ]
    if node.is_leaf:
        lines += [
            "# [data]",
            "# paths = [...]   # this leaf's own files, replacing the shared config's source",
            "",
        ]
    path = out / "nodes" / f"{name}.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _write_start_script(
    out: Path, shared: Path, tree: FederationNode, files: dict[str, Path]
) -> Path:
    worldlm = f"{shlex.quote(sys.executable)} -m worldlm.cli"
    lines = [
        "#!/usr/bin/env bash",
        "# Every node of the federation as its own process on this machine; logs in logs/.",
        "# The root's run directory is $RUN_DIR (default: run); extra arguments go to the root.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "mkdir -p logs",
        'RUN_DIR="${RUN_DIR:-run}"',
        "children=()",
        "trap 'kill \"${children[@]}\" 2>/dev/null || true' EXIT",
    ]
    for node in tree.walk():
        if node.path == tree.path:
            continue
        verb = "join" if node.is_leaf else "serve"
        log = f"logs/{safe_name(node.path)}.log"
        node_file = files[node.path].relative_to(out)
        lines.append(
            f"{worldlm} {verb} {shared.name} --node {node_file} > {log} 2>&1 & children+=($!)"
        )
    root_file = files[tree.path].relative_to(out)
    lines += [
        f'{worldlm} serve {shared.name} --node {root_file} --out "$RUN_DIR" "$@" '
        f"2>&1 | tee logs/{safe_name(tree.path)}.log",
        'wait "${children[@]}"',
        "trap - EXIT",
        "",
    ]
    script = out / "start.sh"
    script.write_text("\n".join(lines), encoding="utf-8")
    script.chmod(0o755)
    return script
