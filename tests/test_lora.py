"""Federated LoRA fine-tuning of a pretrained model (issue 8): only adapters cross, the base
never changes, prompts are masked out of the loss, exports round-trip through transformers and
PEFT, and WorldLM's key layers are the adapters of the last blocks.

Everything runs on a tiny random-init Llama saved to a temporary Hugging Face directory with a
BPE tokenizer that has a chat template, and on instruction JSONL the tests write.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

from worldlm.checkpoint import list_checkpoints
from worldlm.cli import main
from worldlm.config import ModelConfig, RunConfig, TrainConfig, dump_config
from worldlm.config_load import validate_config
from worldlm.core.messages import TrainTask, Update
from worldlm.core.state import get_state, set_state
from worldlm.data.blocks import IGNORE_INDEX, inputs_and_labels, pack_examples
from worldlm.data.instructions import (
    Conversation,
    Message,
    conversation_from_record,
    encode_conversations,
)
from worldlm.data.prepare import prepare_data
from worldlm.data.tokenizer import to_hf_tokenizer
from worldlm.errors import ConfigError, DataError, ModelError
from worldlm.federation.leaf import Leaf
from worldlm.metrics.jsonl import read_metrics
from worldlm.model.build import build_model
from worldlm.model.export import export_model
from worldlm.model.lora import adapter_names, wrap_lora
from worldlm.model.partition import key_layer_partition, split_state
from worldlm.model.pretrained import pretrained_dir
from worldlm.model.workspace import build_workspace
from worldlm.progress import QuietProgress
from worldlm.root_loop import evaluate_tree, round_loop
from worldlm.runner import run
from worldlm.session import Session, open_session
from worldlm.train.evaluate import evaluate
from worldlm.train.local import local_train, make_optimizer
from worldlm.tree import build_tree
from worldlm.wire import encode

from .conftest import _TOPICS, synthetic_documents, write_jsonl
from .fake_hub import CHAT_TEMPLATE, save_llama

SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CPU = torch.device("cpu")


def qa_pairs(topic: str, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"{topic}-{seed}")
    pairs = []
    for _ in range(n):
        a, b, c = rng.sample(_TOPICS[topic], 3)
        pairs.append((f"What is the {a} of the {b}?", f"The {a} of the {b} is {c}."))
    return pairs


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Llama and its BPE tokenizer (with a chat template), saved as a
    Hugging Face directory: the 'pretrained' model."""
    directory = tmp_path_factory.mktemp("base")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [f"{p} {r}" for topic in ("med", "law") for p, r in qa_pairs(topic, 200, 99)]
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = to_hf_tokenizer(tok)
    hf.chat_template = CHAT_TEMPLATE
    save_llama(
        directory, tok.get_vocab_size(), hidden=64, layers=4, intermediate=128, positions=128
    )
    hf.save_pretrained(directory)
    return directory


