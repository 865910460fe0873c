"""A deployment: every node its own process (`worldlm serve` / `worldlm join`) on loopback with
mutual TLS. It must end with the same global model and the same evaluations as the in-process
engine on the same config."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worldlm.config import RunConfig, dump_config
from worldlm.data.tokenizer import train_tokenizer
from worldlm.deploy.node_file import load_node_file
from worldlm.errors import ConfigError
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
        "round_timeout = 900",
        "wait_for_children = 900",
        "reconnect_wait = 900",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def worldlm(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "worldlm.cli", *map(str, args)]


def shared_tokenizer(tmp_path: Path) -> str:
    texts = [d for i, t in enumerate(["med", "law", "code"]) for d in synthetic_documents(t, 60, i)]
    train_tokenizer(texts, vocab_size=320, cache_dir=None).save(str(tmp_path / "tok.json"))
    return f"tokenizer.path='{tmp_path / 'tok.json'}'"


def deploy(tmp_path: Path, config: RunConfig, *, kill: str | None = None) -> Path:
    """Run `config` (the THREE_LEVEL tree) as five processes; SIGKILL the leaf `kill` once it
    has started training in round 1. Returns the root's run directory."""
    shared = tmp_path / "federation.toml"
    shared.write_text(dump_config(config), encoding="utf-8")
    pki = tmp_path / "pki"
    subprocess.run(worldlm("certs", "tree", shared, "--out", pki), check=True)
    root, med = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    files = {
        "world": node_file(nodes / "root.toml", "world", pki, listen=root),
        "world/med": node_file(nodes / "med.toml", "world/med", pki, listen=med, parent=root),
        "world/med/a": node_file(nodes / "a.toml", "world/med/a", pki, parent=med),
        "world/med/b": node_file(nodes / "b.toml", "world/med/b", pki, parent=med),
        "world/c": node_file(nodes / "c.toml", "world/c", pki, parent=root),
    }
    log_paths = {p: tmp_path / f"{safe_name(p)}.log" for p in files}
    logs = {p: log_paths[p].open("w") for p in files}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    run_dir = tmp_path / "deployed"
    try:
        for path, file in files.items():
            verb = "join" if path in THREE_LEVEL else "serve"
            extra = ["--out", run_dir] if path == "world" else []
            procs[path] = subprocess.Popen(
                worldlm(verb, shared, "--node", file, *extra),
                stdout=logs[path],
                stderr=subprocess.STDOUT,
            )
        if kill is not None:
            deadline = time.monotonic() + 300
            while "train_task of round 1" not in log_paths[kill].read_text("utf-8"):
                assert time.monotonic() < deadline and procs[kill].poll() is None
                time.sleep(0.02)
            procs[kill].send_signal(signal.SIGKILL)
        for path, proc in procs.items():
            code = proc.wait(timeout=600)
            assert code == (-signal.SIGKILL if path == kill else 0), log_paths[path].read_text()
    finally:
        for proc in procs.values():
            proc.kill()
        for log in logs.values():
            log.close()
    return run_dir


def evals(run_dir: Path) -> list[dict[str, object]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]


def same_global_model(a: Path, b: Path) -> bool:
    left = load_file(a / "final" / "world" / "model.safetensors")
    right = load_file(b / "final" / "world" / "model.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_processes_over_mtls_equal_the_in_process_engine(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, THREE_LEVEL, [shared_tokenizer(tmp_path), "stop.rounds=2"])
    reference = run(config, QuietProgress(), out=tmp_path / "in-process")
    deployed = deploy(tmp_path, config)
    assert same_global_model(deployed, reference.run_dir)
    assert evals(deployed) == evals(reference.run_dir)
    summary = json.loads((deployed / "summary.json").read_text("utf-8"))
    assert summary["rounds"] == 2


@pytest.mark.slow
def test_a_leaf_killed_mid_round_is_left_out_and_the_round_completes(tmp_path: Path) -> None:
    # long enough local training that the kill lands while the leaf is still training
    overrides = [shared_tokenizer(tmp_path), "stop.rounds=2", "train.local_steps=300"]
    config = tiny_config(tmp_path, THREE_LEVEL, overrides)
    deployed = deploy(tmp_path, config, kill="world/med/b")
    # the same run without that leaf at all: FedAvg over the survivors, round after round
    survivors = {k: v for k, v in THREE_LEVEL.items() if k != "world/med/b"}
    reference = run(
        tiny_config(tmp_path / "ref", survivors, overrides),
        QuietProgress(),
        out=tmp_path / "ref-run",
    )
    assert same_global_model(deployed, reference.run_dir)
    # after round 1 the killed leaf is gone from every evaluation, as if it had never been there
    rows = [r for r in evals(deployed) if r["round"] >= 1]
    assert rows == [r for r in evals(reference.run_dir) if r["round"] >= 1]
    assert any(r["node"] == "world/med/b" for r in evals(deployed) if r["round"] == 0)


def test_node_files_are_checked_and_paths_are_relative_to_them(tmp_path: Path) -> None:
    good = tmp_path / "paris.toml"
    good.write_text(
        '[node]\npath = "world/eu/paris"\nparent = "localhost:7001"\n'
        '[tls]\nca = "pki/ca.pem"\ncert = "pki/p.pem"\nkey = "pki/p.key"\n'
        '[data]\npaths = ["notes.jsonl"]\n',
        encoding="utf-8",
    )
    node = load_node_file(good)
    assert node.tls is not None and node.tls.ca == str(tmp_path / "pki" / "ca.pem")
    assert node.data is not None and node.data.paths == [str(tmp_path / "notes.jsonl")]
    assert node.link.round_timeout == 3600.0 and not node.allow_plaintext

    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\npath = "world"\nlisten = 7000\n[link]\nround_timout = 5\n', "utf-8")
    with pytest.raises(ConfigError) as err:
        load_node_file(bad)
    assert "node.listen" in str(err.value) and "link.round_timout" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_node_file(tmp_path / "missing.toml")
