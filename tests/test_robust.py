"""Byzantine-robust aggregation (TESTPLAN §H 30-32): the rules against slow references and
hand-computed cases, the strategies' rounds, norm bounding, feasibility checks at build, and
sign-flipping and model-replacement leaves end to end on the tiny model."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from worldlm.config import RobustConfig
from worldlm.core.messages import State, Update
from worldlm.errors import ConfigError
from worldlm.federation.attacks import Attack, install_attack, model_replacement, sign_flip
from worldlm.progress import QuietProgress
from worldlm.root_loop import evaluate_tree, mean_ppl
from worldlm.session import open_session
from worldlm.strategies import robust
from worldlm.strategies.catalog import build_strategy, check_strategy
from worldlm.strategies.norm_bound import bounded_update
from worldlm.strategies.robust_rounds import RobustRound

from .conftest import tiny_config

# --- slow references: plain Python over one coordinate at a time --------------------------


def _states(values: list[list[float]]) -> list[State]:
    """One model per row; each model holds the row split over two keys of shapes (2,) and
    (1, len - 2), so that rules must treat keys together."""
    return [
        {
            "a": torch.tensor(row[:2], dtype=torch.float64),
            "b": torch.tensor([row[2:]], dtype=torch.float64),
        }
        for row in values
    ]


def _flat(state: State) -> list[float]:
    return [float(x) for key in ("a", "b") for x in state[key].reshape(-1)]


def _columns(rows: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*rows, strict=True)]


def _ref_sq_dist(x: list[float], y: list[float]) -> float:
    return sum((a - b) ** 2 for a, b in zip(x, y, strict=True))


def _ref_krum_order(rows: list[list[float]], f: int) -> list[int]:
    n = len(rows)
    scores = []
    for i in range(n):
        d = sorted(_ref_sq_dist(rows[i], rows[j]) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return sorted(range(n), key=lambda i: (scores[i], i))


def _ref_trimmed(col: list[float], k: int) -> float:
    kept = sorted(col)[k : len(col) - k]
    return sum(kept) / len(kept)


def _ref_bulyan(rows: list[list[float]], f: int) -> list[float]:
    remaining = list(range(len(rows)))
    chosen: list[int] = []
    while len(chosen) < len(rows) - 2 * f:
        sub = [rows[i] for i in remaining]
        neighbours = max(len(sub) - f - 2, 1)
        scores = [
            sum(sorted(_ref_sq_dist(x, y) for j, y in enumerate(sub) if j != i)[:neighbours])
            for i, x in enumerate(sub)
        ]
        pick = min(range(len(sub)), key=lambda i: (scores[i], i))
        chosen.append(remaining.pop(pick))
    beta = len(rows) - 4 * f
    out = []
    for col in _columns([rows[i] for i in chosen]):
        med = statistics.median(col)
        out.append(sum(sorted(col, key=lambda v: abs(v - med))[:beta]) / beta)
    return out


def _random_rows(n: int, d: int, seed: int) -> list[list[float]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).tolist()


# --- pure functions: golden values -------------------------------------------------------


def test_median_and_trimmed_mean_hand_computed() -> None:
    odd = _states([[1, -1, 0, 7], [5, -5, 0, 7], [2, -2, 0, 7], [100, -100, 0, 7], [3, -3, 0, 7]])
    assert _flat(robust.coordinate_median(odd)) == [3, -3, 0, 7]
    even = _states([[1, 0, 0], [2, 0, 0], [3, 0, 0], [100, 0, 0]])
    assert _flat(robust.coordinate_median(even))[0] == 2.5
    # trim 0.2 of 5 drops one value at each end: mean(2, 3, 5) and mean(-5, -3, -2)
    assert _flat(robust.trimmed_mean(odd, 0.2)) == pytest.approx([10 / 3, -10 / 3, 0, 7])
    assert _flat(robust.trimmed_mean(odd, 0.0)) == pytest.approx([22.2, -22.2, 0, 7])
    with pytest.raises(ValueError):
        robust.trimmed_mean(even, 0.5)


@pytest.mark.parametrize("n", [5, 6, 9])
def test_median_and_trimmed_mean_match_references(n: int) -> None:
    rows = _random_rows(n, 7, seed=n)
    cols = _columns(rows)
    assert _flat(robust.coordinate_median(_states(rows))) == pytest.approx(
        [statistics.median(c) for c in cols], abs=1e-12
    )
    for trim in (0.1, 0.25, 0.4):
        k = math.floor(trim * n)
        assert _flat(robust.trimmed_mean(_states(rows), trim)) == pytest.approx(
            [_ref_trimmed(c, k) for c in cols], abs=1e-12
        )


@pytest.mark.parametrize(("n", "f"), [(5, 1), (7, 2), (9, 1), (9, 3)])
def test_krum_and_multi_krum_match_references(n: int, f: int) -> None:
    rows = _random_rows(n, 6, seed=10 * n + f)
    order = _ref_krum_order(rows, f)
    states = _states(rows)
    for m in (1, 2, n - f):
        assert robust.krum_select(states, f, m) == order[:m]
    expected = [sum(col) / (n - f) for col in _columns([rows[i] for i in order[: n - f]])]
    assert _flat(robust.multi_krum(states, f)) == pytest.approx(expected, abs=1e-12)
    assert _flat(robust.krum(states, f)) == rows[order[0]]
    with pytest.raises(ValueError):
        robust.krum_select(states[: 2 * f + 2], f)


def test_krum_hand_computed() -> None:
    # 1-D points 0, 1, 3, 10 with f = 0: each scores its 2 nearest others.
    states = _states([[0, 0, 0], [1, 0, 0], [3, 0, 0], [10, 0, 0]])
    # scores: 0 -> 1 + 9 = 10; 1 -> 1 + 4 = 5; 3 -> 4 + 9 = 13; 10 -> 49 + 81 = 130
    assert robust.krum_select(states, 0, 4) == [1, 0, 2, 3]


@pytest.mark.parametrize(("n", "f"), [(3, 0), (7, 1), (8, 1), (11, 2)])
def test_bulyan_matches_reference(n: int, f: int) -> None:
    rows = _random_rows(n, 5, seed=n + f)
    assert _flat(robust.bulyan(_states(rows), f)) == pytest.approx(_ref_bulyan(rows, f), abs=1e-12)
    with pytest.raises(ValueError):
        robust.bulyan(_states(rows[: 4 * f + 2]), f)


def test_bulyan_hand_computed() -> None:
    # n = 7, f = 1: theta = 5 chosen by iterated Krum drops the two far points 50 and -40;
    # among 0, 1, 2, 3, 4 the beta = 3 closest to the median 2 are 1, 2, 3.
    states = _states([[v, 0, 0] for v in [0, 1, 2, 3, 4, 50, -40]])
    assert _flat(robust.bulyan(states, 1)) == [2.0, 0.0, 0.0]


def test_bound_norm_scales_down_only_long_changes() -> None:
    delta = {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}  # norm 5 over both keys
    bounded = robust.bound_norm(delta, 1.0)
    assert bounded["a"].item() == pytest.approx(0.6) and bounded["b"].item() == pytest.approx(0.8)
    assert robust.state_norm(bounded) == pytest.approx(1.0)
    assert robust.bound_norm(delta, 5.0) is delta


# --- strategies: rounds fed Updates --------------------------------------------------------

RULES = {
    "median": RobustConfig(byzantine=2),
    "trimmed_mean": RobustConfig(byzantine=2, trim_fraction=0.2),
    "krum": RobustConfig(byzantine=2),
    "multi_krum": RobustConfig(byzantine=2),
    "bulyan": RobustConfig(byzantine=2),
}


def _model(value: torch.Tensor) -> State:
    return {"w": value[:6].reshape(2, 3).float(), "b": value[6:].float()}


def _update(i: int, model: State, scale: float = 1.0) -> Update:
    state = {k: v.double() * scale for k, v in model.items()} if scale != 1 else model
    return Update(f"c{i}", 0, "x", state, weight=10.0 * (i + 1), scale=scale)


def _aggregate(name: str, cfg: RobustConfig, current: State, updates: list[Update]) -> State:
    aggregation = build_strategy(name, cfg).start_round(current)
    for update in updates:
        aggregation.add(update)
    state, scale = aggregation.result()
    return {k: v / scale for k, v in state.items()}


def _honest_and_outliers(n: int, f: int) -> tuple[State, list[Update], list[Update]]:
    """n - f honest models near 1.0 (some sent as forwarded sums with a scale), f far away."""
    gen = torch.Generator().manual_seed(3)
    current = _model(torch.zeros(8))
    honest = [
        _update(i, _model(1.0 + 0.01 * torch.randn(8, generator=gen)), scale=1.0 + i % 3)
        for i in range(n - f)
    ]
    outliers = [_update(n - f + i, _model(torch.full((8,), 1e4))) for i in range(f)]
    return current, honest, outliers


@pytest.mark.parametrize("name", sorted(RULES))
def test_rules_are_unaffected_by_f_far_outliers(name: str) -> None:
    current, honest, outliers = _honest_and_outliers(11, 2)  # bulyan needs 4f + 3 = 11
    result = _aggregate(name, RULES[name], current, honest + outliers)
    models = [u.model() for u in honest]
    for key, value in result.items():
        low = torch.stack([m[key] for m in models]).amin(dim=0)
        high = torch.stack([m[key] for m in models]).amax(dim=0)
        assert bool(((value >= low - 1e-6) & (value <= high + 1e-6)).all()), (name, key)
    # Teeth: FedAvg is dragged far away by the same two outliers.
    fedavg = _aggregate("fedavg", RobustConfig(), current, honest + outliers)
    assert all(float(v.min()) > 100 for v in fedavg.values())


def test_krum_selects_the_honest_cluster() -> None:
    _, honest, outliers = _honest_and_outliers(9, 3)
    states = [u.model() for u in outliers[:2] + honest + outliers[2:]]  # outliers at 0, 1, 8
    assert sorted(robust.krum_select(states, 3, 6)) == [2, 3, 4, 5, 6, 7]


def test_robust_round_buffers_models_in_the_model_dtype_and_weights_children_equally() -> None:
    current = _model(torch.zeros(8))
    # A forwarded float64 sum (weight 1000, scale 4) counts once, like a small leaf.
    updates = [
        _update(0, _model(torch.full((8,), 1.0)), scale=4.0),
        _update(1, _model(torch.full((8,), 2.0))),
        _update(2, _model(torch.full((8,), 6.0))),
    ]
    updates[0].weight = 1000.0
    # trim 0.1 of 3 drops nothing: the plain unweighted mean of 1, 2 and 6.
    aggregation = build_strategy("trimmed_mean").start_round(current)
    assert isinstance(aggregation, RobustRound)
    for update in updates:
        aggregation.add(update)
    assert aggregation.count == 3
    assert all(v.dtype == torch.float32 for m in aggregation.models for v in m.values())
    state, scale = aggregation.result()
    assert scale == 1.0 and all(bool((v == 3.0).all()) for v in state.values())


@pytest.mark.parametrize("name", sorted(RULES))
def test_a_round_without_enough_replies_keeps_the_model(name: str) -> None:
    current, honest, _ = _honest_and_outliers(11, 2)
    assert build_strategy(name, RULES[name]).start_round(current).result() == (current, 1.0)
    if name != "trimmed_mean":  # the others need at least 2f + 1 replies to outvote f
        state = _aggregate(name, RULES[name], current, honest[:4])
        assert all(torch.equal(state[k], current[k]) for k in current)


# --- norm bounding ---------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["fedavg", "median", "trimmed_mean"])
def test_norm_bound_caps_each_change(inner: str) -> None:
    current = _model(torch.ones(8))
    far = _update(0, _model(torch.full((8,), 301.0)), scale=2.0)  # change of norm 300*sqrt(8)
    result = _aggregate(inner, RobustConfig(norm_bound=1.0), current, [far])
    change = {k: result[k].double() - current[k].double() for k in result}
    assert robust.state_norm(change) == pytest.approx(1.0, rel=1e-5)
    assert all(bool((v > 0).all()) for v in change.values())  # same direction as the reply
    unbounded = _aggregate(inner, RobustConfig(), current, [far])
    assert robust.state_norm({k: unbounded[k] - current[k] for k in current}) > 800


def test_norm_bound_passes_short_changes_through_exactly() -> None:
    current = _model(torch.ones(8))
    near = _update(1, _model(torch.full((8,), 1.1)), scale=3.0)
    assert bounded_update(near, current, 1.0) is near
    far = _update(1, _model(torch.full((8,), 5.0)), scale=3.0)
    aggregation = build_strategy("fedavg", RobustConfig(norm_bound=1.0)).start_round(current)
    aggregation.add(near)
    aggregation.add(far)
    state, scale = aggregation.result()
    assert scale == 40.0  # the two weights: a bounded reply keeps its weight and scale
    expected = 1.0 + (0.1 + 1 / math.sqrt(8)) / 2  # the mean of the two bounded models
    assert all(torch.allclose(v / scale, torch.full_like(v, expected)) for v in state.values())


# --- feasibility: impossible settings fail at start (TESTPLAN 32) --------------------------


@pytest.mark.parametrize(
    ("name", "cfg", "n", "needed"),
    [
        ("krum", RobustConfig(byzantine=1), 4, "n >= 5"),
        ("multi_krum", RobustConfig(byzantine=2), 6, "n >= 7"),
        ("multi_krum", RobustConfig(byzantine=1, multi_krum_keep=5), 5, "n - f = 4"),
        ("bulyan", RobustConfig(byzantine=1), 6, "n >= 4f + 3 = 7"),
        ("median", RobustConfig(byzantine=2), 4, "n >= 2f + 1 = 5"),
        ("trimmed_mean", RobustConfig(byzantine=2, trim_fraction=0.1), 10, "trim_fraction >="),
    ],
)
def test_check_strategy_names_node_rule_n_f_and_the_need(
    name: str, cfg: RobustConfig, n: int, needed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check_strategy(name, cfg, n, path="world/med")
    message = str(info.value)
    for part in ("nodes.world/med", repr(name), f"n={n}", f"f={cfg.byzantine}", needed):
        assert part in message, (part, message)
    check_strategy(name, cfg, n + 10, path="world/med")  # enough children: no error
    check_strategy("fedavg", cfg, 1)  # FedAvg makes no promise to check


def test_feasible_edges_pass() -> None:
    check_strategy("krum", RobustConfig(byzantine=1), 5)
    check_strategy("bulyan", RobustConfig(byzantine=1), 7)
    check_strategy("trimmed_mean", RobustConfig(byzantine=2, trim_fraction=0.2), 10)
    check_strategy("multi_krum", RobustConfig(byzantine=1, multi_krum_keep=4), 5)


FIVE = {f"world/l{i}": ("med", "law")[i % 2] for i in range(5)}


@pytest.mark.parametrize(
    ("overrides", "n"),
    [
        (["nodes.world.strategy=krum", "nodes.world.robust.byzantine=2"], 5),
        (["nodes.world.strategy=bulyan", "nodes.world.robust.byzantine=1"], 5),
        # 5 children, but a round samples only ceil(0.4 * 5) = 2 of them: Krum f=0 needs 3.
        (
            [
                "nodes.world.strategy=krum",
                "nodes.world.sample.fraction=0.4",
                "nodes.world.robust.byzantine=0",
            ],
            2,
        ),
    ],
)
def test_impossible_settings_fail_when_the_federation_is_built(
    tmp_path: Path, overrides: list[str], n: int
) -> None:
    config = tiny_config(tmp_path, FIVE, overrides, n_docs=20)
    with pytest.raises(ConfigError, match=rf"nodes\.world: strategy .* n={n} children per round"):
        open_session(config, QuietProgress(), tmp_path / "run")


# --- end to end: Byzantine leaves on the tiny model (TESTPLAN 30-31) ----------------------

# Ten leaves under one root, three topics. Two rounds of three local steps keep each run near
# 6 s on two CPU cores. Sign flipping with k = 4: k = 1 only slows FedAvg (2 of 10 flipped
# leave 0.6 of the honest step; +31% perplexity measured after 3 rounds), while k = 4 cancels
# the honest step (0.8 - 0.2 * 4 = 0), which FedAvg cannot tell from a real reply.
TEN = {f"world/l{i}": ("med", "law", "code")[i % 3] for i in range(10)}
FLIPPERS = ["world/l1", "world/l6"]  # 20% of the leaves, different topics
E2E = ["stop.rounds=2", "train.local_steps=3"]

RunPpl = Callable[[str, list[str], Attack | None, list[str]], float]


@pytest.fixture(scope="module")
def run_ppl(tmp_path_factory: pytest.TempPathFactory) -> RunPpl:
    """Mean validation perplexity after E2E rounds of `strategy` with `attackers`."""
    tmp = tmp_path_factory.mktemp("robust")
    counter = itertools.count()

    def run(strategy: str, extra: list[str], attack: Attack | None, attackers: list[str]) -> float:
        overrides = [*E2E, f"nodes.world.strategy={strategy}", *extra]
        config = tiny_config(tmp, TEN, overrides, n_docs=30)
        session = open_session(config, QuietProgress(), tmp / f"run{next(counter)}")
        if attack is not None:
            install_attack(session.fed, attackers, attack)
        state = session.fed.root.state
        for r in range(1, config.stop.rounds + 1):
            state = session.fed.root.run_round(state, r).state
        return mean_ppl(evaluate_tree(session, state, config.stop.rounds))

    return run


@pytest.fixture(scope="module")
def clean_ppl(run_ppl: RunPpl) -> float:
    return run_ppl("fedavg", [], None, [])


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("trimmed_mean", ["nodes.world.robust.trim_fraction=0.2"]),
        ("median", []),
        ("multi_krum", ["nodes.world.robust.byzantine=2"]),
    ],
)
def test_robust_rules_withstand_20_percent_sign_flippers(
    run_ppl: RunPpl, clean_ppl: float, strategy: str, extra: list[str]
) -> None:
    attacked = run_ppl(strategy, extra, sign_flip(4.0), FLIPPERS)
    assert attacked < 1.10 * clean_ppl, (strategy, attacked, clean_ppl)


def test_fedavg_degrades_under_sign_flippers(run_ppl: RunPpl, clean_ppl: float) -> None:
    attacked = run_ppl("fedavg", [], sign_flip(4.0), FLIPPERS)
    assert attacked > 1.5 * clean_ppl, (attacked, clean_ppl)


def test_norm_bound_withstands_model_replacement(run_ppl: RunPpl, clean_ppl: float) -> None:
    # Honest changes measured 4.5 (round 1) and 2.1 (round 2): a bound of 5 leaves them be.
    attack = model_replacement(100.0)
    bounded = run_ppl("fedavg", ["nodes.world.robust.norm_bound=5.0"], attack, FLIPPERS[:1])
    assert bounded < 1.05 * clean_ppl, (bounded, clean_ppl)
    unbounded = run_ppl("fedavg", [], attack, FLIPPERS[:1])  # teeth
    assert unbounded > 1.5 * clean_ppl, (unbounded, clean_ppl)
