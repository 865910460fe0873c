"""The worker side of the Ray backend: one process (a Ray actor) hosting some of a run's leaves.

It builds its own model workspace and its `Leaf` objects from the run's config and the leaves'
tokenized data, exactly as `build_federation` does in process, and answers the tasks the
driver's `RayTransport` sends them. Its leaves train in turn on the one workspace; an actor runs
one call at a time, in the order the driver submitted them. Nothing here imports Ray: the
driver wraps the class with `ray.remote`.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

from worldlm.config import RunConfig
from worldlm.core.leaf_data import LeafData
from worldlm.core.secure_messages import SecureMessage, SecureReply
from worldlm.federation.build import build_leaves
from worldlm.federation.context import RunContext
from worldlm.federation.leaf import Leaf
from worldlm.federation.methods import plan_method
from worldlm.model.workspace import build_workspace
from worldlm.plugins import load_plugins
from worldlm.train.data_parallel import DataParallelTrainer
from worldlm.transport.ray_codec import Packed, answer_batch, pack_state, unpack_state
from worldlm.transport.ray_ranks import follow_round, group_address, join_ranks, leave_ranks
from worldlm.tree import build_tree


class LeafWorker:
    """Hosts the leaves whose data it is given; every method names the leaf it is for."""

    def __init__(
        self,
        config: RunConfig,
        run_id: str,
        vocab_size: int,
        leaf_data: dict[str, LeafData],
        threads: int,
    ) -> None:
        # One core per actor: actors side by side must not each start a thread per core.
        torch.set_num_threads(threads)
        load_plugins(config.run.plugins)  # a worker is a new process: register them here too

        cpu = torch.device("cpu")
        plan = plan_method(config.run.method, build_tree(config.nodes))
        workspace = build_workspace(config, vocab_size, cpu)
        # Progress stays quiet and the audit trail empty here: a leaf reports through the
        # records on its Update, and the driver's aggregators audit what they accept.
        # run.leaf_state = "disk": on the worker's own disk (it may be another machine), in a
        # directory that `close` deletes (the driver calls it before it stops the actor).
        self._state_dir = (
            tempfile.TemporaryDirectory(prefix="worldlm-leaf-state-")
            if config.run.leaf_state == "disk"
            else None
        )
        state_dir = Path(self._state_dir.name) if self._state_dir is not None else None
        ctx = RunContext(run_id, config.run.seed, cpu, state_dir=state_dir)
        self.workspace = workspace
        self._ranks: DataParallelTrainer | None = None  # run.leaf_ranks: this rank's trainer
        self.leaves: dict[str, Leaf] = build_leaves(
            plan,
            leaf_data,
            workspace=workspace,
            config=config,
            ctx=ctx,
            partial=True,
        )

    def close(self) -> None:
        """Leave the leaf's process group, if any, and delete the leaves' state directory; the
        worker is not asked anything after this."""
        leave_ranks()
        if self._state_dir is not None:
            self._state_dir.cleanup()

    # --- run.leaf_ranks: this worker is one rank of its one leaf ------------------------------
    def group_address(self) -> str:
        return group_address()

    def join_ranks(self, address: str, rank: int, world: int, followers: list[Any]) -> None:
        (leaf,) = self.leaves.values()
        self._ranks = join_ranks(leaf, address, rank, world, followers)

    def follow_round(self) -> bool:
        (leaf,) = self.leaves.values()
        assert self._ranks is not None, "join_ranks comes first"
        try:
            return follow_round(self._ranks, leaf, self.workspace)
        except BaseException:
            # Leave at once: this rank's connections close and rank 0's round fails now, where
            # a live process would leave it waiting in a collective until the group's timeout.
            traceback.print_exc()
            os._exit(1)

    def paths(self) -> list[str]:
        """The leaves this worker hosts (the driver waits on this to know it started)."""
        return sorted(self.leaves)

    def answer(
        self, method: str, calls: list[tuple[Any, int | None]], *models: Packed
    ) -> list[Any]:
        """A batch of calls from the driver (`ray_codec.answer_batch`): each task's weights are
        the packed model it names, put into the object store once however many tasks carry it."""
        return answer_batch(self._handle, method, calls, models)

    def _handle(self, method: str, message: Any) -> Any:
        return getattr(self.leaves[message.recipient], method)(message)

    def handle_secure(self, message: SecureMessage) -> SecureReply:
        return self.leaves[message.recipient].handle_secure(message)

    # Weights cross to the driver packed (`ray_codec`): NumPy bytes Ray maps without pickling.
    def kept_state(self, path: str) -> tuple[Packed, Packed]:
        """The leaf's personal and adapted weights (for the final models)."""
        leaf = self.leaves[path]
        return pack_state(leaf.own_state), pack_state(leaf.adapted_state)

    def state_version(self, path: str) -> int:
        return self.leaves[path].state_version

    def state_versions(self) -> dict[str, int]:
        """Every hosted leaf's state_version, in one call (a checkpoint asks each actor once)."""
        return {path: leaf.state_version for path, leaf in self.leaves.items()}

    def snapshot(self, path: str) -> tuple[Packed, dict[str, Any]]:
        tensors, meta = self.leaves[path].snapshot()
        return pack_state(tensors), meta

    def restore(self, path: str, tensors: Packed, meta: dict[str, Any]) -> None:
        self.leaves[path].restore(unpack_state(tensors), meta)
