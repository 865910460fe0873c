"""What a run leaves behind besides its metrics: checkpoints and their audit entries, the final
Hugging Face models with their model cards, and summary.json."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worldlm.audit.digest import file_sha256
from worldlm.audit.log import AuditLog
from worldlm.checkpoint import save_checkpoint
from worldlm.core.messages import EvalResult, Record, State
from worldlm.data.prepare import hf_tokenizer
from worldlm.federation.snapshot import snapshot
from worldlm.metrics.jsonl import read_metrics
from worldlm.model.card import Provenance, latest_privacy, participation_by_leaf, render_card
from worldlm.model.io import save_hf_model, weights_file
from worldlm.model.lora import base_of, is_lora
from worldlm.model.pretrained import base_model_dir, pretrained_dir
from worldlm.model.workspace import cache_dir_of
from worldlm.session import Session, config_digest
from worldlm.train.evaluate import merge_results
from worldlm.train.unigram import unigram_result
from worldlm.version import __version__


@dataclass
class RunResult:
    run_dir: Path
    rounds: int
    stop_reason: str
    before: dict[str, EvalResult]  # by leaf path, before training
    after: dict[str, EvalResult]  # by leaf path, the deployed models after training
    tokens: float
    parameters: int
    final_dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def perplexity(self) -> dict[str, float]:
        """Validation perplexity of each leaf's deployed model after training, by leaf path."""
        return {path: result.ppl for path, result in sorted(self.after.items())}

    @property
    def mean_perplexity(self) -> float:
        """The mean over leaves of `perplexity` (each leaf counts once, whatever its size)."""
        values = list(self.perplexity.values())
        return sum(values) / len(values)

    @property
    def worst_leaf(self) -> tuple[str, float]:
        """The leaf whose deployed model does worst, and its perplexity."""
        return max(self.perplexity.items(), key=lambda item: item[1])

    def summary(self) -> dict[str, Any]:
        """summary.json of the run: per-leaf results, final models, privacy, audit head."""
        loaded: dict[str, Any] = json.loads((self.run_dir / "summary.json").read_text("utf-8"))
        return loaded


def write_model_cards(session: Session, result: RunResult) -> None:
    """A README.md model card in every final model directory (see `model.card`)."""
    tree, config = session.tree, session.config
    rows = read_metrics(session.metrics.path)
    leaves = [leaf.path for leaf in tree.leaves()]
    digests = {leaf.path: session.data.digests.get(leaf.name, "unknown") for leaf in tree.leaves()}
    for path, directory in result.final_dirs.items():
        node = tree.find(path)  # final_dirs are keyed by configured paths
        kind = "global" if path == tree.path else ("leaf" if node.is_leaf else "sub-federation")
        below = [leaf.path for leaf in node.leaves()]
        merged = [result.after[leaf] for leaf in below if leaf in result.after]
        card = Provenance(
            node=path,
            kind=kind,
            run_id=session.fed.root.ctx.run_id,
            config_sha256=config_digest(config),
            worldlm_version=__version__,
            method=config.run.method,
            rounds=result.rounds,
            stop_reason=result.stop_reason,
            contributors=leaves,
            participation=participation_by_leaf(rows),
            data_sha256=digests,
            val_ppl=merge_results(merged).ppl if merged else None,
            personal_from=below if kind != "global" and session.personalized else (),
            privacy=latest_privacy(rows),
            base_model=str(base) if (base := lora_base(session.model, directory)) else None,
        )
        (directory / "README.md").write_text(render_card(card), encoding="utf-8")


def lora_base(model: torch.nn.Module, directory: Path) -> Path | None:
    """The base model a LoRA model directory applies to (None for a whole model)."""
    return base_of(directory) if is_lora(model) else None


def write_checkpoint(session: Session, round_index: int, tokens: float, finished: str) -> Record:
    """The whole run state after `round_index`, then the audit entry naming the file and its
    SHA-256. The checkpoint itself holds nothing of the audit log (whose hashes cover
    timestamps): two runs of one config must write identical checkpoints (TESTPLAN A2).
    Returns the metrics row of what it wrote: the bytes of the checkpoint and of the leaf-state
    files it wrote (the leaves that changed since the last one), and the seconds it took."""
    fed, audit, parts = session.fed, session.audit, session.parts
    started, written_before = time.perf_counter(), parts.written_bytes
    files_before = parts.written_files
    tensors, meta = snapshot(fed, round_index, tokens, fed.root.ctx.run_id, parts)
    meta["finished"] = finished
    path = save_checkpoint(
        session.run_dir / "checkpoints",
        round_index,
        tensors,
        meta,
        keep=session.config.checkpoint.keep,
        parts=parts,
    )
    if audit is not None:
        audit_checkpoint(audit, fed.root.path, path, round_index)
    return {
        "round": round_index,
        "node": fed.root.path,
        "kind": "checkpoint",
        "file": path.name,
        "bytes": path.stat().st_size + parts.written_bytes - written_before,
        "leaf_files": parts.written_files - files_before,
        "seconds": time.perf_counter() - started,
    }


def audit_checkpoint(audit: AuditLog, root: str, path: Path, round_index: int) -> None:
    audit.append(
        "checkpoint", node=root, round=round_index, file=path.name, sha256=file_sha256(path)
    )


