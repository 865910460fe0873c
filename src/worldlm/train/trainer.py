"""What a leaf runs on its own data each round, as an extension point: a `LocalTrainer` builds
the optimizer and runs the steps. `StandardTrainer` is the default (AdamW, warmup + cosine,
gradient clipping, micro-batch accumulation); FedProx is a subclass of it, and so is any custom
objective (override `loss`). Trainers register by name; `train.trainer` picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from worldlm.config import TrainConfig
from worldlm.data.blocks import IGNORE_INDEX, inputs_and_labels
from worldlm.errors import ConfigError
from worldlm.registration import add_entry
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


@dataclass(frozen=True)
class LocalJob:
    """One round's local training at a leaf: `cfg.local_steps` steps over `blocks`, the
    learning-rate schedule continuing from `start_step` of `total_steps`."""

    blocks: torch.Tensor  # (N, T) token ids; prompt and padding stored as ~id (data.blocks)
    cfg: TrainConfig
    start_step: int
    total_steps: int
    gen: torch.Generator  # the only source of randomness (data order), for reproducibility
    device: torch.device
    on_step: StepCallback | None = None


class LocalTrainer(Protocol):
    """A leaf's local optimization. The optimizer's state_dict is kept between rounds when
    `train.keep_optimizer_state` is on (and saved in checkpoints), so `make_optimizer` must
    build the same optimizer every round."""

    def make_optimizer(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer: ...

    def train(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, job: LocalJob
    ) -> LocalResult: ...


def make_adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (with LoRA: the adapters), weight decay on
    matrices only (norms and biases are not decayed)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # On CUDA the fused kernel updates every tensor in one launch (same math as the loop).
    fused = bool(trainable) and trainable[0].is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def on_cpu(value: Any) -> Any:
    """`value` (an optimizer's state_dict: nested dicts and lists of tensors) with every
    tensor on the CPU; torch's load_state_dict moves them back to each parameter's device."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [on_cpu(v) for v in value]
    return value


def batch_order(n_blocks: int, batch_size: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """(steps, batch) block indices: consecutive random permutations, so every block is seen
    once per pass over the data before any repeats."""
    need = steps * batch_size
    perms = [torch.randperm(n_blocks, generator=gen) for _ in range(-(-need // n_blocks))]
    return torch.cat(perms)[:need].view(steps, batch_size)


def micro_batches(batch: torch.Tensor, parts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, labels) of `batch` split into `parts` equal micro-batches, in order."""
    return [inputs_and_labels(chunk) for chunk in batch.chunk(parts)]


def zero_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """A loss of 0 with gradient 0 that still runs the model forward and backward (a data-
    parallel wrapper reduces gradients in every backward pass)."""
    return model(input_ids=input_ids).logits.float().sum() * 0.0


def target_count(labels: torch.Tensor) -> int:
    """Tokens a causal LM's loss averages over: every label after the first position that is
    not ignored (HF shifts labels by one inside the model)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class StandardTrainer:
    """AdamW with linear warmup and cosine decay to `min_lr_ratio`, global-norm clipping, and
    `grad_accum_steps` micro-batches per step. Each micro-batch's loss is weighted by its share
    of the step's target tokens, so a step equals one large batch up to float rounding (also
    for instruction data, whose prompts carry no targets).

    Subclass and override `loss` for another objective, `after_backward` to change the
    gradient before clipping, or `make_optimizer` for another optimizer."""

    # Multiplies every backward: data parallelism averages gradients over its processes, which
    # each hold a share of the step's targets, so it scales by their number.
    gradient_scale = 1.0

    def make_optimizer(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return make_adamw(model, cfg)

    def loss(
        self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The mean loss over `labels`' targets; the language model's next-token loss."""
        return model(input_ids=input_ids, labels=labels).loss  # HF shifts labels inside

    def start(self, model: torch.nn.Module, job: LocalJob) -> None:
        """Called once before the first step of a round (FedProx records its anchor here)."""
        del model, job

    def after_backward(self, model: torch.nn.Module) -> None:
        """Called after the step's gradients are accumulated, before clipping."""
        del model

    def pieces(
        self, batch: torch.Tensor, parts: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """What this process runs of a step's batch: (input ids, labels, share of the step's
        targets) per micro-batch; one without targets is left out (the others carry the
        step)."""
        chunks = micro_batches(batch, parts)
        if parts == 1:
            return [(ids, labels, 1.0) for ids, labels in chunks]
        counts = [target_count(labels) for _, labels in chunks]
        total = max(sum(counts), 1)
        return [
            (ids, labels, count / total)
            for (ids, labels), count in zip(chunks, counts, strict=True)
            if count > 0
        ]

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss over every process that trains a part of it (one here)."""
        return loss

    def train(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, job: LocalJob
    ) -> LocalResult:
        cfg, device = job.cfg, job.device
        model.train()
        self.start(model, job)
        order = batch_order(job.blocks.shape[0], cfg.batch_size, cfg.local_steps, job.gen)
        loss_sum = torch.zeros((), device=device)
        for i in range(cfg.local_steps):
            lr = lr_at(
                job.start_step + i,
                peak=cfg.lr,
                warmup=cfg.warmup_steps,
                total=job.total_steps,
                min_ratio=cfg.min_lr_ratio,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for ids, labels, share in self.pieces(job.blocks[order[i]], cfg.grad_accum_steps):
                x = ids.to(device, non_blocking=True)
                y = x if labels is ids else labels.to(device, non_blocking=True)  # text: y is x
                with autocast(device, cfg.precision):
                    # A piece without targets (kept only where every process must run as many
                    # backward passes) would give a 0/0 loss; its gradient is zero instead.
                    loss = self.loss(model, x, y) if share > 0 else zero_loss(model, x)
                (loss * (share * self.gradient_scale)).backward()
                step_loss += loss.detach() * share
            self.after_backward(model)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += step_loss
            report = (i + 1) % LOSS_REPORT_EVERY == 0 or i + 1 == cfg.local_steps
            if report:  # every process reaches this together (a collective under DDP)
                reported = float(self.reduce_loss(step_loss.clone()))
                if job.on_step is not None:
                    job.on_step(i + 1, reported)
            elif job.on_step is not None:
                job.on_step(i + 1, None)
        tokens = cfg.local_steps * cfg.batch_size * job.blocks.shape[1]
        mean = float(self.reduce_loss(loss_sum)) / cfg.local_steps
        return LocalResult(tokens, cfg.local_steps, mean)


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


class FedProxTrainer(StandardTrainer):
    """FedProx (Li et al. 2020): each step also descends (mu/2)·||w - w0||², w0 being the
    trainable parameters as the round finds them (what the leaf received, with its personal
    weights on top). The reported loss is the language model's alone."""

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self._anchor: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def start(self, model: torch.nn.Module, job: LocalJob) -> None:
        params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
        self._anchor = (params, [p.detach().clone() for p in params])

    def after_backward(self, model: torch.nn.Module) -> None:
        assert self._anchor is not None, "start() records the anchor before the first step"
        add_proximal_gradient(*self._anchor, self.mu)


TrainerFactory = Callable[[TrainConfig], LocalTrainer]
TRAINERS: dict[str, TrainerFactory] = {}


def register_local_trainer(name: str) -> Callable[[TrainerFactory], TrainerFactory]:
    """Decorator: make the trainer `factory(train_config)` builds selectable as
    `train.trainer = name`. The factory runs once per leaf."""

    def wrap(factory: TrainerFactory) -> TrainerFactory:
        return add_entry(TRAINERS, name, factory, "local trainer")

    return wrap


@register_local_trainer("standard")
def _standard(cfg: TrainConfig) -> LocalTrainer:
    return FedProxTrainer(cfg.prox_mu) if cfg.prox_mu > 0 else StandardTrainer()


def build_trainer(cfg: TrainConfig) -> LocalTrainer:
    """The trainer `cfg.trainer` names (a plugin's must be imported first: `run.plugins`)."""
    factory = TRAINERS.get(cfg.trainer)
    if factory is None:
        raise ConfigError(
            f"train.trainer: unknown local trainer {cfg.trainer!r}; registered: "
            f"{', '.join(sorted(TRAINERS))} (a plugin's trainer needs its module in run.plugins)"
        )
    return factory(cfg)
