"""A leaf: a data owner that trains on its own blocks and never sends data, only weights."""

from __future__ import annotations

import time
from collections.abc import Set
from typing import Any, cast

import torch

from worldlm.compression.link import Uplink, decode_task
from worldlm.config import DPConfig, EvalConfig, LinkConfig, TrainConfig
from worldlm.core.leaf_data import LeafData
from worldlm.core.messages import EvalReport, EvalTask, State, TrainTask, Update
from worldlm.core.secure_messages import SecureMessage, SecureReply
from worldlm.core.state import get_state, set_state
from worldlm.core.transport import ChildInfo
from worldlm.federation.context import RunContext
from worldlm.federation.leaf_store import HeldState, flatten_optimizer, unflatten_optimizer
from worldlm.federation.local_privacy import LocalDP
from worldlm.federation.secure_child import SecureChild
from worldlm.seeding import generator
from worldlm.train.evaluate import evaluate
from worldlm.train.local import local_train
from worldlm.train.trainer import build_trainer, on_cpu


class Leaf:
    """Trains the model it is sent; keeps `personal_keys` of its own between rounds (all of
    them for the `local` baseline, none for FedAvg). After root round `finetune_after` (the
    personalization phase, `train.finetune_rounds`) it trains and keeps its whole deployed model
    and sends back what it received."""

    def __init__(
        self,
        path: str,
        data: LeafData,
        *,
        workspace: torch.nn.Module,
        train_cfg: TrainConfig,
        eval_cfg: EvalConfig,
        total_steps: int,
        personal_keys: Set[str],
        ctx: RunContext,
        adapted_keys: Set[str] = frozenset(),
        link: LinkConfig | None = None,
        dp: DPConfig | None = None,
        finetune_after: int | None = None,
        key_mix: float = 1.0,
    ) -> None:
        self.path = path
        self.data = data
        self.workspace = workspace  # a model shared by every in-process leaf; trained in turn
        self.train_cfg = train_cfg
        self.eval_cfg = eval_cfg
        self.total_steps = total_steps
        self.personal_keys = frozenset(personal_keys)
        # Weights the leaf deploys as it last trained them, though each round starts again from
        # what it is sent (WorldLM's "optionally its own" K).
        self.adapted_keys = frozenset(adapted_keys) - self.personal_keys
        # Where a round starts its adapted weights: key_mix of the way from its own toward the
        # received ones (1: the received ones; 0: its own, FedPer-style, though still sent up).
        self.key_mix = key_mix
        self.ctx = ctx
        self.finetune_after = finetune_after
        self.sessions = 0  # training sessions so far; seeds this leaf's data order
        # Local-DP releases a rewind undid (deploy.journal): sent all the same, so charged.
        self.lost_releases = 0
        self.steps_done = 0  # optimizer steps so far; drives the learning-rate schedule
        # Personal weights (kept between rounds), adapted weights (deployed but not trained
        # from) and the optimizer's moments: in memory, or on disk between rounds when the
        # run says so (run.leaf_state), read back as they were written.
        self._held = HeldState(ctx.state_dir, path)
        # Moves whenever the state a checkpoint keeps changes: an unchanged leaf is not written
        # into the next checkpoint again (`checkpoint_parts`).
        self.state_version = 0
        self._optimizer_state: dict[str, Any] | None = None  # in memory
        self.uplink = Uplink(link or LinkConfig())  # compresses replies to the parent
        local = dp if dp is not None and dp.local_noise_multiplier > 0 else None
        self.local_dp = LocalDP(local, path, ctx.seed) if local is not None else None
        self.secure_child = SecureChild(self)  # answers its parent's secure rounds
        self.trainer = build_trainer(train_cfg)  # train.trainer: the local optimization
        self._compiled_model: torch.nn.Module | None = None  # train.compile, built on first use

    def info(self) -> ChildInfo:
        return ChildInfo(self.path, self.data.train_tokens)

    @property
    def own_state(self) -> State:
        return self._held.get("own")[0]

    @own_state.setter
    def own_state(self, value: State) -> None:
        self.state_version += 1
        self._held.put("own", value)

    @property
    def adapted_state(self) -> State:
        return self._held.get("adapted")[0]

    @adapted_state.setter
    def adapted_state(self, value: State) -> None:
        self.state_version += 1
        self._held.put("adapted", value)

    @property
    def optimizer_state(self) -> dict[str, Any] | None:
        if not self._held.on_disk:
            return self._optimizer_state
        tensors, meta = self._held.get("optimizer")
        return unflatten_optimizer(tensors, meta) if meta else None

    @optimizer_state.setter
    def optimizer_state(self, value: dict[str, Any] | None) -> None:
        self.state_version += 1
        if not self._held.on_disk:
            self._optimizer_state = value
        elif value is None:
            self._held.drop("optimizer")
        else:
            self._held.put("optimizer", *flatten_optimizer(value))

    def charge_lost_releases(self, count: int) -> None:
        """Local-DP releases a rewind undid (they reached the parent): charged from now on."""
        self.lost_releases += count
        self.state_version += 1

    def training_start(self, incoming: State) -> State:
        """What a round trains from: the incoming model with the personal weights on top, and
        the adapted weights moved key_mix of the way from the leaf's own toward the incoming."""
        start = {**incoming, **self.own_state}
        if self.key_mix < 1.0:
            for key, own in self.adapted_state.items():
                start[key] = torch.lerp(own, incoming[key].to(own.dtype), self.key_mix)
        return start

    def deployed_state(self, incoming: State) -> State:
        """What this leaf would deploy: the training start with its adapted weights on top."""
        return {**incoming, **self.own_state, **self.adapted_state}

    def handle_train(self, task: TrainTask) -> Update:
        self.state_version += 1  # counters, error feedback: everything below may change
        task = decode_task(task)  # the weights, if the parent compressed them
        model, device = self.workspace, self.ctx.device
        finetuning = self.finetune_after is not None and task.global_round > self.finetune_after
        # A fine-tuning round continues the model the leaf deploys (in its first one: what it
        # would have deployed after the federated rounds).
        start = self.deployed_state(task.state) if finetuning else self.training_start(task.state)
        set_state(model, start)
        optimizer = self.trainer.make_optimizer(model, self.train_cfg)
        if self.train_cfg.keep_optimizer_state and self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        # Seeded by the leaf's name, not its path: the same data owner trains identically in a
        # flat and in a hierarchical tree, which is what makes hierarchy-equals-flat testable.
        gen = generator(self.ctx.seed, self.data.name, "train", self.sessions)
        started = time.perf_counter()
        self.ctx.observer.leaf_started(self.path, self.train_cfg.local_steps)
        result = local_train(
            self._compiled() if self.train_cfg.compile else model,
            optimizer,
            self.data.train_blocks,
            self.train_cfg,
            start_step=self.steps_done,
            total_steps=self.total_steps,
            gen=gen,
            device=device,
            on_step=lambda step, loss: self.ctx.observer.leaf_step(self.path, step, loss),
            trainer=self.trainer,
        )
        self.optimizer_state = None
        if self.train_cfg.keep_optimizer_state:
            # In host memory between rounds: leaves sharing one GPU hold one leaf's moments on
            # it at a time, the one training (load_state_dict moves them back).
            state = optimizer.state_dict()
            self.optimizer_state = on_cpu(state) if device.type != "cpu" else state
        new_state = get_state(model)
        if finetuning:
            self.own_state, self.adapted_state = new_state, {}
        else:
            self.own_state = {k: new_state[k] for k in self.personal_keys}
            self.adapted_state = {k: new_state[k] for k in self.adapted_keys}
        self.sessions += 1
        self.steps_done += result.steps
        record = {
            "round": task.global_round,
            "node": self.path,
            "kind": "train",
            "loss": result.mean_loss,
            "tokens": result.tokens,
            "steps": result.steps,
            "seconds": time.perf_counter() - started,
        }
        # Personal weights stay here (FedPer's K, or everything for the local baseline); while
        # fine-tuning, every trained weight does, and the received ones go back unchanged.
        sent = task.state if finetuning else new_state
        shared = {k: sent[k] for k in new_state if k not in self.personal_keys}
        records = [record]
        if self.local_dp is not None:  # the parent only ever sees the noisy change
            release = self.sessions - 1
            shared, privacy = self.local_dp.privatize(
                shared, task.state, task.global_round, release, self.lost_releases
            )
            records.append(privacy)
        update = Update(self.path, task.round, task.nonce, shared, float(result.tokens), records)
        return self.uplink.encode(update, task.state)

    def _compiled(self) -> torch.nn.Module:
        """The workspace under torch.compile, built once: it shares the workspace's
        parameters, so the weights set on the workspace are the ones it trains."""
        if self._compiled_model is None:
            self._compiled_model = cast(torch.nn.Module, torch.compile(self.workspace))
        return self._compiled_model

    def handle_secure(self, message: SecureMessage) -> SecureReply:
        """A stage of the parent's secure round; the first trains, like `handle_train`."""
        return self.secure_child.handle(message)

    def handle_eval(self, task: EvalTask) -> EvalReport:
        model = self.workspace
        set_state(model, self.deployed_state(task.state) if task.deployed else task.state)
        limit = self.eval_cfg.max_blocks
        results = {
            name: evaluate(
                model,
                blocks[:limit] if limit else blocks,
                batch_size=self.eval_cfg.batch_size,
                device=self.ctx.device,
                precision=self.train_cfg.precision,
            )
            for name, blocks in self.data.eval_sets.items()
        }
        return EvalReport(self.path, task.nonce, results)

    # --- checkpointing -------------------------------------------------------------------
    def snapshot(self) -> tuple[State, dict[str, Any]]:
        tensors: State = {f"own/{k}": v for k, v in self.own_state.items()}
        tensors.update({f"adapted/{k}": v for k, v in self.adapted_state.items()})
        tensors.update({f"link/{k}": v for k, v in self.uplink.state_dict().items()})
        meta: dict[str, Any] = {"sessions": self.sessions, "steps_done": self.steps_done}
        if self.lost_releases:  # (absent otherwise: checkpoints of runs without it unchanged)
            meta["lost_releases"] = self.lost_releases
        if self.optimizer_state is not None:
            for index, slots in self.optimizer_state["state"].items():
                for slot, value in slots.items():
                    tensors[f"opt/{index}/{slot}"] = value
            meta["param_groups"] = self.optimizer_state["param_groups"]
        return tensors, meta

    def restore(self, tensors: State, meta: dict[str, Any]) -> None:
        self.state_version += 1
        self.sessions = int(meta["sessions"])
        self.steps_done = int(meta["steps_done"])
        self.lost_releases = int(meta.get("lost_releases", 0))
        self.own_state = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("own/")}
        self.adapted_state = {
            k[8:]: v.clone() for k, v in tensors.items() if k.startswith("adapted/")
        }
        self.uplink.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("link/")})
        if "param_groups" not in meta:
            self.optimizer_state = None
            return
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt/"):
                _, index, slot = key.split("/", 2)
                state.setdefault(int(index), {})[slot] = value.clone()
        self.optimizer_state = {"state": state, "param_groups": meta["param_groups"]}
