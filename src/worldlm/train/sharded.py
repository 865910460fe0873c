"""Several processes training one leaf with the model sharded over them (`train.shard =
"fsdp"`): PyTorch's FSDP2 (`fully_shard`, per transformer block, then the root) instead of DDP.

Each rank holds a 1/N shard of every parameter, gradient and AdamW moment; a block's weights
are all-gathered for its forward and backward and its gradients reduce-scattered, so the ranks
train the same step as `DataParallelTrainer` (the same pieces of the same global batch, the
same gradient scale). The federation still sees one model: rank 0's leaf keeps its workspace
unsharded, its weights are scattered into the shards when a round starts, and the trained
weights are gathered back into it (on rank 0 only) when the round ends, so what the leaf sends
up is the full state, as with DDP.

AdamW's moments are the leaf's, as with DDP and one process (`train.keep_optimizer_state`): a
round scatters the ones the leaf holds into a sharded optimizer on the ranks, and at its end
gathers them back into the leaf's optimizer on rank 0, on the CPU, so that the leaf's
checkpoints and its journal hold them and a restarted or rewound leaf resumes exactly. That costs
one gather of the moments per round (8 bytes a parameter to rank 0, as DDP's broadcast of them
costs in the other direction) and their copy in rank 0's host memory between rounds; the
devices hold none between rounds.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from worldlm.config import TrainConfig
from worldlm.core.state import State, set_state
from worldlm.train.data_parallel import DataParallelTrainer, check_batch, schedule_message
from worldlm.train.trainer import LocalJob, LocalResult, StandardTrainer

FULL_FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ShardedTrainer(DataParallelTrainer):
    """A `DataParallelTrainer` whose ranks train one FSDP2-sharded copy of the model (kept from
    round to round; its optimizer is made for each round from the leaf's moments)."""

    def __init__(self, inner: StandardTrainer) -> None:
        super().__init__(inner)
        self.sharded: torch.nn.Module | None = None

    def make_optimizer(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        """The leaf's optimizer (rank 0): it never steps, it holds the moments between rounds,
        in host memory even when the leaf loads them back (`keep_on_host`)."""
        return keep_on_host(self.inner.make_optimizer(model, cfg))

    def round_message(self, optimizer: torch.optim.Optimizer, job: LocalJob) -> dict[str, Any]:
        return {**schedule_message(job), "moments": bool(optimizer.state)}

    def train_part(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, job: LocalJob
    ) -> LocalResult:
        """Rank 0: `model` is the leaf's workspace and `optimizer` the leaf's (it trains
        neither; they hand in the round's start and take back its result)."""
        return self._round(model, optimizer, bool(optimizer.state), job)

    def follow_round(self, model: torch.nn.Module, message: dict[str, Any], job: LocalJob) -> None:
        self._round(model, None, bool(message["moments"]), job)

    def _round(
        self,
        model: torch.nn.Module,
        leaf_optimizer: torch.optim.Optimizer | None,
        moments: bool,
        job: LocalJob,
    ) -> LocalResult:
        check_batch(job.cfg, self.world)
        sharded = self._shard(model, job.device)
        # The round's start is rank 0's workspace (what the leaf received): into every shard.
        start = model.state_dict() if self.rank == 0 else {}
        set_model_state_dict(sharded, start, options=FULL_FROM_RANK0)
        optimizer = self.inner.make_optimizer(sharded, job.cfg)
        if moments:  # the leaf's: into the shards, and out of the leaf until the round ends
            full = by_name(leaf_optimizer, model) if leaf_optimizer is not None else {}
            set_optimizer_state_dict(sharded, optimizer, full, options=FULL_FROM_RANK0)
            if leaf_optimizer is not None:
                leaf_optimizer.state.clear()
        result = StandardTrainer.train(self, sharded, optimizer, job)
        # Collectives: every rank sends its shards, rank 0 alone gets the whole (on the CPU).
        trained = get_model_state_dict(sharded, options=FULL_ON_RANK0)
        if job.cfg.keep_optimizer_state:
            kept = get_optimizer_state_dict(sharded, optimizer, options=FULL_ON_RANK0)
            if leaf_optimizer is not None:
                put_by_name(leaf_optimizer, model, cast(dict[str, Any], kept))
        if self.rank == 0:
            set_state(model, cast(State, trained))
        return result

    def _shard(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The ranks' sharded model, built in the first round: on rank 0 a copy (the leaf's
        workspace stays whole), on the others their own model, sharded in place (they never
        need it whole)."""
        if self.sharded is None:
            mesh = init_device_mesh(device.type, (self.world,))
            target = copy.deepcopy(model) if self.rank == 0 else model
            for block in transformer_blocks(target):
                fully_shard(block, mesh=mesh)
            fully_shard(target, mesh=mesh)  # the rest: embeddings, final norm, head
            self.sharded = target
        return self.sharded


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules of the classes its Hugging Face model names as
    never to be split across devices (`_no_split_modules`, e.g. LlamaDecoderLayer). None for a
    model that names none (the root alone is then sharded: weights, gradients and moments are
    still split, but a forward gathers the whole model at once)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """`optimizer`'s state_dict keyed by `model`'s parameter names (what torch's distributed
    state_dict functions read) instead of by position."""
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = optimizer.state_dict()
    return {
        "state": {names[id(params[i])]: slots for i, slots in saved["state"].items()},
        "param_groups": [
            {**group, "params": [names[id(params[i])] for i in group["params"]]}
            for group in saved["param_groups"]
        ],
    }


def keep_on_host(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`optimizer`, whose `load_state_dict` keeps the moments where they are (the host) instead
    of moving them to its parameters' device: a sharded leaf's rank 0 would otherwise hold all
    of them on its device while scattering them, what sharding is there to avoid."""
    held: dict[str, Any] = {}

    def take_state(_: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
        held["state"] = saved["state"]
        return {**saved, "state": {}}

    def put_state(opt: torch.optim.Optimizer) -> None:
        params = [p for group in opt.param_groups for p in group["params"]]
        for index, slots in held.pop("state").items():
            opt.state[params[int(index)]] = dict(slots)

    optimizer.register_load_state_dict_pre_hook(take_state)
    optimizer.register_load_state_dict_post_hook(put_state)
    return optimizer


def put_by_name(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, full: dict[str, Any]
) -> None:
    """Make `full` (a state_dict keyed by `model`'s parameter names, as `by_name` gives and
    torch's distributed state_dict functions return) `optimizer`'s state. Its tensors stay where
    they are (the CPU), not moved to the parameters' device: this optimizer does not step while
    the leaf is sharded, it keeps the moments between rounds and for the checkpoints."""
    params = dict(model.named_parameters())
    optimizer.state.clear()
    for name, slots in full["state"].items():
        optimizer.state[params[name]] = dict(slots)
