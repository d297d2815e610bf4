"""The vmap backend: plans agree, chunking is exact and bounds memory, one compile per run."""

import os
import re
import subprocess
import sys

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.runner import run
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(plan, chunk=None, sizes=(4, 9, 2, 7, 5, 11, 3, 6), rounds=3, cpr=5, seed=0):
    data = make_population(list(sizes), seed=2)
    alg = fedavg(MODEL, optax.sgd(0.3, momentum=0.5), batch_size=3, local_epochs=2)
    return run(alg, VmapBackend(plan, chunk_size=chunk), data, MODEL.init(jax.random.key(0)),
               rounds=rounds, clients_per_round=cpr, seed=seed)


@pytest.mark.parametrize("plan", ["unrolled", "loop"])
def test_plans_agree_with_vmap(plan):
    ref, other = _run("vmap"), _run(plan)
    chex.assert_trees_all_close(ref.server_state.params, other.server_state.params, atol=1e-6)
    for a, b in zip(ref.history, other.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3], ids=lambda c: f"chunk{c}")
def test_chunking_equals_unchunked(chunk):
    ref, chunked = _run("vmap"), _run("vmap", chunk=chunk)
    chex.assert_trees_all_close(ref.server_state.params, chunked.server_state.params, atol=1e-6)
    assert ref.history[-1]["clients"] == chunked.history[-1]["clients"] == 5.0


@pytest.mark.parametrize("packing", ["off", "auto"])
def test_bounded_compiles_per_run_with_varying_client_sizes(packing):
    data = make_population([1, 30, 4, 17, 2, 9], seed=3)
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=4)
    backend = VmapBackend("vmap", packing=packing)
    result = run(alg, backend, data, MODEL.init(jax.random.key(0)), rounds=6,
                 clients_per_round=3, seed=1)
    sizes_seen = {h["train_examples"] for h in result.history}
    assert len(sizes_seen) > 1  # the sampled clients really had different sizes
    # padded: one program per ladder rung used (S_max = 8: rungs 8, 4, 2, 1); packed: the run's
    # one layout is init + finish + up to three segment lengths (full, half, quarter).
    assert sum(backend.compiles.values()) <= (4 if packing == "off" else 5)
    assert result.compiles == dict(backend.compiles)


def test_same_seed_same_metrics_different_seed_different_sampling():
    a, b, c = _run("vmap", seed=3), _run("vmap", seed=3), _run("vmap", seed=4)
    assert a.history == [dict(h, round_seconds=x["round_seconds"]) for h, x in
                         zip(b.history, a.history, strict=True)]
    chex.assert_trees_all_equal(a.server_state.params, b.server_state.params)
    assert [h["train_examples"] for h in a.history] != [h["train_examples"] for h in c.history]


def _temp_bytes(cohort_size, chunk):
    data = make_population([20] * cohort_size, dim=30, classes=10, seed=0)
    model = LinearModel(30, 10)
    alg = fedavg(model, optax.sgd(0.1), batch_size=5)
    state = alg.init(model.init(jax.random.key(0)))
    cohort = CohortBuilder(data, batch_size=5, local_epochs=1, cohort_size=cohort_size,
                           seed=0).build(0, np.arange(cohort_size))
    fn = VmapBackend("vmap", chunk_size=chunk)._compiled(alg, "vmap")
    compiled = fn.lower(state, (), cohort, jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_round_memory_does_not_grow_with_cohort():
    # XLA's own buffer assignment: with chunks, scratch memory is the same for 400 and 800
    # clients; without chunks it doubles. This is what bounds the peak by the chunk size.
    assert _temp_bytes(400, 50) == _temp_bytes(800, 50)
    assert _temp_bytes(800, None) > 1.8 * _temp_bytes(400, None)


def test_thousand_clients_per_round_fit_in_two_gigabytes():
    script = f"""
import jax, numpy as np, optax, sys
sys.path.insert(0, {ROOT!r})
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.runner import run
from tests.helpers import LinearModel, make_population
m = LinearModel(60, 10)
data = make_population([60] * 1000, dim=60, classes=10, seed=0)
alg = fedavg(m, optax.sgd(0.1), batch_size=10)
res = run(alg, VmapBackend('vmap', chunk_size=100), data, m.init(jax.random.key(0)), rounds=2,
          clients_per_round=1000, seed=0)
assert res.history[-1]['clients'] == 1000.0, res.history
print(open('/proc/self/status').read())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=300)
    # VmHWM is this process's own high-water mark. getrusage's ru_maxrss is not: when the child is
    # spawned by vfork it inherits the parent's peak at exec, i.e. the pytest process's RSS.
    peak_kib = int(re.search(r"^VmHWM:\s+(\d+) kB$", out.stdout, re.M).group(1))
    assert peak_kib < 2 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"


def test_bad_backend_arguments():
    with pytest.raises(ValueError, match="plan must be one of"):
        VmapBackend("fast")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        VmapBackend("vmap", chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size only applies to the 'vmap' plan"):
        VmapBackend("loop", chunk_size=2)


def test_cohort_not_multiple_of_chunk_is_rejected_before_compiling():
    data = make_population([3, 3, 3])
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=3)
    cohort = CohortBuilder(data, batch_size=3, local_epochs=1, cohort_size=3, seed=0).build(
        0, [0, 1, 2])
    with pytest.raises(ValueError, match="not a multiple of chunk_size=2"):
        VmapBackend("vmap", chunk_size=2).run_round(
            alg, alg.init(MODEL.init(jax.random.key(0))), (), cohort, jax.random.key(0))
