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
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worldlm.config import RunConfig, dump_config
from worldlm.config_load import load_config
from worldlm.core.messages import EvalReport, EvalTask, TrainTask, Update
from worldlm.core.transport import ChildInfo, Dropout, Transport
from worldlm.data.tokenizer import train_tokenizer
from worldlm.deploy.node_file import load_node_file
from worldlm.errors import ConfigError
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.root_loop import evaluate_tree, round_loop
from worldlm.runner import run
from worldlm.security.certs import safe_name
from worldlm.session import open_session

from .conftest import synthetic_documents, tiny_config

THREE_LEVEL = {"world/med/a": "med", "world/med/b": "law", "world/c": "code"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_file(
    path: Path, node: str, pki: Path, *, rejoin_wait: float = 10.0, **addresses: str
) -> Path:
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
        f"rejoin_wait = {rejoin_wait}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def worldlm(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "worldlm.cli", *map(str, args)]


def shared_tokenizer(tmp_path: Path) -> str:
    texts = [d for i, t in enumerate(["med", "law", "code"]) for d in synthetic_documents(t, 60, i)]
    train_tokenizer(texts, vocab_size=320, cache_dir=None).save(str(tmp_path / "tok.json"))
    return f"tokenizer.path='{tmp_path / 'tok.json'}'"


def deploy(
    tmp_path: Path,
    config: RunConfig,
    *,
    kill: str | None = None,
    when: tuple[str, str] = ("", "train_task of round 1"),
    restart: bool = False,
    rejoin_wait: float = 10.0,
    ranks: dict[str, int] | None = None,
) -> Path:
    """Run `config` (the THREE_LEVEL tree) as five processes and return the root's run
    directory. With `kill`, SIGKILL that node once the log of node `when[0]` (default: itself)
    shows `when[1]`; with `restart`, start it again (the root with `--resume`). `ranks` starts
    the leaves it names on that many processes each with torchrun."""
    shared = tmp_path / "federation.toml"
    shared.write_text(dump_config(config), encoding="utf-8")
    pki = tmp_path / "pki"
    subprocess.run(worldlm("certs", "tree", shared, "--out", pki), check=True)
    root, med = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    wait = {"rejoin_wait": rejoin_wait}
    files = {
        "world": node_file(nodes / "root.toml", "world", pki, listen=root, **wait),
        "world/med": node_file(
            nodes / "med.toml", "world/med", pki, listen=med, parent=root, **wait
        ),
        "world/med/a": node_file(nodes / "a.toml", "world/med/a", pki, parent=med),
        "world/med/b": node_file(nodes / "b.toml", "world/med/b", pki, parent=med),
        "world/c": node_file(nodes / "c.toml", "world/c", pki, parent=root),
    }
    run_dir = tmp_path / "deployed"

    def command(path: str, *, again: bool = False) -> list[str]:
        verb = "join" if path in THREE_LEVEL else "serve"
        extra = ["--resume" if again else "--out", run_dir] if path == "world" else []
        n = (ranks or {}).get(path, 1)
        if n > 1:  # torchrun's launcher, as `torchrun --nproc_per_node n -m worldlm.cli ...`
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
            launcher += ["--master_port", str(free_port()), "-m", "worldlm.cli"]
            # --node-file: torchrun's parser would take --node for its --node-rank
            command = [verb, str(shared), "--node-file", str(files[path]), *map(str, extra)]
            return [*launcher, *command]
        return worldlm(verb, shared, "--node", files[path], *extra)

    log_paths = {p: tmp_path / f"{safe_name(p)}.log" for p in files}
    logs = {p: log_paths[p].open("w") for p in files}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    restarted: subprocess.Popen[bytes] | None = None
    try:
        for path in files:
            procs[path] = subprocess.Popen(
                command(path), stdout=logs[path], stderr=subprocess.STDOUT
            )
        if kill is not None:
            watched = log_paths[when[0] or kill]
            deadline = time.monotonic() + 300
            while when[1] not in watched.read_text("utf-8"):
                assert time.monotonic() < deadline and procs[kill].poll() is None
                time.sleep(0.02)
            procs[kill].send_signal(signal.SIGKILL)
            assert procs[kill].wait(timeout=60) == -signal.SIGKILL
            if restart:
                logs[kill].write("\n--- restarted ---\n")
                logs[kill].flush()
                restarted = subprocess.Popen(
                    command(kill, again=True), stdout=logs[kill], stderr=subprocess.STDOUT
                )
        for path, proc in procs.items():
            if path == kill:
                proc = restarted if restarted is not None else proc
            code = proc.wait(timeout=600)
            expected = -signal.SIGKILL if path == kill and restarted is None else 0
            assert code == expected, log_paths[path].read_text()
    finally:
        for proc in [*procs.values(), *([restarted] if restarted else [])]:
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


def test_deploy_local_then_start_sh_equals_the_in_process_engine(tmp_path: Path) -> None:
    """The README's path: `worldlm deploy-local` writes the files, `start.sh` starts five
    processes over mTLS; the same config run in one process ends with the same model."""
    from worldlm.cli import main

    config = tiny_config(tmp_path, THREE_LEVEL, ["stop.rounds=2"])
    (tmp_path / "fed.toml").write_text(dump_config(config), encoding="utf-8")
    out = tmp_path / "deploy"
    args = ["deploy-local", str(tmp_path / "fed.toml"), "--out", str(out)]
    assert main([*args, "--base-port", str(free_port())]) == 0
    for path in ["world", "world/med", *THREE_LEVEL]:
        node = load_node_file(out / "nodes" / f"{safe_name(path)}.toml")
        assert node.tls is not None and Path(node.tls.cert).is_file()
    started = subprocess.run(["bash", str(out / "start.sh")], capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "validation perplexity per leaf" in started.stdout
    shared = tmp_path / "deploy" / "federation.toml"
    reference = run(load_config(shared), QuietProgress(), out=tmp_path / "in-process")
    assert same_global_model(out / "run", reference.run_dir)
    assert evals(out / "run") == evals(reference.run_dir)
    summary = json.loads((out / "run" / "summary.json").read_text("utf-8"))
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


def test_the_receive_gate_limit_is_a_node_file_setting(tmp_path: Path) -> None:
    root = '[node]\npath = "world"\nlisten = "127.0.0.1:7000"\n'
    default = tmp_path / "default.toml"
    default.write_text(root, encoding="utf-8")
    assert load_node_file(default).link.held_messages == 2
    raised = tmp_path / "raised.toml"
    raised.write_text(root + "[link]\nheld_messages = 8\n", encoding="utf-8")
    assert load_node_file(raised).link.held_messages == 8
    zero = tmp_path / "zero.toml"
    zero.write_text(root + "[link]\nheld_messages = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"link\.held_messages"):
        load_node_file(zero)


class LeaveOutInRound:
    """The in-process reference of a sub-federation that died in one round: the root's tasks
    to `path` in global round `round_index` are never answered."""

    def __init__(self, transport: Transport, path: str, round_index: int) -> None:
        self.inner, self.path, self.round_index = transport, path, round_index

    def children(self, parent: str) -> list[ChildInfo]:
        return self.inner.children(parent)

    def train(self, tasks: Sequence[TrainTask]) -> Iterator[Update]:
        kept = [t for t in tasks if (t.recipient, t.global_round) != (self.path, self.round_index)]
        return self.inner.train(kept)

    def evaluate(self, tasks: Sequence[EvalTask]) -> Iterator[EvalReport]:
        return self.inner.evaluate(tasks)

    def dropouts(self) -> list[Dropout]:
        return self.inner.dropouts()


def in_process_run(
    config: RunConfig, run_dir: Path, *, drop: tuple[str, int] | None = None
) -> Path:
    run_dir.mkdir(parents=True)
    session = open_session(config, QuietProgress(), run_dir)
    if drop is not None:
        session.fed.root.transport = LeaveOutInRound(session.fed.root.transport, *drop)
    before = evaluate_tree(session, session.fed.root.state, 0)
    round_loop(session, QuietProgress(), before, first_round=1, tokens=0.0)
    return run_dir


def aggregate_rows(run_dir: Path, node: str) -> dict[int, dict[str, object]]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {int(r["round"]): r for r in rows if r["kind"] == "aggregate" and r["node"] == node}


@pytest.mark.slow
def test_a_killed_root_resumes_and_the_deployment_ends_as_if_uninterrupted(
    tmp_path: Path,
) -> None:
    """TESTPLAN C9 across processes: SIGKILL the root in round 2 of 3, restart it with
    `--resume`; the children (still running) roll back to its checkpoint and replay round 2."""
    overrides = [shared_tokenizer(tmp_path), "stop.rounds=3", "train.local_steps=80"]
    config = tiny_config(tmp_path, THREE_LEVEL, overrides)
    reference = run(config, QuietProgress(), out=tmp_path / "in-process")
    deployed = deploy(
        tmp_path, config, kill="world", when=("world/med", "train_task of round 2"), restart=True
    )
    assert same_global_model(deployed, reference.run_dir)
    assert evals(deployed) == evals(reference.run_dir)
    assert "rolled back" in (tmp_path / f"{safe_name('world/med')}.log").read_text("utf-8")


@pytest.mark.slow
def test_a_killed_sub_federation_misses_one_round_and_rejoins_the_next(tmp_path: Path) -> None:
    """TESTPLAN C11: SIGKILL the inner aggregator world/med once its leaf a trains in round 2,
    and restart it: round 2 goes on without its subtree, and it rejoins in round 3 with its
    state from round 1; its leaves roll back the round that was lost, so nothing counts twice.
    The result equals the in-process engine with world/med left out of round 2."""
    overrides = [shared_tokenizer(tmp_path), "stop.rounds=3", "train.local_steps=80"]
    config = tiny_config(tmp_path, THREE_LEVEL, overrides)
    deployed = deploy(
        tmp_path,
        config,
        kill="world/med",
        when=("world/med/a", "train_task of round 2"),
        restart=True,
        rejoin_wait=300.0,
    )
    reference = in_process_run(config, tmp_path / "reference", drop=("world/med", 2))
    rows = aggregate_rows(deployed, "world")
    assert rows[2]["participants"] == ["world/c"] and rows[2]["missing"] == ["world/med"]
    assert rows[3]["participants"] == ["world/c", "world/med"]
    dropped = [r for r in read_metrics(deployed / "metrics.jsonl") if r["kind"] == "dropped"]
    assert [(r["round"], r["sender"]) for r in dropped] == [(2, "world/med")]
    assert same_global_model(deployed, reference)
    assert evals(deployed) == evals(reference)
    # world/med/a had started round 2 when its parent died: it trained it again, from before
    assert "rolled back" in (tmp_path / f"{safe_name('world/med/a')}.log").read_text("utf-8")


def test_a_node_with_a_missing_or_foreign_certificate_stops_before_reading_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worldlm.cli import main

    config = tiny_config(tmp_path, THREE_LEVEL, [shared_tokenizer(tmp_path)])
    shared = tmp_path / "federation.toml"
    shared.write_text(dump_config(config), encoding="utf-8")
    pki = tmp_path / "pki"
    assert main(["certs", "tree", str(shared), "--out", str(pki)]) == 0
    leaf = "world/med/a"
    borrowed = node_file(tmp_path / "borrowed.toml", "world/c", pki, parent="127.0.0.1:1")
    # world/med/a with world/c's certificate, and data that does not exist
    text = borrowed.read_text("utf-8").replace('path = "world/c"', f'path = "{leaf}"')
    borrowed.write_text(text + '[data]\npaths = ["nowhere.jsonl"]\n', encoding="utf-8")
    assert main(["join", str(shared), "--node", str(borrowed)]) == 2
    err = capsys.readouterr().err
    assert "expected 'world/med/a', but the certificate is for 'world/c'" in " ".join(err.split())

    (pki / f"{safe_name(leaf)}.pem").unlink()
    missing = node_file(tmp_path / "a.toml", leaf, pki, parent="127.0.0.1:1")
    assert main(["join", str(shared), "--node", str(missing)]) == 2
    assert "node certificate not found" in capsys.readouterr().err


def test_a_node_files_paths_replace_every_shared_source() -> None:
    """A member's own files win over whatever source the shared config names for its leaf,
    including a plugin's data source (which would otherwise be read first)."""
    from worldlm.config import LeafConfig
    from worldlm.deploy.node import with_own_files
    from worldlm.tree import FederationNode

    for shared in (
        {"source": "warehouse", "options": {"table": "notes"}, "max_chars": 1000},
        {"dataset": "shared/dir", "split": "train", "max_chars": 1000},
        {"corpus": "hpo", "max_chars": 1000},
    ):
        leaf = FederationNode("world/a", LeafConfig.model_validate({"data": shared}))
        own = with_own_files(leaf, ["/member/notes.jsonl"]).data
        assert own.paths == ["/member/notes.jsonl"]
        assert (own.source, own.options, own.dataset, own.split, own.corpus) == (None,) * 5
        assert own.max_chars == 1000


@pytest.mark.slow
def test_a_leaf_on_two_processes_sends_what_one_process_sends(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m worldlm join`: rank 0 answers the parent, both ranks
    train halves of every step's batch; the federation ends with the in-process engine's
    models up to float rounding (gradients summed across processes in another order)."""
    config = tiny_config(tmp_path, THREE_LEVEL, [shared_tokenizer(tmp_path)])
    deployed = deploy(tmp_path, config, ranks={"world/c": 2})
    log = (tmp_path / f"{safe_name('world/c')}.log").read_text("utf-8")
    assert "run over after" in log
    reference = run(config, QuietProgress(), out=tmp_path / "in-process")
    left = load_file(deployed / "final" / "world" / "model.safetensors")
    right = load_file(reference.run_dir / "final" / "world" / "model.safetensors")
    assert left.keys() == right.keys()
    gap = max(float((left[k] - right[k]).abs().max()) for k in left)
    assert 0 < gap < 1e-3  # not bit-identical (another summation order), but the same model
    for got, want in zip(evals(deployed), evals(reference.run_dir), strict=True):
        assert (got["round"], got["node"]) == (want["round"], want["node"])
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-3)


@pytest.mark.slow
def test_a_deployed_federation_runs_fedbuff_on_real_clocks(tmp_path: Path) -> None:
    """`strategy = "fedbuff"` with the real clock at the root of five processes: each step folds
    the first reply to arrive while the other child keeps training (in flight across steps, its
    reply folded later with its staleness), and at the end the work still in flight is given
    up without a hang: every process exits 0."""
    overrides = [
        shared_tokenizer(tmp_path),
        "stop.rounds=4",
        "nodes.world.strategy=fedbuff",
        "nodes.world.fedbuff.clock=real",
        "nodes.world.fedbuff.buffer=1",
    ]
    deployed = deploy(tmp_path, tiny_config(tmp_path, THREE_LEVEL, overrides))
    rows = read_metrics(deployed / "metrics.jsonl")
    steps = [r for r in rows if r["kind"] == "aggregate" and r["node"] == "world"]
    assert [(r["status"], r["version"]) for r in steps] == [("ok", v) for v in (1, 2, 3, 4)]
    folded = [f for r in steps for f in r["folded"]]
    assert len(folded) == 4  # one reply a step, the buffer's size
    assert {f["sender"] for f in folded} <= {"world/med", "world/c"}
    # After each step the other child's work goes on into the next: still training, or its
    # reply already buffered, never waited for.
    assert all(r["in_flight"] + r["buffered"] == 1 for r in steps)
    # Weighted by the default staleness rule, 1/sqrt(1 + s), s the steps taken since it left.
    assert all(f["factor"] == pytest.approx((1 + f["staleness"]) ** -0.5) for f in folded)
    assert not [r for r in rows if r["kind"] in ("rejected", "refused")]
    summary = json.loads((deployed / "summary.json").read_text("utf-8"))
    assert summary["rounds"] == 4
