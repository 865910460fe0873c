"""What only a GPU can show, skipped without one (`benchmarks/gpu_check.sh` runs them):
training on CUDA in bf16 autocast, the fused AdamW kernel, and leaves sharing one GPU keeping
their optimizer moments in host memory between rounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worldlm.config import ModelConfig, TrainConfig
from worldlm.config_load import validate_config
from worldlm.config_toml import apply_overrides
from worldlm.model.build import build_model
from worldlm.progress import QuietProgress
from worldlm.train.trainer import make_adamw

from .conftest import tiny_config_dict

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_a_run_on_cuda_learns(tmp_path: Path) -> None:
    from worldlm.runner import run

    data = tiny_config_dict(tmp_path, {"world/a": "med", "world/b": "law"})
    config = validate_config(apply_overrides(data, ['run.device="cuda"', "stop.rounds=3"]))
    result = run(config, QuietProgress())
    for leaf, after in result.after.items():
        assert after.loss < result.before[leaf].loss


def test_adamw_is_fused_on_cuda() -> None:
    model = build_model(ModelConfig(preset="tiny", block_size=16), 64, seed=0).cuda()
    optimizer = make_adamw(model, TrainConfig())
    assert optimizer.defaults["fused"] is True


def test_leaves_keep_their_moments_in_host_memory() -> None:
    """Leaves sharing the GPU hold one leaf's AdamW moments on it at a time: after its round
    a leaf's kept optimizer state is in host memory."""
    from worldlm.config import EvalConfig
    from worldlm.core.leaf_data import LeafData
    from worldlm.core.messages import TrainTask
    from worldlm.core.state import get_state
    from worldlm.federation.context import RunContext
    from worldlm.federation.leaf import Leaf

    cuda = torch.device("cuda")
    model = build_model(ModelConfig(preset="tiny", block_size=16), 64, seed=0).cuda()
    blocks = torch.randint(1, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    leaves = [
        Leaf(
            f"world/{name}",
            LeafData(name, blocks, {}),
            workspace=model,
            train_cfg=TrainConfig(local_steps=2, batch_size=4),
            eval_cfg=EvalConfig(),
            total_steps=8,
            personal_keys=frozenset(),
            ctx=RunContext(run_id="t", seed=0, device=cuda),
        )
        for name in ("a", "b")
    ]
    incoming = get_state(model)
    for r in range(2):
        for leaf in leaves:
            leaf.handle_train(TrainTask("t", r, r, "world", leaf.path, f"n{r}", incoming))
    for leaf in leaves:
        assert leaf.optimizer_state is not None
        slots = leaf.optimizer_state["state"].values()
        assert {t.device.type for slot in slots for t in slot.values()} == {"cpu"}


def test_micro_batches_equal_one_batch_in_bf16() -> None:
    from worldlm.core.state import get_state
    from worldlm.train.local import local_train

    blocks = torch.randint(1, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for parts in (1, 4):
        model = build_model(ModelConfig(preset="tiny", block_size=16), 64, seed=0).cuda()
        cfg = TrainConfig(local_steps=2, batch_size=8, grad_accum_steps=parts, warmup_steps=0)
        local_train(
            model,
            make_adamw(model, cfg),
            blocks,
            cfg,
            start_step=0,
            total_steps=2,
            gen=torch.Generator().manual_seed(3),
            device=torch.device("cuda"),
        )
        results.append(get_state(model))
    for key in results[0]:  # bf16 rounding differs per micro-batch: a looser bound than fp32
        torch.testing.assert_close(results[1][key], results[0][key], rtol=2e-2, atol=2e-3)
