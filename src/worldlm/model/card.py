"""The model card in each final model directory: where the model came from, not what it saw.

A Hugging Face `README.md` whose YAML front matter is written by `huggingface_hub`'s
`ModelCardData` (and the whole card checked by parsing it as a `ModelCard`), so the Hub reads
it. It names the run, the method, the federations and leaves whose updates reached the model
and in how many rounds, the differential privacy spent, and a SHA-256 per leaf of its
documents: an auditor can check that a leaf's data is the data it claims, and nobody can read
the data back from the card.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


@dataclass(frozen=True)
class Provenance:
    """What one final model's card says."""

    node: str  # the tree path whose model this is
    kind: str  # "global", "sub-federation" or "leaf"
    run_id: str
    config_sha256: str
    worldlm_version: str
    method: str
    rounds: int
    stop_reason: str
    contributors: Sequence[str]  # leaves whose updates reached this model
    participation: Mapping[str, int]  # leaf -> rounds it took part in
    data_sha256: Mapping[str, str]  # leaf -> digest of its documents
    val_ppl: float | None = None
    personal_from: Sequence[str] = ()  # leaves whose updates shaped its personalized layers
    privacy: Mapping[str, Any] = field(default_factory=dict)  # node -> {"epsilon", "delta"}
    base_model: str | None = None  # LoRA: the directory of the base the adapters apply to


def participation_by_leaf(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """In how many rounds each child took part, from the `aggregate` rows of the metrics."""
    counts: dict[str, int] = {}
    for row in rows:
        if row.get("kind") == "aggregate" and row.get("status", "ok") == "ok":
            for child in row.get("participants", []):
                counts[child] = counts.get(child, 0) + 1
    return counts


def latest_privacy(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last ε and δ each node reported (none until a federation configures DP)."""
    spent: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("kind") == "privacy":
            spent[str(row["node"])] = {"epsilon": row.get("epsilon"), "delta": row.get("delta")}
    return spent


def render_card(p: Provenance) -> str:
    """The README.md text of one model directory."""
    front = ModelCardData(
        library_name="transformers" if p.base_model is None else "peft",
        pipeline_tag="text-generation",
        tags=["worldlm", "federated-learning", p.method, *(["lora"] if p.base_model else [])],
        base_model=p.base_model,
    )
    lines = [
        f"# {p.node} ({p.kind} model)",
        "",
        f"Trained by federated learning with worldlm {p.worldlm_version}, method `{p.method}`, "
        f"over {p.rounds} root rounds (stopped by: {p.stop_reason}). No training text left "
        "its owner's node; this card holds digests and figures only.",
        "",
        f"- run id: `{p.run_id}`",
        f"- config SHA-256: `{p.config_sha256}`",
    ]
    if p.val_ppl is not None:
        lines.append(f"- validation perplexity at the end: {p.val_ppl:.2f}")
    if p.base_model is not None:
        lines.append(
            f"- LoRA adapters only (PEFT format) on the base model `{p.base_model}`; "
            "`worldlm export RUN_DIR --node PATH --out DIR` writes the merged model"
        )
    lines += ["", "## Contributors", "", "| leaf | rounds taken part ¹ | documents SHA-256 |"]
    lines.append("|---|--:|---|")
    for leaf in p.contributors:
        digest = p.data_sha256.get(leaf, "unknown")
        lines.append(f"| {leaf} | {p.participation.get(leaf, 0)} | `{digest}` |")
    lines += ["", "¹ rounds of its parent federation in which its update was accepted."]
    if p.personal_from:
        lines += [
            "",
            "Personalized layers (key layers, or a leaf's own weights) came from: "
            + ", ".join(p.personal_from)
            + "; the rest of the model from every contributor.",
        ]
    lines += ["", "## Differential privacy", ""]
    if p.privacy:
        lines += ["| federation | ε | δ |", "|---|--:|--:|"]
        for node, spent in sorted(p.privacy.items()):
            lines.append(f"| {node} | {spent.get('epsilon')} | {spent.get('delta')} |")
    else:
        lines.append("None configured: no federation of this run added DP noise.")
    # ModelCard parses the front matter back: a card the Hub could not read fails here.
    return str(ModelCard(f"---\n{front.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))
