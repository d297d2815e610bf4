"""A round to which no client contributed reports NaN means, never 0.0 (every algorithm).

A mean over zero clients is undefined: reporting it as 0.0 (a perfect loss, a zero update)
made a run in which every client diverged look like a converged one.
"""

import math

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.dp_fedavg import dp_fedavg
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.fednova import fednova
from fedjax_lab.algorithms.fedopt import fedadam
from fedjax_lab.algorithms.fedpaq import fedpaq
from fedjax_lab.algorithms.fedprox import fedprox
from fedjax_lab.algorithms.robust import median, with_aggregator
from fedjax_lab.algorithms.scaffold import scaffold
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd
from fedjax_lab.data.federated import FederatedData
from fedjax_lab.runner import run
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)
SIZES = [5, 7, 4]

ALGORITHMS = {
    "fedavg": lambda: fedavg(MODEL, optax.sgd(0.1), batch_size=4),
    "fedadam": lambda: fedadam(MODEL, optax.sgd(0.1), server_lr=0.1, batch_size=4),
    "fedprox": lambda: fedprox(MODEL, optax.sgd(0.1), mu=0.1, batch_size=4),
    "fedpaq": lambda: fedpaq(MODEL, optax.sgd(0.1), num_steps=2, batch_size=4,
                             compressor=qsgd(num_levels=2)),
    "fednova": lambda: fednova(MODEL, 0.1, batch_size=4),
    "scaffold": lambda: scaffold(MODEL, 0.1, num_clients=len(SIZES), batch_size=4),
    "median": lambda: with_aggregator(fedavg(MODEL, optax.sgd(0.1), batch_size=4), median()),
    "dp_fedavg": lambda: dp_fedavg(MODEL, optax.sgd(0.1), batch_size=4, clip_norm=1.0,
                                   noise_multiplier=0.5, clients_per_round=2,
                                   key=jax.random.key(3)),
}


def _population(poisoned: list[int]) -> FederatedData:
    """``SIZES`` clients; the listed ones have a NaN feature, so their update is rejected."""
    data = make_population(SIZES, seed=3)
    x = data.arrays["x"].copy()
    # Each poisoned client's LAST example: row 0 of the table is also what padding reads.
    x[data.offsets[1:][poisoned] - 1] = np.nan
    return FederatedData(data.client_ids, {"x": x, "y": data.arrays["y"]}, data.offsets)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_round_without_contribution_reports_nan(name):
    alg = ALGORITHMS[name]()
    params = MODEL.init(jax.random.key(0))
    backend = VmapBackend("vmap")  # both runs below share its compiled round
    common = dict(rounds=1, clients_per_round=3, seed=0)
    none = run(alg, backend, _population([0, 1, 2]), params, **common).history[0]
    assert none["clients"] == 3.0 and none["rejected"] == 3.0
    assert none["train_examples"] == 0.0
    assert math.isnan(none["train_loss"]), none
    if name == "dp_fedavg":
        # The DP server still applies its (pure-noise) update: its norm is a real number.
        assert math.isfinite(none["update_norm"]) and none["update_norm"] > 0
    else:
        assert math.isnan(none["update_norm"]), none
    if name == "fednova":
        assert math.isnan(none["tau_eff"])
    # A round with one accepted client reports real numbers (the NaN is not unconditional).
    some = run(alg, backend, _population([0, 2]), params, **common).history[0]
    assert some["rejected"] == 2.0
    assert math.isfinite(some["train_loss"]) and some["train_loss"] > 0
    assert math.isfinite(some["update_norm"]) and some["update_norm"] > 0


def test_server_state_is_unchanged_when_no_client_contributed():
    alg = ALGORITHMS["fedadam"]()
    params = MODEL.init(jax.random.key(0))
    result = run(alg, VmapBackend("vmap"), _population([0, 1, 2]), params, rounds=2,
                 clients_per_round=3, seed=0)
    chex.assert_trees_all_equal(result.server_state.params, params)
    chex.assert_trees_all_equal(result.server_state.opt_state, alg.init(params).opt_state)
