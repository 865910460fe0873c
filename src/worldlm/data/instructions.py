"""Instruction and chat data: records, their rendering, and which tokens the loss sees.

A JSONL line `{"prompt": ..., "response": ...}` (optionally with `"system"`),
`{"messages": [{"role": ..., "content": ...}, ...]}`, or TRL's prompt-completion record
`{"prompt": ..., "completion": ...}` (two strings, read like prompt/response, or two lists of
messages, whose completion's assistant turns alone are targets) is one conversation. It is
rendered with
the tokenizer's chat template when there is one, else in a plain format: every message's
content followed by a newline, the last one followed by the end-of-text token instead, so
`{"prompt": p, "response": r}` is `p + "\\n" + r + <eos>`. Only the assistant's turns are
targets of the loss (with a template: from the end of the generation prompt to the end of the
turn, its end-of-turn marker included; plain: the response and the final <eos>).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from worldlm.data.tokenizer import eos_id
from worldlm.errors import DataError

if TYPE_CHECKING:  # transformers takes 0.5 s to import; a chat template is the only user
    from transformers import PreTrainedTokenizerBase

ASSISTANT = "assistant"
_JSONL_SUFFIXES = (".jsonl", ".json")

Span = tuple[int, int]  # [start, end) characters of rendered text that the loss sees
Example = tuple[list[int], list[bool]]  # token ids, and whether each one is a target


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """One instruction example: messages in order, at least one of them the assistant's."""

    messages: tuple[Message, ...]
    # The assistant turns from this message on are targets; earlier ones are context (TRL's
    # conversational prompt-completion records put prior assistant turns in the prompt).
    targets_from: int = 0

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def is_target(self, index: int) -> bool:
        return index >= self.targets_from and self.messages[index].role == ASSISTANT

    def canonical(self) -> str:
        """A stable serialization (digests of a leaf's data; unchanged for conversations
        whose every assistant turn is a target)."""
        data: Any = self.as_dicts()
        if self.targets_from:
            data = {"messages": data, "targets_from": self.targets_from}
        return json.dumps(data, ensure_ascii=False, sort_keys=True)

    @property
    def chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


Document = str | Conversation  # a leaf's unit of data: plain text or one conversation


def document_chars(doc: Document) -> int:
    return len(doc) if isinstance(doc, str) else doc.chars


def is_instruction_record(record: Any, text_field: str) -> bool:
    """A JSON object holding a conversation rather than a `text_field` document."""
    return (
        isinstance(record, dict)
        and text_field not in record
        and ("messages" in record or "prompt" in record)
    )


def holds_instructions(file: Path, text_field: str) -> bool:
    """Whether a JSONL file holds conversations, judged by its first non-blank line (a file
    that does not parse is left to the text reader, which names the problem)."""
    if file.suffix.lower() not in _JSONL_SUFFIXES:
        return False
    try:
        with file.open("rb") as fh:
            for raw in fh:
                line = raw.decode("utf-8").lstrip("\ufeff")
                if line.strip():
                    return is_instruction_record(json.loads(line), text_field)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return False


def read_conversations(file: Path, *, max_chars: int | None = None) -> list[Conversation]:
    """The conversations of one JSONL file, whole ones only, until `max_chars` characters of
    content have been read."""
    conversations: list[Conversation] = []
    total = 0
    for line_no, record in _records(file):
        conversation = conversation_from_record(record, f"{file}: line {line_no}")
        conversations.append(conversation)
        total += conversation.chars
        if max_chars is not None and total >= max_chars:
            break
    if not conversations:
        raise DataError(f"{file}: holds no conversations; remove it or fill it with examples")
    return conversations


def _records(file: Path) -> Iterator[tuple[int, Any]]:
    with file.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError:
                raise DataError(
                    f"{file}: line {line_no} is not valid UTF-8; re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{file}: line {line_no} is not valid JSON ({err.msg}, column {err.colno})"
                ) from None
            except RecursionError:
                raise DataError(
                    f"{file}: line {line_no} nests JSON arrays or objects too deeply to read"
                ) from None
            yield line_no, record


