"""A small synthetic labelled dataset for trying `[partition]` (configs/partition-dirichlet.toml).

Usage: python studies/topic_dataset.py [OUT_DIR] [N_DOCS]   (default: data/topics, 2000)

Writes a Hugging Face Dataset with save_to_disk: short templated documents about one of 8
topics (`label`, a ClassLabel) in one of 3 made-up registers (`register`), seeded, so the same
command always writes the same rows. docs/partition-dirichlet.png was drawn from it with:

    python studies/topic_dataset.py data/topics
    worldlm partition configs/partition-dirichlet.toml --plot docs/partition-dirichlet.png
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

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


def build(out: Path, n_docs: int, seed: int = 0) -> None:
    from datasets import ClassLabel, Dataset

    rng = random.Random(seed)
    topics, registers = sorted(TOPICS), sorted(REGISTERS)
    rows: dict[str, list[object]] = {"text": [], "label": [], "register": []}
    for _ in range(n_docs):
        topic = rng.randrange(len(topics))
        register = rng.choice(registers)
        words = TOPICS[topics[topic]]
        sentences = [
            REGISTERS[register].format(**dict(zip("abc", rng.sample(words, 3), strict=True)))
            for _ in range(rng.randint(3, 8))
        ]
        rows["text"].append(" ".join(sentences))
        rows["label"].append(topic)
        rows["register"].append(register)
    ds = Dataset.from_dict(rows).cast_column("label", ClassLabel(names=topics))
    ds.save_to_disk(str(out))
    print(f"wrote {n_docs} documents ({len(topics)} topics) to {out}")


if __name__ == "__main__":
    build(
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data/topics"),
        int(sys.argv[2]) if len(sys.argv) > 2 else 2000,
    )
