"""Several processes training one leaf (DDP over gloo on the CPU, 2 processes): the model
rank 0 ends with is the one a single process trains on the same global batch."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from worldlm.config import ModelConfig, TrainConfig
from worldlm.core.state import get_state
from worldlm.errors import ConfigError
from worldlm.model.build import build_model
from worldlm.train.data_parallel import DataParallelTrainer, check_batch, follow
from worldlm.train.local import local_train
from worldlm.train.trainer import FedProxTrainer, StandardTrainer

VOCAB = 64
BASE = {"local_steps": 3, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1}


def _model() -> torch.nn.Module:
    return build_model(
        ModelConfig.model_validate({"preset": "tiny", "block_size": 16}), VOCAB, seed=0
    )


def _blocks() -> torch.Tensor:
    blocks = torch.randint(1, VOCAB, (24, 16), generator=torch.Generator().manual_seed(1))
    for row in range(blocks.shape[0]):  # instruction-style masks of uneven length
        masked = 16 if row % 3 == 0 else 2 + row % 9  # a third are all prompt: no targets
        blocks[row, :masked] = ~blocks[row, :masked]
    return blocks


def _inner(cfg: TrainConfig) -> StandardTrainer:
    return FedProxTrainer(cfg.prox_mu) if cfg.prox_mu > 0 else StandardTrainer()


def _train_rounds(
    model: torch.nn.Module, trainer: StandardTrainer, cfg: TrainConfig, rounds: int
) -> list[float]:
    """`rounds` rounds of local training with one optimizer kept across them, as a leaf keeps
    it; each round's data order seeded by its index. The rounds' mean losses."""
    optimizer = trainer.make_optimizer(model, cfg)
    losses = []
    for r in range(rounds):
        result = local_train(
            model,
            optimizer,
            _blocks(),
            cfg,
            start_step=r * cfg.local_steps,
            total_steps=rounds * cfg.local_steps,
            gen=torch.Generator().manual_seed(3 + r),
            device=torch.device("cpu"),
            trainer=trainer,
        )
        losses.append(result.mean_loss)
    return losses


def _single(cfg: TrainConfig, rounds: int) -> dict[str, torch.Tensor]:
    model = _model()
    _train_rounds(model, _inner(cfg), cfg, rounds)
    return get_state(model)


def _worker(rank: int, world: int, port: int, cfg_data: dict, rounds: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = TrainConfig.model_validate(cfg_data)
        model = _model()
        if rank != 0:  # the followers' weights must not matter: DDP gives them rank 0's
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        trainer = DataParallelTrainer(_inner(cfg))
        device = torch.device("cpu")
        if rank == 0:
            # Kept across rounds on rank 0 only, as a leaf keeps it; rank 1 gets it each round.
            losses = _train_rounds(model, trainer, cfg, rounds)
            trainer.stop()
            torch.save({"state": get_state(model), "losses": losses}, out)
        else:
            assert follow(trainer, model, _blocks(), cfg, device) == rounds
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "extra",
    [{}, {"grad_accum_steps": 2}, {"grad_accum_steps": 4}, {"prox_mu": 0.1}],
    ids=["plain", "micro-batches", "single-block micro-batches", "fedprox"],
)
def test_two_processes_train_what_one_trains(tmp_path: Path, extra: dict) -> None:
    cfg_data = {**BASE, **extra}
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), cfg_data, 2, out), nprocs=2, join=True)
    saved = torch.load(out)
    spread = saved["state"]
    # Micro-batches of one all-prompt block have no targets; the reported loss stays finite.
    assert all(math.isfinite(loss) for loss in saved["losses"])
    single = _single(TrainConfig.model_validate(cfg_data), rounds=2)
    start = get_state(_model())
    moved = max(float((single[k] - start[k]).abs().max()) for k in single)
    assert moved > 1e-2  # it trained
    # Float tolerance: Adam divides by sqrt(v), so an entry whose gradient is near zero moves
    # by a visible fraction of a step on a rounding difference; the rest match far closer.
    gaps = torch.cat([(spread[k] - single[k]).abs().flatten() for k in single])
    assert float(gaps.max()) < 1e-3  # a sixtieth of how far training moved the weights
    assert float(gaps.mean()) < 1e-6


def test_a_batch_that_does_not_split_over_the_processes_is_refused() -> None:
    with pytest.raises(ConfigError, match="multiple of the processes"):
        check_batch(TrainConfig.model_validate({"batch_size": 6, "grad_accum_steps": 2}), 2)
