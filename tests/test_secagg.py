"""Secure aggregation (TESTPLAN §F 22-25): exact sums, dropouts at every stage, what the server
can and cannot learn, and how the cost grows with the cohort."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from worldlm.config import SecAggConfig
from worldlm.secagg import (
    MaskedInput,
    Quantizer,
    SecAggAborted,
    SecAggClient,
    SecAggProtocolError,
    SecAggRefused,
    SecAggServer,
    SecAggSetupError,
    Stage,
    UnmaskRequest,
    measure_cost,
    plan_round,
    run_secagg,
    shamir,
)
from worldlm.secagg.graph import neighbourhood_graph

# chi-square critical value for 15 degrees of freedom at p = 1e-6 (scipy.stats.chi2.isf):
# a uniformity test that a correct implementation fails once in a million runs.
CHI2_15_P1E6 = 56.49


def make_inputs(n: int, length: int, seed: int = 0, scale: float = 1.2) -> dict[str, np.ndarray]:
    """n float32 vectors, some values beyond the clip range of 1 so that clipping is exercised."""
    rng = np.random.default_rng(seed)
    return {f"c{i:02d}": rng.uniform(-scale, scale, length).astype(np.float32) for i in range(n)}


def encoded_sum(
    inputs: dict[str, np.ndarray], quantizer: Quantizer, ids: tuple[str, ...]
) -> list[int]:
    """Reference: the plain integer sum of the quantized inputs, in Python ints (no wrapping)."""
    codes = [quantizer.encode(inputs[c]).tolist() for c in ids]
    return [sum(col) for col in zip(*codes, strict=True)]


def assert_exact(result, inputs: dict[str, np.ndarray], config: SecAggConfig) -> None:
    ref = encoded_sum(inputs, result.quantizer, result.included)
    assert max(ref) < 2**config.bits  # no wrap: the sum is the true integer sum
    assert result.total.tolist() == ref
    clipped = sum(
        np.clip(inputs[c].astype(np.float64), -config.clip_range, config.clip_range)
        for c in result.included
    )
    assert np.abs(result.sum - clipped).max() <= result.max_error * (1 + 1e-3)


def drive_to_unmasking(inputs: dict[str, np.ndarray], config: SecAggConfig, seed: int = 0):
    """Run the first three stages by hand through the public API; return what unmasking needs."""
    ids = sorted(inputs)
    length = len(next(iter(inputs.values())))
    server = SecAggServer(plan_round(ids, config, length=length, graph_seed=seed))
    clients = {c: SecAggClient(s) for c, s in server.setups().items()}
    keys = server.receive_keys([clients[c].advertise_keys() for c in ids])
    deliveries = server.receive_shares([clients[c].share_keys(keys[c]) for c in keys])
    masked = {c: clients[c].masked_input(deliveries[c], inputs[c]) for c in deliveries}
    requests = server.receive_masked(list(masked.values()))
    return server, clients, masked, requests


# §F22 exactness -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "bits"), [(5, 0, 32), (20, 6, 32), (5, 0, 8), (12, 4, 62)], ids=str
)
def test_unmasked_sum_is_exact_sum_of_quantized_inputs(n: int, k: int, bits: int) -> None:
    inputs = make_inputs(n, 301, seed=n + k)
    config = SecAggConfig(neighbours=k, bits=bits)
    result = run_secagg(inputs, config, rng_seed=3)
    assert result.included == tuple(sorted(inputs))
    assert_exact(result, inputs, config)


def test_extreme_inputs_sum_without_wrapping() -> None:
    """All inputs at +clip give the largest possible sum, n * max_int, which must not wrap."""
    config = SecAggConfig(bits=8, clip_range=2.0)
    inputs = {f"c{i}": np.full(64, 5.0) for i in range(5)}  # clipped to 2.0
    result = run_secagg(inputs, config)
    q = result.quantizer
    assert 5 * q.max_int < 2**8
    assert result.total.tolist() == [5 * q.max_int] * 64
    np.testing.assert_allclose(result.sum, 10.0, atol=result.max_error)


def test_quantizer_error_bound_and_range() -> None:
    q = Quantizer(bits=16, clip_range=0.5, max_clients=7)
    assert q.max_clients * q.max_int < 2**16
    x = np.random.default_rng(1).uniform(-0.5, 0.5, 10_000)
    codes = q.encode(x)
    assert codes.min() >= 0 and codes.max() <= q.max_int
    single = q.decode_sum(codes, 1)
    assert np.abs(single - x).max() <= q.step / 2 * (1 + 1e-9)
    assert q.max_error(7) == pytest.approx(7 * q.step / 2)


def test_setup_refuses_too_many_clients_for_the_bits() -> None:
    config = SecAggConfig(bits=8)
    with pytest.raises(SecAggSetupError, match=r"raise secagg\.bits"):
        plan_round([f"c{i}" for i in range(130)], config, length=4, graph_seed=0)
    with pytest.raises(SecAggSetupError, match="at least 3 clients"):
        plan_round(["a", "b"], SecAggConfig(), length=4, graph_seed=0)


def test_secagg_plus_graph_is_symmetric_and_k_regular() -> None:
    ids = [f"c{i}" for i in range(30)]
    graph = neighbourhood_graph(ids, 6, seed=5)
    assert all(len(v) == 6 and c not in v for c, v in graph.items())
    assert all(c in graph[v] for c, vs in graph.items() for v in vs)
    assert graph != neighbourhood_graph(ids, 6, seed=6)  # the public seed places the ring
    assert all(len(v) == 29 for v in neighbourhood_graph(ids, 0, seed=5).values())


# §F23 dropouts --------------------------------------------------------------------------------

STAGES = list(Stage)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("n", "k", "dropped"), [(5, 0, {"c03"}), (20, 6, {"c02", "c09", "c15"})])
def test_dropouts_above_threshold_give_exact_sum(
    stage: Stage, n: int, k: int, dropped: set[str]
) -> None:
    inputs = make_inputs(n, 97, seed=7)
    config = SecAggConfig(neighbours=k)
    result = run_secagg(inputs, config, {stage: dropped}, rng_seed=11)
    # Clients that dropped while unmasking had already sent their inputs: those stay in.
    expected = set(inputs) if stage is Stage.UNMASKING else set(inputs) - dropped
    assert set(result.included) == expected
    assert_exact(result, inputs, config)


def test_dropouts_at_several_stages_at_once() -> None:
    inputs = make_inputs(20, 50, seed=8)
    config = SecAggConfig(neighbours=8)
    dropouts = {
        Stage.ADVERTISE_KEYS: {"c00"},
        Stage.SHARE_KEYS: {"c05"},
        Stage.MASKED_INPUT: {"c10", "c11"},
        Stage.UNMASKING: {"c15"},
    }
    result = run_secagg(inputs, config, dropouts, rng_seed=2)
    assert set(result.included) == set(inputs) - {"c00", "c05", "c10", "c11"}
    assert_exact(result, inputs, config)


@pytest.mark.parametrize("stage", STAGES)
def test_below_threshold_aborts_complete_graph(stage: Stage) -> None:
    inputs = make_inputs(5, 16)  # t = max(2, ceil(0.5 * 4)) = 2 of each client's 4 peers
    with pytest.raises(SecAggAborted, match=r"nothing is released|too few clients"):
        run_secagg(inputs, SecAggConfig(), {stage: {"c00", "c01", "c02"}})


def victim_and_neighbours(n: int, k: int, seed: int) -> tuple[str, list[str]]:
    graph = neighbourhood_graph([f"c{i:02d}" for i in range(n)], k, seed)
    victim = "c04"
    return victim, sorted(graph[victim])


@pytest.mark.parametrize("stage", [Stage.MASKED_INPUT, Stage.UNMASKING])
def test_below_threshold_in_one_neighbourhood_aborts(stage: Stage) -> None:
    """SecAgg+: 4 of c04's 6 neighbours gone after inputs are masked leave 2 < t = 3 holders."""
    victim, neighbours = victim_and_neighbours(20, 6, seed=4)
    with pytest.raises(SecAggAborted, match=victim):
        run_secagg(make_inputs(20, 16), SecAggConfig(neighbours=6), {stage: set(neighbours[:4])}, 4)


