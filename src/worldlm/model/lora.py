"""LoRA fine-tuning with PEFT: the federation sees the adapters and nothing else.

`wrap_lora` injects adapters into a base model once per node (transformers' PEFT integration,
`add_adapter`: the model stays a `PreTrainedModel`, and its `save_pretrained` writes the
adapters in PEFT format), then turns every frozen base weight into a module *buffer*: state of
the module that is not a parameter. From then on everything that walks `named_parameters()` —
`core.state.get_state`/`set_state`, hence every update, aggregate, checkpoint and wire
payload; the B/K partition (K = the adapters of the last blocks); the optimizer; the `local`
baseline's set of personal weights — sees the adapters only, and the engine needs no LoRA
branch. The base stays in memory, is used by the forward pass, and is never sent or saved.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from worldlm.config import LoRAConfig
from worldlm.core.state import State, set_state
from worldlm.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def wrap_lora(model: PreTrainedModel, cfg: LoRAConfig, *, seed: int) -> PreTrainedModel:
    """`model`, in place, with LoRA adapters (initialized from `seed`) and its base weights
    turned into buffers."""
    targets: str | list[str] = (
        "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    )
    peft_config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # lora_A is initialized from the global RNG: fork it so every node (and every run of one
    # config) starts from the same adapters without touching the caller's stream.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations PEFT calls
        torch.manual_seed(seed)
        try:
            model.add_adapter(peft_config)
        except ValueError as exc:  # e.g. no target module found in the model
            raise ModelError(f"model.lora: {exc}") from exc
    freeze_base(model)
    return model


def freeze_base(model: nn.Module) -> None:
    """Move every parameter that does not require grad into the module's buffers."""
    frozen: dict[int, torch.Tensor] = {}  # one buffer per tensor, so tied weights stay tied
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.requires_grad:
                continue
            del module._parameters[name]
            # bitsandbytes keeps its quantization state on its Parameter subclasses: keep those
            # objects; a plain Parameter becomes a plain tensor sharing its storage.
            buffer = frozen.setdefault(
                id(param), param.detach() if type(param) is nn.Parameter else param
            )
            module.register_buffer(name, buffer)


def is_lora(model: nn.Module) -> bool:
    """Whether `model` carries LoRA adapters."""
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters, found by module structure: the tensors held in the
    adapter containers (lora_A, lora_B, ...) of PEFT's tuner layers."""
    names: list[str] = []
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for container in module.adapter_layer_names:
            held = getattr(module, container, None)
            if isinstance(held, nn.Module):
                names += [f"{module_name}.{container}.{n}" for n, _ in held.named_parameters()]
    return names


def save_adapters(
    model: PreTrainedModel, state: State, directory: Path, base_dir: Path | None
) -> Path:
    """`state` in PEFT format (adapter_config.json + adapter_model.safetensors), naming
    `base_dir` (absolute) as the base model to load them on."""
    set_state(model, state)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # with an adapter attached: the adapter alone
    if base_dir is not None:
        config_path = directory / ADAPTER_CONFIG
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = str(base_dir.resolve())
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


def base_of(adapter_dir: Path) -> Path | None:
    """The base model directory an adapter directory names, if any."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    return Path(base) if base else None
