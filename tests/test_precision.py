"""train.precision: "bf16" keeps weights, gradients and optimizer moments in bfloat16 (half
the memory and half the bytes on every link); "fp32" turns autocast off; "auto" is bf16
autocast over fp32 weights on CUDA and fp32 on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worldlm.config import TrainConfig
from worldlm.config_load import validate_config
from worldlm.config_toml import apply_overrides
from worldlm.metrics.jsonl import read_metrics
from worldlm.progress import QuietProgress
from worldlm.runner import run
from worldlm.train.device import autocast_enabled

from .conftest import tiny_config_dict

LEAVES = {"world/a": "med", "world/b": "law"}


def _run(tmp_path: Path, precision: str):  # type: ignore[no-untyped-def]
    data = tiny_config_dict(tmp_path / precision, LEAVES)
    config = validate_config(apply_overrides(data, [f'train.precision="{precision}"']))
    return run(config, QuietProgress())


def test_bf16_trains_in_bfloat16_and_halves_the_bytes_sent(tmp_path: Path) -> None:
    half, full = _run(tmp_path, "bf16"), _run(tmp_path, "fp32")
    for leaf, after in half.after.items():
        assert after.loss < half.before[leaf].loss  # it learns
    weights = load_file(half.run_dir / "final" / "world" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}

    def sent(result) -> int:  # type: ignore[no-untyped-def]
        rows = read_metrics(result.run_dir / "metrics.jsonl")
        return sum(r["bytes_up"] for r in rows if r["kind"] == "aggregate")

    assert sent(half) * 2 == sent(full)


@pytest.mark.parametrize(
    ("precision", "device", "on"),
    [
        ("auto", "cuda", True),
        ("auto", "cpu", False),
        ("fp32", "cuda", False),
        ("bf16", "cuda", False),  # the weights themselves are bf16: nothing to cast
    ],
)
def test_autocast_follows_the_precision(precision: str, device: str, on: bool) -> None:
    assert autocast_enabled(torch.device(device), precision) is on


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        TrainConfig.model_validate({"precision": "fp8"})


def test_bf16_in_a_hierarchy_forwards_float32_sums(tmp_path: Path) -> None:
    """Inner aggregators of a bf16 run forward their FedAvg sums in float32 (wider than the
    model, as float64 sums are for a float32 model); their parent accepts them."""
    from .conftest import TWO_LEVEL

    data = tiny_config_dict(tmp_path, TWO_LEVEL)
    overrides = ['train.precision="bf16"', "run.method=hierfavg"]
    result = run(validate_config(apply_overrides(data, overrides)), QuietProgress())
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert not [r for r in rows if r["kind"] == "rejected"]
    roots = [r for r in rows if r["kind"] == "aggregate" and r["node"] == "world"]
    assert roots and all(r["participants"] == ["world/med", "world/soft"] for r in roots)
    for leaf, after in result.after.items():
        assert after.loss < result.before[leaf].loss


def test_bf16_over_a_quantized_base_is_refused(tmp_path: Path) -> None:
    from worldlm.errors import ConfigError

    data = tiny_config_dict(tmp_path, LEAVES)
    data["model"] = {"path": str(tmp_path), "load_in": "4bit", "lora": {"enabled": True}}
    validate_config(apply_overrides(data, []))  # fine with the default precision
    with pytest.raises(ConfigError, match="quantized"):
        validate_config(apply_overrides(data, ['train.precision="bf16"']))