def test_client_whose_neighbours_left_before_masking_is_left_out() -> None:
    """Before inputs are masked, a client with too few live neighbours is dropped, not fatal."""
    inputs = make_inputs(20, 40, seed=9)
    config = SecAggConfig(neighbours=6)
    victim, neighbours = victim_and_neighbours(20, 6, seed=4)
    result = run_secagg(inputs, config, {Stage.SHARE_KEYS: set(neighbours[:4])}, rng_seed=4)
    assert victim not in result.included
    assert set(result.included) == set(inputs) - set(neighbours[:4]) - {victim}
    assert_exact(result, inputs, config)


def test_abort_during_unmasking_releases_nothing() -> None:
    inputs = make_inputs(5, 32)
    server, clients, _, requests = drive_to_unmasking(inputs, SecAggConfig())
    answers = [clients[c].unmask(requests[c]) for c in ["c03", "c04"]]  # 2 of 5 answer
    with pytest.raises(SecAggAborted):
        server.receive_unmasking(answers)
    assert server.result is None
    with pytest.raises(SecAggProtocolError):  # and it cannot be talked into a second try
        server.receive_unmasking([clients[c].unmask(requests[c]) for c in requests])
    assert server.result is None


# §F24 the server sees only the sum ------------------------------------------------------------


