"""Split one dataset's examples among simulated leaves: which example indices each leaf gets.

Pure functions of labels or sizes and a seed, so that every process (the config loader, each
leaf, `worldlm partition`) computes the same split without any of them writing it down.

- iid: a seeded permutation cut into near-equal parts.
- dirichlet: for every label, its examples are shuffled and cut in proportions drawn from
  Dirichlet(alpha, ..., alpha) over the leaves (Hsu et al. 2019; NIID-Bench, Li et al. 2022),
  redrawn until every leaf has `min_size` examples. Small alpha: each leaf sees few labels;
  large alpha: every leaf sees every label in about equal shares.
- column: one leaf per distinct value of a column (rows whose value is missing are left out).
- size_skew: leaf sizes proportional to LogNormal(0, sigma) draws (FedLab's unbalanced split),
  over a seeded permutation; sigma 0 gives equal sizes.

Every kind but `column` assigns every example to exactly one leaf. Each leaf's indices are
returned sorted, so a leaf reads its examples in the dataset's order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

from worldlm.seeding import derive_seed

Parts = list[np.ndarray]  # per leaf: sorted int64 indices into the dataset

# A Dirichlet draw can leave a leaf empty; redraws are cheap, but a hopeless request (more
# leaves than examples allow) must end with an error, not loop forever.
MAX_TRIES = 1000
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def rng(seed: int, kind: str) -> np.random.Generator:
    """The generator every draw of a `kind` partition comes from."""
    return np.random.default_rng(derive_seed(seed, "partition", kind))


def iid_partition(n: int, leaves: int, seed: int, *, min_size: int = 0) -> Parts:
    """A seeded permutation of range(n) cut into `leaves` parts whose sizes differ by <= 1."""
    _check_leaves(n, leaves, min_size)
    order = rng(seed, "iid").permutation(n)
    return [np.sort(part) for part in np.array_split(order, leaves)]


def dirichlet_partition(
    labels: Sequence[Hashable], leaves: int, alpha: float, seed: int, *, min_size: int = 0
) -> Parts:
    """Each label's examples cut among the leaves in Dirichlet(alpha) proportions; the draw is
    repeated (from the same generator) until every leaf has at least `min_size` examples."""
    n = len(labels)
    _check_leaves(n, leaves, min_size)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    by_label: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):  # first-appearance order: stable for a given dataset
        by_label.setdefault(label, []).append(i)
    classes = [np.asarray(members, dtype=np.int64) for members in by_label.values()]
    gen = rng(seed, "dirichlet")
    for _ in range(MAX_TRIES):
        shares: list[list[np.ndarray]] = [[] for _ in range(leaves)]
        for members in classes:
            shuffled = gen.permutation(members)
            proportions = gen.dirichlet(np.full(leaves, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for leaf, piece in enumerate(np.split(shuffled, cuts)):
                shares[leaf].append(piece)
        parts = [np.sort(np.concatenate(pieces)) for pieces in shares]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"no Dirichlet draw in {MAX_TRIES} gave each of {leaves} leaves at least min_size = "
        f"{min_size} of the {n} examples; raise alpha, use fewer leaves or a lower min_size"
    )


def column_partition(values: Sequence[Hashable]) -> tuple[list[Hashable], Parts]:
    """One part per distinct value (sorted); rows whose value is None belong to no leaf."""
    members: dict[Hashable, list[int]] = {}
    for i, value in enumerate(values):
        if value is not None:
            members.setdefault(value, []).append(i)
    if not members:
        raise ValueError("the column has no values (every row is missing one)")
    try:
        keys = sorted(members)  # type: ignore[type-var]  # mixed types fall back below
    except TypeError:
        keys = sorted(members, key=repr)
    return keys, [np.asarray(members[k], dtype=np.int64) for k in keys]


def skewed_sizes(
    n: int, leaves: int, sigma: float, gen: np.random.Generator, *, min_size: int = 0
) -> np.ndarray:
    """`leaves` sizes summing to n: min_size each, the rest shared in proportion to
    LogNormal(0, sigma) weights (largest remainders get the leftover examples)."""
    _check_leaves(n, leaves, min_size)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    spare = n - leaves * min_size
    weights = gen.lognormal(0.0, sigma, leaves)
    exact = spare * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    # Stable sort: equal remainders (sigma 0) go to the first leaves, deterministically.
    leftover = np.argsort(-(exact - sizes), kind="stable")[: spare - int(sizes.sum())]
    sizes[leftover] += 1
    return sizes + min_size


def size_skew_partition(
    n: int, leaves: int, sigma: float, seed: int, *, min_size: int = 0
) -> Parts:
    """A seeded permutation of range(n) cut into parts of `skewed_sizes`."""
    gen = rng(seed, "size_skew")
    sizes = skewed_sizes(n, leaves, sigma, gen, min_size=min_size)
    order = gen.permutation(n)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def round_robin_groups(leaves: int, groups: int) -> list[int]:
    """The group of each leaf: leaf i goes to group i mod `groups`."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    return [i % groups for i in range(leaves)]


def majority(values: Sequence[Hashable], part: np.ndarray) -> Hashable:
    """The most common non-missing value among the rows of `part` (ties: the smallest repr)."""
    counts = Counter(values[int(i)] for i in part if values[int(i)] is not None)
    if not counts:
        raise ValueError("every row of the leaf is missing a value")
    top = max(counts.values())
    return min((v for v, c in counts.items() if c == top), key=repr)


def histograms(labels: Sequence[Hashable], parts: Parts) -> list[Counter[Hashable]]:
    """How many examples of each label every leaf holds."""
    return [Counter(labels[int(i)] for i in part) for part in parts]


def node_names(values: Sequence[Hashable]) -> list[str]:
    """A node name (letters, digits, '_' or '-') per value, unique: unsafe characters become
    '_', and a name that is taken gets '-2', '-3', ... appended."""
    names: list[str] = []
    for value in values:
        base = _UNSAFE.sub("_", str(value)).strip("_")[:64] or "_"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def numbered(prefix: str, count: int) -> list[str]:
    """prefix0 .. prefix{count-1}, zero-padded so that the names sort in number order."""
    width = len(str(max(count - 1, 0)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def _check_leaves(n: int, leaves: int, min_size: int) -> None:
    if leaves < 1:
        raise ValueError(f"leaves must be >= 1, got {leaves}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if n < leaves * min_size:
        raise ValueError(
            f"{n} examples cannot give {leaves} leaves min_size = {min_size} each; use fewer "
            "leaves or a lower min_size"
        )
