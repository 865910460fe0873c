"""Server optimizers: the math against torch.optim and hand-written references, then in runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worldlm.checkpoint import load_latest
from worldlm.config import ServerOptimizerConfig
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run
from worldlm.strategies.server_optimizer import ServerOptimizer

from .conftest import TWO_LEVEL, tiny_config
from .test_engine import StopAtRound

ROUNDS = 3


def _pseudo_gradients() -> list[dict[str, torch.Tensor]]:
    """Three rounds of fixed pseudo-gradients (model sent minus aggregate) of a 2-tensor model."""
    gen = torch.Generator().manual_seed(0)
    return [
        {"w": torch.randn(3, 4, generator=gen) * 0.1, "b": torch.randn(4, generator=gen) * 0.1}
        for _ in range(ROUNDS)
    ]


def _start() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def _run_ours(config: ServerOptimizerConfig) -> dict[str, torch.Tensor]:
    """Three rounds whose aggregate is the model sent minus that round's fixed g."""
    optimizer, x = ServerOptimizer(config), _start()
    for g in _pseudo_gradients():
        aggregate = {k: x[k] - g[k] for k in x}
        x = {**x, **optimizer.step(x, aggregate, list(x))}
    return x


def _run_torch(make: type[torch.optim.Optimizer], **hyper: object) -> dict[str, torch.Tensor]:
    params = {k: torch.nn.Parameter(v.clone()) for k, v in _start().items()}
    opt = make(list(params.values()), **hyper)
    for g in _pseudo_gradients():
        with torch.no_grad():  # the same g as ours: x - (x - g), rounded alike
            for k, p in params.items():
                p.grad = p.detach() - (p.detach() - g[k])
        opt.step()
    return {k: p.detach() for k, p in params.items()}


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_optimizers_equal_torch_sgd(nesterov: bool) -> None:
    name = "nesterov" if nesterov else "fedavgm"
    ours = _run_ours(ServerOptimizerConfig(name=name, lr=0.7, momentum=0.9))
    reference = _run_torch(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=nesterov)
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-6)


def _adaptive_reference(
    rule: str, lr: float, b1: float, b2: float, tau: float
) -> dict[str, torch.Tensor]:
    """Reddi et al. 2021, Algorithm 2, written out in float64 one round at a time."""
    x = {k: v.double() for k, v in _start().items()}
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    v = {k: torch.full_like(t, tau * tau) for k, t in x.items()}
    for g in _pseudo_gradients():
        for k in x:
            delta = -g[k].double()  # the aggregate minus the model sent
            m[k] = b1 * m[k] + (1 - b1) * delta
            if rule == "fedadagrad":
                v[k] = v[k] + delta**2
            elif rule == "fedadam":
                v[k] = b2 * v[k] + (1 - b2) * delta**2
            else:
                v[k] = v[k] - (1 - b2) * delta**2 * torch.sign(v[k] - delta**2)
            x[k] = x[k] + lr * m[k] / (v[k].sqrt() + tau)
    return x


