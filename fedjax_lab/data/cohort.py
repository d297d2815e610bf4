"""Per-round cohorts: a round's clients laid out as ``[C, S, B]`` with masks.

``C`` (client slots) comes from ``clients_per_round`` rounded up to the chunk size and ``B`` (batch
size) is fixed for the run. ``S`` (local steps) follows the clients actually sampled in the round,
rounded up on a geometric ladder anchored at the population's largest client (``S_max``,
``ceil(S_max / ladder)``, ``ceil(S_max / ladder^2)``, ...), so a run compiles a bounded number of
padded programs while a round of small clients does not pay for the population's largest
(DESIGN.md "Data for vmap"). Padding is a no-op by construction: padded examples have mask 0,
fully padded steps are skipped with ``jnp.where`` by the local loop, padded client slots have
weight 0. Backends that can pack clients back to back (``fedjax_lab.data.packing``) start from
this layout too.

Caps that cross-device training uses (TFF's ``max_elements``, FedJAX's ``num_steps``) are applied
here, before any shape is chosen: ``max_examples_per_client`` trains a client on a random subset
of that many of its examples each round, ``max_local_steps`` stops it after that many steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.types import Cohort
from fedjax_lab.data.federated import FederatedData


def _optional_positive_int(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer or None (no cap), got {value!r}"
        )
    return int(value)


class CohortBuilder:
    """Builds the :class:`Cohort` of each round from a host-side population.

    Args:
      data: the population.
      batch_size: local minibatch size ``B`` (>= 1).
      local_epochs: passes over each client's data per round; each epoch is a fresh
        permutation (per-client reshuffling) cut into ``ceil(n / B)`` batches, the last one
        partial (masked), as a PyTorch DataLoader with ``drop_last=False``.
      num_steps: alternatively, a fixed number of local steps ``tau`` (FedPAQ): batches of
        ``min(B, n)`` examples drawn from consecutive fresh permutations. Exclusive with
        ``local_epochs``.
      cohort_size: number of client slots ``C`` (>= clients sampled per round).
      seed: run seed; client ``i`` in round ``r`` is shuffled with
        ``host_rng(seed, SHUFFLE, r, i)``
        so any rank or a resumed run rebuilds exactly the same cohort.
      device_table: keep all examples on the device once and send only ``[C, S, B]`` indices each
        round (fast, needs the dataset to fit in device memory); otherwise the examples of each
        round are gathered on the host and transferred (the only option for a population that
        reads its examples on demand, ``data.is_lazy``: then only the round's rows are read).
      ladder: ratio of the geometric ladder of per-round step counts (> 1); ``None`` gives every
        round the population's largest ``S`` (one padded shape per run).
      max_examples_per_client: train each client on at most this many examples per round: a
        random subset, drawn afresh each round from the client's shuffle stream (TFF's
        ``max_elements``); its weight is then the subset size.
      max_local_steps: stop each client after this many local steps. In ``local_epochs`` mode a
        client stopped before the end of its first epoch weighs the examples it visited.

    Attributes:
      steps: the population's largest ``S`` (the top of the ladder).
      batch: ``B`` of every round.
    """

    def __init__(
        self,
        data: FederatedData,
        *,
        batch_size: int,
        local_epochs: int | None = 1,
        num_steps: int | None = None,
        cohort_size: int,
        seed: int,
        device_table: bool = True,
        ladder: float | None = 2.0,
        max_examples_per_client: int | None = None,
        max_local_steps: int | None = None,
    ) -> None:
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if (local_epochs is None) == (num_steps is None):
            raise ValueError("give exactly one of local_epochs or num_steps")
        if local_epochs is not None and local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if cohort_size < 1:
            raise ValueError(f"cohort_size must be >= 1, got {cohort_size}")
        if ladder is not None and (
            isinstance(ladder, bool) or not isinstance(ladder, int | float)
            or not 1.0 < ladder < math.inf
        ):
            raise ValueError(
                f"ladder must be a finite ratio > 1 (e.g. 2.0), or None for the population's "
                f"largest step count every round; got {ladder!r}"
            )
        self.data = data
        self.batch_size = int(batch_size)
        self.local_epochs = local_epochs
        self.num_steps = num_steps
        self.cohort_size = int(cohort_size)
        self.seed = int(seed)
        self.ladder = None if ladder is None else float(ladder)
        self.max_examples = _optional_positive_int(
            max_examples_per_client, "max_examples_per_client"
        )
        self.max_local_steps = _optional_positive_int(max_local_steps, "max_local_steps")
        self._used = data.sizes if self.max_examples is None else np.minimum(
            data.sizes, self.max_examples
        )
        self.batch = min(self.batch_size, int(self._used.max()))
        self._client_steps = self._steps_of(self._used)
        self.steps = int(self._client_steps.max())
        if device_table and data.is_lazy:
            raise ValueError(
                "device_table=True puts every example on the device, but this population reads "
                "its examples on demand (a RowSource); use device_table=False so that each "
                "round reads only its clients' rows"
            )
        self.device_table = device_table
        self._table = (
            {k: jnp.asarray(v) for k, v in data.arrays.items()} if device_table else None
        )

    def _steps_of(self, used: np.ndarray) -> np.ndarray:
        """Local steps of clients that use ``used`` examples (caps applied)."""
        if self.num_steps is not None:
            steps = np.full(len(used), self.num_steps, np.int64)
        else:
            steps = self.local_epochs * -(-np.asarray(used, np.int64) // self.batch_size)
        if self.max_local_steps is not None:
            steps = np.minimum(steps, self.max_local_steps)
        return steps

    def client_steps(self, clients: Sequence[int]) -> np.ndarray:
        """Real local steps of the given clients (after the caps)."""
        return self._client_steps[np.asarray(clients, np.int64)]

    def round_steps(self, clients: Sequence[int]) -> int:
        """``S`` of a round with these clients: the smallest ladder rung that holds them."""
        need = int(self.client_steps(clients).max(initial=1))
        if self.ladder is None:
            return self.steps
        rung = self.steps
        while rung > 1 and math.ceil(rung / self.ladder) >= need:
            rung = math.ceil(rung / self.ladder)
        return rung

    def cap_stats(self, clients: Sequence[int]) -> dict[str, float]:
        """``capped_clients`` (clients the caps changed) and ``capped_steps`` (steps they cut)."""
        clients = np.asarray(clients, np.int64)
        full = self._uncapped_steps(self.data.sizes[clients])
        cut = full - self.client_steps(clients)
        return {"capped_clients": float(np.count_nonzero(cut)), "capped_steps": float(cut.sum())}

    def _uncapped_steps(self, sizes: np.ndarray) -> np.ndarray:
        if self.num_steps is not None:
            return np.full(len(sizes), self.num_steps, np.int64)
        return self.local_epochs * -(-np.asarray(sizes, np.int64) // self.batch_size)

    @property
    def table(self) -> dict[str, jax.Array] | None:
        """The device-resident example table (or None when examples travel per round)."""
        return self._table

    def client_index(self, client: int, round_idx: int, steps: int | None = None) -> np.ndarray:
        """``[S, B]`` global example indices of one client for one round, -1 for padding.

        ``S`` is ``steps`` (default: the population's largest, :attr:`steps`); it must hold the
        client's real steps.
        """
        lo, hi = int(self.data.offsets[client]), int(self.data.offsets[client + 1])
        n = hi - lo
        own = int(self._client_steps[client])
        steps = self.steps if steps is None else int(steps)
        if steps < own:
            raise ValueError(f"client {client} takes {own} local steps; {steps} cannot hold them")
        rng = rng_lib.host_rng(self.seed, rng_lib.SHUFFLE_STREAM, round_idx, client)
        out = np.full((steps, self.batch), -1, dtype=np.int64)
        rows = np.arange(n)
        if self.max_examples is not None and n > self.max_examples:
            rows = rng.permutation(n)[: self.max_examples]
            n = self.max_examples
        if self.num_steps is not None:
            b = min(self.batch, n)
            need = self.num_steps * b
            stream = np.concatenate(
                [rows[rng.permutation(n)] for _ in range(math.ceil(need / n))]
            )[:need]
            out[:own, :b] = stream.reshape(self.num_steps, b)[:own] + lo
            return out
        per_epoch = math.ceil(n / self.batch)
        layout = np.full((self.local_epochs * per_epoch, self.batch), -1, dtype=np.int64)
        for epoch in range(self.local_epochs):
            padded = np.full(per_epoch * self.batch, -1, dtype=np.int64)
            padded[:n] = rows[rng.permutation(n)] + lo
            layout[epoch * per_epoch : (epoch + 1) * per_epoch] = padded.reshape(
                per_epoch, self.batch
            )
        out[:own] = layout[:own]
        return out

    def client_weight(self, client: int, index: np.ndarray) -> float:
        """The aggregation weight of a client laid out as ``index``: its examples this round.

        Fixed-step clients weigh their (capped) dataset size; epoch clients the examples of one
        pass, or, when ``max_local_steps`` stops them earlier, the examples they visited.
        """
        used = float(self._used[client])
        if self.num_steps is not None or self.max_local_steps is None:
            return used
        one_pass = -(-int(self._used[client]) // self.batch_size)
        if int(self._client_steps[client]) >= one_pass:
            return used
        return float(len(np.unique(index[index >= 0])))

    def build(self, round_idx: int, clients: Sequence[int]) -> Cohort:
        """The cohort of ``round_idx`` for the given client indices (padded to ``cohort_size``).

        Index, mask, weight and client ids are host (numpy) arrays; ``arrays`` is the device
        table (with ``device_table``) or the round's examples gathered on the host.
        """
        clients = np.asarray(clients, dtype=np.int64)
        if clients.ndim != 1:
            raise ValueError(f"clients must be a 1-D array of client indices, got {clients.shape}")
        if len(clients) > self.cohort_size:
            raise ValueError(
                f"{len(clients)} clients do not fit in cohort_size={self.cohort_size}"
            )
        if len(clients) and (clients.min() < 0 or clients.max() >= self.data.num_clients):
            raise ValueError(
                f"client indices must lie in [0, {self.data.num_clients}), got {clients}"
            )
        c = self.cohort_size
        steps = self.round_steps(clients)
        index = np.full((c, steps, self.batch), -1, dtype=np.int64)
        weight = np.zeros(c, np.float32)
        for slot, client in enumerate(clients):
            index[slot] = self.client_index(int(client), round_idx, steps)
            weight[slot] = self.client_weight(int(client), index[slot])
        mask = (index >= 0).astype(np.float32)
        ids = np.full(c, -1, dtype=np.int32)
        ids[: len(clients)] = clients
        if self.device_table:
            return Cohort(
                arrays=self._table,
                index=np.where(index >= 0, index, 0).astype(np.int32),
                mask=mask,
                weight=weight,
                client_ids=ids,
            )
        # Only the real examples are read (a lazy population reads just these rows); padding
        # positions hold zeros, masked out like any padding.
        valid = index >= 0
        real = self.data.take(index[valid])
        arrays = {}
        for name, (shape, dtype) in self.data.feature_spec().items():
            arrays[name] = np.zeros((*index.shape, *shape), dtype)
            arrays[name][valid] = real[name]
        return Cohort(arrays=arrays, index=None, mask=mask, weight=weight, client_ids=ids)


def padded_cohort_size(clients_per_round: int, chunk_size: int | None, multiple: int = 1) -> int:
    """Client slots needed so that the cohort splits evenly into chunks and devices/ranks."""
    unit = math.lcm(chunk_size or 1, multiple)
    return math.ceil(clients_per_round / unit) * unit
