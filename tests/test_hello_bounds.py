"""What a child claims when it attaches is bounded (issue 19, item 1): its training tokens, which
drive data-size sampling, and its resources, which drive eligibility."""

from __future__ import annotations

import json

import pytest

from worldlm.config import SampleConfig
from worldlm.federation import selection
from worldlm.federation.selection import select_children
from worldlm.transport.grpc import link_pb2
from worldlm.transport.grpc.errors import HelloError
from worldlm.transport.grpc.hello import MAX_TRAIN_TOKENS, HelloInfo


def _hello(train_tokens: int = 1000, resources: object = None) -> link_pb2.Hello:
    text = "" if resources is None else json.dumps(resources)
    return link_pb2.Hello(node_path="w/a", train_tokens=train_tokens, resources_json=text)


@pytest.mark.parametrize(
    ("hello", "named"),
    [
        (_hello(train_tokens=MAX_TRAIN_TOKENS + 1), "train_tokens .* is above"),
        (_hello(resources={"pad": "x" * 5000}), "resources_json of .* is longer"),
        (_hello(resources={"available": "yes"}), "available must be true or false"),
        (_hello(resources={"memory_gb": -1}), "memory_gb must be a non-negative number"),
        (_hello(resources={"cpus": "many"}), "cpus must be a non-negative number"),
    ],
    ids=["tokens", "long-resources", "available", "memory", "cpus"],
)
def test_an_out_of_bounds_hello_is_refused_with_its_reason(
    hello: link_pb2.Hello, named: str
) -> None:
    with pytest.raises(HelloError, match=named):
        HelloInfo.from_proto(hello)


def test_an_honest_hello_is_accepted() -> None:
    resources = {"available": True, "cpus": 2, "memory_gb": 23.4, "device": "cpu"}
    info = HelloInfo.from_proto(_hello(train_tokens=5_000_000, resources=resources))
    assert info.train_tokens == 5_000_000 and info.resources == resources


def _picks_of_liar(rounds: int = 200) -> int:
    children = [f"w/{i}" for i in range(10)]
    sizes = [1000.0] * 9 + [1e18]  # w/9 claims a corpus of 1e18 tokens
    cfg = SampleConfig(fraction=0.2, weighting="data_size")
    return sum(
        "w/9" in select_children(children, sizes, cfg, seed=0, path="w", round_index=r)
        for r in range(rounds)
    )


def test_a_child_claiming_an_enormous_corpus_is_not_sampled_every_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capped = _picks_of_liar()
    assert capped < 200  # at most 10x the median: sampled often, not always
    monkeypatch.setattr(selection, "SIZE_CAP_OVER_MEDIAN", float("inf"))  # the attack, undefended
    assert _picks_of_liar() == 200
