"""The local trainer as an extension point: micro-batch accumulation equals one large batch,
a custom loss and a registered trainer are what a leaf runs, and an unknown one is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worldlm.config import ModelConfig, TrainConfig
from worldlm.config_load import validate_config
from worldlm.config_toml import apply_overrides
from worldlm.core.state import get_state
from worldlm.errors import ConfigError
from worldlm.model.build import build_model
from worldlm.progress import QuietProgress
from worldlm.train import trainer as trainer_module
from worldlm.train.local import local_train, make_optimizer
from worldlm.train.trainer import (
    TRAINERS,
    LocalTrainer,
    StandardTrainer,
    build_trainer,
    register_local_trainer,
)

from .conftest import tiny_config_dict

VOCAB = 64


def _model() -> torch.nn.Module:
    cfg = ModelConfig.model_validate({"preset": "tiny", "block_size": 16})
    return build_model(cfg, VOCAB, seed=0)


def _blocks(masked: bool) -> torch.Tensor:
    blocks = torch.randint(1, VOCAB, (24, 16), generator=torch.Generator().manual_seed(1))
    if masked:  # instruction data: prompts stored as ~id carry no target; uneven per block
        for row in range(blocks.shape[0]):
            blocks[row, : 2 + row % 9] = ~blocks[row, : 2 + row % 9]
    return blocks


def _train(
    cfg: TrainConfig, blocks: torch.Tensor, trainer: LocalTrainer | None = None
) -> dict[str, torch.Tensor]:
    model = _model()
    local_train(
        model,
        make_optimizer(model, cfg),
        blocks,
        cfg,
        start_step=0,
        total_steps=cfg.local_steps,
        gen=torch.Generator().manual_seed(3),
        device=torch.device("cpu"),
        trainer=trainer,
    )
    return {k: v.clone() for k, v in get_state(model).items()}


@pytest.mark.parametrize("masked", [False, True], ids=["text", "instructions"])
def test_micro_batches_equal_one_large_batch(masked: bool) -> None:
    base = {"local_steps": 3, "batch_size": 8, "lr": 1e-2, "warmup_steps": 0}
    whole = _train(TrainConfig.model_validate(base), _blocks(masked))
    parts = _train(TrainConfig.model_validate({**base, "grad_accum_steps": 4}), _blocks(masked))
    initial = get_state(_model())
    for key in whole:
        assert not torch.equal(whole[key], initial[key]) or "rotary" in key  # it did train
        torch.testing.assert_close(parts[key], whole[key], rtol=1e-3, atol=1e-4)


def test_unweighted_micro_batches_would_not_equal_the_large_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Why micro-batches are weighted by their target tokens: averaging their mean losses
    instead gives another step on instruction data (the weighting is not a no-op)."""
    base = {"local_steps": 3, "batch_size": 8, "lr": 1e-2, "warmup_steps": 0}
    whole = _train(TrainConfig.model_validate(base), _blocks(True))
    monkeypatch.setattr(trainer_module, "target_count", lambda labels: 1)  # equal weights
    cfg = TrainConfig.model_validate({**base, "grad_accum_steps": 4})
    unweighted = _train(cfg, _blocks(True))
    gap = max(float((unweighted[k] - whole[k]).abs().max()) for k in whole)
    assert gap > 1e-3  # ten times the tolerance the weighted micro-batches meet


def test_grad_accum_steps_must_divide_the_batch() -> None:
    with pytest.raises(ValueError, match="must divide batch_size"):
        TrainConfig.model_validate({"batch_size": 8, "grad_accum_steps": 3})


def test_a_custom_loss_changes_what_the_leaf_learns() -> None:
    class LabelSmoothed(StandardTrainer):
        def loss(
            self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
        ) -> torch.Tensor:
            logits = model(input_ids=input_ids).logits[:, :-1]
            return torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                label_smoothing=0.5,
            )

    cfg = TrainConfig.model_validate({"local_steps": 3, "batch_size": 4, "warmup_steps": 0})
    plain = _train(cfg, _blocks(False))
    smoothed = _train(cfg, _blocks(False), LabelSmoothed())
    assert any(not torch.allclose(plain[k], smoothed[k]) for k in plain)


def test_a_registered_trainer_is_what_every_leaf_runs(tmp_path: Path) -> None:
    from worldlm.runner import run

    calls: list[int] = []

    class Counting(StandardTrainer):
        def train(self, model, optimizer, job):  # type: ignore[no-untyped-def]
            calls.append(job.cfg.local_steps)
            return super().train(model, optimizer, job)

    name = "counting-test-trainer"
    register_local_trainer(name)(lambda cfg: Counting())
    try:
        data = tiny_config_dict(tmp_path, {"world/a": "med", "world/b": "law"})
        config = validate_config(apply_overrides(data, [f'train.trainer="{name}"']))
        run(config, QuietProgress())
    finally:
        del TRAINERS[name]
    assert calls == [4] * 4  # 2 leaves x 2 rounds, 4 local steps each


def test_an_unknown_trainer_is_refused_with_the_registered_names() -> None:
    cfg = TrainConfig.model_validate({"trainer": "nope"})
    with pytest.raises(ConfigError, match=r"unknown local trainer 'nope'.*standard"):
        build_trainer(cfg)


def _train_workspace(tmp_path: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    from worldlm.model.workspace import build_workspace

    data = tiny_config_dict(tmp_path, {"world/a": "med"})
    config = validate_config(apply_overrides(data, overrides))
    model = build_workspace(config, VOCAB, torch.device("cpu"))
    cfg = config.train.model_copy(update={"local_steps": 3, "batch_size": 4})
    local_train(
        model,
        make_optimizer(model, cfg),
        _blocks(True),
        cfg,
        start_step=0,
        total_steps=3,
        gen=torch.Generator().manual_seed(3),
        device=torch.device("cpu"),
    )
    return {k: v.clone() for k, v in get_state(model).items()}


def test_activation_checkpointing_trains_the_same_model(tmp_path: Path) -> None:
    from worldlm.model.workspace import build_workspace

    plain = _train_workspace(tmp_path / "a", [])
    checkpointed = _train_workspace(tmp_path / "b", ["train.activation_checkpointing=true"])
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-5)
    data = tiny_config_dict(tmp_path / "c", {"world/a": "med"})
    config = validate_config(apply_overrides(data, ["train.activation_checkpointing=true"]))
    assert build_workspace(config, VOCAB, torch.device("cpu")).is_activation_checkpointing


def test_attention_runs_on_pytorch_sdpa() -> None:
    """The presets use torch's scaled_dot_product_attention (flash or memory-efficient
    kernels on CUDA), not transformers' eager attention."""
    assert _model().config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_a_compiled_leaf_trains_the_same_model(tmp_path: Path) -> None:
    """train.compile: the leaf trains torch.compile's module, which shares the workspace's
    parameters; the run's models match an uncompiled run up to float rounding."""
    from worldlm.runner import run

    results = []
    for name, compile_ in (("plain", "false"), ("compiled", "true")):
        data = tiny_config_dict(tmp_path / name, {"world/a": "med", "world/b": "law"})
        config = validate_config(apply_overrides(data, [f"train.compile={compile_}"]))
        results.append(run(config, QuietProgress()))
    plain, compiled = results
    for leaf, after in plain.after.items():
        assert compiled.after[leaf].loss == pytest.approx(after.loss, rel=1e-3)
