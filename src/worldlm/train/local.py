"""A leaf's local training: AdamW, warmup + cosine, gradient clipping, explicit loop; with
`train.prox_mu` > 0, FedProx's proximal term (Li et al. 2020)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from worldlm.config import TrainConfig
from worldlm.data.blocks import inputs_and_labels
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
    """AdamW over the trainable parameters (with LoRA: the adapters), weight decay on
    matrices only (norms and biases are not decayed)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
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


@torch.no_grad()
def add_proximal_gradient(
    params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor], mu: float
) -> None:
    """Add mu * (p - a), the gradient of FedProx's (mu/2)·sum ||p - a||², to each p.grad: the
    same step as adding the term to the loss, without building its autograd graph."""
    for p, a in zip(params, anchors, strict=True):
        pull = (p - a).mul_(mu)
        if p.grad is None:
            p.grad = pull
        else:
            p.grad.add_(pull)


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
) -> LocalResult:
    """Train `cfg.local_steps` steps on `blocks`; the schedule continues from `start_step`.

    With `cfg.prox_mu` > 0 each step also descends (mu/2)·||w - w0||², w0 being the trainable
    parameters as this call finds them (what the leaf received, with its personal weights on
    top): the gradient mu·(w - w0) is added before clipping. The reported loss is the language
    model's alone."""
    model.train()
    prox: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    if cfg.prox_mu > 0:
        params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
        prox = (params, [p.detach().clone() for p in params])
    order = batch_order(blocks.shape[0], cfg.batch_size, cfg.local_steps, gen)
    loss_sum = torch.zeros((), device=device)
    with seeded_dropout(model, gen, device):
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
            ids, labels = inputs_and_labels(blocks[order[i]])  # (B, T) each
            x = ids.to(device, non_blocking=True)
            y = x if labels is ids else labels.to(device, non_blocking=True)  # text: y is x
            with autocast(device):
                loss = model(input_ids=x, labels=y).loss  # HF shifts labels inside
            loss.backward()
            if prox is not None:
                add_proximal_gradient(*prox, cfg.prox_mu)
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
