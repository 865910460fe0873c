"""A tiny pretrained model, saved as a Hugging Face directory or into a fake local hub cache
laid out as huggingface_hub lays it out: models--ORG--NAME/{refs/main, snapshots/HASH/}."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from worldlm.data.tokenizer import to_hf_tokenizer, train_tokenizer

from .conftest import synthetic_documents

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def save_tiny_model(directory: Path, *, hidden: int = 32, chat: bool = True) -> Path:
    """A random-init 2-layer Llama and a byte-level BPE tokenizer in `directory`."""
    texts = synthetic_documents("med", 40, seed=0) + synthetic_documents("law", 40, seed=0)
    tok = train_tokenizer(texts, vocab_size=320, cache_dir=None)
    hf = to_hf_tokenizer(tok)
    if chat:
        hf.chat_template = CHAT_TEMPLATE
    save_llama(directory, tok.get_vocab_size(), hidden=hidden)
    hf.save_pretrained(directory)
    return directory


def save_llama(
    directory: Path,
    vocab_size: int,
    *,
    hidden: int = 32,
    layers: int = 2,
    intermediate: int = 64,
    positions: int = 512,
) -> None:
    """A random-init Llama (seed 0, tied embeddings, token 0 for bos/eos/pad) saved with
    save_pretrained into `directory`."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def hub_snapshot_dir(cache: Path, repo_id: str) -> Path:
    """Where the hub cache `cache` holds `repo_id`'s main revision."""
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT


def cache_tiny_model(cache: Path, repo_id: str, *, hidden: int = 32, chat: bool = True) -> Path:
    """`save_tiny_model` into the hub cache `cache` under `repo_id`; returns the snapshot."""
    snapshot = save_tiny_model(hub_snapshot_dir(cache, repo_id), hidden=hidden, chat=chat)
    refs = cache / f"models--{repo_id.replace('/', '--')}" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(COMMIT, encoding="utf-8")
    return snapshot
