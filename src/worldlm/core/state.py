"""Model weights as a flat dict of named parameters (tied weights appear once)."""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def get_state(model: torch.nn.Module) -> State:
    """A detached CPU copy of every distinct parameter, in module order."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def set_state(model: torch.nn.Module, state: State) -> None:
    """Copy `state` into the model's parameters in place (dtypes and devices are converted)."""
    params = dict(model.named_parameters())
    missing = params.keys() - state.keys()
    if missing:
        raise KeyError(f"state lacks parameters: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def cast_like(state: State, reference: State) -> State:
    """`state` converted to the dtypes of `reference` (e.g. float64 averages to float32 weights)."""
    return {k: v.to(reference[k].dtype) for k, v in state.items()}
