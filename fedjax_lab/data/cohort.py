"""Fixed-shape cohorts: a round's clients laid out as ``[C, S, B]`` with masks.

The compiled round never changes shape, so a run compiles once (DESIGN.md "Data for vmap"):
``S`` (local steps) and ``B`` (batch size) are fixed for the whole run from the LARGEST client of
the population, and ``C`` (client slots) from ``clients_per_round`` rounded up to the chunk size.
Padding is a no-op by construction: padded examples have mask 0, fully padded steps are skipped
with ``jnp.where`` by the local loop, padded client slots have weight 0.
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


class CohortBuilder:
    """Builds the fixed-shape :class:`Cohort` of each round from a host-side population.

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
        self.data = data
        self.batch_size = int(batch_size)
        self.local_epochs = local_epochs
        self.num_steps = num_steps
        self.cohort_size = int(cohort_size)
        self.seed = int(seed)
        max_n = int(data.sizes.max())
        if num_steps is not None:
            self.steps = int(num_steps)
            self.batch = min(self.batch_size, max_n)
        else:
            self.steps = int(local_epochs) * math.ceil(max_n / self.batch_size)
            self.batch = min(self.batch_size, max_n)
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

    @property
    def table(self) -> dict[str, jax.Array] | None:
        """The device-resident example table (or None when examples travel per round)."""
        return self._table

    def client_index(self, client: int, round_idx: int) -> np.ndarray:
        """``[S, B]`` global example indices of one client for one round, -1 for padding."""
        lo, hi = int(self.data.offsets[client]), int(self.data.offsets[client + 1])
        n = hi - lo
        rng = rng_lib.host_rng(self.seed, rng_lib.SHUFFLE_STREAM, round_idx, client)
        out = np.full((self.steps, self.batch), -1, dtype=np.int64)
        if self.num_steps is not None:
            b = min(self.batch, n)
            need = self.steps * b
            stream = np.concatenate(
                [rng.permutation(n) for _ in range(math.ceil(need / n))]
            )[:need]
            out[:, :b] = stream.reshape(self.steps, b) + lo
            return out
        per_epoch = math.ceil(n / self.batch)
        step = 0
        for _ in range(self.local_epochs):
            perm = rng.permutation(n) + lo
            padded = np.full(per_epoch * self.batch, -1, dtype=np.int64)
            padded[:n] = perm
            out[step : step + per_epoch] = padded.reshape(per_epoch, self.batch)
            step += per_epoch
        return out

    def build(self, round_idx: int, clients: Sequence[int]) -> Cohort:
        """The cohort of ``round_idx`` for the given client indices (padded to ``cohort_size``)."""
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
        index = np.full((c, self.steps, self.batch), -1, dtype=np.int64)
        for slot, client in enumerate(clients):
            index[slot] = self.client_index(int(client), round_idx)
        mask = (index >= 0).astype(np.float32)
        weight = mask.sum(axis=(1, 2)) / (
            self.local_epochs if self.local_epochs is not None else 1
        )
        if self.num_steps is not None:
            # Fixed-step clients weigh by dataset size, not by examples visited.
            weight = np.zeros(c, np.float32)
            weight[: len(clients)] = self.data.sizes[clients]
        ids = np.full(c, -1, dtype=np.int32)
        ids[: len(clients)] = clients
        safe = np.where(index >= 0, index, 0)
        if self.device_table:
            return Cohort(
                arrays=self._table,
                index=jnp.asarray(safe, dtype=jnp.int32),
                mask=jnp.asarray(mask),
                weight=jnp.asarray(weight, dtype=jnp.float32),
                client_ids=jnp.asarray(ids),
            )
        # Only the real examples are read (a lazy population reads just these rows); padding
        # positions hold zeros, masked out like any padding.
        valid = index >= 0
        real = self.data.take(index[valid])
        arrays = {}
        for name, (shape, dtype) in self.data.feature_spec().items():
            arrays[name] = np.zeros((*index.shape, *shape), dtype)
            arrays[name][valid] = real[name]
        return Cohort(
            arrays=arrays,
            index=None,
            mask=mask,
            weight=weight.astype(np.float32),
            client_ids=ids,
        )


def padded_cohort_size(clients_per_round: int, chunk_size: int | None, multiple: int = 1) -> int:
    """Client slots needed so that the cohort splits evenly into chunks and devices/ranks."""
    unit = math.lcm(chunk_size or 1, multiple)
    return math.ceil(clients_per_round / unit) * unit
