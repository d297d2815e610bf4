"""Which client slots a selecting rule excluded, scored against the simulation's malicious mask.

Selecting rules (Krum / Multi-Krum, Blanchard et al. 2017; Bulyan's Krum stage, El Mhamdi et al.
2018) keep some valid slots and drop the others. An :class:`~fedjax_lab.algorithms.robust.
Aggregator` declares ``selects=True`` and returns the kept slots as the ``[C]`` bool metric
:data:`SELECTED`; :func:`~fedjax_lab.algorithms.robust.with_aggregator` turns it into
additive counts (sums over slots, so they survive jit like every client metric):

* ``excluded_clients``: valid slots the rule dropped; and ``excluded_slot_<i>`` (0/1) for each
  slot ``i`` of the round's cohort (slot ``i`` is the ``i``-th sampled client);
* when the round's client metrics carry the simulation's malicious flag (the ``0/1`` counter
  ``attack_malicious`` of :func:`fedjax_lab.attacks.with_model_poisoning` or
  :func:`fedjax_lab.attacks.with_malicious_flag`): ``excluded_malicious`` (malicious slots
  dropped: true positives) and ``malicious_valid`` (malicious valid slots), and the round's
  ``detection_precision = excluded_malicious / excluded_clients`` and
  ``detection_recall = excluded_malicious / malicious_valid``: NaN when the denominator is 0
  (nothing excluded / no malicious client in the round), never 0.

The defense never sees the mask: only ``with_aggregator``, after the rule has run, reads it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Metric key of a selecting rule: ``[C]`` bool, the slots whose updates the estimate used.
SELECTED = "selected"
#: Round metrics of a selecting rule (``excluded_slot_<i>`` come on top, one per slot).
EXCLUDED_CLIENTS = "excluded_clients"
EXCLUDED_MALICIOUS = "excluded_malicious"
MALICIOUS_VALID = "malicious_valid"
DETECTION_PRECISION = "detection_precision"
DETECTION_RECALL = "detection_recall"
#: ``[C]`` 0/1 vector in the aggregate's metric sums; the server step splits it per slot.
EXCLUDED_SLOTS = "excluded_slots"


def slot_metric(slot: int) -> str:
    """The round metric of one cohort slot: ``excluded_slot_<slot>`` (1.0 if excluded)."""
    return f"excluded_slot_{slot}"


def exclusion_sums(selected: jax.Array, valid: jax.Array,
                   malicious: jax.Array | None) -> dict[str, jax.Array]:
    """Additive exclusion counts of one round (float32).

    Args:
      selected: ``[C]`` bool, slots the rule kept.
      valid: ``[C]`` bool, slots with weight > 0 (padded and rejected slots are neither kept
        nor excluded).
      malicious: ``[C]`` 0/1 flags of the simulation, or None when the run has no attack.

    Returns:
      ``excluded_clients``, ``excluded_slots`` ([C]) and, with ``malicious``,
      ``excluded_malicious`` and ``malicious_valid``.
    """
    excluded = jnp.logical_and(valid, ~selected)
    out = {EXCLUDED_CLIENTS: jnp.sum(excluded.astype(jnp.float32)),
           EXCLUDED_SLOTS: excluded.astype(jnp.float32)}
    if malicious is not None:
        bad = jnp.logical_and(malicious > 0, valid)
        out[EXCLUDED_MALICIOUS] = jnp.sum(jnp.logical_and(excluded, bad).astype(jnp.float32))
        out[MALICIOUS_VALID] = jnp.sum(bad.astype(jnp.float32))
    return out


def detection_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Round metrics from :func:`exclusion_sums` (or their sum over shards).

    Per-slot ``excluded_slot_<i>``, the counts, and, when the malicious counts are present,
    precision and recall of detection (NaN when undefined).
    """
    excluded = sums[EXCLUDED_CLIENTS]
    out = {EXCLUDED_CLIENTS: excluded}
    slots = sums[EXCLUDED_SLOTS]
    out.update({slot_metric(i): slots[i] for i in range(slots.shape[0])})
    if EXCLUDED_MALICIOUS in sums:
        hits, bad = sums[EXCLUDED_MALICIOUS], sums[MALICIOUS_VALID]
        nan = jnp.float32(jnp.nan)
        out[EXCLUDED_MALICIOUS] = hits
        out[MALICIOUS_VALID] = bad
        out[DETECTION_PRECISION] = jnp.where(excluded > 0, hits / jnp.maximum(excluded, 1.0),
                                             nan)
        out[DETECTION_RECALL] = jnp.where(bad > 0, hits / jnp.maximum(bad, 1.0), nan)
    return out