@pytest.mark.parametrize("rule", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_optimizers_follow_reddi_et_al(rule: str) -> None:
    config = ServerOptimizerConfig(name=rule, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    ours = _run_ours(config)
    reference = _adaptive_reference(rule, 0.05, 0.9, 0.99, 1e-3)
    for key in ours:
        torch.testing.assert_close(ours[key].double(), reference[key], rtol=1e-5, atol=1e-6)
        assert (ours[key] - _start()[key]).abs().max() > 0.01  # and it really moved


def test_fedavg_at_lr_1_is_the_aggregate_itself_and_nesterov_reduces_to_it() -> None:
    x, g = _start(), _pseudo_gradients()[0]
    aggregate = {k: x[k] - g[k] for k in x}
    plain = ServerOptimizer(ServerOptimizerConfig()).step(x, aggregate, list(x))
    assert all(plain[k] is aggregate[k] for k in x)  # not even a copy
    reduced = ServerOptimizer(ServerOptimizerConfig(name="nesterov", lr=1.0, momentum=0.0))
    stepped = reduced.step(x, aggregate, list(x))
    for key in x:  # x - (x - a) is a up to float32 rounding
        torch.testing.assert_close(stepped[key], aggregate[key], rtol=0, atol=1e-6)
    half = ServerOptimizer(ServerOptimizerConfig(lr=0.5)).step(x, aggregate, list(x))
    for key in x:
        torch.testing.assert_close(half[key], x[key] - 0.5 * g[key], rtol=0, atol=1e-6)


def test_state_dict_round_trip_continues_bit_for_bit() -> None:
    config = ServerOptimizerConfig(name="fedyogi", lr=0.05)
    whole, cut = ServerOptimizer(config), ServerOptimizer(config)
    x_whole, x_cut = _start(), _start()
    for i, g in enumerate(_pseudo_gradients()):
        agg_whole = {k: x_whole[k] - g[k] for k in x_whole}
        agg_cut = {k: x_cut[k] - g[k] for k in x_cut}
        x_whole = whole.step(x_whole, agg_whole, list(x_whole))
        x_cut = cut.step(x_cut, agg_cut, list(x_cut))
        if i == 0:  # a fresh optimizer from the saved state, as after a resume
            cut, saved = ServerOptimizer(config), cut.state_dict()
            assert set(saved) == {"w#m", "w#v", "b#m", "b#v"}
            cut.load_state_dict(saved)
    assert all(torch.equal(x_whole[k], x_cut[k]) for k in x_whole)


def _final_state(result_dir: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_latest(result_dir / "checkpoints")
    prefix = "node/world#model/"
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_fedavg_section_equals_no_section_and_other_optimizers_differ(tmp_path: Path) -> None:
    absent = run(tiny_config(tmp_path, TWO_LEVEL), QuietProgress(), out=tmp_path / "absent")
    named = tiny_config(tmp_path, TWO_LEVEL, ["nodes.world.server_optimizer.name=fedavg"])
    explicit = run(named, QuietProgress(), out=tmp_path / "fedavg")
    base = _final_state(absent.run_dir)
    assert all(torch.equal(base[k], v) for k, v in _final_state(explicit.run_dir).items())
    for name in ("nesterov", "fedadam"):
        config = tiny_config(tmp_path, TWO_LEVEL, [f"nodes.world.server_optimizer.name={name}"])
        other = _final_state(run(config, QuietProgress(), out=tmp_path / name).run_dir)
        assert all(torch.isfinite(v).all() for v in other.values())
        assert any(not torch.equal(base[k], v) for k, v in other.items()), name


def test_optimizer_state_at_every_level_survives_an_interruption(tmp_path: Path) -> None:
    overrides = [
        "stop.rounds=3",
        "nodes.world.server_optimizer.name=fedadam",
        "nodes.world/med.server_optimizer.name=nesterov",
        "nodes.world/med.inner_rounds=2",
    ]
    config = tiny_config(tmp_path, TWO_LEVEL, overrides)
    run(config, QuietProgress(), out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(3), out=tmp_path / "cut")
    _, tensors, _ = load_latest(tmp_path / "cut" / "checkpoints")
    saved = {k.split("#server_opt/")[0] for k in tensors if "#server_opt/" in k}
    assert saved == {"node/world", "node/world/med"}  # both optimizers' state is checkpointed
    resume(tmp_path / "cut", QuietProgress())
    final = "checkpoints/round-000003.wlm"
    assert (tmp_path / "cut" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()


def test_a_leaf_cannot_have_a_server_optimizer(tmp_path: Path) -> None:
    from worldlm.errors import ConfigError

    with pytest.raises(ConfigError, match="server_optimizer: only aggregators"):
        tiny_config(tmp_path, TWO_LEVEL, ["nodes.world/med/a.server_optimizer.name=fedadam"])


def _node_tensors(run_dir: Path, node: str, prefix: str) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_latest(run_dir / "checkpoints")
    head = f"node/{node}#{prefix}"
    return {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}


# (one K per sub-federation: the optimizer does not step per-child attended K, see below)
WORLDLM_ONE_ROUND = ["run.method=worldlm", "stop.rounds=1", "worldlm.child_key_layers=shared"]
HALF_STEP = [  # one round of this is x0 + 0.5 (aggregate - x0)
    "nodes.world/med.server_optimizer.name=nesterov",
    "nodes.world/med.server_optimizer.momentum=0.0",
    "nodes.world/med.server_optimizer.lr=0.5",
]
DP_AT_MED = [
    "nodes.world/med.dp.enabled=true",
    "nodes.world/med.dp.clip=0.5",
    "nodes.world/med.dp.noise_multiplier=0.1",
    "nodes.world/med.dp.seeded_noise=true",
]


@pytest.mark.parametrize(
    "rule",
    [[], ["worldlm.attention=true"], DP_AT_MED],
    ids=["mean", "attention", "dp"],
)
def test_under_worldlm_the_optimizer_steps_key_layers_only_when_asked(
    tmp_path: Path, rule: list[str]
) -> None:
    base = WORLDLM_ONE_ROUND + rule
    runs = {
        name: run(
            tiny_config(tmp_path, TWO_LEVEL, base + extra), QuietProgress(), out=tmp_path / name
        )
        for name, extra in [
            ("plain", []),
            ("backbone", HALF_STEP),
            ("keys", [*HALF_STEP, "nodes.world/med.server_optimizer.key_layers=true"]),
        ]
    }
    k = {name: _node_tensors(r.run_dir, "world/med", "key/") for name, r in runs.items()}
    k0 = _node_tensors(runs["plain"].run_dir, "world/med", "keyref/")  # K before the round
    assert k["plain"] and k["plain"].keys() == k0.keys()
    # By default K_p is the key layers' own aggregate (the mean, attention, or DP's noisy mean)
    assert all(torch.equal(k["backbone"][n], k["plain"][n]) for n in k0)
    # ... while the backbone sent up took the optimizer's half step: the roots differ.
    plain_root, stepped_root = (_final_state(runs[n].run_dir) for n in ("plain", "backbone"))
    assert any(not torch.equal(plain_root[n], stepped_root[n]) for n in plain_root)
    # With key_layers = true K_p takes the same half step from the K it sent.
    for name in k0:
        expected = k0[name] + 0.5 * (k["plain"][name] - k0[name])
        torch.testing.assert_close(k["keys"][name], expected, rtol=0, atol=1e-6)
    assert any(not torch.equal(k["keys"][n], k["plain"][n]) for n in k0)


def test_the_optimizer_on_attended_child_key_layers_is_refused(tmp_path: Path) -> None:
    from worldlm.errors import ConfigError

    overrides = [
        *WORLDLM_ONE_ROUND,
        "worldlm.attention=true",
        "worldlm.child_key_layers=attended",
        "nodes.world/med.server_optimizer.name=nesterov",
        "nodes.world/med.server_optimizer.key_layers=true",
    ]
    with pytest.raises(ConfigError, match=r"server_optimizer\.key_layers: with worldlm\.child_key"):
        run(tiny_config(tmp_path, TWO_LEVEL, overrides), QuietProgress(), out=tmp_path / "r")
