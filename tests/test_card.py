"""The model card: front matter written by huggingface_hub's ModelCardData and read back by
ModelCard; digests and figures in the body, never data."""

from __future__ import annotations

from huggingface_hub import ModelCard

from worldlm.model.card import Provenance, render_card


def _provenance(**changes: object) -> Provenance:
    fields: dict[str, object] = {
        "node": "world",
        "kind": "global",
        "run_id": "abc123",
        "config_sha256": "c0ffee",
        "worldlm_version": "0.1.0",
        "method": "hierfavg",
        "rounds": 3,
        "stop_reason": "rounds",
        "contributors": ["world/a", "world/b"],
        "participation": {"world/a": 3, "world/b": 2},
        "data_sha256": {"world/a": "aa11", "world/b": "bb22"},
        "val_ppl": 12.345,
    }
    return Provenance(**{**fields, **changes})  # type: ignore[arg-type]


def test_the_card_is_a_hub_model_card() -> None:
    text = render_card(_provenance())
    assert text.startswith("---\n") and text.endswith("\n")
    card = ModelCard(text)
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["worldlm", "federated-learning", "hierfavg"]
    assert "# world (global model)" in card.text
    assert "| world/a | 3 | `aa11` |" in text and "| world/b | 2 | `bb22` |" in text
    assert "validation perplexity at the end: 12.35" in text
    assert "None configured" in text


def test_a_lora_card_names_its_base_and_the_privacy_spent() -> None:
    privacy = {"world": {"epsilon": 1.5, "delta": 1e-05}}
    card = ModelCard(render_card(_provenance(base_model="/models/base", privacy=privacy)))
    assert card.data.library_name == "peft" and card.data.base_model == "/models/base"
    assert "lora" in card.data.tags
    assert "| world | 1.5 | 1e-05 |" in card.text
