"""A deployment: every node its own process (`worldlm serve` / `worldlm join`) on loopback with
mutual TLS. It must end with the same global model and the same evaluations as the in-process
engine on the same config."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from worldlm.config import dump_config
from worldlm.data.tokenizer import train_tokenizer
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.run import run
from worldlm.security.certs import safe_name

from .conftest import synthetic_documents, tiny_config

THREE_LEVEL = {"world/med/a": "med", "world/med/b": "law", "world/c": "code"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_file(path: Path, node: str, pki: Path, **addresses: str) -> Path:
    name = safe_name(node)
    lines = ["[node]", f'path = "{node}"']
    lines += [f'{key} = "{value}"' for key, value in addresses.items()]
    lines += [
        "[tls]",
        f'ca = "{pki / "ca.pem"}"',
        f'cert = "{pki / (name + ".pem")}"',
        f'key = "{pki / (name + ".key")}"',
        "[link]",
        "round_timeout = 120",
        "wait_for_children = 120",
        "reconnect_wait = 60",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def worldlm(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "worldlm.cli", *map(str, args)]


def test_processes_over_mtls_equal_the_in_process_engine(tmp_path: Path) -> None:
    texts = [d for i, t in enumerate(["med", "law", "code"]) for d in synthetic_documents(t, 60, i)]
    train_tokenizer(texts, vocab_size=320, cache_dir=None).save(str(tmp_path / "tok.json"))
    overrides = [f"tokenizer.path='{tmp_path / 'tok.json'}'", "stop.rounds=2"]
    config = tiny_config(tmp_path, THREE_LEVEL, overrides)
    reference = run(config, QuietProgress(), out=tmp_path / "in-process")

    shared = tmp_path / "federation.toml"
    shared.write_text(dump_config(config), encoding="utf-8")
    pki = tmp_path / "pki"
    subprocess.run(worldlm("certs", "tree", shared, "--out", pki), check=True)
    root_port, med_port = free_port(), free_port()
    root = f"127.0.0.1:{root_port}"
    med = f"127.0.0.1:{med_port}"
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    files = {
        "world": node_file(nodes / "root.toml", "world", pki, listen=root),
        "world/med": node_file(nodes / "med.toml", "world/med", pki, listen=med, parent=root),
        "world/med/a": node_file(nodes / "a.toml", "world/med/a", pki, parent=med),
        "world/med/b": node_file(nodes / "b.toml", "world/med/b", pki, parent=med),
        "world/c": node_file(nodes / "c.toml", "world/c", pki, parent=root),
    }
    logs = {p: (tmp_path / f"{safe_name(p)}.log").open("w") for p in files}
    procs = {}
    try:
        for path in ("world", "world/med", "world/med/a", "world/med/b", "world/c"):
            verb = "join" if path in THREE_LEVEL else "serve"
            extra = ["--out", tmp_path / "deployed"] if path == "world" else []
            procs[path] = subprocess.Popen(
                worldlm(verb, shared, "--node", files[path], *extra),
                stdout=logs[path],
                stderr=subprocess.STDOUT,
            )
        for path, proc in procs.items():
            assert proc.wait(timeout=300) == 0, (tmp_path / f"{safe_name(path)}.log").read_text()
    finally:
        for proc in procs.values():
            proc.kill()
        for log in logs.values():
            log.close()

    deployed = load_file(tmp_path / "deployed" / "final" / "world" / "model.safetensors")
    expected = load_file(reference.run_dir / "final" / "world" / "model.safetensors")
    assert deployed.keys() == expected.keys()
    assert all(torch.equal(deployed[k], expected[k]) for k in expected)

    def evals(run_dir: Path) -> list[dict[str, object]]:
        return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]

    assert evals(tmp_path / "deployed") == evals(reference.run_dir)
    summary = json.loads((tmp_path / "deployed" / "summary.json").read_text("utf-8"))
    assert summary["rounds"] == 2
