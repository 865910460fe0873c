"""A leaf's local training: AdamW, warmup + cosine, gradient clipping, explicit loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from worldlm.config import TrainConfig
from worldlm.train.device import autocast
from worldlm.train.schedule import lr_at

StepCallback = Callable[[int, float | None], None]
# Reading the loss forces a device sync; the progress display gets it only every few steps.
LOSS_REPORT_EVERY = 10


@dataclass(frozen=True)
class LocalResult:
    tokens: int  # input tokens seen (steps * batch * block)
    steps: int
    mean_loss: float


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norms and biases are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def batch_order(n_blocks: int, batch_size: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """(steps, batch) block indices: consecutive random permutations, so every block is seen
    once per pass over the data before any repeats."""
    need = steps * batch_size
    perms = [torch.randperm(n_blocks, generator=gen) for _ in range(-(-need // n_blocks))]
    return torch.cat(perms)[:need].view(steps, batch_size)


def local_train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    blocks: torch.Tensor,  # (N, T) token ids
    cfg: TrainConfig,
    *,
    start_step: int,
    total_steps: int,
    gen: torch.Generator,
    device: torch.device,
    on_step: StepCallback | None = None,
) -> LocalResult:
    """Train `cfg.local_steps` steps on `blocks`; the schedule continues from `start_step`."""
    model.train()
    order = batch_order(blocks.shape[0], cfg.batch_size, cfg.local_steps, gen)
    loss_sum = torch.zeros((), device=device)
    for i in range(cfg.local_steps):
        lr = lr_at(
            start_step + i,
            peak=cfg.lr,
            warmup=cfg.warmup_steps,
            total=total_steps,
            min_ratio=cfg.min_lr_ratio,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = blocks[order[i]].to(device, non_blocking=True)  # (B, T)
        with autocast(device):
            loss = model(input_ids=x, labels=x).loss  # HF shifts labels inside
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        if on_step is not None:
            report = (i + 1) % LOSS_REPORT_EVERY == 0 or i + 1 == cfg.local_steps
            on_step(i + 1, float(loss.detach()) if report else None)
    tokens = cfg.local_steps * cfg.batch_size * blocks.shape[1]
    return LocalResult(tokens, cfg.local_steps, float(loss_sum) / cfg.local_steps)
