"""One run from a config: prepare data, build the federation, loop over root rounds, save.

The loop is explicit: each root round trains the whole tree once, then evaluates, checkpoints
and checks the stop conditions.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from worldlm import __version__
from worldlm.audit.cli import AUDIT_FILE
from worldlm.audit.digest import file_sha256
from worldlm.audit.log import AuditLog
from worldlm.checkpoint import list_checkpoints, load_latest, save_checkpoint
from worldlm.config import RunConfig, dump_config, load_config
from worldlm.data.corpora import default_cache_dir
from worldlm.data.prepare import PreparedData, check_sources, hf_tokenizer, prepare_data
from worldlm.errors import CheckpointError, ConfigError, ModelError
from worldlm.federation.build import Federation, build_federation
from worldlm.federation.context import Observer, RunContext
from worldlm.federation.messages import State
from worldlm.federation.methods import MethodPlan, plan_method
from worldlm.federation.snapshot import restore, snapshot
from worldlm.metrics.jsonl import MetricsWriter, read_metrics
from worldlm.metrics.sinks import make_sinks
from worldlm.model.build import build_model, count_parameters
from worldlm.model.card import Provenance, latest_privacy, participation_by_leaf, render_card
from worldlm.model.io import save_hf_model, weights_file
from worldlm.model.lora import base_of, is_lora, wrap_lora
from worldlm.model.pretrained import base_model_dir
from worldlm.model.state import get_state
from worldlm.monitoring import eval_rows, fairness_rows, leaf_results
from worldlm.seeding import derive_seed
from worldlm.train.device import pick_device
from worldlm.train.evaluate import EvalResult, merge_results
from worldlm.tree import FederationNode, build_tree


class RunObserver(Observer, Protocol):
    def status(self, message: str) -> None: ...

    def round_started(self, round_index: int, total: int) -> None: ...

    def round_finished(self, round_index: int, mean_ppl: float | None) -> None: ...


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


def config_digest(config: RunConfig) -> str:
    """SHA-256 of the config, less where its leaves run (run.backend, run.ray_address): that
    changes none of the results, so a run keeps its run_id and checkpoints on every backend
    and may resume on another."""
    where = {"backend": "inprocess", "ray_address": None}
    what = config.model_copy(update={"run": config.run.model_copy(update=where)})
    return hashlib.sha256(dump_config(what).encode("utf-8")).hexdigest()


def make_run_dir(config: RunConfig, out: Path | None) -> Path:
    """`out` if given (it must be new or empty), else out_dir/name with a free numeric suffix."""
    if out is not None:
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {out} already holds files; choose a new directory")
        out.mkdir(parents=True, exist_ok=True)
        return out
    base = Path(config.run.out_dir) / config.run.name
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


@dataclass
class Session:
    """Everything the round loop needs, built identically for a new and a resumed run."""

    config: RunConfig
    tree: FederationNode
    fed: Federation
    model: PreTrainedModel
    data: PreparedData
    run_dir: Path
    metrics: MetricsWriter
    # Whether leaves deploy something other than the global model (worldlm, fedper, local).
    personalized: bool = True
    audit: AuditLog | None = None  # audit.sqlite; None where a caller keeps no audit log


def open_metrics(config: RunConfig, run_dir: Path) -> MetricsWriter:
    """metrics.jsonl plus the sinks `config.monitor` asks for."""
    return MetricsWriter(run_dir / "metrics.jsonl", make_sinks(config.monitor, run_dir))


def open_session(config: RunConfig, observer: RunObserver, run_dir: Path) -> Session:
    """Read and tokenize the data, build the model and the live federation."""
    tree = build_tree(config.nodes)
    plan = plan_method(config.run.method, tree)
    remote = uses_ray(config, plan, observer)
    device = torch.device("cpu") if remote else pick_device(config.run.device)
    data = prepare_config_data(tree, config, observer)
    observer.status("building the model")
    model = build_workspace(config, data.tokenizer.get_vocab_size(), device)
    run_id = config_digest(config)[:16]
    audit = AuditLog.open(run_dir / AUDIT_FILE, run_id)
    ctx = RunContext(run_id, config.run.seed, device, observer, audit)
    metrics = open_metrics(config, run_dir)
    if remote:
        observer.status("starting the Ray workers")
    fed = federation_from_config(config, plan, data, model, ctx, remote_leaves=remote)
    return Session(config, tree, fed, model, data, run_dir, metrics, plan.personalizes, audit)


def uses_ray(config: RunConfig, plan: MethodPlan, observer: RunObserver) -> bool:
    """Whether the run's leaves train on Ray actors (run.backend = "ray"), on CPU cores."""
    if config.run.backend != "ray":
        return False
    if plan.pooled:
        observer.status("method centralized trains one leaf on pooled data: it runs in process")
        return False
    from worldlm.transport.ray_transport import import_ray

    import_ray()  # before the data is read: say now if Ray is missing
    if config.run.device == "cuda" or config.model.load_in != "full":
        raise ConfigError(
            "run.backend = 'ray' trains leaves on CPU cores: set run.device to cpu or auto and "
            "model.load_in to full, or use run.backend = 'inprocess' on a GPU"
        )
    return True


