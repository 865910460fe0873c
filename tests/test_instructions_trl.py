"""TRL's prompt-completion records are instruction data: read, rendered and masked as
prompt/response records are; in the conversational form only the completion is learnt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from worldlm.data.instructions import (
    Conversation,
    Message,
    conversation_from_record,
    encode_conversations,
    holds_instructions,
    read_conversations,
)
from worldlm.data.tokenizer import to_hf_tokenizer, train_tokenizer
from worldlm.errors import DataError

from .conftest import synthetic_documents
from .fake_hub import CHAT_TEMPLATE

PROMPT, ANSWER = "What is the fever of the patient?", "The fever is acute."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [*synthetic_documents("med", 40, seed=0), PROMPT, ANSWER]
    return train_tokenizer(texts, vocab_size=320, cache_dir=None)


def _targets(tok: Tokenizer, ids: list[int], targets: list[bool]) -> str:
    return tok.decode(
        [i for i, t in zip(ids, targets, strict=True) if t], skip_special_tokens=False
    )


def test_prompt_completion_strings_are_read_and_masked_like_prompt_response(
    tok: Tokenizer,
) -> None:
    completion = conversation_from_record({"prompt": PROMPT, "completion": ANSWER}, "x")
    response = conversation_from_record({"prompt": PROMPT, "response": ANSWER}, "x")
    assert completion == response
    chat = to_hf_tokenizer(tok)
    chat.chat_template = CHAT_TEMPLATE
    for template in (None, chat):
        [(ids, targets)] = encode_conversations(tok, [completion], template)
        assert [(ids, targets)] == encode_conversations(tok, [response], template)
        assert _targets(tok, ids, targets).startswith(ANSWER)
        assert PROMPT not in _targets(tok, ids, targets)
    with_system = {"system": "Be brief.", "prompt": PROMPT, "completion": ANSWER}
    assert conversation_from_record(with_system, "x").messages[0] == Message("system", "Be brief.")


def test_conversational_prompt_completion_learns_the_completion_only(tok: Tokenizer) -> None:
    record = {
        "prompt": [
            {"role": "user", "content": "And the cough?"},
            {"role": "assistant", "content": "Chronic."},  # context, not a target
            {"role": "user", "content": PROMPT},
        ],
        "completion": [{"role": "assistant", "content": ANSWER}],
    }
    conversation = conversation_from_record(record, "x")
    assert conversation.targets_from == 3 and len(conversation.messages) == 4
    [(ids, targets)] = encode_conversations(tok, [conversation], None)
    assert _targets(tok, ids, targets) == ANSWER + "<|endoftext|>"
    chat = to_hf_tokenizer(tok)
    chat.chat_template = CHAT_TEMPLATE
    [(ids, targets)] = encode_conversations(tok, [conversation], chat)
    assert _targets(tok, ids, targets) == ANSWER + "<|end|>\n"
    # the same turns as a messages record learn both assistant turns; digests tell them apart
    as_messages = Conversation(conversation.messages)
    assert "Chronic." in _targets(tok, *encode_conversations(tok, [as_messages], None)[0])
    assert as_messages.canonical() != conversation.canonical()


def test_a_jsonl_file_of_prompt_completion_records_is_instruction_data(tmp_path: Path) -> None:
    file = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"{PROMPT} {i}", "completion": ANSWER} for i in range(3)]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert holds_instructions(file, "text")
    read = read_conversations(file)
    assert [c.messages[0].content for c in read] == [r["prompt"] for r in rows]
    assert all(c.messages[-1] == Message("assistant", ANSWER) for c in read)


def test_bad_prompt_completion_records_are_named() -> None:
    with pytest.raises(DataError, match="completion"):
        conversation_from_record({"prompt": PROMPT, "completion": 3}, "f.jsonl: line 2")
    with pytest.raises(DataError, match="completion"):
        conversation_from_record({"prompt": [{"role": "user", "content": "hi"}]}, "f")
    with pytest.raises(DataError, match="no non-empty assistant"):
        record = {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "user", "content": "no answer"}],
        }
        conversation_from_record(record, "f")
