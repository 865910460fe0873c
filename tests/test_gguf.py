"""A pretrained base from a GGUF file (issue 8): converted once into the cache, with the
file's own tokenizer and chat template; the converted model computes what the original did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from worldlm.data.prepare import choose_tokenizer, hf_tokenizer
from worldlm.model import pretrained
from worldlm.model.build import build_model

from .test_lora import CHAT_TEMPLATE, SPECIAL, base_dir, lora_config

__all__ = ["base_dir"]  # the tiny pretrained model, a fixture


def write_gguf(base: Path, path: Path) -> Path:
    """The tiny base as a GGUF file (float32, llama.cpp's tensor names and Q/K layout)."""
    import gguf

    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = model.config
    spec = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = spec["model"]["vocab"]
    vocab.update({t["content"]: t["id"] for t in spec["added_tokens"]})
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    def permute(w: torch.Tensor, heads: int) -> Any:  # llama.cpp's rotary layout of Q and K
        return (
            w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1])
            .swapaxes(1, 2)
            .reshape(w.shape)
            .numpy()
        )

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(
            f"blk.{i}.attn_q.weight",
            permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads),
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight",
            permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
        )
        for hf_name, gguf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"].numpy())
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_is_converted_once_with_its_tokenizer(
    tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    write_gguf(base_dir, gguf_dir / "tiny.gguf")
    config = lora_config(tmp_path, gguf_dir, gguf_file="tiny.gguf")
    cache = tmp_path / "cache"
    conversions = []
    convert = pretrained.AutoTokenizer.from_pretrained

    def counting(*args: Any, **kwargs: Any) -> Any:
        conversions.append(kwargs.get("gguf_file"))
        return convert(*args, **kwargs)

    monkeypatch.setattr(pretrained.AutoTokenizer, "from_pretrained", counting)
    x = torch.randint(0, 300, (2, 12))
    original = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    for _ in range(2):
        model = build_model(config.model, 10, seed=0, cache_dir=cache).eval()
        with torch.no_grad():
            assert torch.allclose(
                model(input_ids=x).logits, original(input_ids=x).logits, atol=1e-5
            )
    assert conversions == ["tiny.gguf"]  # the second load read the cached safetensors
    [converted] = (cache / "models").iterdir()
    assert (converted / "model.safetensors").is_file()
    # the GGUF's own tokenizer and chat template
    tok = choose_tokenizer(
        config.tokenizer, pretrained.pretrained_dir(config.model, cache), [], cache
    )
    text = "<|user|>\nWhat is the fever of the patient?<|end|>"
    reference = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    assert tok.encode(text).ids == reference.encode(text).ids
    assert (
        hf_tokenizer(
            tok, config.tokenizer, pretrained.pretrained_dir(config.model, cache)
        ).chat_template
        == CHAT_TEMPLATE
    )
