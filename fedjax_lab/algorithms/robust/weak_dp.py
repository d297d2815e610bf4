"""Weak differential privacy: Gaussian noise on the server's new model (Sun, Kairouz, Suresh,
McMahan 2019, "Can You Really Backdoor Federated Learning?", Sec. 4).

Sun et al. defend against backdoors with norm-difference clipping (each client's update
``w_i - w`` clipped to L2 norm ``M``: :func:`~fedjax_lab.algorithms.robust.clip_norm`) followed
by "weak DP": after aggregating, the server adds ``N(0, sigma^2)`` noise to every coordinate of
the new global model. The noise is small and NOT calibrated to a privacy budget (hence "weak");
for calibrated DP use :func:`~fedjax_lab.algorithms.dp_fedavg`. FedML's
``NormDiffClippingDefense`` is exercised there with ``M = 5``; Sun et al.'s weak-DP noise is a
few hundredths per coordinate.

Key: ``Algorithm.aggregate`` receives no PRNG key, but ``server_update`` sees the round
counter, so, as DP-FedAvg does, the noise of round ``r`` is drawn with
``fold_in(key, r)`` from a key given at construction: rounds get independent noise and a
resumed run draws the same noise. The noise is added every round (the model is released every
round), after the algorithm's own server step, so it composes with any aggregator and backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_lab.core.types import Aggregate, Algorithm, ServerState


def with_weak_dp(algorithm: Algorithm, noise_std: float, key: jax.Array) -> Algorithm:
    """Returns ``algorithm`` whose server adds ``N(0, noise_std^2)`` to every model parameter.

    Norm-difference clipping + weak DP of Sun et al. (2019) is
    ``with_weak_dp(with_aggregator(alg, mean(), transforms=(clip_norm(M),)), sigma, key)``.

    Args:
      algorithm: any ``Algorithm`` (its aggregate and additivity are kept).
      noise_std: ``sigma >= 0`` (finite), the std of the noise on each parameter; ``0`` adds
        nothing.
      key: scalar typed PRNG key (e.g. ``jax.random.key(seed)``); round ``r`` uses
        ``fold_in(key, r)``.

    Returns:
      The algorithm with round metric ``weak_dp_std`` added, named ``<name>+weakdp<sigma>``.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedjax_lab Algorithm, got {type(algorithm)}")
    if (isinstance(noise_std, bool) or not isinstance(noise_std, int | float)
            or not math.isfinite(noise_std) or noise_std < 0):
        raise ValueError(f"with_weak_dp: noise_std must be a finite number >= 0, got "
                         f"{noise_std!r}")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            and key.shape == ()):
        raise TypeError(f"key must be a scalar typed PRNG key, e.g. jax.random.key(0); got {key!r}")
    std = float(noise_std)

    def server_update(state: ServerState, agg: Aggregate) -> tuple[ServerState, dict]:
        new_state, metrics = algorithm.server_update(state, agg)
        leaves, treedef = jax.tree.flatten(new_state.params)
        keys = jax.random.split(jax.random.fold_in(key, state.round), max(len(leaves), 1))
        noisy = [x + (std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                 for x, k in zip(leaves, keys, strict=False)]
        new_state = new_state._replace(params=jax.tree.unflatten(treedef, noisy))
        return new_state, {**metrics, "weak_dp_std": jnp.asarray(std, jnp.float32)}

    return algorithm._replace(server_update=server_update, name=f"{algorithm.name}+weakdp{std:g}")
