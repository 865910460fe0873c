"""The root's loop over rounds: train the tree, evaluate, checkpoint, stop; and its
continuation from a checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from worldlm.checkpoint import list_checkpoints, load_latest
from worldlm.config import RunConfig
from worldlm.core.messages import EvalResult, State
from worldlm.errors import CheckpointError
from worldlm.federation.privacy_policy import DPRule
from worldlm.federation.snapshot import restore
from worldlm.metrics.jsonl import read_metrics
from worldlm.model.build import count_parameters
from worldlm.model.card import latest_privacy
from worldlm.monitoring import eval_rows, fairness_rows, leaf_results
from worldlm.outputs import (
    RunResult,
    audit_run_end,
    audit_vouches,
    resume_audit,
    save_final_models,
    unigram_references,
    write_checkpoint,
    write_model_cards,
    write_summary,
)
from worldlm.round_summary import summarize_round, wire_bytes
from worldlm.session import RunObserver, Session, audit_run_start
from worldlm.train.evaluate import merge_results


def continue_session(session: Session, observer: RunObserver) -> RunResult:
    """Restore `session`'s federation from the newest checkpoint in its run directory and run
    the remaining rounds (from round 1 if there is no checkpoint yet)."""
    run_dir = session.run_dir
    rows = read_metrics(session.metrics.path) if session.metrics.path.exists() else []
    if not list_checkpoints(run_dir / "checkpoints"):
        observer.status("no checkpoint yet: starting the run again from round 1")
        session.metrics.replace([])
        if session.audit is not None:
            session.audit.truncate_after(0)
            audit_run_start(session)
        before = evaluate_tree(session, session.fed.root.state, 0)
        return round_loop(session, observer, before, first_round=1, tokens=0.0)
    refused: list[str] = []  # checkpoints the audit log does not vouch for

    def vouch(candidate: Path) -> str | None:
        problem = audit_vouches(session.audit)(candidate) if session.audit is not None else None
        if problem is not None:
            refused.append(candidate.name)
            observer.status(f"{problem}; trying an older one")
        return problem

    path, tensors, meta = load_latest(run_dir / "checkpoints", vouch, session.parts)
    if meta.get("run_id") != session.fed.root.ctx.run_id:
        raise CheckpointError(f"{path} belongs to another run configuration")
    if meta.get("finished"):
        raise CheckpointError(f"the run in {run_dir} already finished ({meta['finished']})")
    restore(session.fed, tensors, meta, session.parts)
    done = int(meta["global_round"])
    observer.status(f"resuming after round {done} from {path.name}")
    if session.audit is not None:
        resume_audit(session.audit, path, session.tree.path, done)
        session.audit.append(
            "run_resumed",
            node=session.tree.path,
            round=done,
            checkpoint=path.name,
            refused=refused,
        )
    _charge_lost_rounds(session, rows, done)
    # Rows written after the checkpoint belong to a round that will be run again.
    # (A row without an integer round cannot be placed before or after it: it goes too.)
    kept = [row for row in rows if _is_round(row.get("round")) and row["round"] <= done]
    session.metrics.replace(kept)
    before = {
        row["node"]: EvalResult(float(row["loss"]), int(row["tokens"]))
        for row in kept
        if row["kind"] == "eval" and row["round"] == 0
    }
    # (a deployed leaf that was not there for the first evaluation has no baseline)
    before = {leaf.path: before[leaf.path] for leaf in session.tree.leaves() if leaf.path in before}
    return round_loop(session, observer, before, first_round=done + 1, tokens=meta["tokens"])


def _charge_lost_rounds(session: Session, rows: list[dict[str, Any]], done: int) -> None:
    """DP rounds that ran after the checkpoint released noisy models to the tree before the
    crash; their re-runs draw fresh noise, so both are charged (a row without its sampling
    rate, from an older run, is charged at q = 1, the most)."""
    lost: dict[str, list[float]] = {}
    for row in rows:
        if row.get("kind") != "privacy" or row.get("local") or not _is_round(row.get("round")):
            continue
        if row["round"] > done and isinstance(row.get("node"), str):
            rate = row.get("sampling_rate", 1.0)
            lost.setdefault(row["node"], []).append(
                float(rate) if isinstance(rate, int | float) and 0 <= rate <= 1 else 1.0
            )
    for path, rates in sorted(lost.items()):
        aggregator = session.fed.aggregators.get(path)
        if aggregator is None or not isinstance(aggregator.rule, DPRule):
            continue
        aggregator.rule.policy.charge_lost(rates)
        if session.audit is not None:
            session.audit.append(
                "dp_lost_rounds_charged", node=path, round=done, rounds=len(rates), rates=rates
            )


def round_loop(
    session: Session,
    observer: RunObserver,
    before: dict[str, EvalResult],
    *,
    first_round: int,
    tokens: float,
) -> RunResult:
    """Root rounds from `first_round` on: train the tree, evaluate, checkpoint, check stops."""
    config, fed = session.config, session.fed
    started = time.monotonic()
    state = fed.root.state
    after, stop_reason, r = before, "", first_round - 1
    # Traffic of the rounds before this process (a resumed run): what metrics.jsonl holds.
    sent = wire_bytes(read_metrics(session.metrics.path)) if session.metrics.path.exists() else None
    for r in range(first_round, config.stop.rounds + 1):
        observer.round_started(r, config.stop.rounds)
        round_started = time.monotonic()
        outcome = fed.root.run_round(state, r)
        state = outcome.state
        tokens += outcome.weight
        sent = wire_bytes(outcome.records, sent)
        session.metrics.write(outcome.records)
        last = r == config.stop.rounds
        stop_reason = _stop_reason(config, tokens, time.monotonic() - started)
        if any(a.privacy_exhausted for a in fed.aggregators.values()):
            # A federation refused a round that would have exceeded its ε budget.
            stop_reason = "privacy_budget"
        evaluated = r % config.eval.every == 0 or last or stop_reason != ""
        if evaluated:
            after = evaluate_tree(session, state, r)
            if config.stop.target_ppl is not None and mean_ppl(after) <= config.stop.target_ppl:
                stop_reason = "target_ppl"
        observer.round_finished(
            summarize_round(
                r,
                config.stop.rounds,
                after if evaluated else None,
                tokens,
                sent,
                time.monotonic() - round_started,
            )
        )
        finished = stop_reason or ("rounds" if last else "")
        if r % config.checkpoint.every == 0 or finished:
            session.metrics.write([write_checkpoint(session, r, tokens, finished)])
        if stop_reason:
            break
    observer.status("saving final models")
    final_dirs = save_final_models(session)
    result = RunResult(
        session.run_dir,
        r,
        stop_reason or "rounds",
        before,
        after,
        tokens,
        count_parameters(session.model),
        final_dirs,
    )
    write_model_cards(session, result)
    audit_head = audit_run_end(session, result)
    privacy = latest_privacy(read_metrics(session.metrics.path))
    unigram = unigram_references(session)
    write_summary(result, session.run_dir, session.data.digests, audit_head, privacy, unigram)
    session.metrics.publish(session.run_dir)  # to trackers that keep files (MLflow, W&B)
    session.metrics.close()
    if session.audit is not None:
        session.audit.close()  # folds the write-ahead log into audit.sqlite
    return result


def _stop_reason(config: RunConfig, tokens: float, elapsed: float) -> str:
    if config.stop.max_tokens is not None and tokens >= config.stop.max_tokens:
        return "max_tokens"
    if config.stop.max_seconds is not None and elapsed >= config.stop.max_seconds:
        return "max_seconds"
    return ""


def evaluate_tree(session: Session, state: State, round_index: int) -> dict[str, EvalResult]:
    """Each leaf of the configured tree on its own validation split, with the model it would
    deploy (and with the global model, if configured); eval, eval_global and fairness rows go
    to the metrics (see `monitoring`). Returns the deployed models' results by leaf path."""
    fed, tree = session.fed, session.tree
    per_leaf = leaf_results(fed, tree, state, round_index, deployed=True)
    rows = eval_rows(tree, per_leaf, round_index, "eval")
    rows += fairness_rows(tree, per_leaf, round_index)
    if session.config.eval.global_model:
        # Without personalization the deployed model is the global one: no second pass.
        global_results = (
            leaf_results(fed, tree, state, round_index, deployed=False)
            if session.personalized
            else per_leaf
        )
        rows += eval_rows(tree, global_results, round_index, "eval_global")
    session.metrics.write(rows)
    return per_leaf


def mean_ppl(results: dict[str, EvalResult]) -> float:
    """Perplexity of the token-weighted mean validation loss over the leaves."""
    return merge_results(list(results.values())).ppl


def _is_round(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
