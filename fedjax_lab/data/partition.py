"""Partitioners: split a centralized dataset into a population of clients.

Every partitioner takes an explicit ``np.random.Generator`` and returns ``list[np.ndarray]`` of
example indices, one int64 array per client, such that every example is assigned to exactly one
client and no client is empty (DESIGN.md "Data for vmap"). Indices inside a client are sorted
(ascending): a client is a *set* of examples, and its order is chosen each round by the cohort
builder's per-client shuffling. A scheme that can produce an empty client resamples a bounded
number of times and then raises; nothing is ever dropped silently.

Variants, named precisely:
  * ``iid`` -- shuffle, then a near-equal split.
  * ``dirichlet_label_mix`` -- Hsu et al. 2019: each client's label mix ``q ~ Dir(alpha * p)``.
  * ``dirichlet_per_class`` -- FedML "hetero": each class is split across clients ``~ Dir(alpha)``.
  * ``shards`` -- McMahan et al. 2017: sorted by label, cut into shards, a few shards per client.
  * ``natural`` -- group by a natural id (writer, speaker, user).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

PARTITIONERS = ("iid", "dirichlet_label_mix", "dirichlet_per_class", "shards", "natural")


# --------------------------------------------------------------------------------- validation
def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def _check_num_clients(num_clients: Any, num_examples: int) -> int:
    num_clients = _check_int(num_clients, "num_clients", 1)
    if num_clients > num_examples:
        raise ValueError(
            f"`num_clients`={num_clients} > number of examples {num_examples}: some clients would "
            "be empty. Use fewer clients or more data."
        )
    return num_clients


def _check_alpha(alpha: Any) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"`alpha` must be a positive float, got {alpha!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(
            f"`alpha` must be a finite float > 0 (Dirichlet concentration), got {alpha!r}"
        )
    return value


def _check_labels(labels: Any) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"`labels` must be a 1-D array of class ids, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"`labels` must have an integer dtype, got {labels.dtype}")
    if labels.size == 0:
        raise ValueError("`labels` is empty: there are no examples to partition")
    return labels


def _check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"`rng` must be a numpy Generator (e.g. fedjax_lab.core.rng.host_rng(seed, "
            f"PARTITION_STREAM)), got {type(rng).__name__}"
        )
    return rng


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# ------------------------------------------------------------------------------- partitioners
def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """IID partition: a uniform random permutation cut into ``num_clients`` near-equal parts.

    Client sizes differ by at most one (the first ``num_examples % num_clients`` clients get one
    extra example).

    Args:
      num_examples: number of examples ``N`` (>= 1).
      num_clients: number of clients, in ``[1, N]``.
      rng: the generator that draws the permutation.

    Returns:
      ``num_clients`` sorted int64 index arrays covering ``range(N)`` exactly once.
    """
    num_examples = _check_int(num_examples, "num_examples", 1)
    num_clients = _check_num_clients(num_clients, num_examples)
    rng = _check_rng(rng)
    return _finish(np.array_split(rng.permutation(num_examples), num_clients))


def _equal_sizes(num_examples: int, num_clients: int) -> np.ndarray:
    sizes = np.full(num_clients, num_examples // num_clients, dtype=np.int64)
    sizes[: num_examples % num_clients] += 1
    return sizes


def dirichlet_label_mix(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    sizes: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Label-mix Dirichlet partition of Hsu, Qi & Brown 2019.

    "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
    Classification" (arXiv:1909.06335): client ``k`` draws its label distribution
    ``q_k ~ Dir(alpha * p)``, where ``p`` is the global class prior (class frequencies of
    `labels`), then fills its ``sizes[k]`` examples by picking a class from ``q_k`` and an example
    of that class uniformly without replacement. ``alpha -> inf`` gives IID clients,
    ``alpha -> 0`` one class per client.

    Clients are filled in index order from shared class pools, so that every example is
    assigned exactly once. When a class pool is exhausted, later draws renormalise ``q_k`` over the
    classes that still have examples (equivalently: a draw of an exhausted class is rejected
    and redrawn). If ``q_k`` has no numerical mass left on any non-exhausted class (possible for
    tiny ``alpha`` because Dirichlet draws underflow to exact zeros), the rest of that client is
    drawn in proportion to the remaining pool sizes. Both rules only act near the end of the
    population, when the pools run low; they make the last clients closer to the leftover mix.

    Args:
      labels: ``[N]`` integer class ids.
      num_clients: number of clients, in ``[1, N]``.
      alpha: Dirichlet concentration (> 0), multiplying the prior ``p``.
      rng: the generator for the Dirichlet and multinomial draws.
      sizes: optional client sizes (each >= 1, summing to ``N``); default near-equal sizes.

    Returns:
      ``num_clients`` sorted int64 index arrays, client ``k`` of size ``sizes[k]``.
    """
    labels = _check_labels(labels)
    n = len(labels)
    num_clients = _check_num_clients(num_clients, n)
    alpha = _check_alpha(alpha)
    rng = _check_rng(rng)
    if sizes is None:
        sizes_arr = _equal_sizes(n, num_clients)
    else:
        sizes_arr = np.asarray(sizes)
        if sizes_arr.shape != (num_clients,) or not np.issubdtype(sizes_arr.dtype, np.integer):
            raise ValueError(
                f"`sizes` must be {num_clients} integers (one per client), got {sizes!r}"
            )
        if np.any(sizes_arr < 1) or int(sizes_arr.sum()) != n:
            raise ValueError(
                f"`sizes` must be >= 1 each and sum to the number of examples {n} (every "
                f"example assigned exactly once), got sum {int(sizes_arr.sum())}, "
                f"min {int(sizes_arr.min())}"
            )
        sizes_arr = sizes_arr.astype(np.int64)

    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    prior = counts / n
    by_class = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    # Random order inside each class pool; taking a prefix = sampling without replacement.
    pools = [rng.permutation(by_class[starts[c] : starts[c + 1]]) for c in range(len(classes))]
    used = np.zeros(len(classes), dtype=np.int64)

    parts = []
    for k in range(num_clients):
        q = rng.dirichlet(alpha * prior)
        take = np.zeros(len(classes), dtype=np.int64)
        need = int(sizes_arr[k])
        while need > 0:
            left = counts - used - take
            weights = np.where(left > 0, q, 0.0)
            if not weights.sum() > 0:
                weights = left.astype(np.float64)
            draw = np.minimum(rng.multinomial(need, weights / weights.sum()), left)
            take += draw
            need -= int(draw.sum())
        parts.append(
            np.concatenate([pools[c][used[c] : used[c] + take[c]] for c in range(len(classes))])
        )
        used += take
    return _finish(parts)