def conversation_from_record(record: Any, where: str) -> Conversation:
    """A conversation from `{"prompt", "response"[, "system"]}`, `{"messages": [...]}` or
    `{"prompt", "completion"[, "system"]}`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    targets_from = 0
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f'{where}: "messages" must be a non-empty list of messages')
        messages = tuple(_message(m, f"{where}, message {i + 1}") for i, m in enumerate(raw))
    elif isinstance(record.get("prompt"), list):
        messages, targets_from = _conversational_completion(record, where)
    else:
        answer = "completion" if "completion" in record else "response"
        fields = {k: record.get(k) for k in ("system", "prompt", answer)}
        for key in ("prompt", answer):
            if not isinstance(fields[key], str):
                raise DataError(
                    f'{where}: an instruction record needs string "prompt" and "response" '
                    f'(or "completion") fields, or a "messages" list; {key!r} is missing or '
                    "not a string"
                )
        system = fields["system"]
        if system is not None and not isinstance(system, str):
            raise DataError(f'{where}: "system" must be a string')
        messages = (
            *([Message("system", system)] if system else []),
            Message("user", str(fields["prompt"])),
            Message(ASSISTANT, str(fields[answer])),
        )
    if messages[0].role == ASSISTANT:
        raise DataError(f"{where}: the conversation starts with the assistant; give a prompt")
    conversation = Conversation(messages, targets_from)
    if not any(conversation.is_target(i) and m.content for i, m in enumerate(messages)):
        raise DataError(f"{where}: no non-empty assistant message, so nothing to learn from")
    return conversation


def _conversational_completion(
    record: dict[str, Any], where: str
) -> tuple[tuple[Message, ...], int]:
    """TRL's conversational prompt-completion record: two lists of messages; the completion's
    assistant turns are the targets."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(completion, list) or not completion or not prompt:
        raise DataError(
            f'{where}: a conversational record needs non-empty "prompt" and "completion" '
            "lists of messages"
        )
    assert isinstance(prompt, list)
    head = [_message(m, f"{where}, prompt message {i + 1}") for i, m in enumerate(prompt)]
    tail = [_message(m, f"{where}, completion message {i + 1}") for i, m in enumerate(completion)]
    return (*head, *tail), len(head)


def _message(raw: Any, where: str) -> Message:
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("role"), str)
        or not isinstance(raw.get("content"), str)
    ):
        raise DataError(f'{where}: a message is an object with string "role" and "content"')
    return Message(raw["role"], raw["content"])


def plain_text(conversation: Conversation) -> str:
    """The conversation as text, without markers (what a trained tokenizer learns from)."""
    return render_plain(conversation)[0]


def render_plain(conversation: Conversation) -> tuple[str, list[Span]]:
    """Plain format: each message's content and a newline (none after the last); the
    assistant's messages are the spans the loss sees."""
    text, spans = "", []
    last = len(conversation.messages) - 1
    for i, message in enumerate(conversation.messages):
        start = len(text)
        text += message.content + ("" if i == last else "\n")
        if conversation.is_target(i):
            spans.append((start, len(text)))
    return text, spans


def render_chat(
    conversation: Conversation, chat: PreTrainedTokenizerBase
) -> tuple[str, list[Span]]:
    """The chat template's rendering; each assistant turn's span runs from the end of the
    generation prompt before it to the end of the turn."""
    messages = conversation.as_dicts()

    def render(upto: int, generation_prompt: bool) -> str:
        text = chat.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )
        assert isinstance(text, str)
        return text

    full = render(len(messages), False)
    spans: list[Span] = []
    for i in range(len(conversation.messages)):
        if not conversation.is_target(i):
            continue
        prompt, turn = render(i, True), render(i + 1, False)
        if not (turn.startswith(prompt) and full.startswith(turn)):
            raise DataError(
                "the tokenizer's chat template does not render a conversation as the prefix of "
                "its continuation, so prompt and response tokens cannot be told apart; use a "
                "tokenizer without a template (plain format) or another template"
            )
        spans.append((len(prompt), len(turn)))
    return full, spans


def encode_conversations(
    tok: Tokenizer,
    conversations: Sequence[Conversation],
    chat: PreTrainedTokenizerBase | None,
) -> list[Example]:
    """Token ids of each conversation (rendered with `chat`'s template, else plain) and their
    target flags; each example ends with the end-of-text id, a target only in plain format
    (a template ends turns with its own marker)."""
    eos = eos_id(tok)
    rendered = [
        render_chat(c, chat) if chat is not None else render_plain(c) for c in conversations
    ]
    encodings = tok.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    examples: list[Example] = []
    for (_, spans), encoding in zip(rendered, encodings, strict=True):
        targets = [_in_spans(start, spans) for start, _ in encoding.offsets]
        examples.append(([*encoding.ids, eos], [*targets, chat is None]))
    return examples


def _in_spans(position: int, spans: list[Span]) -> bool:
    return any(start <= position < end for start, end in spans)
