"""Host-side federated datasets (DESIGN.md "Data for vmap").

Client datasets live on the host as numpy. Examples of all clients are stored contiguously, client
``i`` owning rows ``offsets[i]:offsets[i+1]`` of every array; this lets the same storage serve as a
device-resident table that a round gathers from by index (no per-round host->device copy of
examples), or be materialised on the host chunk by chunk when it does not fit on the device.

The examples may also stay in a :class:`RowSource` (e.g. an array_record file through
``tfds.data_source``) and be read on demand: a population built on one then reads, each round,
only the rows of the clients a process trains (an MPI rank's block of the cohort, an edge
client's own clients), never the whole dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedjax_lab.data.labels import check_label_spec, check_labels, check_num_classes

FeatureSpec = dict[str, tuple[tuple[int, ...], np.dtype]]


@runtime_checkable
class RowSource(Protocol):
    """Examples read on demand instead of held in memory.

    ``take(rows)`` returns ``{name: array [len(rows), ...]}`` for sorted, unique row numbers in
    ``[0, len(source))``; ``feature_spec()`` gives each array's per-example shape and dtype.
    """

    def __len__(self) -> int: ...

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]: ...

    def feature_spec(self) -> FeatureSpec: ...


class ReorderedSource:
    """Row ``j`` of this source is row ``order[j]`` of ``source`` (a partition's grouping)."""

    def __init__(self, source: RowSource, order: np.ndarray) -> None:
        order = np.asarray(order, np.int64)
        if len(order) and (order.min() < 0 or order.max() >= len(source)):
            raise ValueError(f"row order must lie in [0, {len(source)}) of the source")
        self.source = source
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        wanted = self.order[np.asarray(rows, np.int64)]
        uniq, inverse = np.unique(wanted, return_inverse=True)
        got = self.source.take(uniq)
        return {k: v[inverse] for k, v in got.items()}

    def feature_spec(self) -> FeatureSpec:
        return self.source.feature_spec()


@dataclass(frozen=True)
class FederatedData:
    """A federated dataset: an ordered population of clients, each a dict of arrays.

    Class labels (the ``label_key`` array) are validated on the host, because JAX clamps
    out-of-range label indices silently: they must be integers, one per example, never
    negative, and below ``num_classes`` when it is given. In-memory arrays are checked at
    construction; a :class:`RowSource`'s label spec at construction and its labels on every
    read (:meth:`take`). ``fedjax_lab.runner.run(num_classes=...)`` checks a population
    against the model's output size.

    Attributes:
      client_ids: population ids (strings), position ``i`` is client index ``i``.
      arrays: dict name -> array ``[N, ...]`` with the examples of all clients, grouped by client;
        or a :class:`RowSource` whose rows are grouped that way (read on demand, ``is_lazy``).
      offsets: ``[num_clients + 1]`` int64; client ``i`` owns rows ``offsets[i]:offsets[i+1]``.
      num_classes: number of classes; labels must lie in ``[0, num_classes)``. None: unknown
        (only the dtype, the shape and the sign of the labels are checked).
      label_key: the array holding class labels (checked as above); None when the population
        has no class labels (e.g. a custom per-example loss with real-valued targets).
    """

    client_ids: tuple[str, ...]
    arrays: dict[str, np.ndarray] | RowSource
    offsets: np.ndarray
    num_classes: int | None = None
    label_key: str | None = "y"

    def __post_init__(self) -> None:
        if isinstance(self.arrays, Mapping):
            if not self.arrays:
                raise ValueError(
                    "FederatedData: `arrays` is empty; pass e.g. {'x': ..., 'y': ...}"
                )
            lengths = {k: len(v) for k, v in self.arrays.items()}
        elif isinstance(self.arrays, RowSource):
            lengths = {"<source>": len(self.arrays)}
        else:
            raise TypeError(
                "FederatedData: `arrays` must be a dict of arrays or a RowSource (take, "
                f"feature_spec, __len__), got {type(self.arrays).__name__}"
            )
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"FederatedData: arrays must share their leading (example) axis, got {lengths}"
            )
        offsets = np.asarray(self.offsets)
        if offsets.ndim != 1 or len(offsets) != len(self.client_ids) + 1:
            raise ValueError("FederatedData: `offsets` must have num_clients + 1 entries")
        if offsets[0] != 0 or offsets[-1] != next(iter(lengths.values())):
            raise ValueError(
                "FederatedData: `offsets` must start at 0 and end at the example count"
            )
        sizes = np.diff(offsets)
        if np.any(sizes < 0):
            raise ValueError("FederatedData: `offsets` must be non-decreasing")
        empty = [self.client_ids[i] for i in np.flatnonzero(sizes == 0)[:5]]
        if empty:
            raise ValueError(
                f"FederatedData: clients {empty} have 0 examples. Remove them from the population "
                "explicitly, or use a partitioner with a min_size (nothing is dropped silently)."
            )
        if len(set(self.client_ids)) != len(self.client_ids):
            raise ValueError("FederatedData: `client_ids` must be unique")
        self._check_labels_at_construction()

    def _check_labels_at_construction(self) -> None:
        if self.num_classes is not None:
            object.__setattr__(
                self, "num_classes", check_num_classes(self.num_classes, "FederatedData")
            )
        key = self.label_key
        if key is None:
            return
        names = self.arrays if not self.is_lazy else self.arrays.feature_spec()
        if key not in names:
            if self.num_classes is not None:
                raise ValueError(
                    f"FederatedData: num_classes={self.num_classes} is given but there is no "
                    f"label array {key!r} (arrays: {sorted(names)}); pass label_key=<the label "
                    "array>"
                )
            return
        if self.is_lazy:
            shape, dtype = names[key]
            check_label_spec(shape, dtype, f"FederatedData: label array {key!r} of the source")
        else:
            check_labels(self.arrays[key], self.num_classes,
                         f"FederatedData: label array {key!r}", self._locate)

    def _locate(self, row: int) -> str:
        """``client 'id' example j`` for population row ``row`` (error messages)."""
        client = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return f"client {self.client_ids[client]!r} example {row - int(self.offsets[client])}"

    def with_num_classes(self, num_classes: int) -> FederatedData:
        """This population with ``num_classes`` set (labels checked against it).

        Raises:
          ValueError: the population already has another ``num_classes``, or a label is out of
            range.
        """
        num_classes = check_num_classes(num_classes, "with_num_classes")
        if self.num_classes == num_classes:
            return self
        if self.num_classes is not None:
            raise ValueError(
                f"the population's labels have num_classes={self.num_classes}, but the model "
                f"outputs {num_classes} classes; build the model with num_classes="
                f"{self.num_classes} (or relabel the data)"
            )
        return dataclasses.replace(self, num_classes=num_classes)

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_clients(
        cls,
        clients: Mapping[str, Mapping[str, np.ndarray]],
        *,
        num_classes: int | None = None,
        label_key: str | None = "y",
    ) -> FederatedData:
        """Build from ``{client_id: {"x": array, "y": array}}`` (insertion order is kept).

        ``num_classes`` and ``label_key`` are the class attributes (labels are checked).
        """
        if not clients:
            raise ValueError("FederatedData.from_clients: `clients` is empty")
        ids = tuple(str(c) for c in clients)
        names = None
        for cid, arrays in clients.items():
            if names is None:
                names = tuple(arrays)
            elif tuple(arrays) != names:
                raise ValueError(
                    f"FederatedData.from_clients: client {cid!r} has arrays {tuple(arrays)}, "
                    f"expected {names} like the first client"
                )
        per_name = {n: [np.asarray(clients[c][n]) for c in clients] for n in names}
        for n, parts in per_name.items():
            shapes = {p.shape[1:] for p in parts}
            if len(shapes) != 1:
                raise ValueError(
                    f"FederatedData.from_clients: array {n!r} has mismatched feature shapes "
                    f"{sorted(shapes)} across clients; reshape them to one shape"
                )
        sizes = [len(clients[c][names[0]]) for c in clients]
        for cid in clients:
            lens = {len(np.asarray(clients[cid][n])) for n in names}
            if len(lens) != 1:
                raise ValueError(
                    f"FederatedData.from_clients: client {cid!r} arrays have different "
                    f"lengths {lens}"
                )
        arrays = {n: np.concatenate(parts, axis=0) for n, parts in per_name.items()}
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls(ids, arrays, offsets, num_classes, label_key)

    @classmethod
    def from_partition(
        cls,
        arrays: Mapping[str, np.ndarray] | RowSource,
        partition: Sequence[np.ndarray],
        client_ids: Sequence[str] | None = None,
        *,
        num_classes: int | None = None,
        label_key: str | None = "y",
    ) -> FederatedData:
        """Build from centralized ``arrays`` and a list of per-client example-index arrays.

        ``arrays`` may be a :class:`RowSource`: the population then reads examples on demand
        (and checks the labels of every read). ``num_classes`` and ``label_key`` are the class
        attributes.
        """
        lazy = isinstance(arrays, RowSource) and not isinstance(arrays, Mapping)
        if not lazy:
            arrays = {k: np.asarray(v) for k, v in arrays.items()}
        if client_ids is None:
            client_ids = [str(i) for i in range(len(partition))]
        if len(client_ids) != len(partition):
            raise ValueError("FederatedData.from_partition: len(client_ids) != len(partition)")
        order = (
            np.concatenate([np.asarray(p, np.int64) for p in partition])
            if partition
            else np.zeros(0, np.int64)
        )
        sizes = [len(p) for p in partition]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if lazy:
            return cls(tuple(client_ids), ReorderedSource(arrays, order), offsets, num_classes,
                       label_key)
        return cls(tuple(client_ids), {k: v[order] for k, v in arrays.items()}, offsets,
                   num_classes, label_key)

    # ------------------------------------------------------------------------------- accessors
    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_examples(self) -> int:
        return int(self.offsets[-1])

    @property
    def is_lazy(self) -> bool:
        """Whether examples are read on demand from a :class:`RowSource`."""
        return not isinstance(self.arrays, Mapping)

    def take(self, rows: Any) -> dict[str, np.ndarray]:
        """The examples at population rows ``rows`` (any order, repeats allowed)."""
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be a 1-D array of row numbers, got shape {rows.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_examples):
            raise IndexError(f"rows must lie in [0, {self.num_examples})")
        if not self.is_lazy:
            return {k: v[rows] for k, v in self.arrays.items()}
        uniq, inverse = np.unique(rows, return_inverse=True)  # each row is read once
        got = self.arrays.take(uniq)
        if self.label_key is not None and self.label_key in got:
            # Read on demand: these labels were never seen before this read.
            check_labels(got[self.label_key], self.num_classes,
                         f"FederatedData.take: labels {self.label_key!r} read from the source",
                         lambda i: self._locate(int(uniq[i])))
        return {k: v[inverse] for k, v in got.items()}

    def client(self, i: int) -> dict[str, np.ndarray]:
        """The arrays of client index ``i``."""
        if not 0 <= i < self.num_clients:
            raise IndexError(f"client index {i} out of range [0, {self.num_clients})")
        lo, hi = self.offsets[i], self.offsets[i + 1]
        if self.is_lazy:
            return self.take(np.arange(lo, hi))
        return {k: v[lo:hi] for k, v in self.arrays.items()}

    def subset(self, indices: Sequence[int]) -> FederatedData:
        """A population made of the given client indices (e.g. one MPI rank's clients)."""
        return FederatedData.from_clients(
            {self.client_ids[i]: self.client(int(i)) for i in indices},
            num_classes=self.num_classes, label_key=self.label_key,
        )

    def feature_spec(self) -> FeatureSpec:
        """name -> (per-example shape, dtype)."""
        if self.is_lazy:
            return dict(self.arrays.feature_spec())
        return {k: (v.shape[1:], v.dtype) for k, v in self.arrays.items()}


def sample_clients(
    num_clients: int, clients_per_round: int, rng: np.random.Generator
) -> np.ndarray:
    """Uniform sampling of client indices without replacement (sorted for reproducible layout)."""
    if clients_per_round <= 0:
        raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
    if clients_per_round > num_clients:
        raise ValueError(
            f"clients_per_round={clients_per_round} > num_clients={num_clients}; lower "
            "--clients-per-round or use more clients"
        )
    return np.sort(rng.choice(num_clients, size=clients_per_round, replace=False))