def dirichlet_per_class(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Per-class Dirichlet partition, FedML's "hetero" scheme (``partition_alpha``).

    Introduced by Yurochkin et al. 2019, "Bayesian Nonparametric Federated Learning of Neural
    Networks" (ICML), and popularised by FedML (He et al. 2020, "FedML: A Research Library and
    Benchmark for Federated Machine Learning"). For each class in turn, its examples are shuffled
    and split across the clients with proportions ``~ Dir(alpha * 1)``. Balancing trick (FedML): a
    client that already holds ``>= N / num_clients`` examples gets proportion 0 for the following
    classes (the rest renormalised), which bounds client sizes. Cut points are
    ``floor(cumsum(proportions) * n_class)`` as in FedML. The whole partition is redrawn while the
    smallest client has fewer than `min_size` examples (FedML's ``while min_size < 10`` loop),
    at most `max_attempts` times; then a ValueError is raised instead of looping forever.

    If a Dirichlet draw underflows so that all eligible clients get exactly 0 mass (tiny
    ``alpha``), that class's proportions are redrawn: in exact arithmetic this event has
    probability zero, so conditioning on it does not change the distribution.

    Args:
      labels: ``[N]`` integer class ids.
      num_clients: number of clients, in ``[1, N]``.
      alpha: Dirichlet concentration (> 0); small = few classes per client.
      rng: the generator for the shuffles and Dirichlet draws.
      min_size: minimum examples per client (>= 1, and ``min_size * num_clients <= N``).
      max_attempts: bound on the number of full redraws (>= 1).

    Returns:
      ``num_clients`` sorted int64 index arrays covering ``range(N)`` exactly once.
    """
    labels = _check_labels(labels)
    n = len(labels)
    num_clients = _check_num_clients(num_clients, n)
    alpha = _check_alpha(alpha)
    rng = _check_rng(rng)
    min_size = _check_int(min_size, "min_size", 1)
    max_attempts = _check_int(max_attempts, "max_attempts", 1)
    if min_size * num_clients > n:
        raise ValueError(
            f"`min_size`={min_size} * num_clients={num_clients} > number of examples {n}: "
            "no partition can satisfy it; lower min_size or num_clients."
        )
    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    cap = n / num_clients
    smallest = 0
    for _ in range(max_attempts):
        batches: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        held = np.zeros(num_clients, dtype=np.int64)
        for idx in class_indices:
            idx = rng.permutation(idx)
            eligible = held < cap
            for _ in range(max_attempts):
                props = rng.dirichlet(np.full(num_clients, alpha)) * eligible
                if props.sum() > 0:
                    break
            else:
                raise ValueError(
                    f"dirichlet_per_class: Dirichlet draws with `alpha`={alpha} underflowed to 0 "
                    f"on every eligible client {max_attempts} times; use a larger alpha."
                )
            cuts = (np.cumsum(props / props.sum()) * len(idx)).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(idx, cuts)):
                batches[j].append(piece)
                held[j] += len(piece)
        smallest = int(held.min())
        if smallest >= min_size:
            return _finish([np.concatenate(b) for b in batches])
    raise ValueError(
        f"dirichlet_per_class: after {max_attempts} attempts the smallest client still had "
        f"{smallest} < `min_size`={min_size} examples (alpha={alpha}, num_clients={num_clients}, "
        f"{len(class_indices)} classes, N={n}). Increase `alpha`, lower `min_size` or "
        "num_clients, or raise max_attempts."
    )


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID shards of McMahan et al. 2017.

    "Communication-Efficient Learning of Deep Networks from Decentralized Data" (AISTATS):
    sort the examples by label, cut them into ``num_clients * shards_per_client`` contiguous
    shards, and give each client ``shards_per_client`` shards chosen at random without
    replacement. Ties inside a label are broken by a random permutation, so which examples of a
    class share a shard is random too. When ``N`` is not divisible by the number of shards, shard
    sizes differ by at most one and every example is still assigned.

    Args:
      labels: ``[N]`` integer class ids.
      num_clients: number of clients (>= 1).
      shards_per_client: shards per client (>= 1); ``num_clients * shards_per_client <= N``.
      rng: the generator for the tie-breaking permutation and the shard assignment.

    Returns:
      ``num_clients`` sorted int64 index arrays covering ``range(N)`` exactly once.
    """
    labels = _check_labels(labels)
    n = len(labels)
    num_clients = _check_num_clients(num_clients, n)
    shards_per_client = _check_int(shards_per_client, "shards_per_client", 1)
    rng = _check_rng(rng)
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(
            f"num_clients * `shards_per_client` = {num_shards} > number of examples {n}: shards "
            "would be empty. Lower shards_per_client or num_clients."
        )
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    pieces = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in assignment])