def audit_run_start(session: Session) -> None:
    """What an auditor needs to know the run by: its config, code, method and data digests."""
    if session.audit is None:
        return
    config = session.config
    session.audit.append(
        "run_start",
        node=session.tree.path,
        round=0,
        run_id=session.fed.root.ctx.run_id,
        config_sha256=config_digest(config),
        worldlm=__version__,
        method=config.run.method,
        seed=config.run.seed,
        leaves=[leaf.path for leaf in session.tree.leaves()],
        data_sha256=dict(sorted(session.data.digests.items())),
    )


def cache_dir_of(config: RunConfig) -> Path:
    return Path(config.run.cache_dir) if config.run.cache_dir else default_cache_dir()


def prepare_config_data(
    tree: FederationNode, config: RunConfig, observer: RunObserver
) -> PreparedData:
    """Blocks for every leaf of `tree` (the whole tree, or one deployed leaf) per `config`."""
    return prepare_data(
        tree,
        data_cfg=config.data,
        tokenizer_cfg=config.tokenizer,
        model_cfg=config.model,
        seed=config.run.seed,
        cache_dir=cache_dir_of(config),
        status=observer.status,
    )


def federation_from_config(
    config: RunConfig,
    plan: MethodPlan,
    data: PreparedData,
    model: PreTrainedModel,
    ctx: RunContext,
    *,
    partial: bool = False,
    remote_leaves: bool = False,
) -> Federation:
    """The live federation of `plan` on `model`, its root holding the initial weights; with
    `remote_leaves`, its leaves train in Ray actors (`transport.ray_transport`)."""
    if remote_leaves:
        from worldlm.transport.ray_transport import ray_federation

        fed = ray_federation(config, plan, data, model, ctx)
    else:
        fed = build_federation(
            plan,
            data.leaves,
            workspace=model,
            config=config,
            ctx=ctx,
            partial=partial,
        )
    fed.root.state = get_state(model)
    return fed


def build_workspace(config: RunConfig, vocab_size: int, device: torch.device) -> PreTrainedModel:
    """The model every node of this process trains or reads: same seed, same initial weights.
    With LoRA, the base is loaded once here and only the adapters are trained and federated
    (see `model.lora`)."""
    model = build_model(
        config.model,
        vocab_size,
        seed=derive_seed(config.run.seed, "init"),
        cache_dir=cache_dir_of(config),
    )
    if config.model.load_in == "full":  # a quantized base is already on its GPU
        model.to(device)  # type: ignore[arg-type]  # transformers' stub of .to is too narrow
    if int(model.config.vocab_size) < vocab_size:
        raise ModelError("the tokenizer's vocabulary is larger than the model's embedding table")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and int(positions) < config.model.block_size:
        raise ModelError(
            f"model.block_size: {config.model.block_size} is longer than the model's "
            f"{positions} positions; lower it"
        )
    if config.model.lora.enabled:
        wrap_lora(model, config.model.lora, seed=derive_seed(config.run.seed, "lora"))
    return model


def run(config: RunConfig, observer: RunObserver, *, out: Path | None = None) -> RunResult:
    """Execute a whole run and leave its directory behind (see DESIGN §7)."""
    check_sources(build_tree(config.nodes))
    run_dir = make_run_dir(config, out)
    (run_dir / "config.toml").write_text(dump_config(config), encoding="utf-8")
    observer.status(f"run directory: {run_dir}")
    session = open_session(config, observer, run_dir)
    try:
        audit_run_start(session)
        observer.status("evaluating the initial model")
        before = evaluate_tree(session, session.fed.root.state, 0)
        return round_loop(session, observer, before, first_round=1, tokens=0.0)
    finally:
        session.fed.close()