def write_instructions(path: Path, topic: str, *, chat: bool, n: int = 48) -> Path:
    """Instruction JSONL: prompt/response records, or chat messages with a system prompt."""
    lines = []
    for prompt, response in qa_pairs(topic, n, 1):
        record: dict[str, Any] = {"prompt": prompt, "response": response}
        if chat:
            record = {
                "messages": [
                    {"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": response},
                ]
            }
        lines.append(json.dumps(record))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def lora_config(tmp_path: Path, base: Path, method: str = "hierfavg", **extra: Any) -> RunConfig:
    data = tmp_path / "data"
    med = write_instructions(data / "med.jsonl", "med", chat=False)
    law = write_instructions(data / "law.jsonl", "law", chat=True)
    return validate_config(
        {
            "run": {
                "name": "lora",
                "out_dir": str(tmp_path / "runs"),
                "seed": 3,
                "cache_dir": str(tmp_path / "cache"),
                "device": "cpu",
                "method": method,
            },
            "model": {
                "path": str(base),
                "block_size": 48,
                "lora": {"enabled": True, "r": 4, "alpha": 8},
                **extra,  # may replace lora
            },
            "data": {"val_fraction": 0.2, "max_chars": 0},
            "train": {"local_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1},
            "eval": {"max_blocks": 8, "batch_size": 8},
            "stop": {"rounds": 2},
            "monitor": {"tensorboard": False},
            "nodes": {
                "world": {},
                "world/med": {},
                "world/law": {},
                "world/med/a": {"data": {"paths": [str(med)]}},
                "world/law/b": {"data": {"paths": [str(law)]}},
            },
        }
    )


def run_to_end(config: RunConfig, run_dir: Path) -> tuple[Session, dict[str, Any]]:
    """A whole run (as `worldlm run`), keeping the live session to look inside."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(dump_config(config), encoding="utf-8")
    observer = QuietProgress()
    session = open_session(config, observer, run_dir)
    before = evaluate_tree(session, session.fed.root.state, 0)
    buffers = {k: v.clone() for k, v in session.model.named_buffers()}
    result = round_loop(session, observer, before, first_round=1, tokens=0.0)
    return session, {"result": result, "buffers_before": buffers}


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# --- the model: adapters are the only parameters -------------------------------------------


def test_lora_workspace_federates_adapters_only(tmp_path: Path, base_dir: Path) -> None:
    config = lora_config(tmp_path, base_dir)
    model = build_workspace(config, 10, CPU)
    state = get_state(model)
    adapters = adapter_names(model)
    assert set(state) == set(adapters) and adapters
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    # 4 blocks x 7 linear layers (q, k, v, o, gate, up, down) x (A, B)
    assert len(adapters) == 4 * 7 * 2
    base = load_file(base_dir / "model.safetensors")
    assert nbytes(state) < nbytes(base) / 5
    # the optimizer sees the adapters and nothing else
    optimizer = make_optimizer(model, config.train)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(adapters)
    # WorldLM's K: the adapters of the last ceil(0.3 * 4) = 2 blocks; the final norm is frozen
    partition = key_layer_partition(model, 0.3)
    assert list(partition.groups) == ["model.layers.2", "model.layers.3"]
    assert partition.key_names == {
        k for k in adapters if k.startswith(("model.layers.2.", "model.layers.3."))
    }
    backbone, keys = split_state(state, partition.key_names)
    assert set(keys) == partition.key_names and len(backbone) == len(adapters) // 2


def test_training_moves_adapters_and_leaves_the_base_unchanged(base_dir: Path) -> None:
    model = build_model(ModelConfig.model_validate({"path": str(base_dir)}), 10, seed=0)
    lora = ModelConfig.model_validate({"path": str(base_dir), "lora": {"enabled": True}}).lora
    wrap_lora(model, lora, seed=1)
    base_before = {k: v.clone() for k, v in model.named_buffers()}
    adapters_before = get_state(model)
    cfg = TrainConfig(local_steps=3, batch_size=2, lr=1e-2, warmup_steps=0)
    blocks = torch.randint(0, 300, (6, 16))
    local_train(
        model,
        make_optimizer(model, cfg),
        blocks,
        cfg,
        start_step=0,
        total_steps=3,
        gen=torch.Generator().manual_seed(0),
        device=CPU,
    )
    for name, tensor in model.named_buffers():
        assert torch.equal(tensor, base_before[name]), name
    on_disk = load_file(base_dir / "model.safetensors")
    buffers = {k.replace(".base_layer.", "."): v for k, v in model.named_buffers()}
    assert all(torch.equal(buffers[k], v) for k, v in on_disk.items())
    after = get_state(model)
    assert any(not torch.equal(after[k], adapters_before[k]) for k in after)
    assert all(not torch.equal(after[k], adapters_before[k]) for k in after if ".lora_B." in k)


def test_fedprox_pulls_only_the_adapters(base_dir: Path) -> None:
    """train.prox_mu anchors the trainable adapters; the frozen base is no parameter of it."""
    moved = []
    for mu in (0.0, 1.0):
        model = build_model(ModelConfig.model_validate({"path": str(base_dir)}), 10, seed=0)
        lora = ModelConfig.model_validate({"path": str(base_dir), "lora": {"enabled": True}})
        wrap_lora(model, lora.lora, seed=1)
        assert all(".lora_" in k for k, p in model.named_parameters() if p.requires_grad)
        base_before = {k: v.clone() for k, v in model.named_buffers()}
        before = get_state(model)
        cfg = TrainConfig(
            local_steps=4, batch_size=2, lr=1e-2, warmup_steps=0, weight_decay=0.0, prox_mu=mu
        )
        local_train(
            model,
            make_optimizer(model, cfg),
            torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(2)),
            cfg,
            start_step=0,
            total_steps=4,
            gen=torch.Generator().manual_seed(0),
            device=CPU,
        )
        assert all(torch.equal(v, base_before[k]) for k, v in model.named_buffers())
        after = get_state(model)
        moved.append(sum(float((after[k] - before[k]).pow(2).sum()) for k in after))
    assert 0 < moved[1] < moved[0]


def test_lora_dropout_is_seeded_by_the_session(base_dir: Path) -> None:
    cfg = TrainConfig(local_steps=2, batch_size=2, lr=1e-2, warmup_steps=0)
    lora = ModelConfig.model_validate(
        {"path": str(base_dir), "lora": {"enabled": True, "dropout": 0.3}}
    ).lora
    states = []
    for _ in range(2):
        model = build_model(ModelConfig.model_validate({"path": str(base_dir)}), 10, seed=0)
        wrap_lora(model, lora, seed=1)
        torch.manual_seed(len(states))  # the global RNG differs: results must not
        local_train(
            model,
            make_optimizer(model, cfg),
            torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(5)),
            cfg,
            start_step=0,
            total_steps=2,
            gen=torch.Generator().manual_seed(0),
            device=CPU,
        )
        states.append(get_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_config_refuses_what_cannot_work(tmp_path: Path, base_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.path"):
        validate_config({"model": {"preset": "tiny", "lora": {"enabled": True}}, "nodes": {}})
    with pytest.raises(ConfigError, match="load_in"):
        validate_config({"model": {"path": str(base_dir), "load_in": "4bit"}, "nodes": {}})
    if not torch.cuda.is_available():
        config = lora_config(tmp_path, base_dir, load_in="8bit")
        with pytest.raises(ModelError, match="CUDA"):
            build_workspace(config, 10, CPU)


# --- instruction data: prompt tokens are not targets ---------------------------------------


def _targets_text(hf: Any, ids: list[int], targets: list[bool]) -> str:
    return "".join(hf.decode([i]) for i, t in zip(ids, targets, strict=True) if t)


def test_prompt_tokens_are_masked(base_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(base_dir)
    tok = hf.backend_tokenizer
    conversation = conversation_from_record(
        {"prompt": "What is the fever of the patient?", "response": "The fever is acute."}, "x"
    )
    # plain format: "prompt\nresponse<eos>"; the response and <eos> are the targets
    [(ids, targets)] = encode_conversations(tok, [conversation], None)
    assert hf.decode(ids) == "What is the fever of the patient?\nThe fever is acute.<|endoftext|>"
    assert _targets_text(hf, ids, targets) == "The fever is acute.<|endoftext|>"
    # chat template: only the assistant's turn, its end-of-turn marker included
    chat = Conversation(
        (
            Message("system", "Be brief."),
            Message("user", "What is the fever?"),
            Message("assistant", "Acute."),
            Message("user", "And the cough?"),
            Message("assistant", "Chronic."),
        )
    )
    [(ids, targets)] = encode_conversations(tok, [chat], hf)
    assert hf.decode(ids).startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is")
    assert _targets_text(hf, ids, targets) == "Acute.<|end|>\nChronic.<|end|>\n"
    assert not targets[-1]  # the separating <eos> after a templated example is not a target
    # packed into blocks: prompt and padding are stored as ~id, their labels are IGNORE_INDEX
    blocks = pack_examples([(ids, targets)], block_size=len(ids) + 5, pad_id=0)
    x, y = inputs_and_labels(blocks)
    assert x[0, : len(ids)].tolist() == ids and x[0, len(ids) :].tolist() == [0] * 5
    expected = [i if t else IGNORE_INDEX for i, t in zip(ids, targets, strict=True)]
    assert y[0].tolist() == expected + [IGNORE_INDEX] * 5
    # plain text has no masked token: its blocks are their own labels
    text = torch.arange(12).view(2, 6)
    assert inputs_and_labels(text)[1] is text


def test_instruction_records_are_checked() -> None:
    with pytest.raises(DataError, match="response"):
        conversation_from_record({"prompt": "p"}, "f.jsonl: line 1")
    with pytest.raises(DataError, match="assistant"):
        conversation_from_record({"messages": [{"role": "user", "content": "hi"}]}, "f")
    with pytest.raises(DataError, match="role"):
        conversation_from_record({"messages": [{"content": "hi"}]}, "f")


def test_the_loss_sees_response_tokens_only(base_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    conversation = conversation_from_record(
        {"prompt": "What is the fever of the patient?", "response": "The fever is acute."}, "x"
    )
    [(ids, targets)] = encode_conversations(hf.backend_tokenizer, [conversation], hf)
    blocks = pack_examples([(ids, targets)], block_size=len(ids), pad_id=0)  # (1, T)
    x, y = inputs_and_labels(blocks)
    out = model(input_ids=x, labels=y)
    (grad,) = torch.autograd.grad(out.loss, out.logits)  # (1, T, V)
    # position t predicts token t + 1: its logits matter exactly when t + 1 is a target
    predicts_target = torch.tensor([*targets[1:], False])
    touched = grad[0].abs().sum(-1) > 0
    assert torch.equal(touched, predicts_target) and predicts_target.any()
    # evaluation: the mean over the response targets only, and it moves with the response
    result = evaluate(model, blocks, batch_size=1, device=CPU)
    assert result.tokens == sum(targets[1:])
    assert result.loss == pytest.approx(float(out.loss.detach()), rel=1e-5)
    changed = blocks.clone()
    last_target = max(i for i, t in enumerate(targets) if t)
    changed[0, last_target] = (changed[0, last_target] + 1) % 300
    assert evaluate(model, changed, batch_size=1, device=CPU).loss != pytest.approx(result.loss)


def test_a_leaf_may_mix_text_and_instruction_files(tmp_path: Path, base_dir: Path) -> None:
    write_instructions(tmp_path / "d" / "chat.jsonl", "med", chat=True)
    write_jsonl(tmp_path / "d" / "notes.jsonl", synthetic_documents("med", 30, seed=0))
    nodes = {"world": {}, "world/a": {"data": {"paths": [str(tmp_path / "d")]}}}
    model = {"path": str(base_dir), "block_size": 48}
    for tokenizer, templated in (({}, True), ({"path": str(base_dir / "tokenizer.json")}, False)):
        config = validate_config({"model": model, "tokenizer": tokenizer, "nodes": nodes})
        data = prepare_data(
            build_tree(config.nodes),
            data_cfg=config.data,
            tokenizer_cfg=config.tokenizer,
            block_size=config.model.block_size,
            model_dir=pretrained_dir(config.model, tmp_path / "cache"),
            seed=0,
            cache_dir=tmp_path / "cache",
        )
        blocks = data.leaves["a"].train_blocks
        masked = (blocks < 0).any(dim=1)
        assert masked.any() and not masked.all()  # conversations and plain text
        hf = AutoTokenizer.from_pretrained(base_dir)
        first = inputs_and_labels(blocks[masked][:1])[0][0].tolist()
        assert ("<|user|>" in hf.decode(first)) == templated  # else the plain format


# --- a federation of two leaves on instruction data ----------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations PEFT calls
def test_federated_lora_sends_adapters_and_exports_round_trip(
    tmp_path: Path,
    base_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    replies: list[Update] = []
    handle_train = Leaf.handle_train

    def recording(self: Leaf, task: TrainTask) -> Update:
        update = handle_train(self, task)
        replies.append(update)
        return update

    monkeypatch.setattr(Leaf, "handle_train", recording)
    config = lora_config(tmp_path, base_dir)
    run_dir = tmp_path / "run"
    session, info = run_to_end(config, run_dir)
    model = session.model
    adapters = set(adapter_names(model))
    adapter_bytes = nbytes(get_state(model))

    # only adapters crossed: every reply holds exactly the adapters, and its wire payload is
    # their size (plus a header)
    assert len(replies) == 2 * 2  # 2 leaves x 2 rounds
    for update in replies:
        assert set(update.state) == adapters
        assert nbytes(update.state) == adapter_bytes
        assert (
            adapter_bytes < len(encode(update.state)) < adapter_bytes + 64 * len(adapters) + 65536
        )
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "aggregate"]
    for row in rows:
        if row["node"] == "world":  # two sub-federations forwarding their float32 means
            assert row["bytes_down"] == row["bytes_up"] == 2 * adapter_bytes
        else:  # one leaf each
            assert row["bytes_down"] == row["bytes_up"] == adapter_bytes
    # nor did the checkpoints hold anything but adapters (and optimizer moments)
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1].stat().st_size
    assert checkpoint < nbytes(load_file(base_dir / "model.safetensors"))

    # the base is what it was: buffers untouched by two rounds of training
    for name, tensor in model.named_buffers():
        assert torch.equal(tensor, info["buffers_before"][name]), name
    # and each leaf's response perplexity went down
    result = info["result"]
    for leaf, after in result.after.items():
        assert after.ppl < result.before[leaf].ppl, leaf

    # final/world holds the global adapters in PEFT format, with the tokenizer
    final = run_dir / "final" / "world"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(base_dir.resolve())

    # export, merged: plain transformers gives the federated model's logits
    set_state(model, session.fed.root.state)
    model.eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        federated = model(input_ids=x).logits
    merged_dir = export_model(run_dir, tmp_path / "merged", node="world/med/a")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, federated, atol=1e-5)
    assert AutoTokenizer.from_pretrained(merged_dir).chat_template == CHAT_TEMPLATE
    # export, adapters only (here through the command line): PEFT on the base directory gives
    # the same logits
    adapter_dir = tmp_path / "adapters"
    assert main(["export", str(run_dir), "--adapters", "--out", str(adapter_dir)]) == 0
    assert "wrote the adapters" in capsys.readouterr().out
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in adapter_dir.iterdir()
    }
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    with torch.no_grad():
        assert torch.allclose(peft.eval()(input_ids=x).logits, federated, atol=1e-6)

    # generate works on both (greedy: the same text), and on the run's own adapters
    texts = []
    for directory in (merged_dir, adapter_dir, run_dir):
        for chat in ([], ["--chat"]):
            args = ["generate", str(directory), "What is", "--temperature", "0", *chat]
            assert main([*args, "--max-new-tokens", "6"]) == 0
            texts.append(capsys.readouterr().out)
    assert texts[0] == texts[2] == texts[4] and texts[1] == texts[3] == texts[5]
    assert texts[0].startswith("What is")


def test_two_lora_runs_give_identical_checkpoints(tmp_path: Path, base_dir: Path) -> None:
    config = lora_config(tmp_path, base_dir, lora={"enabled": True, "r": 4, "dropout": 0.1})
    config = config.model_copy(update={"stop": config.stop.model_copy(update={"rounds": 1})})
    payloads = []
    for name in ("one", "two"):
        torch.manual_seed(len(payloads))  # the global RNG differs between the runs
        result = run(config, QuietProgress(), out=tmp_path / name)
        directory = result.run_dir / "checkpoints"
        [checkpoint] = list_checkpoints(directory)
        # the checkpoint, and the leaves' state files it names by their SHA-256
        objects = sorted(p.name for p in (directory / "objects").iterdir())
        payloads.append((checkpoint.read_bytes(), objects))
    assert payloads[0] == payloads[1]


def test_worldlm_key_layers_are_the_last_blocks_adapters(tmp_path: Path, base_dir: Path) -> None:
    config = lora_config(tmp_path, base_dir, method="worldlm")
    # K = the last 2 of the 4 blocks (the default, 1, would make every block K)
    half = config.worldlm.model_copy(update={"key_fraction": 0.5})
    config = config.model_copy(update={"worldlm": half})
    session, _ = run_to_end(config, tmp_path / "run")
    fed = session.fed
    partition = key_layer_partition(session.model, config.worldlm.key_fraction)
    med = fed.aggregators["world/med"].with_own_key_layers(fed.root.state)
    law = fed.aggregators["world/law"].with_own_key_layers(fed.root.state)
    assert set(med) == set(law) == set(adapter_names(session.model))
    for name in med:
        if name in partition.key_names:  # K: each sub-federation's own
            assert not torch.equal(med[name], law[name]), name
        else:  # B: shared by everyone
            assert torch.equal(med[name], law[name]), name
    # and so do the saved adapters of the two sub-federations
    saved = {
        path: load_file(tmp_path / "run" / "final" / path / "adapter_model.safetensors")
        for path in ("world/med", "world/law")
    }
    differ = {
        k
        for k in saved["world/med"]
        if not torch.equal(saved["world/med"][k], saved["world/law"][k])
    }
    assert differ and all(".layers.2." in k or ".layers.3." in k for k in differ)