def chi_square_uniform(values: np.ndarray, bits: int, bins: int = 16) -> float:
    counts = np.bincount(
        (values.astype(np.uint64) >> np.uint64(bits - 4)).astype(np.int64), minlength=bins
    )
    expected = len(values) / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_masked_inputs_look_uniform_whatever_the_input() -> None:
    length, bits = 4096, 32
    rng = np.random.default_rng(0)
    inputs = {
        "c00": np.zeros(length),  # encodes to max_int / 2 everywhere
        "c01": np.ones(length),  # encodes to max_int everywhere
        "c02": -np.ones(length),  # encodes to 0 everywhere
        "c03": rng.uniform(-1, 1, length),
        "c04": rng.uniform(-1, 1, length),
    }
    _, _, masked, _ = drive_to_unmasking(inputs, SecAggConfig(bits=bits))
    for c in ("c00", "c01", "c02", "c03"):
        y = masked[c].masked
        assert chi_square_uniform(y, bits) < CHI2_15_P1E6, c
        # No linear trace of the input: |r| under 5 standard errors of a null correlation.
        r = np.corrcoef(y.astype(np.float64), inputs["c03"])[0, 1]
        assert abs(r) < 5 / np.sqrt(length), c
    # The constant inputs are as spread out as the random ones.
    assert len(np.unique(masked["c00"].masked)) > 0.99 * length


def test_client_refuses_to_reveal_both_secrets_of_a_peer() -> None:
    inputs = make_inputs(5, 8)
    _, clients, _, requests = drive_to_unmasking(inputs, SecAggConfig())
    client = clients["c00"]
    with pytest.raises(SecAggRefused, match="both"):
        client.unmask(UnmaskRequest(survivors=("c01", "c02"), dropped=("c01",)))
    client.unmask(requests["c00"])  # the honest request: b-shares of all four peers
    with pytest.raises(SecAggRefused, match="already revealed"):
        client.unmask(UnmaskRequest(survivors=(), dropped=("c01",)))
    with pytest.raises(SecAggRefused, match="holds no shares"):
        client.unmask(UnmaskRequest(survivors=("c00",), dropped=()))


