"""The Backend protocol: every backend declares every hook; the runner refuses others early."""

import contextlib

import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg
from fedjax_lab.backends import (
    Backend,
    ShardedBackend,
    SingleProcessBackend,
    VmapBackend,
    check_backend,
)
from fedjax_lab.runner import run
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=3, classes=2)


def test_every_single_process_backend_implements_the_protocol():
    for backend in (VmapBackend("vmap"), ShardedBackend(jax.devices()[:1])):
        assert isinstance(backend, Backend)
        assert check_backend(backend) is backend
        np.testing.assert_array_equal(backend.owned_slots(3), [0, 1, 2])
        assert backend.broadcast("x") == "x" and backend.is_primary
        with backend.failure_guard():
            pass
        backend.close()


def test_cohort_multiple_includes_the_chunk_size():
    # run() takes the padding from the backend alone (chunk_size is no run() argument).
    assert VmapBackend("vmap", chunk_size=3).cohort_multiple == 3
    assert VmapBackend("vmap").cohort_multiple == 1


class _RoundsOnly:
    """A backend written before the protocol: run_round and nothing else."""

    name = "legacy"

    def run_round(self, algorithm, server_state, client_states, cohort, key):
        raise AssertionError("never reached: refused before the first round")


def test_a_backend_without_the_hooks_is_refused_before_compiling():
    with pytest.raises(TypeError, match=r"lacks \['cohort_multiple'.*SingleProcessBackend"):
        check_backend(_RoundsOnly())
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=2)
    with pytest.raises(TypeError, match=r"must implement fedjax_lab\.backends\.Backend"):
        run(alg, _RoundsOnly(), make_population([3, 4], dim=3, classes=2),
            MODEL.init(jax.random.key(0)), rounds=1, clients_per_round=2, seed=0)


def test_single_process_backend_gives_the_defaults_to_a_new_backend():
    class Delegating(SingleProcessBackend):
        name = "delegating"

        def __init__(self):
            super().__init__()
            self.inner = VmapBackend("vmap")

        def run_round(self, *args):
            return self.inner.run_round(*args)

    backend = Delegating()
    assert isinstance(backend, Backend)
    data = make_population([3, 4, 5], dim=3, classes=2)
    params = MODEL.init(jax.random.key(0))
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=2)
    got = run(alg, backend, data, params, rounds=2, clients_per_round=2, seed=1)
    want = run(alg, VmapBackend("vmap"), data, params, rounds=2, clients_per_round=2, seed=1)
    np.testing.assert_allclose(got.server_state.params["w"], want.server_state.params["w"],
                               atol=1e-6)
    assert isinstance(backend.failure_guard(), contextlib.AbstractContextManager)
