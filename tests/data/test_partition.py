"""Tests of the partitioners in fedjax_lab.data.partition."""

import chex
import numpy as np
import pytest

# `from <module> import names`: binds the module's functions even if a package __init__
# re-exports the `partition` function under the submodule's name.
from fedjax_lab.data.partition import (
    dirichlet_label_mix,
    dirichlet_per_class,
    iid,
    natural,
    natural_client_ids,
    partition,
    shards,
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def _check_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert len(p) > 0, "empty client"
        assert np.all(np.diff(p) > 0), "indices inside a client must be sorted and unique"
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    k = labels.max() + 1
    return float(np.mean([_entropy(np.bincount(labels[p], minlength=k)) for p in parts]))


# ------------------------------------------------------------------------------------------ iid
@pytest.mark.parametrize(
    ("n", "k", "seed"), [(10, 1, 0), (10, 10, 1), (1001, 7, 2), (64, 8, 3)], ids=str
)
def test_iid_cover_and_sizes(n, k, seed):
    parts = iid(n, k, _rng(seed))
    _check_cover(parts, n, k)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() - sizes.min() <= 1
    assert sizes.sum() == n


def test_iid_determinism():
    assert _same(iid(500, 10, _rng(5)), iid(500, 10, _rng(5)))
    assert not _same(iid(500, 10, _rng(5)), iid(500, 10, _rng(6)))


def test_iid_is_shuffled():
    # Contiguous blocks would give client 0 exactly range(100); a shuffle essentially never does.
    parts = iid(1000, 10, _rng(0))
    assert not np.array_equal(parts[0], np.arange(100))


# ---------------------------------------------------------------------------- label mix (Hsu)
@pytest.mark.parametrize(
    ("alpha", "k", "seed"), [(0.01, 10, 0), (0.5, 13, 1), (100.0, 20, 2), (1e-4, 50, 3)], ids=str
)
def test_label_mix_cover_and_equal_sizes(alpha, k, seed):
    labels = np.random.default_rng(99).integers(0, 10, size=1003)
    parts = dirichlet_label_mix(labels, k, alpha, _rng(seed))
    _check_cover(parts, len(labels), k)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() - sizes.min() <= 1


def test_label_mix_given_sizes():
    labels = np.random.default_rng(0).integers(0, 5, size=300)
    sizes = [10, 50, 200, 40]
    parts = dirichlet_label_mix(labels, 4, 0.3, _rng(1), sizes=sizes)
    _check_cover(parts, 300, 4)
    assert [len(p) for p in parts] == sizes


def test_label_mix_determinism():
    labels = _balanced_labels(10, 50)
    assert _same(
        dirichlet_label_mix(labels, 10, 0.5, _rng(3)),
        dirichlet_label_mix(labels, 10, 0.5, _rng(3)),
    )
    assert not _same(
        dirichlet_label_mix(labels, 10, 0.5, _rng(3)),
        dirichlet_label_mix(labels, 10, 0.5, _rng(4)),
    )


def test_label_mix_heterogeneity_small_vs_large_alpha():
    labels = _balanced_labels(10, 200)
    low = _mean_label_entropy(labels, dirichlet_label_mix(labels, 20, 0.05, _rng(0)))
    high = _mean_label_entropy(labels, dirichlet_label_mix(labels, 20, 1000.0, _rng(0)))
    assert high > 0.95 * np.log(10)
    assert low < 0.4 * high


def test_label_mix_large_alpha_follows_unbalanced_prior():
    # Prior p = (0.4, 0.3, 0.2, 0.1): Dir(alpha * p) centres clients on p (not on uniform).
    # Client k's class fraction has variance p(1-p)(1/(alpha+1) + 1/n) (Dirichlet + multinomial);
    # the first half of the clients draw before the pools run low, so no renormalisation
    # applies to them. Check each within 5 standard errors.
    prior = np.array([0.4, 0.3, 0.2, 0.1])
    k, n_per_client, alpha = 40, 250, 500.0
    labels = np.repeat(np.arange(4), (prior * k * n_per_client).astype(int))
    parts = dirichlet_label_mix(labels, k, alpha, _rng(11))
    fractions = np.stack([np.bincount(labels[p], minlength=4) / len(p) for p in parts[: k // 2]])
    se = np.sqrt(prior * (1 - prior) * (1 / (alpha + 1) + 1 / n_per_client))
    assert np.all(np.abs(fractions - prior) < 5 * se), np.abs(fractions - prior).max(0) / se
    # The mean over these clients has standard error <= se / sqrt(20) (draws without replacement
    # from shared pools are negatively correlated); it must sit at p, far from uniform 0.25.
    mean_se = se / np.sqrt(k // 2)
    assert np.all(np.abs(fractions.mean(0) - prior) < 5 * mean_se)
    assert np.abs(fractions[:, 0].mean() - 0.25) > 5 * mean_se[0]


def test_label_mix_tiny_alpha_one_class_per_client_until_pools_run_low():
    labels = _balanced_labels(10, 100)
    parts = dirichlet_label_mix(labels, 10, 1e-6, _rng(2))
    _check_cover(parts, 1000, 10)
    # The first client draws from full pools, and a Dir(1e-7, ...) draw is one-hot numerically.
    assert len(np.unique(labels[parts[0]])) == 1


# -------------------------------------------------------------------------- per class (FedML)
def _fedml_reference(labels, num_clients, alpha, rng, min_size):
    """Plain-python transcription of FedML's hetero loop (same draw order)."""
    n = len(labels)
    smallest = 0
    while smallest < min_size:
        batch = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet([alpha] * num_clients)
            props = np.array(
                [p if len(b) < n / num_clients else 0.0 for p, b in zip(props, batch, strict=True)]
            )
            props = props / props.sum()
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for j, piece in enumerate(np.split(idx, cuts)):
                batch[j] += piece.tolist()
        smallest = min(len(b) for b in batch)
    return [np.sort(np.array(b, dtype=np.int64)) for b in batch]


@pytest.mark.parametrize(
    ("alpha", "k", "min_size", "seed"),
    [(0.5, 10, 10, 0), (0.1, 5, 5, 1), (10.0, 20, 20, 2), (1.0, 7, 1, 3)],
    ids=str,
)
def test_per_class_matches_fedml_reference(alpha, k, min_size, seed):
    labels = np.random.default_rng(7).integers(0, 10, size=1200)
    parts = dirichlet_per_class(labels, k, alpha, _rng(seed), min_size=min_size)
    _check_cover(parts, len(labels), k)
    assert min(len(p) for p in parts) >= min_size
    ref = _fedml_reference(labels, k, alpha, _rng(seed), min_size)
    assert _same(parts, ref)


def test_per_class_balancing_bounds_sizes():
    # A client stops receiving classes once it holds >= N/K examples, so its size is below
    # N/K + (largest class). Without the trick, small alpha piles several classes on a client.
    labels = _balanced_labels(10, 100)
    for seed in range(5):
        parts = dirichlet_per_class(labels, 10, 0.1, _rng(seed), min_size=1)
        assert max(len(p) for p in parts) < 100 + 100


def test_per_class_determinism():
    labels = _balanced_labels(10, 100)
    a = dirichlet_per_class(labels, 10, 0.5, _rng(0))
    assert _same(a, dirichlet_per_class(labels, 10, 0.5, _rng(0)))
    assert not _same(a, dirichlet_per_class(labels, 10, 0.5, _rng(1)))


def test_per_class_heterogeneity_small_vs_large_alpha():
    labels = _balanced_labels(10, 100)
    low_parts = dirichlet_per_class(labels, 5, 0.01, _rng(0), min_size=10)
    high_parts = dirichlet_per_class(labels, 5, 1000.0, _rng(0), min_size=10)
    low = _mean_label_entropy(labels, low_parts)
    high = _mean_label_entropy(labels, high_parts)
    assert high > 0.95 * np.log(10)
    assert low < 0.5 * high
    distinct_low = np.mean([len(np.unique(labels[p])) for p in low_parts])
    distinct_high = np.mean([len(np.unique(labels[p])) for p in high_parts])
    assert distinct_high == 10
    assert distinct_low <= 4


def test_per_class_min_size_unreachable_raises():
    labels = _balanced_labels(10, 100)
    with pytest.raises(ValueError, match=r"min_size.*alpha"):
        dirichlet_per_class(labels, 50, 0.001, _rng(0), min_size=10, max_attempts=20)


def test_per_class_min_size_impossible_raises():
    labels = _balanced_labels(2, 10)
    with pytest.raises(ValueError, match="min_size"):
        dirichlet_per_class(labels, 5, 1.0, _rng(0), min_size=5)


# ------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize(
    ("n", "k", "spc", "seed"),
    [(1000, 50, 2, 0), (1003, 7, 3, 1), (20, 10, 2, 2), (97, 5, 1, 3)],
    ids=str,
)
def test_shards_cover_and_sizes(n, k, spc, seed):
    labels = np.random.default_rng(5).integers(0, 10, size=n)
    parts = shards(labels, k, spc, _rng(seed))
    _check_cover(parts, n, k)
    lo = n // (k * spc)
    for p in parts:  # shard sizes are lo or lo + 1
        assert spc * lo <= len(p) <= spc * (lo + 1)


def test_shards_two_labels_per_client_on_sorted_balanced_data():
    labels = _balanced_labels(10, 100)  # 100 shards of 10: each shard holds a single label
    parts = shards(labels, 50, 2, _rng(0))
    counts = [len(np.unique(labels[p])) for p in parts]
    assert max(counts) <= 2
    # Unaligned shards (size 7) may straddle a label boundary: at most 2 labels per shard.
    parts = shards(labels, 71, 2, _rng(1))
    assert max(len(np.unique(labels[p])) for p in parts) <= 4
    # An iid split of the same data has many more labels per client.
    assert np.mean([len(np.unique(labels[p])) for p in iid(1000, 50, _rng(0))]) > 5


def test_shards_are_label_contiguous_on_shuffled_input():
    labels = np.random.default_rng(3).permutation(_balanced_labels(10, 100))
    parts = shards(labels, 50, 2, _rng(0))
    assert max(len(np.unique(labels[p])) for p in parts) <= 2


def test_shards_determinism():
    labels = _balanced_labels(10, 100)
    a = shards(labels, 50, 2, _rng(0))
    assert _same(a, shards(labels, 50, 2, _rng(0)))
    assert not _same(a, shards(labels, 50, 2, _rng(1)))


def test_shards_too_many_raises():
    with pytest.raises(ValueError, match="shards_per_client"):
        shards(np.zeros(10, np.int32), 4, 3, _rng(0))


# ------------------------------------------------------------------------------------ natural
@pytest.mark.parametrize(
    "ids",
    [
        np.array([3, 1, 3, 2, 1, 1]),
        np.array(["bob", "al", "bob", "cy"]),
        np.array([7]),
    ],
    ids=["ints", "strings", "single"],
)
def test_natural_groups_by_id(ids):
    parts = natural(ids)
    _check_cover(parts, len(ids), len(np.unique(ids)))
    names = natural_client_ids(ids)
    assert len(names) == len(parts)
    for name, p in zip(names, parts, strict=True):
        assert {str(v) for v in ids[p]} == {name}
        np.testing.assert_array_equal(p, np.flatnonzero(ids.astype(str) == name))


def test_natural_empty_raises():
    with pytest.raises(ValueError, match="client_of_example"):
        natural(np.array([], dtype=np.int64))


# ----------------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    ("name", "fn", "kwargs"),
    [
        ("iid", lambda y, k, r: iid(len(y), k, r), {}),
        (
            "dirichlet_label_mix",
            lambda y, k, r: dirichlet_label_mix(y, k, 0.3, r),
            {"alpha": 0.3},
        ),
        (
            "dirichlet_per_class",
            lambda y, k, r: dirichlet_per_class(y, k, 0.3, r, min_size=2),
            {"alpha": 0.3, "min_size": 2},
        ),
        ("shards", lambda y, k, r: shards(y, k, 2, r), {"shards_per_client": 2}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_registry_dispatch(name, fn, kwargs):
    labels = np.random.default_rng(0).integers(0, 10, size=400)
    got = partition(name, labels, 8, _rng(4), **kwargs)
    chex.assert_equal(len(got), 8)
    assert _same(got, fn(labels, 8, _rng(4)))


def test_registry_natural():
    labels = np.zeros(5, np.int32)
    ids = np.array(["a", "b", "a", "c", "b"])
    parts = partition("natural", labels, None, _rng(0), client_of_example=ids)
    assert _same(parts, natural(ids))
    assert _same(parts, partition("natural", labels, 3, _rng(0), client_of_example=ids))
    with pytest.raises(ValueError, match=r"num_clients.*3 natural clients"):
        partition("natural", labels, 2, _rng(0), client_of_example=ids)
    with pytest.raises(ValueError, match="client_of_example"):
        partition("natural", labels, None, _rng(0))
    with pytest.raises(ValueError, match="client_of_example"):
        partition("natural", labels, None, _rng(0), client_of_example=ids[:3])


def test_registry_unknown_name():
    with pytest.raises(ValueError, match=r"unknown partition 'pathological'.*iid.*natural"):
        partition("pathological", np.zeros(4, np.int32), 2, _rng(0))


# ---------------------------------------------------------------------------------- bad input
LABELS = np.repeat(np.arange(4), 5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: iid(10, 0, _rng(0)), "num_clients"),
        (lambda: iid(10, 11, _rng(0)), "num_clients"),
        (lambda: iid(10, 2.0, _rng(0)), "num_clients"),
        (lambda: iid(10, True, _rng(0)), "num_clients"),
        (lambda: shards(LABELS, 0, 2, _rng(0)), "num_clients"),
        (lambda: shards(LABELS, 21, 1, _rng(0)), "num_clients"),
        (lambda: shards(LABELS, 2, 0, _rng(0)), "shards_per_client"),
        (lambda: dirichlet_label_mix(LABELS, 2, 0.0, _rng(0)), "alpha"),
        (lambda: dirichlet_label_mix(LABELS, 2, -1.0, _rng(0)), "alpha"),
        (lambda: dirichlet_label_mix(LABELS, 2, float("nan"), _rng(0)), "alpha"),
        (lambda: dirichlet_label_mix(LABELS, 2, float("inf"), _rng(0)), "alpha"),
        (lambda: dirichlet_label_mix(LABELS, 2, 1.0, _rng(0), sizes=[5, 5]), "sizes"),
        (lambda: dirichlet_label_mix(LABELS, 2, 1.0, _rng(0), sizes=[20, 0]), "sizes"),
        (lambda: dirichlet_label_mix(LABELS, 2, 1.0, _rng(0), sizes=[20]), "sizes"),
        (lambda: dirichlet_per_class(LABELS, 2, 0.0, _rng(0)), "alpha"),
        (lambda: dirichlet_per_class(LABELS, 2, 1.0, _rng(0), min_size=0), "min_size"),
        (lambda: dirichlet_per_class(LABELS, 25, 1.0, _rng(0)), "num_clients"),
        (lambda: shards(LABELS.reshape(4, 5), 2, 2, _rng(0)), "labels"),
        (lambda: shards(LABELS.astype(np.float32), 2, 2, _rng(0)), "labels"),
        (lambda: shards(np.zeros(0, np.int32), 1, 1, _rng(0)), "labels"),
    ],
    ids=lambda v: "",
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_rng_must_be_generator():
    with pytest.raises(TypeError, match="rng"):
        iid(10, 2, 0)
