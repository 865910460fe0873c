"""Local training pieces: the schedule's closed form, batch order, and a loop that learns."""

from __future__ import annotations

import math

import pytest
import torch

from worldlm.config import ModelConfig, TrainConfig
from worldlm.model.build import build_model
from worldlm.train.evaluate import evaluate
from worldlm.train.local import batch_order, local_train, make_optimizer
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
    result = local_train(
        model,
        make_optimizer(model, cfg),
        blocks,
        cfg,
        start_step=0,
        total_steps=30,
        gen=torch.Generator().manual_seed(1),
        device=torch.device("cpu"),
    )
    after = evaluate(model, blocks, batch_size=4, device=torch.device("cpu"))
    assert result.tokens == 30 * 4 * 16 and result.steps == 30
    assert after.loss < 0.5 * before.loss


def test_weight_decay_skips_norms() -> None:
    model = build_model(ModelConfig.model_validate({"preset": "tiny"}), 64, seed=0)
    groups = make_optimizer(model, TrainConfig.model_validate({})).param_groups
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] > 0
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0
