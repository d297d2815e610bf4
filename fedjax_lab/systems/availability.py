"""Per-round client availability: Bernoulli dropouts and stragglers.

Systems heterogeneity as in Li et al. (2020), "Federated Optimization in Heterogeneous
Networks" (FedProx), §5.2: in each round a fraction of the sampled devices are *stragglers* that
can only complete a random amount of local work. FedAvg drops them; FedProx aggregates their
partial work. Bernoulli dropout models devices that vanish after being sampled (Bonawitz et al.
2019, "Towards Federated Learning at Scale: System Design").

Everything happens on the host, on the round's fixed-shape ``Cohort``: a dropped client gets
weight 0 and an all-zero mask (it sends nothing and its client state is left unchanged by the
algorithms); a straggler keeps only its first ``L`` real local steps (the later steps are
masked, which the local loop treats as exact no-ops). The compiled round never changes shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.types import Cohort

StragglerPolicy = Literal["partial", "drop"]
StragglerSampling = Literal["bernoulli", "exact"]
# Sub-stream of SYSTEM_STREAM, so availability and the time model never share draws.
AVAILABILITY_SUBSTREAM = 0


def _check_probability(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


@dataclass(frozen=True)
class Availability:
    """Which sampled clients report back in a round, and how much work they did.

    Each real client slot of a round independently:

    1. drops out with probability ``dropout``: it sends nothing (weight 0, mask 0);
    2. otherwise is a straggler with probability ``straggler_fraction``, if it has at least two
       real local steps ``tau_i``: it completes only ``L ~ Uniform{1, ..., tau_i - 1}`` steps
       (the steps counted in order of the cohort layout). ``straggler_policy="partial"``
       (FedProx) keeps those ``L`` steps; ``"drop"`` (FedAvg in FedProx §5.2) discards the
       straggler like a dropout. A client with a single step cannot do less work and is never
       a straggler.

    Two options reproduce the released FedProx code (``flearn/trainers/fedprox.py``), which
    the paper's Figure 1 was produced with:

    * ``straggler_sampling="exact"``: instead of an independent coin per client, exactly
      ``m - round(m * (1 - straggler_fraction))`` of the ``m`` eligible (non-dropped, >= 2
      steps) clients straggle, the ones with the smallest straggle draws (the code keeps
      ``round(K * (1 - drop_percent))`` active devices of the ``K`` sampled ones);
    * ``straggler_epochs=E``: a straggler completes ``e ~ Uniform{1, ..., E - 1}`` whole local
      epochs of its ``E`` (the code's ``np.random.randint(1, E)``; the paper's text says
      "uniformly at random between 1 and E"), i.e. ``e * tau_i / E`` steps, instead of a
      uniform number of steps. ``tau_i`` must be a multiple of ``E`` (it is in
      ``local_epochs=E`` mode, where every epoch has ``ceil(n_i / B)`` steps). With ``E = 1``
      nobody can do less than a full epoch and nobody straggles.

    Draws come from ``host_rng(seed, SYSTEM_STREAM, round, AVAILABILITY_SUBSTREAM)``; three
    uniform vectors of the cohort's length are drawn every round whatever the outcome, so a
    round's availability depends only on ``(seed, round)``.

    Attributes:
      dropout: per-client dropout probability in ``[0, 1]``.
      straggler_fraction: probability in ``[0, 1]`` that a non-dropped client straggles
        (FedProx's "x% stragglers").
      straggler_policy: ``"partial"`` or ``"drop"``.
      straggler_sampling: ``"bernoulli"`` (a coin per client) or ``"exact"`` (a fixed count).
      straggler_epochs: ``None`` (a straggler's work is a uniform number of steps) or the
        number ``E`` of local epochs (its work is a uniform number of whole epochs < E).
    """

    dropout: float = 0.0
    straggler_fraction: float = 0.0
    straggler_policy: StragglerPolicy = "partial"
    straggler_sampling: StragglerSampling = "bernoulli"
    straggler_epochs: int | None = None

    def __post_init__(self) -> None:
        _check_probability(self.dropout, "dropout")
        _check_probability(self.straggler_fraction, "straggler_fraction")
        if self.straggler_policy not in ("partial", "drop"):
            raise ValueError(
                f"straggler_policy must be 'partial' (keep partial work, FedProx) or 'drop' "
                f"(discard stragglers, FedAvg), got {self.straggler_policy!r}"
            )
        if self.straggler_sampling not in ("bernoulli", "exact"):
            raise ValueError(
                f"straggler_sampling must be 'bernoulli' (a coin per client) or 'exact' (a "
                f"fixed count, as FedProx's code), got {self.straggler_sampling!r}"
            )
        epochs = self.straggler_epochs
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int | np.integer) or epochs < 1
        ):
            raise ValueError(f"straggler_epochs must be None or an integer >= 1, got {epochs!r}")

    def draw(
        self, step_counts: np.ndarray, real: np.ndarray, *, seed: int, round_idx: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dropped flags, step limits and straggler flags of one round.

        Args:
          step_counts: ``[C]`` number of real local steps ``tau_i`` of each slot.
          real: ``[C]`` bool, whether the slot holds a sampled client (not padding).
          seed: run seed.
          round_idx: round index.

        Returns:
          ``(dropped [C] bool, limit [C] int64, straggler [C] bool)``: ``limit[i]`` is the
          number of real steps slot ``i`` completes (``tau_i`` for a punctual client,
          < ``tau_i`` for a straggler, 0 for dropped or padded slots).
        """
        step_counts = np.asarray(step_counts, np.int64)
        real = np.asarray(real, bool)
        rng = rng_lib.host_rng(seed, rng_lib.SYSTEM_STREAM, round_idx, AVAILABILITY_SUBSTREAM)
        c = len(step_counts)
        u_drop, u_straggle, u_steps = rng.random(c), rng.random(c), rng.random(c)
        dropped = real & (u_drop < self.dropout)
        epochs = self.straggler_epochs
        if epochs is None:
            eligible = real & ~dropped & (step_counts >= 2)
            # Uniform on {1, ..., tau - 1}; min() guards the u -> 1 rounding edge.
            partial = np.minimum(1 + np.floor(u_steps * (step_counts - 1)), step_counts - 1)
        else:
            eligible = real & ~dropped & (step_counts >= 1) & (epochs >= 2)
            if np.any(step_counts[eligible] % epochs):
                raise ValueError(
                    f"straggler_epochs={epochs} needs every client's local steps to be a "
                    f"multiple of it (local_epochs={epochs} without a step cap), got "
                    f"{step_counts[eligible].tolist()}"
                )
            # Whole epochs, uniform on {1, ..., E - 1} (FedProx's np.random.randint(1, E)).
            done = np.minimum(1 + np.floor(u_steps * (epochs - 1)), max(epochs - 1, 1))
            partial = done * (step_counts // epochs)
        if self.straggler_sampling == "bernoulli":
            straggler = eligible & (u_straggle < self.straggler_fraction)
        else:
            m = int(eligible.sum())
            # Python's round(), as the released code: round(K * (1 - drop_percent)) finish.
            count = m - round(m * (1.0 - self.straggler_fraction))
            order = np.argsort(np.where(eligible, u_straggle, np.inf), kind="stable")
            straggler = np.zeros(c, bool)
            straggler[order[:count]] = True
        limit = np.where(straggler, partial, step_counts).astype(np.int64)
        if self.straggler_policy == "drop":
            dropped = dropped | straggler
        limit = np.where(dropped | ~real, 0, limit)
        return dropped, limit, straggler

    def apply(
        self, cohort: Cohort, *, seed: int, round_idx: int
    ) -> tuple[Cohort, dict[str, float]]:
        """The cohort as it reports back in round ``round_idx``, and system metrics.

        Returns:
          ``(cohort, {"dropped": ..., "stragglers": ...})``: ``dropped`` counts the sampled
          clients that sent nothing (dropouts, plus stragglers under ``"drop"``),
          ``stragglers`` the clients that could not finish their local work.
        """
        mask = np.asarray(jax.device_get(cohort.mask), np.float32)
        real = np.asarray(jax.device_get(cohort.client_ids)) >= 0
        active = mask.sum(axis=2) > 0  # [C, S] steps with at least one real example
        dropped, limit, straggler = self.draw(
            active.sum(axis=1), real, seed=seed, round_idx=round_idx
        )
        keep = active & (np.cumsum(active, axis=1) <= limit[:, None])
        new_mask = mask * keep[:, :, None]
        weight = np.asarray(jax.device_get(cohort.weight), np.float32)
        new_weight = np.where(dropped, 0.0, weight).astype(np.float32)
        on_device = not isinstance(cohort.mask, np.ndarray)
        cohort = cohort._replace(
            mask=jnp.asarray(new_mask) if on_device else new_mask,
            weight=jnp.asarray(new_weight) if on_device else new_weight,
        )
        return cohort, {
            "dropped": float(dropped.sum()),
            "stragglers": float(straggler.sum()),
        }

