"""Validation loss and perplexity of a model on a leaf's held-out blocks."""

from __future__ import annotations

import torch

from worldlm.core.messages import EvalResult
from worldlm.data.blocks import IGNORE_INDEX, inputs_and_labels
from worldlm.train.device import autocast


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
) -> EvalResult:
    """Mean loss over every predicted token of `blocks` (N, T): every token after the first,
    but for instruction data only the response tokens (prompt and padding are masked)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, blocks.shape[0], batch_size):
        ids, labels = inputs_and_labels(blocks[start : start + batch_size])  # (B, T) each
        x = ids.to(device)
        if labels is ids:  # plain text: every token after the first is a target
            y, n = x, x.shape[0] * (x.shape[1] - 1)
        else:
            y, n = labels.to(device), int((labels[:, 1:] != IGNORE_INDEX).sum())
            if n == 0:
                continue
        with autocast(device, precision):
            loss = model(input_ids=x, labels=y).loss  # mean over the n targets
        total += loss.double() * n
        count += n
    model.train(was_training)
    return EvalResult(float(total) / max(count, 1), count)


def merge_results(results: list[EvalResult]) -> EvalResult:
    """Token-weighted mean of several evaluations (an aggregator's view of its leaves)."""
    tokens = sum(r.tokens for r in results)
    loss = sum(r.loss * r.tokens for r in results) / max(tokens, 1)
    return EvalResult(loss, tokens)