def resume(run_dir: Path, observer: RunObserver, *, backend: list[str] | None = None) -> RunResult:
    """Continue a run from its newest usable checkpoint; the result equals an uninterrupted run.
    `backend` overrides (run.backend, run.ray_address) may move it to another backend.

    The time budget (stop.max_seconds) restarts with the resumed process."""
    config = load_config(run_dir / "config.toml", backend)
    if config_digest(config) != config_digest(load_config(run_dir / "config.toml")):
        raise ConfigError("on resume only run.backend and run.ray_address may change")
    session = open_session(config, observer, run_dir)
    try:
        return continue_session(session, observer)
    finally:
        session.fed.close()


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
    path, tensors, meta = load_latest(run_dir / "checkpoints")
    if meta.get("run_id") != session.fed.root.ctx.run_id:
        raise CheckpointError(f"{path} belongs to another run configuration")
    if meta.get("finished"):
        raise CheckpointError(f"the run in {run_dir} already finished ({meta['finished']})")
    restore(session.fed, tensors, meta)
    done = int(meta["global_round"])
    observer.status(f"resuming after round {done} from {path.name}")
    if session.audit is not None:
        resume_audit(session.audit, path, session.tree.path, done)
        session.audit.append(
            "run_resumed", node=session.tree.path, round=done, checkpoint=path.name
        )
    # Rows written after the checkpoint belong to a round that will be run again.
    kept = [row for row in rows if int(row["round"]) <= done]
    session.metrics.replace(kept)
    before = {
        row["node"]: EvalResult(float(row["loss"]), int(row["tokens"]))
        for row in kept
        if row["kind"] == "eval" and row["round"] == 0
    }
    # (a deployed leaf that was not there for the first evaluation has no baseline)
    before = {leaf.path: before[leaf.path] for leaf in session.tree.leaves() if leaf.path in before}
    return round_loop(session, observer, before, first_round=done + 1, tokens=meta["tokens"])


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
    for r in range(first_round, config.stop.rounds + 1):
        observer.round_started(r, config.stop.rounds)
        outcome = fed.root.run_round(state, r)
        state = outcome.state
        tokens += outcome.weight
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
        observer.round_finished(r, mean_ppl(after) if evaluated else None)
        finished = stop_reason or ("rounds" if last else "")
        if r % config.checkpoint.every == 0 or finished:
            write_checkpoint(session, r, tokens, finished)
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
    write_summary(result, session.run_dir, session.data.digests, audit_head, privacy)
    session.metrics.close()
    if session.audit is not None:
        session.audit.close()  # folds the write-ahead log into audit.sqlite
    return result


def resume_audit(audit: AuditLog, path: Path, root: str, round_index: int) -> None:
    """Like the metrics: drop the entries of the rounds that will run again, and make sure the
    checkpoint resumed from has its entry (written late if the crash came between the
    checkpoint and its entry)."""
    audit.truncate_after(audit.last_seq_through(round_index))
    recorded = audit.checkpoint_entry(path.name)
    if recorded is None or recorded[1].get("sha256") != file_sha256(path):
        audit_checkpoint(audit, root, path, round_index)


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


def write_checkpoint(session: Session, round_index: int, tokens: float, finished: str) -> None:
    """The whole run state after `round_index`, then the audit entry naming the file and its
    SHA-256. The checkpoint itself holds nothing of the audit log (whose hashes cover
    timestamps): two runs of one config must write identical checkpoints (TESTPLAN A2)."""
    fed, audit = session.fed, session.audit
    tensors, meta = snapshot(fed, round_index, tokens, fed.root.ctx.run_id)
    meta["finished"] = finished
    path = save_checkpoint(
        session.run_dir / "checkpoints",
        round_index,
        tensors,
        meta,
        keep=session.config.checkpoint.keep,
    )
    if audit is not None:
        audit_checkpoint(audit, fed.root.path, path, round_index)


def audit_checkpoint(audit: AuditLog, root: str, path: Path, round_index: int) -> None:
    audit.append(
        "checkpoint", node=root, round=round_index, file=path.name, sha256=file_sha256(path)
    )


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


def save_final_models(session: Session) -> dict[str, Path]:
    """The global model under final/<root>, and, under each leaf's configured path, every leaf
    that deploys something else. With LoRA, each directory holds that model's adapters."""
    fed, tree, model, config = session.fed, session.tree, session.model, session.config
    final, cache_dir = session.run_dir / "final", cache_dir_of(config)
    tokenizer = hf_tokenizer(session.data.tokenizer, config.tokenizer, config.model, cache_dir)
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
) -> None:
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
