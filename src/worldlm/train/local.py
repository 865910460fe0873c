"""A leaf's local training as one call: the configured trainer (`train.trainer`, see
`train.trainer`) with dropout seeded from the session's generator."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from worldlm.config import TrainConfig
from worldlm.train.trainer import (
    LOSS_REPORT_EVERY,
    LocalJob,
    LocalResult,
    LocalTrainer,
    StepCallback,
    add_proximal_gradient,
    batch_order,
    build_trainer,
    make_adamw,
)

__all__ = [
    "LOSS_REPORT_EVERY",
    "LocalResult",
    "add_proximal_gradient",
    "batch_order",
    "local_train",
    "make_optimizer",
    "seeded_dropout",
]

make_optimizer = make_adamw


def local_train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    blocks: torch.Tensor,  # (N, T) token ids; prompt and padding stored as ~id (data.blocks)
    cfg: TrainConfig,
    *,
    start_step: int,
    total_steps: int,
    gen: torch.Generator,
    device: torch.device,
    on_step: StepCallback | None = None,
    trainer: LocalTrainer | None = None,
) -> LocalResult:
    """Train `cfg.local_steps` steps on `blocks` with `trainer` (default: the one
    `cfg.trainer` names); the schedule continues from `start_step`."""
    job = LocalJob(blocks, cfg, start_step, total_steps, gen, device, on_step)
    with seeded_dropout(model, gen, device):
        return (trainer or build_trainer(cfg)).train(model, optimizer, job)


@contextlib.contextmanager
def seeded_dropout(
    model: torch.nn.Module, gen: torch.Generator, device: torch.device
) -> Iterator[None]:
    """Dropout modules draw from torch's global RNG: when the model has an active one (LoRA's
    dropout), seed a forked global RNG from the session's generator so runs stay reproducible.
    Without one, nothing is drawn and the generator is left as it is."""
    if not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
