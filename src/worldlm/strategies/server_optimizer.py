"""Server optimizers: an aggregator's step on its round's pseudo-gradient.

The pseudo-gradient of a round is g = x - x_agg, the model the aggregator sent minus what its
rule (FedAvg, a robust rule, DP-FedAvg) made of the replies. Plain FedAvg takes x_agg itself,
that is one SGD step on g at learning rate 1. The others (Reddi et al. 2021, "Adaptive
Federated Optimization", Algorithm 2; Hsu et al. 2019 for FedAvgM; Douillard et al. 2023,
DiLoCo, for the outer Nesterov step):

| name       | state | step                                                               |
|------------|-------|--------------------------------------------------------------------|
| fedavg     | -     | x - lr g                                                           |
| fedavgm    | b     | b = mu b + g;  x - lr b          (torch.optim.SGD, momentum mu)    |
| nesterov   | b     | b = mu b + g;  x - lr (g + mu b) (torch.optim.SGD, nesterov=True)  |
| fedadagrad | m, v  | v = v + g^2                                                        |
| fedadam    | m, v  | v = b2 v + (1 - b2) g^2                                            |
| fedyogi    | m, v  | v = v - (1 - b2) g^2 sign(v - g^2)                                 |

The adaptive three share m = b1 m + (1 - b1) g and x - lr m / (sqrt(v) + tau), with v starting
at tau^2 and no bias correction, as in Reddi et al. State is kept in float32 per tensor (the
model's shape) and saved with the aggregator's checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from worldlm.config import ServerOptimizerConfig
from worldlm.core.state import State
from worldlm.registration import add_entry

Step = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], None]


def sgd_step(x: torch.Tensor, g: torch.Tensor, slots: dict[str, torch.Tensor], lr: float) -> None:
    """Plain SGD on the pseudo-gradient (FedAvg with a server learning rate), in place."""
    del slots  # stateless
    x.add_(g, alpha=-lr)


def momentum_step(
    x: torch.Tensor,
    g: torch.Tensor,
    slots: dict[str, torch.Tensor],
    lr: float,
    mu: float,
    *,
    nesterov: bool,
) -> None:
    """Heavy-ball (FedAvgM) or Nesterov (DiLoCo's outer optimizer) momentum, in place on the
    float32 `x`: torch.optim.SGD's update with dampening 0."""
    b = slots.get("momentum")
    b = slots.setdefault("momentum", g.clone()) if b is None else b.mul_(mu).add_(g)
    x.add_(g.add(b, alpha=mu) if nesterov else b, alpha=-lr)


def adaptive_step(
    x: torch.Tensor,
    g: torch.Tensor,
    slots: dict[str, torch.Tensor],
    *,
    rule: str,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> None:
    """FedAdagrad, FedAdam or FedYogi (`rule`), in place on the float32 `x`."""
    m = slots.setdefault("m", torch.zeros_like(g))
    v = slots.setdefault("v", torch.full_like(g, tau * tau))
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    g2 = g * g
    if rule == "fedadagrad":
        v.add_(g2)
    elif rule == "fedadam":
        v.mul_(beta2).add_(g2, alpha=1.0 - beta2)
    elif rule == "fedyogi":
        v.sub_(g2.mul_(torch.sign(v - g2)), alpha=1.0 - beta2)
    else:
        raise ValueError(f"unknown adaptive rule {rule!r}")
    x.addcdiv_(m, v.sqrt().add_(tau), value=-lr)


StepFactory = Callable[[ServerOptimizerConfig], Step]
SERVER_OPTIMIZERS: dict[str, StepFactory] = {}


def register_server_optimizer(name: str) -> Callable[[StepFactory], StepFactory]:
    """Decorator: `factory(config)` returns the in-place step `step(x, g, slots)` on one
    tensor (x the float32 model, g its pseudo-gradient, slots the tensor's state, saved with
    the aggregator's checkpoint); selectable as `server_optimizer.name = name`."""

    def wrap(factory: StepFactory) -> StepFactory:
        return add_entry(SERVER_OPTIMIZERS, name, factory, "server optimizer")

    return wrap


@register_server_optimizer("fedavg")
def _sgd(config: ServerOptimizerConfig) -> Step:
    lr = config.learning_rate
    return lambda x, g, slots: sgd_step(x, g, slots, lr)


def _momentum(config: ServerOptimizerConfig) -> Step:
    lr, nesterov = config.learning_rate, config.name == "nesterov"
    return lambda x, g, slots: momentum_step(x, g, slots, lr, config.momentum, nesterov=nesterov)


def _adaptive(config: ServerOptimizerConfig) -> Step:
    hyper = {
        "lr": config.learning_rate,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "tau": config.tau,
    }
    return lambda x, g, slots: adaptive_step(x, g, slots, rule=config.name, **hyper)


for _name in ("fedavgm", "nesterov"):
    register_server_optimizer(_name)(_momentum)
for _name in ("fedadam", "fedyogi", "fedadagrad"):
    register_server_optimizer(_name)(_adaptive)


def server_optimizer_names() -> list[str]:
    return sorted(SERVER_OPTIMIZERS)


def _step_for(config: ServerOptimizerConfig) -> Step:
    return SERVER_OPTIMIZERS[config.name](config)


class ServerOptimizer:
    """One aggregator's optimizer across rounds: `step` turns the model it sent and its rule's
    aggregate into the new model, for the keys the optimizer covers."""

    def __init__(self, config: ServerOptimizerConfig) -> None:
        self.config = config
        self._step = _step_for(config)
        self.slots: dict[str, dict[str, torch.Tensor]] = {}  # key -> slot name -> tensor

    @property
    def is_identity(self) -> bool:
        """FedAvg at learning rate 1: the aggregate is the new model, bit for bit."""
        return self.config.name == "fedavg" and self.config.learning_rate == 1.0

    def step(self, sent: State, aggregate: State, keys: Iterable[str]) -> State:
        """The new value of each of `keys`, in its dtype in `aggregate`."""
        if self.is_identity:
            return {k: aggregate[k] for k in keys}
        out: State = {}
        for key in keys:
            x = sent[key].to(torch.float32, copy=True)
            g = x - aggregate[key].to(torch.float32)  # the pseudo-gradient
            self._step(x, g, self.slots.setdefault(key, {}))
            out[key] = x.to(aggregate[key].dtype)
        return out

    def state_dict(self) -> State:
        return {f"{k}#{slot}": t for k, slots in self.slots.items() for slot, t in slots.items()}

    def load_state_dict(self, state: State) -> None:
        self.slots = {}
        for name, tensor in state.items():
            key, slot = name.rsplit("#", 1)
            self.slots.setdefault(key, {})[slot] = tensor.clone()
