"""A run's session: its directory, data, model, audit log, metrics and live federation,
built identically for a new run, a resumed one, and a deployed root."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel

from worldlm.audit.cli import AUDIT_FILE
from worldlm.audit.log import AuditLog
from worldlm.checkpoint_parts import PartStore
from worldlm.config import RunConfig, dump_config
from worldlm.core.state import get_state
from worldlm.data.prepare import PreparedData, prepare_data
from worldlm.errors import ConfigError
from worldlm.federation.build import Federation, build_federation
from worldlm.federation.context import Observer, RunContext
from worldlm.federation.methods import MethodPlan, finetune_rounds, plan_method
from worldlm.metrics.jsonl import MetricsWriter
from worldlm.metrics.sinks import make_sinks
from worldlm.model.pretrained import pretrained_dir
from worldlm.model.workspace import build_workspace, cache_dir_of
from worldlm.round_summary import RoundSummary
from worldlm.train.device import pick_device
from worldlm.tree import FederationNode, build_tree
from worldlm.version import __version__


class RunObserver(Observer, Protocol):
    def status(self, message: str) -> None: ...

    def round_started(self, round_index: int, total: int) -> None: ...

    def round_finished(self, summary: RoundSummary) -> None: ...


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

    @cached_property
    def parts(self) -> PartStore:
        """The leaves' checkpoint state files, and which leaf each holds (kept between
        checkpoints so that a leaf that did not change is not written again)."""
        return PartStore(self.run_dir / "checkpoints")


def config_digest(config: RunConfig) -> str:
    """SHA-256 of the config, less where its leaves run and keep their state (run.backend,
    run.ray_address, run.leaf_state): that
    changes none of the results, so a run keeps its run_id and checkpoints on every backend
    and may resume on another."""
    where = {"backend": "inprocess", "ray_address": None, "leaf_state": "memory"}
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


def open_metrics(config: RunConfig, run_dir: Path) -> MetricsWriter:
    """metrics.jsonl plus the sinks `config.monitor` asks for."""
    return MetricsWriter(run_dir / "metrics.jsonl", make_sinks(config, run_dir))


def open_session(config: RunConfig, observer: RunObserver, run_dir: Path) -> Session:
    """Read and tokenize the data, build the model and the live federation."""
    tree = build_tree(config.nodes)
    phase = finetune_rounds(config.run.method, config.train, config.stop)
    plan = plan_method(config.run.method, tree, finetune_rounds=phase)
    remote = uses_ray(config, plan, observer)
    device = torch.device("cpu") if remote else pick_device(config.run.device)
    data = prepare_config_data(tree, config, observer)
    observer.status("building the model")
    model = build_workspace(config, data.tokenizer.get_vocab_size(), device)
    run_id = config_digest(config)[:16]
    audit = AuditLog.open(run_dir / AUDIT_FILE, run_id)
    state_dir = run_dir / "leaf-state" if config.run.leaf_state == "disk" else None
    ctx = RunContext(run_id, config.run.seed, device, observer, audit, state_dir)
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


def prepare_config_data(
    tree: FederationNode, config: RunConfig, observer: RunObserver
) -> PreparedData:
    """Blocks for every leaf of `tree` (the whole tree, or one deployed leaf) per `config`."""
    return prepare_data(
        tree,
        data_cfg=config.data,
        tokenizer_cfg=config.tokenizer,
        block_size=config.model.block_size,
        model_dir=pretrained_dir(config.model, cache_dir_of(config)),
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
