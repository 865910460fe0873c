"""A deployed leaf on several processes: `torchrun --nproc_per_node N -m worldlm join NODE`.

Each process is a rank of one process group (gloo on CPUs, NCCL on GPUs, one GPU per rank:
cuda:LOCAL_RANK). Rank 0 is the leaf the federation sees: it alone connects to the parent and
journals its state; the other ranks read the same data, build the same model, and train their
part of each of rank 0's rounds (`train.data_parallel`, or `train.sharded` with the model
split over the ranks: `train.shard`) until rank 0 is done.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from worldlm.config import RunConfig
from worldlm.deploy.node import NodeRuntime, open_node
from worldlm.deploy.node_file import NodeFile
from worldlm.errors import ConfigError
from worldlm.federation.leaf import Leaf
from worldlm.session import RunObserver
from worldlm.train.data_parallel import DataParallelTrainer, check_batch, follow
from worldlm.train.sharded import ShardedTrainer
from worldlm.train.trainer import StandardTrainer

RANKS_WAIT = timedelta(days=7)


def launched_ranks() -> int:
    """How many processes torchrun started for this node (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_on_ranks(
    config: RunConfig,
    node_file: NodeFile,
    observer: RunObserver,
    answer: Callable[[NodeRuntime, NodeFile], int],
) -> int:
    """Run this rank of a leaf; rank 0 answers the parent with `answer` and returns the tasks
    it answered, the others the rounds they trained."""
    cuda = torch.cuda.is_available() and config.run.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # The other ranks wait in a collective for the whole time between rank 0's rounds (the
    # parent's other leaves, aggregation, evaluation): far longer than torch's default
    # 10-30 minute timeout. torchrun still ends every rank when one of them exits.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=RANKS_WAIT)
    try:
        rank = dist.get_rank()
        check_batch(config.train, dist.get_world_size())
        # Rank 0 first: it prepares whatever this machine caches; then the others read it.
        if rank != 0:
            dist.barrier()
        rt = open_node(config, node_file, observer)
        if rank == 0:
            dist.barrier()
        if not rt.node.is_leaf:
            raise ConfigError(
                f"{rt.node.path} is an aggregator: only a leaf trains on several processes"
            )
        leaf = rt.fed.leaves[rt.node.path]
        if not isinstance(leaf, Leaf) or not isinstance(leaf.trainer, StandardTrainer):
            raise ConfigError(
                "train.trainer: training a leaf on several processes needs a trainer built on "
                "worldlm.StandardTrainer (its steps are what the processes split)"
            )
        # train.shard: the model whole on every rank (DDP), or split over them (FSDP2).
        sharded = leaf.train_cfg.shard == "fsdp"
        trainer = (ShardedTrainer if sharded else DataParallelTrainer)(leaf.trainer)
        leaf.trainer = trainer
        if rank != 0:
            return follow(
                trainer, rt.model, leaf.data.train_blocks, leaf.train_cfg, leaf.ctx.device
            )
        try:
            return answer(rt, node_file)
        finally:
            trainer.stop()
    finally:
        dist.destroy_process_group()
