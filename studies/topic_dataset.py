"""A small synthetic labelled dataset for trying `[partition]` (configs/partition-dirichlet.toml).

Usage: python studies/topic_dataset.py [OUT_DIR] [N_DOCS]   (default: data/topics, 2000)

Writes a Hugging Face Dataset with save_to_disk: short templated documents about one of 8
topics (`label`, a ClassLabel) in one of 3 made-up registers (`register`), seeded, so the same
command always writes the same rows. docs/partition-dirichlet.png was drawn from it with:

    python studies/topic_dataset.py data/topics
    worldlm partition configs/partition-dirichlet.toml --plot docs/partition-dirichlet.png

The generator lives in the package (worldlm.examples), where `worldlm init partitioned` writes
the same dataset as the template's example.
"""

from __future__ import annotations

import sys
from pathlib import Path

from worldlm.examples import TOPICS, save_topic_dataset


def build(out: Path, n_docs: int, seed: int = 0) -> None:
    save_topic_dataset(out, n_docs, seed)
    print(f"wrote {n_docs} documents ({len(TOPICS)} topics) to {out}")


if __name__ == "__main__":
    build(
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data/topics"),
        int(sys.argv[2]) if len(sys.argv) > 2 else 2000,
    )
