"""FoolsGold (Fung, Yoon, Beschastnikh 2020, "The Limitations of Federated Learning in Sybil
Settings", RAID, Algorithm 1).

Sybils pursuing one poisoning goal send similar updates round after round; FoolsGold keeps each
client's history ``H_i = sum_t Delta_{i,t}`` of the updates it sent, and each round, over the
round's valid clients:

1. ``cs_ij``: cosine similarity of ``H_i`` and ``H_j`` (``i != j``);
   ``v_i = max(0, max_j cs_ij)`` (the authors' code keeps a zero diagonal in the maximum);
2. pardoning: ``cs_ij *= v_i / v_j`` when ``v_j > v_i`` (honest clients that resemble a sybil
   are not punished as one);
3. ``alpha_i = 1 - max_j cs_ij`` clipped to ``[0, 1]``, divided by its maximum, ``1`` set to
   ``0.99``, then the logit ``alpha_i = kappa (ln(alpha_i / (1 - alpha_i)) + 0.5)`` clipped to
   ``[0, 1]`` (``kappa``: the confidence; ``alpha_i = 0`` stays 0);
4. the update is the ``alpha``-weighted mean ``sum_i alpha_i Delta_i / sum_i alpha_i`` of the
   round's updates (the paper's Algorithm 1 applies ``sum_i alpha_i Delta_i`` as learning-rate
   scales; FedML's FoolsGold multiplies the FedAvg weights by ``alpha_i`` and normalises, as
   here, but without the example counts, which a Byzantine client could inflate). A round where
   every ``alpha_i`` is 0 leaves the model unchanged and is counted (``foolsgold_all_zero``).

The similarity is unweighted (the paper's optional weighting of indicative output-layer
features is not implemented). A client whose ``alpha`` is 0 counts as excluded for the
detection metrics of :mod:`fedjax_lab.algorithms.robust.detection`.

Where the history lives: the simulation keeps ``H_i`` in the client-state store, the runner's
per-client table gathered and scattered by client id (as SCAFFOLD's control variates).
``aggregate`` sees the round's slots, not client ids, and only client state follows a client
across rounds. The wrapper, not the client's training code, adds the update the client sends
(``u_i``, decoded by the algorithm's own aggregate) to ``H_i`` after its ``finish``, so the
history is exactly the sum of what the server received from that client. Apply
``with_foolsgold`` outermost, after per-client model poisoning
(:func:`fedjax_lab.attacks.with_model_poisoning` with ``scale``/``noise``/``sign_flip``) and
:func:`fedjax_lab.attacks.with_malicious_flag`; omniscient attacks replace uploads inside
``aggregate``, after the history is formed, and are refused (non-additive algorithms are).
Backends: as the other robust rules, ``vmap`` without chunking.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_lab.algorithms.robust import detection
from fedjax_lab.algorithms.robust._base import client_contributions, ravel_clients
from fedjax_lab.attacks.model_poisoning import MALICIOUS_METRIC
from fedjax_lab.core.local import LocalUpdate, is_local_update
from fedjax_lab.core.types import Aggregate, Algorithm, ClientOutput

#: Round metrics: rounds in which every valid client got weight 0, and the mean weight.
ALL_ZERO = "foolsgold_all_zero"
MEAN_WEIGHT = "foolsgold_mean_weight"


def foolsgold_weights(histories: jax.Array, valid: jax.Array, kappa: float) -> jax.Array:
    """``[C]`` FoolsGold weights ``alpha`` of the valid rows of ``histories`` ``[C, D]``.

    As the authors' released code, a client's own entry of the similarity matrix is 0 (cosine
    similarity minus the identity) and counts in the maxima, so ``v_i = max(0, max_j cs_ij)``.
    Invalid rows get 0 and are no one's neighbour; a zero history has similarity 0.
    """
    c = histories.shape[0]
    norms = jnp.linalg.norm(histories, axis=1)
    unit = histories / jnp.where(norms > 0, norms, 1.0)[:, None]
    others = valid[:, None] & valid[None, :] & ~jnp.eye(c, dtype=bool)
    cs = jnp.where(others, unit @ unit.T, 0.0)
    v = jnp.max(cs, axis=1)  # >= 0: the own (zero) entry counts
    # Pardoning: cs_ij *= v_i / v_j when v_j > v_i (then v_j > 0).
    pardon = (v[None, :] > v[:, None]) & others
    cs = jnp.where(pardon, cs * v[:, None] / jnp.where(pardon, v[None, :], 1.0), cs)
    alpha = jnp.where(valid, jnp.clip(1.0 - jnp.max(cs, axis=1), 0.0, 1.0), 0.0)
    biggest = jnp.max(alpha)
    alpha = alpha / jnp.where(biggest > 0, biggest, 1.0)
    alpha = jnp.where(alpha == 1.0, 0.99, alpha)
    # Logit with confidence kappa; alpha = 0 gives -inf, clipped to 0 like every negative.
    logit = kappa * (jnp.log(alpha) - jnp.log1p(-alpha) + 0.5)
    return jnp.where(valid, jnp.clip(logit, 0.0, 1.0), 0.0)


def _check_kappa(kappa) -> float:
    if isinstance(kappa, bool) or not isinstance(kappa, int | float) or not (
            0.0 < kappa < float("inf")):
        raise ValueError(f"foolsgold: kappa (confidence) must be a finite number > 0, got "
                         f"{kappa!r}")
    return float(kappa)


def with_foolsgold(algorithm: Algorithm, kappa: float = 1.0) -> Algorithm:
    """``algorithm`` aggregated by FoolsGold over its clients' update histories.

    Args:
      algorithm: an additive ``Algorithm`` whose aggregate is ``sum_i weight_i * u_i`` (plain,
        after per-client model poisoning, or flagged by ``with_malicious_flag``).
      kappa: the confidence ``kappa > 0`` of the logit (the paper's default 1).

    Returns:
      A non-additive ``Algorithm`` named ``<name>+foolsgold``; its client state is
      ``(inner client state, H_i)`` with ``H_i`` the flat float32 history. Round metrics add
      ``foolsgold_mean_weight`` (mean ``alpha`` over valid clients), ``foolsgold_all_zero``
      and the exclusion/detection metrics.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm)}")
    kappa = _check_kappa(kappa)
    if not algorithm.additive:
        raise ValueError(
            f"{algorithm.name} has a non-additive aggregate (a robust rule or an omniscient "
            "attack); FoolsGold is the aggregation rule and forms each client's history from "
            "its upload before aggregate: apply with_foolsgold to the plain algorithm")
    inner_update = algorithm.client_update

    def contribution(output: ClientOutput) -> jax.Array:
        """The flat update the server decodes from this client's message (weight 1)."""
        single = jax.tree.map(lambda x: x[None], output)._replace(weight=jnp.ones((1,)))
        return ravel_pytree(algorithm.aggregate(single).update_sum)[0].astype(jnp.float32)

    def record(output: ClientOutput, state, history):
        u = contribution(output)
        # Only what the server accepts enters the history (rejected/padded: weight 0).
        history = jnp.where(output.weight > 0, history + u, history)
        return output._replace(extra=(output.extra, history)), (state, history)

    if is_local_update(inner_update):
        def finish(server_state, client_state, carry, weight, *, key):
            inner_state, history = client_state
            out, state = inner_update.finish(server_state, inner_state, carry, weight, key=key)
            return record(out, state, history)

        if inner_update.keyed:
            def context(server_state, client_state, key):
                return inner_update.context(server_state, client_state[0], key)
        else:
            def context(server_state, client_state):
                return inner_update.context(server_state, client_state[0])

        client_update = LocalUpdate(inner_update.start, inner_update.step, finish, context,
                                    inner_update.keyed)
    else:
        def client_update(server_state, client_state, batches, *, key):
            inner_state, history = client_state
            out, state = inner_update(server_state, inner_state, batches, key=key)
            return record(out, state, history)

    def client_init(params):
        size = ravel_pytree(params)[0].shape[0]
        return algorithm.client_init(params), jnp.zeros((size,), jnp.float32)

    def aggregate(outputs: ClientOutput) -> Aggregate:
        inner_extra, histories = outputs.extra
        plain = outputs._replace(extra=inner_extra)
        base = algorithm.aggregate(plain)
        flat, unravel = ravel_clients(client_contributions(algorithm, plain))
        valid = outputs.weight > 0
        alpha = foolsgold_weights(histories, valid, kappa).astype(flat.dtype)
        total = jnp.sum(alpha)
        estimate = jnp.sum(jnp.where(valid[:, None], alpha[:, None] * flat, 0.0), axis=0)
        estimate = jnp.where(total > 0, estimate / jnp.where(total > 0, total, 1.0), 0.0)
        count = jnp.sum(valid.astype(jnp.float32))
        metrics = {
            ALL_ZERO: jnp.logical_and(count > 0, total == 0).astype(jnp.float32),
            MEAN_WEIGHT: jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan),
            **detection.exclusion_sums(alpha > 0, valid, plain.metrics.get(MALICIOUS_METRIC)),
        }
        update_sum = unravel(estimate * base.weight_sum.astype(estimate.dtype))
        return base._replace(update_sum=update_sum, metric_sums={**base.metric_sums, **metrics})

    def server_update(state, agg: Aggregate):
        new_state, metrics = algorithm.server_update(state, agg)
        return new_state, {**metrics, ALL_ZERO: agg.metric_sums[ALL_ZERO],
                           MEAN_WEIGHT: agg.metric_sums[MEAN_WEIGHT],
                           **detection.detection_metrics(agg.metric_sums)}

    return algorithm._replace(
        client_init=client_init, client_update=client_update, aggregate=aggregate,
        server_update=server_update, name=f"{algorithm.name}+foolsgold", additive=False)
