"""Residual embeddings and routing: the math from factors, and exact reduction at lambda 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worldlm.federation.key_layers import KeyLayerPolicy, aggregate_key_layers, decode_candidate
from worldlm.model.partition import Partition
from worldlm.progress import QuietProgress
from worldlm.runner import resume, run
from worldlm.session import open_session
from worldlm.strategies.routing import (
    decode,
    factor_inner,
    low_rank_factors,
    residual_cosine,
    route,
)

from .conftest import TWO_LEVEL, tiny_config
from .test_engine import StopAtRound

GEN = torch.Generator().manual_seed(0)


def _rank2(m: int, n: int) -> torch.Tensor:
    return torch.randn(m, 2, generator=GEN) @ torch.randn(2, n, generator=GEN)


def test_low_rank_factors_recover_a_low_rank_matrix() -> None:
    matrix = _rank2(6, 5)
    factors = low_rank_factors(matrix, rank=2)
    assert factors[0].shape == (6, 2) and factors[1].shape == (5, 2)
    torch.testing.assert_close(decode(factors).float(), matrix, atol=1e-5, rtol=1e-5)


def test_inner_products_and_cosine_come_from_the_factors() -> None:
    a, b = low_rank_factors(_rank2(6, 5), 2), low_rank_factors(_rank2(6, 5), 2)
    assert factor_inner(a, b) == pytest.approx(float((decode(a) * decode(b)).sum()))
    assert residual_cosine({"w": a}, {"w": a}) == pytest.approx(1.0)
    neg = (-a[0], a[1])
    assert residual_cosine({"w": a}, {"w": neg}) == pytest.approx(-1.0)


def test_route_sends_each_sub_federation_its_most_similar_other() -> None:
    base = low_rank_factors(_rank2(6, 5), 2)
    near = (base[0] * 1.1, base[1])
    far = low_rank_factors(_rank2(6, 5), 2)
    routes = route({"w/a": {"m": base}, "w/b": {"m": near}, "w/c": {"m": far}}, top_k=1, tau=1.0)
    assert routes["w/a"] == [("w/b", 1.0)] and routes["w/b"] == [("w/a", 1.0)]
    two = route({"w/a": {"m": base}, "w/b": {"m": near}, "w/c": {"m": far}}, top_k=2, tau=1.0)
    assert sum(w for _, w in two["w/a"]) == pytest.approx(1.0)
    assert two["w/a"][0][0] == "w/b" and two["w/a"][0][1] > two["w/a"][1][1]


def _layer_case(lambda_route: float):
    partition = Partition({"l": ("l.w", "l.b")})
    policy = KeyLayerPolicy(partition, 1.0, 1.0, True, residual_rank=2, lambda_route=lambda_route)
    current = {"l.w": torch.zeros(6, 5), "l.b": torch.zeros(5)}
    children = [{"l.w": _rank2(6, 5), "l.b": torch.ones(5)} for _ in range(3)]
    routed = decode_candidate({"l.w": low_rank_factors(_rank2(6, 5), 2)}, current, current)
    return current, children, policy, routed


def test_lambda_zero_is_exactly_no_routing() -> None:
    current, children, policy, routed = _layer_case(0.0)
    with_routes = aggregate_key_layers(current, children, [1.0, 2.0, 3.0], policy, [(routed, 1.0)])
    without = aggregate_key_layers(current, children, [1.0, 2.0, 3.0], policy)
    assert all(torch.equal(with_routes[k], without[k]) for k in without)
    current, children, policy, routed = _layer_case(0.5)
    moved = aggregate_key_layers(current, children, [1.0, 2.0, 3.0], policy, [(routed, 1.0)])
    assert not torch.equal(moved["l.w"], without["l.w"])  # teeth: routing does act
    assert torch.equal(moved["l.b"], without["l.b"])  # vectors are never routed


def _sub_federation_keys(tmp_path: Path, lambda_route: float, router: bool):
    config = tiny_config(
        tmp_path,
        TWO_LEVEL,
        ["run.method='worldlm'", "worldlm.attention=true", f"worldlm.lambda_route={lambda_route}"],
    )
    session = open_session(config, QuietProgress(), tmp_path / f"{lambda_route}-{router}")
    if not router:
        session.fed.root.router = None
    state = session.fed.root.state
    for r in range(1, 4):
        state = session.fed.root.run_round(state, r).state
    return session, state


def test_lambda_zero_run_equals_a_run_without_a_router(tmp_path: Path) -> None:
    routed, state_a = _sub_federation_keys(tmp_path, 0.0, router=True)
    plain, state_b = _sub_federation_keys(tmp_path, 0.0, router=False)
    assert routed.fed.root.routes  # residuals really were routed
    for path in ("world/med", "world/soft"):
        a, b = routed.fed.aggregators[path].key_state, plain.fed.aggregators[path].key_state
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    on, _ = _sub_federation_keys(tmp_path, 1.0, router=True)
    a, b = on.fed.aggregators["world/med"].key_state, plain.fed.aggregators["world/med"].key_state
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_residuals_are_small_and_survive_resume(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, TWO_LEVEL, ["run.method='worldlm'", "stop.rounds=3"])
    run(config, QuietProgress(), out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(config, StopAtRound(3), out=tmp_path / "cut")
    resume(tmp_path / "cut", QuietProgress())
    final = "checkpoints/round-000003.wlm"
    assert (tmp_path / "cut" / final).read_bytes() == (tmp_path / "whole" / final).read_bytes()
    session, _ = _sub_federation_keys(tmp_path, 0.5, router=True)
    root = session.fed.root
    k_numel = sum(v.numel() for v in session.fed.aggregators["world/med"].key_state.values())
    r_numel = sum(u.numel() + v.numel() for u, v in root.residuals["world/med"].values())
    assert r_numel * 4 < k_numel  # far smaller than K itself
