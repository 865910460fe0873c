"""Several processes (GPUs) training one leaf: data parallelism inside one organization.

`torchrun --nproc_per_node N -m worldlm join NODE_FILE` starts N processes of one leaf. Rank 0
is the leaf the federation sees: it alone talks to its parent, and when a round's task arrives
it tells the other ranks to train (`DataParallelTrainer.train`), sending them what they cannot
know (where the schedule stands, the data order's generator, the optimizer's moments). Every
rank holds the leaf's data and the model; `DistributedDataParallel` gives them rank 0's
weights and all-reduces the gradients. Each rank trains its slice of every step's batch,
weighted by its share of the step's target tokens, so a step is the single-process step on the
same global batch up to float rounding: the update rank 0 sends is the one a single process
would have sent (with dropout, e.g. LoRA's, each rank draws its own masks: the same in
distribution, not bit for bit).

The other ranks wait in `follow` until rank 0 says stop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from worldlm.config import TrainConfig
from worldlm.data.blocks import inputs_and_labels
from worldlm.errors import ConfigError
from worldlm.train.trainer import (
    LocalJob,
    LocalResult,
    StandardTrainer,
    micro_batches,
    on_cpu,
    target_count,
)

TRAIN, STOP = "train", "stop"


class DataParallelTrainer(StandardTrainer):
    """A `StandardTrainer` (and so FedProx or a subclass's loss) spread over the processes of
    the default process group: on rank 0 it drives the others; on any rank it trains the
    rank's part of each step."""

    def __init__(self, inner: StandardTrainer) -> None:
        self.inner = inner
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.gradient_scale = float(self.world)  # DDP averages: undo it, shares carry the weight

    # The leaf's own objective and hooks are the inner trainer's.
    def make_optimizer(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return self.inner.make_optimizer(model, cfg)

    def loss(
        self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return self.inner.loss(model, input_ids, labels)

    def start(self, model: torch.nn.Module, job: LocalJob) -> None:
        self.inner.start(_unwrapped(model), job)

    def after_backward(self, model: torch.nn.Module) -> None:
        self.inner.after_backward(_unwrapped(model))

    def pieces(
        self, batch: torch.Tensor, parts: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """This rank's slice of the step's batch in `parts` micro-batches, each with its share
        of the whole step's targets. Every rank runs as many backward passes (DDP all-reduces
        in each), so a micro-batch without targets is kept, with share 0."""
        slices = batch.chunk(self.world)
        if len(slices) != self.world:
            raise ConfigError(
                f"train.batch_size {batch.shape[0]} cannot be split over {self.world} processes"
            )
        total = max(sum(target_count(inputs_and_labels(part)[1]) for part in slices), 1)
        return [
            (ids, labels, target_count(labels) / total)
            for ids, labels in micro_batches(slices[self.rank], parts)
        ]

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(loss)  # each rank holds its share of the mean
        return loss

    def train(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, job: LocalJob
    ) -> LocalResult:
        """Rank 0: send the round's job to the other ranks, then train with them."""
        if self.rank == 0:
            _broadcast((TRAIN, self.round_message(optimizer, job)))
        return self.train_part(model, optimizer, job)

    def round_message(self, optimizer: torch.optim.Optimizer, job: LocalJob) -> dict[str, Any]:
        """What the other ranks need of rank 0's round: the schedule, the data order, and here
        the optimizer's moments (on the CPU: load_state_dict moves them to a rank's device)."""
        return {**schedule_message(job), "optimizer": on_cpu(optimizer.state_dict())}

    def follow_round(self, model: torch.nn.Module, message: dict[str, Any], job: LocalJob) -> None:
        """A rank other than 0: its part of the round rank 0's `message` describes."""
        optimizer = self.make_optimizer(model, job.cfg)
        optimizer.load_state_dict(message["optimizer"])
        self.train_part(model, optimizer, job)

    def train_part(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, job: LocalJob
    ) -> LocalResult:
        check_batch(job.cfg, self.world)
        # Wrapping broadcasts rank 0's parameters and buffers to every rank: the weights the
        # round starts from. Built per round: cheap next to a round's steps.
        ids = None
        if job.device.type == "cuda":  # torchrun's rank uses cuda:LOCAL_RANK (set_device)
            index = job.device.index
            ids = [torch.cuda.current_device() if index is None else index]
        ddp = DistributedDataParallel(model, device_ids=ids)
        return super().train(ddp, optimizer, job)

    def stop(self) -> None:
        """Rank 0: release the other ranks (they return from `follow`)."""
        if self.rank == 0:
            _broadcast((STOP, None))


def follow(
    trainer: DataParallelTrainer,
    model: torch.nn.Module,
    blocks: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
) -> int:
    """A rank other than 0: train whenever rank 0 does, until it says stop; the rounds trained."""
    rounds = 0
    while follow_once(trainer, model, blocks, cfg, device):
        rounds += 1
    return rounds


def follow_once(
    trainer: DataParallelTrainer,
    model: torch.nn.Module,
    blocks: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
) -> bool:
    """A rank other than 0: its part of rank 0's next round; False if rank 0 said stop."""
    kind, meta = _broadcast(None)
    if kind == STOP:
        return False
    gen = torch.Generator()
    gen.set_state(meta["gen"])
    job = LocalJob(blocks, cfg, meta["start_step"], meta["total_steps"], gen, device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(meta["dropout_seed"] + trainer.rank)
        trainer.follow_round(model, meta, job)
    return True


def schedule_message(job: LocalJob) -> dict[str, Any]:
    """Rank 0's round as the other ranks rebuild it: the schedule and the data order."""
    return {
        "start_step": job.start_step,
        "total_steps": job.total_steps,
        "gen": job.gen.get_state(),
        # local_train seeded rank 0's dropout from the leaf's generator (a forked global RNG);
        # the others derive theirs from it, so runs stay reproducible.
        "dropout_seed": torch.initial_seed(),
    }


def check_batch(cfg: TrainConfig, world: int) -> None:
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise ConfigError(
            f"train.batch_size = {cfg.batch_size} must be a multiple of the processes ({world}) "
            f"times train.grad_accum_steps ({cfg.grad_accum_steps})"
        )


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _broadcast(message: tuple[str, Any] | None) -> tuple[str, Any]:
    """Rank 0's `message` on every rank (pickled; small next to a round's training)."""
    box: list[Any] = [message]
    dist.broadcast_object_list(box, src=0)
    result: tuple[str, Any] = box[0]
    return result
