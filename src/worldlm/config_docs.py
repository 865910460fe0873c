"""Markdown reference of every config key, generated from the config classes themselves.

`python -m worldlm.config_docs > docs/config.md`; a test keeps the file in sync.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from worldlm.config import (
    AggregatorConfig,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    FedBuffConfig,
    LeafConfig,
    LeafDataConfig,
    LinkConfig,
    LoRAConfig,
    ModelConfig,
    MonitorConfig,
    RunSection,
    SampleConfig,
    ServerOptimizerConfig,
    SpeedConfig,
    StopConfig,
    TokenizerConfig,
    TrainConfig,
    WorldLMConfig,
)
from worldlm.config_partition import PartitionConfig
from worldlm.config_shard import ShardConfig
from worldlm.deploy.node_file import LeafDataSection, LinkSection, NodeSection, TlsSection

SECTIONS: list[tuple[str, type[BaseModel], str]] = [
    ("run", RunSection, "What the run is called, where it goes, and which method it runs."),
    (
        "model",
        ModelConfig,
        "The causal LM: a random-init preset, or a pretrained one from a local HF directory or "
        "GGUF file (with its own tokenizer).",
    ),
    (
        "model.lora",
        LoRAConfig,
        "LoRA (PEFT) on a pretrained model: only adapters are trained, sent and aggregated; "
        "WorldLM's K is the adapters of the last blocks.",
    ),
    ("tokenizer", TokenizerConfig, "A byte-level BPE trained on the leaves' training splits."),
    ("data", DataConfig, "How every leaf's files become training and validation blocks."),
    ("train", TrainConfig, "Local training at each leaf, every round."),
    ("eval", EvalConfig, "Validation of each leaf's deployed model (and of the global one)."),
    ("stop", StopConfig, "When the run ends: whichever limit comes first."),
    ("checkpoint", CheckpointConfig, "Atomic checkpoints of the whole run state."),
    ("monitor", MonitorConfig, "Where metrics go besides metrics.jsonl."),
    ("worldlm", WorldLMConfig, "Key layers K (also FedPer's) and their attention aggregation."),
    (
        "partition",
        PartitionConfig,
        "Optional: one dataset split into simulated leaves under a generated tree, expanded "
        "into `nodes` tables before validation (see docs/data.md). Leaves are `leaf0`..`leafN-1` "
        "(kind column: the column's values) under the root or under groups `g0`..; node tables "
        "the config gives for these paths set their settings.",
    ),
    (
        'nodes."PATH"',
        AggregatorConfig,
        "One table per node of the federation tree, keyed by path; this one for a node with "
        "children (the root or a sub-federation).",
    ),
    (
        'nodes."PATH" (a leaf)',
        LeafConfig,
        "A node without children: a data owner. Only `data`, `link`, `dp` (its local DP "
        "settings) and `slowdown` (its speed on a FedBuff parent's simulated clock) are a "
        "leaf's; aggregator settings on a leaf are refused.",
    ),
    ('nodes."PATH".sample', SampleConfig, "Per-aggregator child sampling."),
    (
        'nodes."PATH".data',
        LeafDataConfig,
        "A leaf's own data: exactly one of paths, corpus, dataset or hub (see docs/data.md).",
    ),
    (
        'nodes."PATH".data.shard',
        ShardConfig,
        "A leaf's part of a dataset split among simulated leaves; written by `[partition]`.",
    ),
    (
        'nodes."PATH".server_optimizer',
        ServerOptimizerConfig,
        "An aggregator's optimizer on each round's pseudo-gradient (the model it sent minus its "
        "rule's aggregate, after robust rules and DP noise); each federation picks its own. "
        "`fedavg` at lr 1 is plain FedAvg, bit for bit. `nesterov` (lr 0.7, momentum 0.9) is "
        "DiLoCo's outer optimizer, the usual choice for language models trained with many local "
        "steps; `fedavgm` is its heavy-ball cousin; `fedadam`/`fedyogi`/`fedadagrad` (Reddi et al. "
        "2021) adapt the step per coordinate and want a small lr (1e-3 to 1e-2). The state "
        "(momentum, moments) is checkpointed with the aggregator. See README, 'Server "
        "optimizers and FedProx'.",
    ),
    (
        'nodes."PATH".fedbuff',
        FedBuffConfig,
        "strategy = 'fedbuff': buffered asynchronous aggregation (FedBuff, Nguyen et al. 2022). "
        "One round is one server step: children stay in flight across rounds, and the step "
        "folds the first K updates to arrive, down-weighting stale ones; they arrive on a "
        "simulated clock (`worldlm run`, bit-exact) or a real one (`worldlm serve`/`join`, not "
        "bit-reproducible). Refused with secure aggregation, central DP and run.method = "
        "'worldlm'; see docs/fedbuff.md.",
    ),
    (
        'nodes."PATH".fedbuff.speed',
        SpeedConfig,
        "The simulated clock (fedbuff.clock = 'simulated'): a child's training duration per "
        "dispatch, drawn from (run seed, child path, dispatch count) and multiplied by the "
        "child's own `slowdown`.",
    ),
    (
        'nodes."PATH".link',
        LinkConfig,
        "Compression of the link between this node and its parent (any node but the root; "
        "see docs/compression.md).",
    ),
]

# A deployment's node file (`worldlm serve|join CONFIG --node FILE`): one per node, not shared.
NODE_FILE_SECTIONS: list[tuple[str, type[BaseModel], str]] = [
    ("node", NodeSection, "Who this node is and where it listens or dials."),
    ("tls", TlsSection, "Mutual TLS files (`worldlm certs`); required off loopback."),
    ("link", LinkSection, "Waiting, timeouts and size limits of this node's links."),
    ("data", LeafDataSection, "A leaf's private files, replacing the shared config's."),
]


def _type_name(info: FieldInfo) -> str:
    text = str(info.annotation).replace("typing.", "")
    for token in ("<class '", "'>"):
        text = text.replace(token, "")
    text = re.sub(r"worldlm\.config(_[a-z_]+)?\.", "", text)  # the schema's own modules
    return text.replace("|", "\\|")


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return "(table)"
    value: Any = info.default
    return "—" if value is None else json.dumps(value)


def config_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "A run is one TOML file (`worldlm run FILE`); `worldlm run` alone uses the embedded",
        "default (`configs/default.toml`). Any key can be overridden on the command line with",
        "`--set section.key=value` (values are read as TOML; a bare word is a string), e.g.",
        "`--set train.lr=3e-4 --set nodes.world/medical.inner_rounds=2`. Unknown keys, wrong",
        "types and impossible values are refused before anything runs, naming the key.",
        "Relative paths are read from the config file's directory.",
        "",
        "Tree rules: node paths are names (letters, digits, `_`, `-`) joined by `/`; exactly one",
        "root; every node's parent is a node; a node without children is a leaf and needs",
        "`data`, and a leaf takes only `data`, `link`, `dp` and `slowdown` (the aggregator",
        "settings below are refused on a leaf, by name); the root's rounds are `stop.rounds`;",
        "leaf names are unique across the tree (they identify data owners); `sample.min` is at",
        "most the number of children; the root has no `link`.",
        "",
        "Generated by `python -m worldlm.config_docs`.",
    ]
    lines += _tables(SECTIONS, "##")
    lines += [
        "",
        "## Node files (deployment)",
        "",
        "`worldlm serve CONFIG --node FILE` (aggregators) and `worldlm join CONFIG --node FILE`",
        "(leaves) read the shared config plus this node's own file. Besides these tables the file",
        "has `allow_plaintext` (default `false`): links without TLS, accepted on loopback only.",
        "Relative paths are read from the node file's directory.",
    ]
    lines += _tables(NODE_FILE_SECTIONS, "###")
    return "\n".join(lines) + "\n"


def _tables(sections: list[tuple[str, type[BaseModel], str]], level: str) -> list[str]:
    lines: list[str] = []
    for name, model, blurb in sections:
        lines += [
            "",
            f"{level} `[{name}]`",
            "",
            blurb,
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, info in model.model_fields.items():
            desc = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | `{_type_name(info)}` | `{_default(info)}` | {desc} |")
    return lines


if __name__ == "__main__":
    print(config_reference(), end="")
