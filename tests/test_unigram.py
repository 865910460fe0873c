"""The unigram reference against a hand count."""

from __future__ import annotations

import math

import pytest
import torch

from worldlm.comparison import MethodResult, table_rows
from worldlm.train.unigram import unigram_result


def test_unigram_is_the_add_one_frequency_table_of_the_training_targets() -> None:
    vocab = 4
    # Targets are every token after a block's first: train targets 1, 1, 2 and 1, 3, 3.
    train = torch.tensor([[0, 1, 1, 2], [2, 1, 3, 3]])
    val = torch.tensor([[3, 1, 0]])  # targets 1 and 0
    counts = [0, 3, 1, 2]  # of tokens 0..3 among the train targets
    p = [(c + 1) / (6 + vocab) for c in counts]
    expected = -(math.log(p[1]) + math.log(p[0])) / 2
    result = unigram_result(train, val, vocab)
    assert result.tokens == 2 and result.loss == pytest.approx(expected)
    assert result.ppl == pytest.approx(math.exp(expected))


def test_masked_prompt_tokens_are_neither_counted_nor_scored() -> None:
    train = torch.tensor([[0, ~1, ~1, 2]])  # ~id: a prompt token, read but not a target
    val = torch.tensor([[0, ~3, 2]])
    result = unigram_result(train, val, 4)
    p2 = (1 + 1) / (1 + 4)  # token 2 is the only training target
    assert result.tokens == 1 and result.loss == pytest.approx(-math.log(p2))


def test_the_comparison_table_carries_the_reference_when_recorded() -> None:
    ppl = {"w/a": 10.0, "w/b": 30.0}
    with_ref = MethodResult("fedavg", ppl, [], {"w/a": 50.0, "w/b": 70.0})
    header, rows = table_rows([with_ref, MethodResult("local", ppl, [])])
    assert header == ["leaf", "fedavg", "local", "unigram"]
    assert [row[-1] for row in rows] == ["50.0", "70.0", "60.0", "70.0"]  # leaves, mean, worst
    assert table_rows([MethodResult("local", ppl, [])])[0] == ["leaf", "local"]
