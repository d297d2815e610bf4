"""``with_model_poisoning``: malicious clients' uploads replaced inside the jitted round.

A :class:`ModelAttack` changes what the malicious clients of a round upload, either

* client by client (``per_client``, not omniscient: scaling, Gaussian noise, sign flipping),
  applied in the client's ``finish`` (:meth:`fedjax_lab.core.local.LocalUpdate.with_finish`),
  so the algorithm stays additive and packable; or
* from the whole round (``omniscient``: ALIE, IPM), applied in ``aggregate`` before the
  algorithm's own (possibly robust) aggregation: the attacker sees every honest update of the
  round, the strongest threat model of Baruch et al. (2019) and Xie et al. (2020). Such an
  algorithm is not additive (it needs every client's update in one place).

Which slots are malicious is data: the client's examples carry the :data:`MALICIOUS_KEY`
column of :func:`fedjax_lab.attacks.mark_malicious`; the wrapped local steps carry
``flag = max(flag, max(malicious * mask))`` next to the algorithm's own carry (padding steps
leave it unchanged), and ``finish`` puts it in the client's metrics under
:data:`MALICIOUS_METRIC` (a 0/1 counter: its round sum is reported as ``malicious_clients``).
The column is removed before the algorithm's steps see the examples.

Uploads must be raw model deltas: no compressor, or the ``identity`` compressor (whose payload
is the flat float32 delta); an attacker that compresses its poisoned update would be another
attack. Every attack here is coordinate-wise or linear, so it acts on the flat vector the same
way as on the parameter pytree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_lab.attacks.malicious import MALICIOUS_KEY
from fedjax_lab.compressors.identity import IdentityPayload
from fedjax_lab.core import rng as rng_lib
from fedjax_lab.core.local import LocalUpdate, is_local_update
from fedjax_lab.core.types import Aggregate, Algorithm, Batches, ClientOutput

#: Per-client metric holding the slot's malicious flag (0/1, not weighted: a counter).
MALICIOUS_METRIC = "attack_malicious"
#: Round metric: number of malicious clients that reported in the round.
MALICIOUS_CLIENTS = "malicious_clients"

# (update [D], key) -> poisoned update [D]
PerClientFn = Callable[[jax.Array, jax.Array], jax.Array]
# (updates [C, D], malicious [C] bool, valid [C] bool) -> (updates [C, D], metrics)
OmniscientFn = Callable[[jax.Array, jax.Array, jax.Array],
                        tuple[jax.Array, dict[str, jax.Array]]]


class ModelAttack(NamedTuple):
    """A model-poisoning attack: exactly one of ``per_client`` and ``omniscient`` is set.

    Attributes:
      name: short name appended to the algorithm's name (e.g. ``"scale10"``).
      per_client: ``(update [D], key) -> [D]``, a malicious client's upload from its own honest
        update and its key (non-omniscient).
      omniscient: ``(updates [C, D], malicious [C], valid [C]) -> (updates [C, D], metrics)``:
        every slot's upload from the whole round (rows of honest slots returned unchanged).
      metric_names: keys of the omniscient metrics, added to the round metrics.
    """

    name: str
    per_client: PerClientFn | None = None
    omniscient: OmniscientFn | None = None
    metric_names: tuple[str, ...] = ()


def _strip(arrays):
    return None if arrays is None else {k: v for k, v in arrays.items() if k != MALICIOUS_KEY}


def _need_column(arrays) -> None:
    if arrays is None or MALICIOUS_KEY not in arrays:
        raise ValueError(f"with_model_poisoning: the client examples have no {MALICIOUS_KEY!r} "
                         "column; mark the population with fedjax_lab.attacks.mark_malicious")


def _step_flag(arrays, mask: jax.Array) -> jax.Array:
    """1.0 when a real example of this step belongs to a malicious client."""
    _need_column(arrays)
    return jnp.max(arrays[MALICIOUS_KEY].astype(jnp.float32) * mask, initial=0.0)


def _check_raw(update, compressed: bool) -> None:
    if compressed and not isinstance(update, IdentityPayload):
        raise ValueError(f"model poisoning needs raw uploads; the algorithm's compressor sends "
                         f"{type(update).__name__} payloads: use the identity compressor")


def _poison_client(attack: ModelAttack | None, output: ClientOutput, flag: jax.Array,
                   key: jax.Array, compressed: bool) -> ClientOutput:
    metrics = {**output.metrics, MALICIOUS_METRIC: flag}
    if attack is None:  # with_malicious_flag: the flag only, any payload
        return output._replace(metrics=metrics)
    _check_raw(output.update, compressed)
    if attack.per_client is None:
        return output._replace(metrics=metrics)
    flat, unravel = ravel_pytree(output.update)
    noise_key = jax.random.fold_in(key, rng_lib.ATTACK_NOISE_STREAM)
    poisoned = attack.per_client(flat, noise_key).astype(flat.dtype)
    update = unravel(jnp.where(flag > 0, poisoned, flat))
    return output._replace(update=update, metrics=metrics)


def _wrap_client_update(client_update, attack: ModelAttack | None, compressed: bool):
    if is_local_update(client_update):
        def start(server_state):
            return client_update.start(server_state), jnp.float32(0.0)

        def step(server_state, ctx, carry, arrays, mask):
            inner, flag = carry
            flag = jnp.maximum(flag, _step_flag(arrays, mask))
            return client_update.step(server_state, ctx, inner, _strip(arrays), mask), flag

        def finish(server_state, client_state, carry, weight, *, key):
            inner, flag = carry
            out, state = client_update.finish(server_state, client_state, inner, weight, key=key)
            return _poison_client(attack, out, flag, key, compressed), state

        return LocalUpdate(start, step, finish, client_update.context, client_update.keyed)

    def plain(server_state, client_state, batches: Batches, *, key):
        if batches.table is not None:
            _need_column(batches.table)
            column = batches.table[MALICIOUS_KEY][batches.index]
        else:
            _need_column(batches.arrays)
            column = batches.arrays[MALICIOUS_KEY]
        flag = jnp.max(column.astype(jnp.float32) * batches.mask, initial=0.0)
        clean = batches._replace(arrays=_strip(batches.arrays), table=_strip(batches.table))
        out, state = client_update(server_state, client_state, clean, key=key)
        return _poison_client(attack, out, flag, key, compressed), state

    return plain


def with_model_poisoning(algorithm: Algorithm, attack: ModelAttack) -> Algorithm:
    """``algorithm`` whose malicious clients upload ``attack``'s poisoned updates.

    Apply it to the algorithm the server really runs, i.e. AFTER
    ``fedjax_lab.algorithms.with_aggregator``: an omniscient attack then replaces the uploads
    before the robust rule sees them. The population must carry the malicious column
    (:func:`fedjax_lab.attacks.mark_malicious`). Adds the round metric ``malicious_clients``
    (and the attack's own metrics).

    Raises:
      ValueError: ``attack`` sets neither or both functions; when the round is traced: the
        algorithm compresses its uploads (other than ``identity``), or the examples lack the
        malicious column.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm)}")
    if not isinstance(attack, ModelAttack):
        raise TypeError(f"attack must be a ModelAttack such as scale(10.0), got {type(attack)}")
    if (attack.per_client is None) == (attack.omniscient is None):
        raise ValueError(f"attack {attack.name!r} must set exactly one of per_client and "
                         "omniscient")
    compressed = algorithm.compressor is not None
    client_update = _wrap_client_update(algorithm.client_update, attack, compressed)
    aggregate = algorithm.aggregate
    if attack.omniscient is not None:
        inner_aggregate = algorithm.aggregate

        def aggregate(outputs: ClientOutput) -> Aggregate:
            _check_raw(outputs.update, compressed)
            malicious = outputs.metrics[MALICIOUS_METRIC] > 0
            valid = outputs.weight > 0
            flat = jax.vmap(lambda u: ravel_pytree(u)[0])(outputs.update)
            _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], outputs.update))
            poisoned, metrics = attack.omniscient(flat, malicious & valid, valid)
            update = jax.vmap(unravel)(poisoned.astype(flat.dtype))
            agg = inner_aggregate(outputs._replace(update=update))
            return agg._replace(metric_sums={**agg.metric_sums, **metrics})

    def server_update(state, agg: Aggregate):
        new_state, metrics = algorithm.server_update(state, agg)
        extra = {k: agg.metric_sums[k] for k in attack.metric_names}
        return new_state, {**metrics, MALICIOUS_CLIENTS: agg.metric_sums[MALICIOUS_METRIC],
                           **extra}

    return algorithm._replace(
        client_update=client_update, aggregate=aggregate, server_update=server_update,
        name=f"{algorithm.name}+{attack.name}",
        additive=algorithm.additive and attack.omniscient is None,
    )


def with_malicious_flag(algorithm: Algorithm) -> Algorithm:
    """``algorithm`` whose clients report the simulation's malicious flag, uploads unchanged.

    For data poisoning (:func:`~fedjax_lab.attacks.label_flip`,
    :func:`~fedjax_lab.attacks.backdoor`), whose uploads are honest training on poisoned data:
    the client metric :data:`MALICIOUS_METRIC` lets a selecting robust rule's exclusions be
    scored against the truth (``detection_precision``/``detection_recall``, see
    :mod:`fedjax_lab.algorithms.robust.detection`), and the round metric ``malicious_clients``
    counts the malicious clients of the round. Apply it outermost (after ``with_aggregator``);
    the population must carry :func:`~fedjax_lab.attacks.mark_malicious`'s column. The name,
    additivity and payloads are the algorithm's.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm)}")
    client_update = _wrap_client_update(algorithm.client_update, None, False)

    def server_update(state, agg: Aggregate):
        new_state, metrics = algorithm.server_update(state, agg)
        return new_state, {**metrics, MALICIOUS_CLIENTS: agg.metric_sums[MALICIOUS_METRIC]}

    return algorithm._replace(client_update=client_update, server_update=server_update)
