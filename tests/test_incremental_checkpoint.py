"""Incremental checkpoints (issue 22, item 2): a checkpoint names each leaf's state by the digest
of a file of its own, written only when the leaf trained since; files no kept checkpoint names
are deleted; an altered file is refused like an altered checkpoint; resume stays bit-exact."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from worldlm import wire
from worldlm.checkpoint import list_checkpoints, load_checkpoint, read_meta
from worldlm.checkpoint_parts import PART_KEY, PartStore, parts_named
from worldlm.errors import CheckpointError
from worldlm.metrics.jsonl import read_metrics
from worldlm.outputs import write_checkpoint
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run
from worldlm.session import open_session

from .conftest import tiny_config
from .test_engine import StopAtRound

SIX = {f"world/{name}": ("med", "law", "code")[i % 3] for i, name in enumerate("abcdef")}
# Half of the six leaves train in each round: the others' state stays as it was.
SAMPLED = ["stop.rounds=4", "train.local_steps=1", "nodes.world.sample.fraction=0.5"]


def _named(checkpoint: Path) -> dict[str, str]:
    """leaf path -> the digest of its state file, as `checkpoint` names them."""
    nodes = read_meta(checkpoint)["nodes"]
    return {path: entry[PART_KEY] for path, entry in nodes.items() if PART_KEY in entry}


def test_a_checkpoint_writes_the_leaves_that_trained_and_names_the_others(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, SIX, [*SAMPLED, "checkpoint.keep=4"], n_docs=20)
    result = run(config, QuietProgress(), out=tmp_path / "run")
    checkpoints = list_checkpoints(result.run_dir / "checkpoints")
    trained = {
        row["round"]: set(row["participants"])
        for row in read_metrics(result.run_dir / "metrics.jsonl")
        if row["kind"] == "aggregate" and row["node"] == "world"
    }
    named = [_named(path) for path in checkpoints]
    assert [set(n) for n in named] == [set(SIX)] * 4  # every leaf, in every checkpoint
    for r in range(1, 4):
        assert len(trained[r + 1]) == 3
        changed = {leaf for leaf in SIX if named[r][leaf] != named[r - 1][leaf]}
        assert changed == trained[r + 1]  # exactly the leaves that trained wrote a file
    # The aggregators' state is in the checkpoint; the leaves' is not.
    tensors, _ = load_checkpoint(checkpoints[-1])
    assert {key.split("#")[0] for key in tensors} == {"node/world"}
    # One file per distinct leaf state: the 3 leaves that trained in round 1 and the 3 that
    # did not (one file: an untrained leaf's state is the same everywhere), then 3 per round.
    objects = sorted((result.run_dir / "checkpoints" / "objects").iterdir())
    assert {p.stem for p in objects} == {d for n in named for d in n.values()}
    assert len(objects) == 3 + 1 + 3 * 3
    for path in objects:  # each file is the one its name says
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem


def test_a_leaf_that_did_not_change_is_named_by_the_file_its_state_would_be(
    tmp_path: Path,
) -> None:
    """The reuse is safe only if every change to a leaf moves its version: each named file is
    byte for byte what the leaf's state encodes to now."""
    config = tiny_config(tmp_path, SIX, SAMPLED, n_docs=20)
    session = open_session(config, QuietProgress(), tmp_path / "run")
    state = session.fed.root.state
    for r in range(1, 4):
        state = session.fed.root.run_round(state, r).state
        write_checkpoint(session, r, 0.0, "")
        latest = list_checkpoints(session.run_dir / "checkpoints")[-1]
        for path, digest in _named(latest).items():
            fresh = wire.encode(*session.fed.leaves[path].snapshot())
            assert hashlib.sha256(fresh).hexdigest() == digest, (r, path)


def test_files_that_no_kept_checkpoint_names_are_deleted(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, SIX, [*SAMPLED, "checkpoint.keep=2"], n_docs=20)
    result = run(config, QuietProgress(), out=tmp_path / "run")
    directory = result.run_dir / "checkpoints"
    kept = list_checkpoints(directory)
    assert [p.name for p in kept] == ["round-000003.wlm", "round-000004.wlm"]
    named = {d for path in kept for d in parts_named(read_meta(path))}
    assert {p.stem for p in (directory / "objects").iterdir()} == named


def test_an_altered_leaf_file_is_refused_and_an_older_checkpoint_resumed(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, SIX, [*SAMPLED, "checkpoint.keep=4"], n_docs=20)
    whole = run(config, QuietProgress(), out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(4), out=tmp_path / "cut")
    directory = tmp_path / "cut" / "checkpoints"
    older, newest = list_checkpoints(directory)[-2:]
    # A file that only the newest checkpoint names: a leaf that trained in round 3.
    before = parts_named(read_meta(older))
    digest = next(d for d in parts_named(read_meta(newest)) if d not in before)
    target = directory / "objects" / f"{digest}.wlm"
    tensors, meta = wire.decode(target.read_bytes())
    key = next(k for k in tensors if k.startswith("opt/"))
    tensors[key] = tensors[key] * 0  # say, an optimizer whose moments were reset
    target.write_bytes(wire.encode(tensors, meta))  # a well-formed file: it decodes

    # The attack without the check: the altered state is what the file would restore.
    altered, _ = wire.decode(target.read_bytes())
    assert float(altered[key].abs().sum()) == 0
    with pytest.raises(CheckpointError, match="does not match its name"):
        PartStore(directory).load(digest)

    resumed = resume(tmp_path / "cut", QuietProgress())
    # Round 3 ran again from round 2's checkpoint: the same bytes as the uninterrupted run.
    final = "checkpoints/round-000004.wlm"
    assert (resumed.run_dir / final).read_bytes() == (whole.run_dir / final).read_bytes()
    assert resumed.perplexity == whole.perplexity


def test_a_sampled_run_resumed_twice_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, SIX, SAMPLED, n_docs=20)
    whole = run(config, QuietProgress(), out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(2), out=tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        resume(tmp_path / "cut", StopAtRound(4))
    resumed = resume(tmp_path / "cut", QuietProgress())
    for name in ("round-000004.wlm",):
        left = whole.run_dir / "checkpoints" / name
        right = resumed.run_dir / "checkpoints" / name
        assert left.read_bytes() == right.read_bytes()
        for digest in parts_named(read_meta(left)):
            assert (right.parent / "objects" / f"{digest}.wlm").is_file()
    assert resumed.perplexity == whole.perplexity


def test_audit_verify_checks_every_leaf_file_a_checkpoint_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worldlm.cli import main

    config = tiny_config(tmp_path, SIX, SAMPLED, n_docs=20)
    result = run(config, QuietProgress(), out=tmp_path / "run")
    assert main(["audit", "verify", str(result.run_dir)]) == 0
    newest = list_checkpoints(result.run_dir / "checkpoints")[-1]
    digest = parts_named(read_meta(newest))[0]
    target = result.run_dir / "checkpoints" / "objects" / f"{digest}.wlm"
    tensors, meta = wire.decode(target.read_bytes())
    target.write_bytes(wire.encode(tensors, {**meta, "sessions": 0}))  # well-formed, altered
    capsys.readouterr()
    assert main(["audit", "verify", str(result.run_dir)]) == 1
    out = " ".join(capsys.readouterr().out.split())  # (rich wraps long lines)
    assert f"{digest}.wlm does not match its name: it was altered since" in out
