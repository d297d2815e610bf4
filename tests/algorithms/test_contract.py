"""check_algorithm: every built-in algorithm passes it, and it refuses broken algorithms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from fedjax_lab.algorithms import (
    dp_fedavg,
    fedadam,
    fedavg,
    fednova,
    fedpaq,
    fedprox,
    kit,
    scaffold,
)
from fedjax_lab.algorithms.robust import median, with_aggregator
from fedjax_lab.algorithms.testing import check_algorithm
from fedjax_lab.compressors import qsgd, top_k, with_error_feedback
from fedjax_lab.core.local import LocalUpdate
from fedjax_lab.core.losses import softmax_cross_entropy
from fedjax_lab.core.types import Aggregate
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=4, classes=3)
SIZES = [3, 17, 9, 30, 5, 12]
DATA = make_population(SIZES, dim=4, seed=1)
PARAMS = MODEL.init(jax.random.key(0))


def _fedavg():
    return fedavg(MODEL, optax.sgd(0.1), batch_size=4)


BUILT_IN = {
    "fedavg_ef_qsgd": lambda: fedavg(MODEL, optax.sgd(0.1, momentum=0.5), batch_size=4,
                                     compressor=with_error_feedback(qsgd(num_levels=2))),
    "fedprox": lambda: fedprox(MODEL, optax.sgd(0.1), mu=0.3, batch_size=4),
    "fedadam": lambda: fedadam(MODEL, optax.sgd(0.1), server_lr=0.05, batch_size=4),
    "fedpaq_schedule": lambda: fedpaq(
        MODEL, kit.per_round(optax.sgd, learning_rate=lambda k: 0.2 / (1.0 + k / 2.0)),
        num_steps=3, batch_size=4, compressor=qsgd(num_levels=4)),
    "fednova": lambda: fednova(MODEL, 0.1, batch_size=4, client_momentum=0.5),
    "scaffold_topk": lambda: scaffold(MODEL, 0.1, num_clients=len(SIZES), batch_size=4,
                                      compressor=top_k(k=5)),
    "dp_fedavg": lambda: dp_fedavg(MODEL, optax.sgd(0.1), batch_size=4, clip_norm=0.5,
                                   noise_multiplier=0.3, clients_per_round=4,
                                   key=jax.random.key(3)),
    "median": lambda: with_aggregator(_fedavg(), median()),
}


# The three algorithm x compressor combinations take 17-21 s each on 2 cores: `make test-slow`
# (the compressors' own contracts and train.py's covering pairs run in `make test`).
SLOW = ("fedavg_ef_qsgd", "fedpaq_schedule", "scaffold_topk")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(BUILT_IN)])
def test_every_algorithm_passes_check_algorithm(name):
    check_algorithm(BUILT_IN[name](), PARAMS, DATA)


# ------------------------------------------------------------------ deliberately broken ones
def _with_finish(alg, finish):
    local = alg.client_update
    return alg._replace(client_update=LocalUpdate(local.start, local.step, finish, local.context))


def test_refuses_unknown_metric_names():
    alg = _fedavg()
    finish = alg.client_update.finish

    def renamed(*args, **kwargs):
        out, state = finish(*args, **kwargs)
        metrics = dict(out.metrics)
        metrics["examples"] = metrics.pop(kit.TRAIN_EXAMPLES)
        return out._replace(metrics=metrics), state

    with pytest.raises(AssertionError, match=r"client metrics lack.*train_examples"):
        check_algorithm(_with_finish(alg, renamed), PARAMS, DATA)


def test_refuses_padding_that_changes_the_result():
    # The plain mean over the batch instead of the masked mean: padded examples count.
    def unmasked(params, arrays, mask):
        del mask
        return jnp.mean(softmax_cross_entropy(MODEL.apply(params, arrays["x"]), arrays["y"]))

    train = kit.local_training(unmasked, optax.sgd(0.1))
    alg = _fedavg()
    alg = alg._replace(client_update=train.update(alg.client_update.finish))
    with pytest.raises(AssertionError, match="padded to more steps and a larger batch"):
        check_algorithm(alg, PARAMS, DATA)


def test_refuses_accepting_non_finite_updates():
    alg = _fedavg()
    finish = alg.client_update.finish

    def accepting(server_state, client_state, result, client_weight, *, key):
        out, state = finish(server_state, client_state, result, client_weight, key=key)
        metrics = {**out.metrics, kit.REJECTED: jnp.zeros(())}
        return out._replace(weight=client_weight, metrics=metrics), state

    with pytest.raises(AssertionError, match="NaN examples was not rejected"):
        check_algorithm(_with_finish(alg, accepting), PARAMS, DATA)


def test_refuses_a_non_additive_aggregate_declared_additive():
    alg = _fedavg()

    def mean_aggregate(outputs):  # a mean, not a sum: parts do not add up
        agg = alg.aggregate(outputs)
        update = jax.tree.map(lambda s: s / jnp.maximum(agg.weight_sum, 1.0), agg.update_sum)
        return Aggregate(update, jnp.minimum(agg.weight_sum, 1.0), agg.metric_sums, agg.extra)

    with pytest.raises(AssertionError, match="not the sum of its parts"):
        check_algorithm(alg._replace(aggregate=mean_aggregate), PARAMS, DATA)


def test_refuses_a_server_state_that_retraces_every_round():
    alg = _fedavg()

    def init(params):
        return alg.init(params)._replace(extra=jnp.zeros((), jnp.float32))

    def server_update(state, agg):
        new, metrics = alg.server_update(state, agg)
        # A Python-float constant is weakly typed: the next round's inputs differ in type.
        return new._replace(extra=jnp.asarray(1.0)), metrics

    with pytest.raises(AssertionError, match="traced more than once"):
        check_algorithm(alg._replace(init=init, server_update=server_update), PARAMS, DATA)


def test_refuses_a_client_update_that_cannot_be_jitted():
    alg = _fedavg()
    local = alg.client_update

    def python_branch(server_state, client_state, batches, *, key):
        if float(batches.weight) > 0:  # Python control flow on a traced value
            return local(server_state, client_state, batches, key=key)
        return local(server_state, client_state, batches, key=key)

    with pytest.raises(jax.errors.ConcretizationTypeError):
        check_algorithm(alg._replace(client_update=python_branch), PARAMS, DATA)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="algorithm must be a fedjax_lab Algorithm"):
        check_algorithm(object(), PARAMS, DATA)
    with pytest.raises(ValueError, match="clients_per_round"):
        check_algorithm(_fedavg(), PARAMS, DATA, clients_per_round=1)
    with pytest.raises(ValueError, match="fewer than clients_per_round"):
        check_algorithm(_fedavg(), PARAMS, DATA, clients_per_round=len(SIZES) + 1)



def test_algorithms_carry_their_uplink_compressor():
    # Backends that ship bytes (edge) take the codec from the algorithm, never a second copy.
    comp = qsgd(num_levels=2)
    built = [
        fedavg(MODEL, optax.sgd(0.1), batch_size=4, compressor=comp),
        fedprox(MODEL, optax.sgd(0.1), mu=0.1, batch_size=4, compressor=comp),
        fedadam(MODEL, optax.sgd(0.1), server_lr=0.1, batch_size=4, compressor=comp),
        fedpaq(MODEL, optax.sgd(0.1), num_steps=2, batch_size=4, compressor=comp),
        fednova(MODEL, 0.1, batch_size=4, compressor=comp),
        scaffold(MODEL, 0.1, num_clients=3, batch_size=4, compressor=comp),
        dp_fedavg(MODEL, optax.sgd(0.1), batch_size=4, clip_norm=1.0, noise_multiplier=0.1,
                  clients_per_round=2, key=jax.random.key(0), compressor=comp),
        with_aggregator(fedavg(MODEL, optax.sgd(0.1), batch_size=4, compressor=comp), median()),
    ]
    assert all(alg.compressor is comp for alg in built), [alg.name for alg in built]
    assert _fedavg().compressor is None
