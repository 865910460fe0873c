"""The unigram reference: what a model that learned only a leaf's token frequencies scores.

A language model that has not beaten this has not learned more than a frequency table, so a
comparison of methods below it says nothing about federation (issue 18's protocol). The table
is fit on the leaf's training blocks with add-one (Laplace) smoothing over the vocabulary, so
that a token unseen in training has a finite cost, and scored on exactly the tokens `evaluate`
predicts: every token after the first of each block, for instruction data only the response's.
"""

from __future__ import annotations

import torch

from worldlm.core.messages import EvalResult
from worldlm.data.blocks import IGNORE_INDEX, inputs_and_labels


def unigram_counts(blocks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) float64 counts of the target tokens of `blocks` (N, T)."""
    _, labels = inputs_and_labels(blocks)
    targets = labels[:, 1:].reshape(-1)
    targets = targets[targets != IGNORE_INDEX]
    return torch.bincount(targets, minlength=vocab_size).to(torch.float64)[:vocab_size]


def unigram_result(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> EvalResult:
    """Mean cross-entropy on `val`'s targets of the add-one unigram model of `train`'s."""
    counts = unigram_counts(train, vocab_size)
    log_p = torch.log((counts + 1.0) / (counts.sum() + vocab_size))  # (V,)
    val_counts = unigram_counts(val, vocab_size)
    tokens = int(val_counts.sum())
    loss = float(-(val_counts * log_p).sum() / max(tokens, 1))
    return EvalResult(loss, tokens)
