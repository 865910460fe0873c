"""Pretrained bases from disk: a Hugging Face directory, or a GGUF file converted once.

transformers reads a GGUF file (`gguf_file=`) by dequantizing every tensor, about 40 s for
SmolLM2-135M on two cores. The result, model and tokenizer (with its chat template), is saved
once as an ordinary Hugging Face directory under `<cache>/models/`, named by the file's SHA-256,
and every later load (each node of a deployment, `worldlm export`, `worldlm generate`) reads that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from worldlm.audit.digest import file_sha256
from worldlm.config import ModelConfig
from worldlm.errors import ModelError
from worldlm.hub import resolve_model_path

# Bump when the conversion changes so that old cache entries are not reused.
_CONVERSION_FORMAT = 1


def base_model_dir(cfg: ModelConfig, cache_dir: Path) -> Path:
    """The Hugging Face directory of `model.path` (a directory, or a hub id's snapshot in the
    local hub cache): the directory itself, or the cached conversion of `model.gguf_file`
    (converted now if it is not cached yet)."""
    assert cfg.path is not None, "only pretrained models have a directory"
    path = resolve_model_path(cfg.path)
    if cfg.gguf_file is None:
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.path: {path} is not a Hugging Face model directory (no config.json); "
                "for a GGUF file set model.gguf_file too"
            )
        return path
    return converted_gguf(path, cfg.gguf_file, cache_dir)


def pretrained_dir(cfg: ModelConfig, cache_dir: Path) -> Path | None:
    """`base_model_dir` of a pretrained model; None for a random-init preset."""
    return None if cfg.path is None else base_model_dir(cfg, cache_dir)


def converted_gguf(directory: Path, gguf_file: str, cache_dir: Path) -> Path:
    """`<cache>/models/<stem>-<sha256[:16]>/`: the GGUF file as a Hugging Face directory."""
    source = directory / gguf_file
    if not source.is_file():
        raise ModelError(f"model.gguf_file: {source} does not exist (it is read from model.path)")
    digest = file_sha256(source)
    target = cache_dir / "models" / f"{Path(gguf_file).stem}-{digest[:16]}-v{_CONVERSION_FORMAT}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(
                directory, gguf_file=gguf_file, local_files_only=True
            )
        except (OSError, ValueError, ImportError) as exc:
            raise ModelError(f"model.gguf_file: cannot load {source}: {exc}") from exc
        # transformers marks a GGUF model as quantized (and refuses to save it) although its
        # weights are dequantized float32 tensors by now: save them as an ordinary model.
        model.hf_quantizer = None  # type: ignore[assignment]  # a plain attribute in fact
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # an incomplete copy left by an interrupted conversion
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)  # atomic: a concurrent reader sees all of it or nothing
        except OSError:
            if not (target / "config.json").is_file():  # not another process's copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_pretrained(cfg: ModelConfig, cache_dir: Path) -> PreTrainedModel:
    """The base model of `cfg` in float32, or quantized by bitsandbytes (`model.load_in`)."""
    path = base_model_dir(cfg, cache_dir)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32}
    if cfg.load_in != "full":
        kwargs.update(quantization_kwargs(cfg.load_in))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot load {path}: {exc}") from exc
    assert isinstance(model, PreTrainedModel)
    return model


def quantization_kwargs(load_in: str) -> dict[str, Any]:
    """from_pretrained arguments of an 8- or 4-bit base; bitsandbytes needs CUDA."""
    if not torch.cuda.is_available():
        raise ModelError(
            f"model.load_in = {load_in!r} needs a CUDA GPU (bitsandbytes quantization); "
            "this machine has none: use load_in = 'full'"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            f"model.load_in = {load_in!r} needs bitsandbytes: `pip install bitsandbytes`, "
            "or use load_in = 'full'"
        ) from None
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    return {"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}}
