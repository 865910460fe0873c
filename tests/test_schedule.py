"""Our learning-rate schedule against transformers' warmup + cosine with a floor, step by step:
the cosine part is the same; ours warms up one step ahead and holds the floor past the horizon,
so we keep ours (docs/design-notes.md, "Libraries we use and where we keep our own")."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from worldlm.train.schedule import lr_at


def _transformers_lrs(
    peak: float, warmup: int, total: int, ratio: float, steps: int
) -> list[float]:
    """The learning rate transformers' scheduler gives at each optimizer step 0..steps-1."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=peak)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup, total, min_lr_rate=ratio
    )
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the scheduler without a real training step
        for _ in range(steps):
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            optimizer.step()
            schedule.step()
    return lrs


@pytest.mark.parametrize(("warmup", "total", "ratio"), [(4, 14, 0.1), (0, 10, 0.0), (6, 40, 0.3)])
def test_schedule_against_transformers_step_by_step(warmup: int, total: int, ratio: float) -> None:
    peak = 2e-3
    steps = total + 6
    theirs = _transformers_lrs(peak, warmup, total, ratio, steps)
    ours = [lr_at(s, peak=peak, warmup=warmup, total=total, min_ratio=ratio) for s in range(steps)]
    if warmup:
        assert theirs[0] == 0.0 and ours[0] > 0.0
    for step in range(steps):
        if step < warmup:
            # ours is one step ahead: (s + 1) / warmup, never a step at lr 0; theirs s / warmup
            assert ours[step] == pytest.approx(theirs[step + 1], rel=1e-12)
        elif step <= total:
            # the cosine from the peak down to the floor: equal up to float rounding
            assert ours[step] == pytest.approx(theirs[step], rel=1e-12, abs=1e-18)
        else:
            # past the horizon ours stays at the floor; theirs follows the cosine back up
            assert ours[step] == pytest.approx(peak * ratio, rel=1e-12)
            if ratio < 1.0:
                assert theirs[step] > ours[step]
