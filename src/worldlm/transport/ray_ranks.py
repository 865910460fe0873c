"""A simulated leaf trained by several Ray actors together (`run.leaf_ranks`): the Ray backend's
counterpart of `torchrun --nproc_per_node N -m worldlm join` (deploy/leaf_ranks.py).

The driver starts `leaf_ranks` actors for each leaf, each building the same leaf from the same
data, and they form one torch.distributed process group (gloo: the Ray backend's workers train
on CPUs) at an address rank 0 chose. Rank 0 is the leaf the driver talks to; its trainer is the
leaf's own wrapped in `DataParallelTrainer` (or `ShardedTrainer`, train.shard = "fsdp"), so
each rank trains its share of every step's batch. Where a deployed leaf's other ranks wait in a
loop for rank 0's rounds, these are asked for each round by rank 0 (`RanksTrainer`): a rank is
in a collective only while a round trains, and one that fails leaves its process at once, so
that gloo closes its connections and the round fails at rank 0, naming the rank, and with it
the run, which resumes from its checkpoint.
Nothing here imports Ray at module level: a worker is a Ray actor, the driver wraps it.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from worldlm.config import TrainConfig
from worldlm.errors import ConfigError, TransportError
from worldlm.federation.leaf import Leaf
from worldlm.train.data_parallel import DataParallelTrainer, follow_once
from worldlm.train.sharded import ShardedTrainer
from worldlm.train.trainer import LocalJob, LocalResult, StandardTrainer

# A rank waits in a collective only while its leaf's round trains (not between rounds, as a
# deployed leaf's ranks do), so torch's default timeout would do; this leaves room for a slow
# first round (data, allocation) on a loaded machine.
ROUND_TIMEOUT = timedelta(hours=2)


def group_address() -> str:
    """An address for a process group's rendezvous on this machine: its IP as Ray sees it and
    a free port."""
    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = int(probe.getsockname()[1])
    return f"tcp://{host}:{port}"


def join_ranks(
    leaf: Leaf, address: str, rank: int, world: int, followers: list[Any]
) -> DataParallelTrainer:
    """Join the leaf's process group as `rank` of `world`; on rank 0 the leaf's trainer becomes
    a `RanksTrainer` over the other ranks' actors (`followers`). This rank's trainer."""
    if not isinstance(leaf.trainer, StandardTrainer):
        raise ConfigError(
            "train.trainer: training a leaf on several processes (run.leaf_ranks) needs a "
            "trainer built on worldlm.StandardTrainer (its steps are what the processes split)"
        )
    dist.init_process_group(
        "gloo", init_method=address, rank=rank, world_size=world, timeout=ROUND_TIMEOUT
    )
    sharded = leaf.train_cfg.shard == "fsdp"
    trainer = (ShardedTrainer if sharded else DataParallelTrainer)(leaf.trainer)
    if rank == 0:
        leaf.trainer = RanksTrainer(trainer, followers)
    return trainer


def follow_round(trainer: DataParallelTrainer, leaf: Leaf, model: torch.nn.Module) -> bool:
    """A rank other than 0: its part of the round rank 0 is starting."""
    return follow_once(trainer, model, leaf.data.train_blocks, leaf.train_cfg, torch.device("cpu"))


def leave_ranks() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class RanksTrainer:
    """Rank 0's trainer: starts the other ranks' part of each round on their actors, trains its
    own with them, and fails the round if one of them failed."""

    def __init__(self, inner: DataParallelTrainer, followers: list[Any]) -> None:
        self.inner = inner
        self.followers = followers

    def make_optimizer(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return self.inner.make_optimizer(model, cfg)

    def train(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, job: LocalJob
    ) -> LocalResult:
        import ray

        parts = [follower.follow_round.remote() for follower in self.followers]
        try:
            result = self.inner.train(model, optimizer, job)
        except RuntimeError as exc:  # a collective failed: another rank left the group
            raise TransportError(
                f"{self._failed(parts, ray, wait=10.0)}: this leaf's ranks stopped training "
                f"together ({exc}); continue from the last checkpoint with: worldlm run "
                "--resume RUN_DIR"
            ) from None
        failed = self._failed(parts, ray, wait=None)
        if failed != "no rank failed":
            raise TransportError(
                f"{failed}; continue from the last checkpoint with: worldlm run --resume RUN_DIR"
            )
        return result

    @staticmethod
    def _failed(parts: list[Any], ray: Any, wait: float | None) -> str:
        """Which of the other ranks failed their part of the round (waiting at most `wait`
        seconds for them to end; None: until they do)."""
        ray.wait(parts, num_returns=len(parts), timeout=wait)
        failed = []
        for rank, part in enumerate(parts, start=1):
            try:
                ray.get(part, timeout=0)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                failed.append(f"rank {rank} failed its part of the round ({type(exc).__name__})")
            except ray.exceptions.GetTimeoutError:
                failed.append(f"rank {rank} did not finish its part of the round")
        return "; ".join(failed) or "no rank failed"
