"""Local training pieces: the schedule's closed form, batch order, and a loop that learns."""

from __future__ import annotations

import math

import pytest
import torch

from worldlm.config import ModelConfig, TrainConfig
from worldlm.model.build import build_model
from worldlm.train import trainer
from worldlm.train.evaluate import evaluate
from worldlm.train.local import (
    LocalResult,
    add_proximal_gradient,
    batch_order,
    local_train,
    make_optimizer,
)
from worldlm.train.schedule import lr_at


def test_schedule_warms_up_then_follows_the_cosine() -> None:
    kw = {"peak": 1.0, "warmup": 4, "total": 14, "min_ratio": 0.1}
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, **kw) == pytest.approx(0.1)
    assert lr_at(100, **kw) == pytest.approx(0.1)  # past the horizon: stays at the floor


def test_batch_order_sees_every_block_once_per_pass() -> None:
    order = batch_order(10, 3, 6, torch.Generator().manual_seed(0))  # 18 draws: 2 passes
    flat = order.flatten().tolist()
    assert order.shape == (6, 3)
    assert sorted(flat[:10]) == list(range(10))
    assert len(set(flat[10:])) == 8


def _train(
    model: torch.nn.Module, cfg: TrainConfig, blocks: torch.Tensor, seed: int
) -> LocalResult:
    """`cfg.local_steps` steps of `local_train` from step 0 on CPU, data order seeded by `seed`."""
    return local_train(
        model,
        make_optimizer(model, cfg),
        blocks,
        cfg,
        start_step=0,
        total_steps=cfg.local_steps,
        gen=torch.Generator().manual_seed(seed),
        device=torch.device("cpu"),
    )


def test_local_training_lowers_the_loss_on_its_blocks() -> None:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig.model_validate({"preset": "tiny", "block_size": 16}), 64, seed=0
    )
    blocks = torch.randint(0, 64, (4, 16))
    cfg = TrainConfig.model_validate(
        {"local_steps": 30, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0}
    )
    before = evaluate(model, blocks, batch_size=4, device=torch.device("cpu"))
    result = _train(model, cfg, blocks, seed=1)
    after = evaluate(model, blocks, batch_size=4, device=torch.device("cpu"))
    assert result.tokens == 30 * 4 * 16 and result.steps == 30
    assert after.loss < 0.5 * before.loss


def test_weight_decay_skips_norms() -> None:
    model = build_model(ModelConfig.model_validate({"preset": "tiny"}), 64, seed=0)
    groups = make_optimizer(model, TrainConfig.model_validate({})).param_groups
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] > 0
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0


def _train_tiny(cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(start, end) parameters of a tiny model trained by `cfg` on fixed random blocks."""
    model = build_model(
        ModelConfig.model_validate({"preset": "tiny", "block_size": 16}), 64, seed=0
    )
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    _train(model, cfg, torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(3)), 1)
    return start, {k: v.detach().clone() for k, v in model.named_parameters()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))


PROX_BASE = {"local_steps": 20, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0}


def test_prox_mu_zero_is_plain_local_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """With mu = 0 the proximal code is never reached: training is the loop it was before."""

    def forbidden(*args: object) -> None:
        raise AssertionError("the proximal gradient was computed")

    monkeypatch.setattr(trainer, "add_proximal_gradient", forbidden)
    _train_tiny(TrainConfig.model_validate({**PROX_BASE, "prox_mu": 0.0}))  # runs through
    with pytest.raises(AssertionError, match="proximal gradient was computed"):
        _train_tiny(TrainConfig.model_validate({**PROX_BASE, "prox_mu": 1e-3}))


def proximal_term(params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor:
    """Reference: FedProx's term without mu, 0.5 * sum ||p - a||^2, differentiable in params."""
    total = torch.zeros(())
    for p, a in zip(params, anchors, strict=True):
        total = total + (p - a).pow(2).sum()
    return 0.5 * total


def test_prox_mu_keeps_the_weights_near_what_the_leaf_received() -> None:
    # No weight decay: it pulls toward zero, not toward the received weights.
    base = {**PROX_BASE, "weight_decay": 0.0}
    start, plain = _train_tiny(TrainConfig.model_validate(base))
    _, prox = _train_tiny(TrainConfig.model_validate({**base, "prox_mu": 1.0}))
    _, pinned = _train_tiny(TrainConfig.model_validate({**base, "prox_mu": 1e4}))
    moved, moved_prox, moved_pinned = (_distance(w, start) for w in (plain, prox, pinned))
    assert moved_prox < moved
    assert moved_pinned < 0.2 * moved  # AdamW steps ~lr, but no longer drift away


def test_proximal_gradient_is_mu_times_the_distance_to_the_anchor() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=gen, requires_grad=True), torch.randn(5, generator=gen)]
    params[1].requires_grad_(True)
    anchors = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    mu = 0.37
    term = proximal_term(params, anchors)
    pairs = zip(params, anchors, strict=True)
    expected = 0.5 * sum(float((p.detach() - a).pow(2).sum()) for p, a in pairs)
    assert float(term.detach()) == pytest.approx(expected)
    (mu * term).backward()
    autograd = [p.grad.clone() for p in params if p.grad is not None]
    for p in params:
        p.grad = torch.ones_like(p)  # added to what is already there
    add_proximal_gradient(params, anchors, mu)
    for p, a, g in zip(params, anchors, autograd, strict=True):
        assert torch.allclose(g, mu * (p.detach() - a))
        assert p.grad is not None and torch.allclose(p.grad, 1 + g)
    fresh = torch.randn(2, generator=gen, requires_grad=True)
    add_proximal_gradient([fresh], [torch.zeros(2)], mu)  # no gradient yet: it is the pull
    assert fresh.grad is not None and torch.allclose(fresh.grad, mu * fresh.detach())


def test_proximal_term_covers_only_trainable_parameters() -> None:
    """As with LoRA's frozen base: frozen weights are neither anchored nor pulled."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model[0].state_dict().items()}
    blocks = torch.randint(0, 4, (4, 3))

    class Out:
        def __init__(self, loss: torch.Tensor) -> None:
            self.loss = loss

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Out:
            x = torch.nn.functional.one_hot(input_ids, 4).float()
            return Out(self.net(x).pow(2).mean())

    wrapped = Wrapped()
    cfg = TrainConfig.model_validate({**PROX_BASE, "local_steps": 3, "prox_mu": 10.0})
    _train(wrapped, cfg, blocks, seed=0)
    assert all(torch.equal(v, frozen[k]) for k, v in model[0].state_dict().items())
    assert all(p.grad is None for p in model[0].parameters())