def audit_vouches(audit: AuditLog) -> Callable[[Path], str | None]:
    """A checkpoint's problem against the audit log, or None: a file whose SHA-256 differs
    from the one recorded when it was written was altered since, and is not resumed from.
    (One without an entry is the crash between a checkpoint and its entry: `resume_audit`
    records it.)"""

    def problem(path: Path) -> str | None:
        recorded = audit.checkpoint_entry(path.name)
        if recorded is not None and recorded[1].get("sha256") != file_sha256(path):
            return (
                f"checkpoint {path} does not match the SHA-256 the audit log recorded when it "
                "was written: it was altered since"
            )
        return None

    return problem


def resume_audit(audit: AuditLog, path: Path, root: str, round_index: int) -> None:
    """Like the metrics: drop the entries of the rounds that will run again, and make sure the
    checkpoint resumed from has its entry (written late if the crash came between the
    checkpoint and its entry). A recorded entry is never written again: the file was vouched
    for against it (`audit_vouches`)."""
    audit.truncate_after(audit.last_seq_through(round_index))
    if audit.checkpoint_entry(path.name) is None:
        audit_checkpoint(audit, root, path, round_index)


def audit_run_end(session: Session, result: RunResult) -> list[Any] | None:
    """The run's end and the digests of its final models; returns the head to anchor."""
    if session.audit is None:
        return None
    session.audit.append(
        "run_end",
        node=session.tree.path,
        round=result.rounds,
        stop_reason=result.stop_reason,
        tokens=result.tokens,
        final_models={
            path: file_sha256(weights_file(directory))
            for path, directory in sorted(result.final_dirs.items())
        },
    )
    return list(session.audit.head())


def save_final_models(session: Session) -> dict[str, Path]:
    """The global model under final/<root>, and, under each leaf's configured path, every leaf
    that deploys something else. With LoRA, each directory holds that model's adapters."""
    fed, tree, model, config = session.fed, session.tree, session.model, session.config
    final, cache_dir = session.run_dir / "final", cache_dir_of(config)
    model_dir = pretrained_dir(config.model, cache_dir)
    tokenizer = hf_tokenizer(session.data.tokenizer, config.tokenizer, model_dir)
    base = base_model_dir(config.model, cache_dir) if config.model.lora.enabled else None

    def save(state: State, path: str) -> Path:
        return save_hf_model(model, state, tokenizer, final / path, base_dir=base)

    dirs = {tree.path: save(fed.root.state, tree.path)}
    for path, aggregator in fed.aggregators.items():
        if aggregator.key_state:  # a sub-federation's deployed model: global B + its K
            dirs[path] = save(aggregator.with_own_key_layers(fed.root.state), path)
    configured = {leaf.name: leaf.path for leaf in tree.leaves()}
    for leaf in fed.leaves.values():
        parent = fed.aggregators[leaf.path.rsplit("/", 1)[0]]
        if leaf.own_state or leaf.adapted_state or leaf.path in parent.child_keys:
            sent = parent.state_for(leaf.path, parent.with_own_key_layers(fed.root.state))
            target = configured.get(leaf.data.name, leaf.path)
            dirs[target] = save(leaf.deployed_state(sent), target)
    return dirs


def write_summary(
    result: RunResult,
    run_dir: Path,
    digests: dict[str, str],
    audit_head: list[Any] | None = None,
    privacy: dict[str, dict[str, Any]] | None = None,
    unigram: dict[str, float] | None = None,
) -> None:
    """summary.json: the run's outcome per leaf, its final models, privacy spent and audit
    head; `unigram` is each leaf's unigram reference perplexity, by leaf name."""
    unigram = unigram or {}
    summary: dict[str, Any] = {
        "worldlm": __version__,
        "rounds": result.rounds,
        "stop_reason": result.stop_reason,
        "tokens": result.tokens,
        "parameters": result.parameters,
        "leaves": {
            path: {
                "ppl_before": result.before[path].ppl,
                "ppl_after": result.after[path].ppl,
                # What a table of the leaf's own token frequencies scores (train.unigram).
                "unigram_ppl": unigram.get(path.rsplit("/", 1)[-1]),
                "data_sha256": digests.get(path.rsplit("/", 1)[-1]),
            }
            for path in result.after
        },
        "final_models": {k: str(v.relative_to(run_dir)) for k, v in result.final_dirs.items()},
    }
    summary["privacy"] = privacy or {}  # ε and δ spent per federation with DP
    if audit_head is not None:
        summary["audit_head"] = audit_head  # `worldlm audit verify` checks the log against it
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def unigram_references(session: Session) -> dict[str, float]:
    """Each leaf's unigram perplexity on the validation blocks it is evaluated on, by name."""
    limit = session.config.eval.max_blocks
    vocab = session.data.tokenizer.get_vocab_size()
    refs: dict[str, float] = {}
    for leaf in session.tree.leaves():
        data = session.data.leaves.get(leaf.name)
        if data is None or leaf.name not in data.eval_sets:  # a leaf that runs elsewhere
            continue
        val = data.eval_sets[leaf.name]
        refs[leaf.name] = unigram_result(
            data.train_blocks, val[:limit] if limit else val, vocab
        ).ppl
    return refs