def test_fewer_than_t_shares_do_not_rebuild_a_secret() -> None:
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir.split(secret, [1, 2, 3, 4, 5, 6], threshold=4)
    for subset in ([1, 2, 3], [2, 4, 6], [3, 5, 6]):
        partial = {x: shares[x] for x in subset}
        assert shamir.interpolate_at_zero(partial) != secret
        with pytest.raises(ValueError, match="cannot rebuild"):
            shamir.reconstruct(partial, threshold=4)
    for subset in ([1, 2, 3, 4], [3, 4, 5, 6], [1, 3, 5, 6]):
        assert shamir.reconstruct({x: shares[x] for x in subset}, threshold=4) == secret


def test_t_minus_one_colluding_neighbours_cannot_rebuild_a_self_mask_seed() -> None:
    """The b-shares of t - 1 of a survivor's neighbours point at a wrong seed; t find it."""
    inputs = make_inputs(20, 8)
    server, clients, _, requests = drive_to_unmasking(inputs, SecAggConfig(neighbours=6))
    victim, plan = "c04", server.plan
    assert plan.thresholds[victim] == 3
    shares = {
        plan.index[h]: shamir.share_from_bytes(clients[h].unmask(requests[h]).seed_shares[victim])
        for h in sorted(plan.graph[victim])[:3]
    }
    true_seed = int.from_bytes(clients[victim]._seed, "big")  # peeked at, for the check only
    assert shamir.reconstruct(shares, 3) == true_seed
    for dropped_x in shares:
        colluders = {x: y for x, y in shares.items() if x != dropped_x}
        assert shamir.interpolate_at_zero(colluders) != true_seed


def test_tampered_or_misrouted_messages_are_rejected() -> None:
    inputs = make_inputs(5, 8)
    config = SecAggConfig()
    ids = sorted(inputs)
    server = SecAggServer(plan_round(ids, config, length=8, graph_seed=0))
    clients = {c: SecAggClient(s) for c, s in server.setups().items()}
    with pytest.raises(SecAggProtocolError):  # out of order
        clients["c00"].masked_input(None, inputs["c00"])  # type: ignore[arg-type]
    keys = server.receive_keys([clients[c].advertise_keys() for c in ids])
    deliveries = server.receive_shares([clients[c].share_keys(keys[c]) for c in ids])
    sealed = dict(deliveries["c00"].sealed)
    sealed["c01"] = sealed["c02"]  # the server swaps two ciphertexts
    with pytest.raises(SecAggProtocolError, match="fail to decrypt"):
        clients["c00"].masked_input(
            dataclasses.replace(deliveries["c00"], sealed=sealed), inputs["c00"]
        )
    bad = MaskedInput(sender="c01", masked=np.zeros(8, dtype=np.float64))
    with pytest.raises(SecAggProtocolError, match="masked input must be"):
        server.receive_masked([bad])


# §F25 cost ------------------------------------------------------------------------------------


def test_secagg_plus_bytes_per_client_grow_much_slower_than_complete() -> None:
    rows = {
        (n, k, d): measure_cost(n, neighbours=k, dropout=d, length=8)
        for n in (10, 40)
        for k in (0, 4)
        for d in (0.0, 0.2)
    }
    for d in (0.0, 0.2):
        complete_growth = rows[40, 0, d].bytes_sent / rows[10, 0, d].bytes_sent
        plus_growth = rows[40, 4, d].bytes_sent / rows[10, 4, d].bytes_sent
        assert complete_growth > 3.0
        assert plus_growth < 1.3
        assert rows[40, 4, d].bytes_received < rows[40, 0, d].bytes_received / 4
        assert rows[40, 4, d].degree == 4 and rows[40, 0, d].degree == 39
    assert all(r.server_seconds > 0 for r in rows.values())