def natural(client_of_example: np.ndarray) -> list[np.ndarray]:
    """Natural partition: one client per distinct id (writer, speaker, user).

    Client ``i`` is the ``i``-th id of ``np.unique(client_of_example)`` (sorted ids), so the ids
    are recovered with ``np.unique``; `natural_client_ids` returns them as strings.

    Args:
      client_of_example: ``[N]`` natural id of each example (ints or strings).

    Returns:
      One sorted int64 index array per distinct id, in sorted-id order.
    """
    ids = np.asarray(client_of_example)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(
            "`client_of_example` must be a non-empty 1-D array of client ids, got shape "
            f"{ids.shape}"
        )
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    return _finish(np.split(order, np.cumsum(counts)[:-1]))


def natural_client_ids(client_of_example: np.ndarray) -> tuple[str, ...]:
    """The client ids of `natural` (sorted distinct ids, as strings), aligned with its output."""
    return tuple(str(i) for i in np.unique(np.asarray(client_of_example)))


# ----------------------------------------------------------------------------------- registry
def partition(
    name: str,
    labels: np.ndarray,
    num_clients: int | None,
    rng: np.random.Generator,
    **kwargs: Any,
) -> list[np.ndarray]:
    """Dispatch to a partitioner by name.

    Args:
      name: one of ``"iid", "dirichlet_label_mix", "dirichlet_per_class", "shards", "natural"``.
      labels: ``[N]`` integer class ids (for ``"iid"`` only their count is used).
      num_clients: number of clients. For ``"natural"`` it may be None (one client per id);
        an integer must equal the number of distinct ids.
      rng: the generator (unused by ``"natural"``).
      **kwargs: the partitioner's own arguments: ``alpha`` (+ ``sizes`` / ``min_size``,
        ``max_attempts``), ``shards_per_client``, or ``client_of_example`` for ``"natural"``.

    Returns:
      The partitioner's list of per-client index arrays.
    """
    labels = _check_labels(labels)
    if name == "natural":
        del rng  # The natural partition is given by the data, not drawn.
        if "client_of_example" not in kwargs:
            raise ValueError("partition('natural', ...) needs `client_of_example=` (the ids)")
        ids = np.asarray(kwargs.pop("client_of_example"))
        if kwargs:
            raise TypeError(f"partition('natural'): unexpected arguments {sorted(kwargs)}")
        if ids.shape != labels.shape:
            raise ValueError(
                f"`client_of_example` has shape {ids.shape}, expected {labels.shape} like labels"
            )
        parts = natural(ids)
        if num_clients is not None and num_clients != len(parts):
            raise ValueError(
                f"`num_clients`={num_clients} but the data have {len(parts)} natural clients; "
                "pass num_clients=None (or the exact count). To use fewer clients, take a "
                "subset of the population explicitly (FederatedData.subset)."
            )
        return parts
    fns: dict[str, Callable[..., list[np.ndarray]]] = {
        "dirichlet_label_mix": dirichlet_label_mix,
        "dirichlet_per_class": dirichlet_per_class,
        "shards": shards,
    }
    if name == "iid":
        return iid(len(labels), num_clients, rng, **kwargs)
    if name not in fns:
        raise ValueError(f"unknown partition {name!r}; valid names: {', '.join(PARTITIONERS)}")
    return fns[name](labels, num_clients, rng=rng, **kwargs)
