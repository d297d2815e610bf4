"""with_secure_aggregation: the protocol's decoded sum inside FedAvg rounds."""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.robust import client_contributions
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.runner import run
from fedjax_lab.secagg import (
    SECAGG_CLIPPED,
    SECAGG_FAILED,
    FixedPoint,
    secure_sum,
    with_secure_aggregation,
)
from tests.algorithms._numpy_ref import (
    client_steps,
    local_sgd,
    make_builder,
    sampled_clients,
    to_np,
)
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)
FP = FixedPoint(bits=40, frac_bits=20, bound=64.0)


@pytest.fixture(scope="module")
def outputs():
    """Six clients' outputs (client 4 rejected: NaN data) in eight slots (two padded)."""
    data = make_population([6, 8, 5, 9, 7, 4], seed=5)
    x = data.arrays["x"].copy()
    x[data.offsets[4]] = np.nan
    data = type(data)(data.client_ids, {"x": x, "y": data.arrays["y"]}, data.offsets)
    alg = fedavg(MODEL, optax.sgd(0.3), batch_size=4)
    params = MODEL.init(jax.random.key(3))
    cohort = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=8,
                           seed=0).build(0, [0, 1, 2, 3, 4, 5])
    states = jax.tree.map(lambda v: jnp.stack([v] * 8), alg.client_init(params))
    out, _ = VmapBackend("vmap").client_outputs(alg, alg.init(params), states, cohort,
                                               jax.random.split(jax.random.key(0), 8))
    return alg, params, out


@pytest.mark.parametrize("neighbours", [None, 2], ids=["secagg", "plus"])
def test_aggregate_is_the_exact_fixed_point_sum(outputs, neighbours):
    alg, _, out = outputs
    secure = with_secure_aggregation(alg, FP, neighbours=neighbours)
    agg = jax.jit(secure.aggregate)(out)
    # numpy reference: the codes of [w_i u_i, w_i] over valid slots, summed as integers.
    u = jax.tree.leaves(client_contributions(alg, out))
    w = np.asarray(out.weight, np.float32)
    valid = w > 0
    assert valid.sum() == 5
    flat = np.concatenate([np.asarray(x, np.float32).reshape(8, -1) for x in u], axis=1)
    rows = np.concatenate([flat * w[:, None], w[:, None]], axis=1)[valid].astype(np.float64)
    ints = np.rint(rows * 2.0**FP.frac_bits).astype(np.int64).sum(0)
    want = (ints / 2.0**FP.frac_bits).astype(np.float32)
    got = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(agg.update_sum)]
                         + [np.asarray(agg.weight_sum).ravel()])
    np.testing.assert_array_equal(got, want)
    assert float(agg.weight_sum) == w.sum()
    plain = alg.aggregate(out)
    for a, b in zip(jax.tree.leaves(agg.update_sum), jax.tree.leaves(plain.update_sum),
                    strict=True):
        # fixed point: 5 clients x resolution/2; float32 sum of the plain aggregate: 1e-6
        np.testing.assert_allclose(a, b, rtol=0, atol=5 * FP.resolution / 2 + 1e-6)
    assert int(agg.metric_sums[SECAGG_CLIPPED]) == 0 == int(agg.metric_sums[SECAGG_FAILED])


def test_clipping_is_counted_and_small_cohorts_fail_cleanly(outputs):
    alg, _, out = outputs
    tiny = FixedPoint(bits=32, frac_bits=16, bound=0.01)  # below every weight (>= 4 examples)
    agg = jax.jit(with_secure_aggregation(alg, tiny).aggregate)(out)
    assert int(agg.metric_sums[SECAGG_CLIPPED]) >= 5
    one = out._replace(weight=out.weight.at[1:].set(0.0))
    agg = jax.jit(with_secure_aggregation(alg, FP).aggregate)(one)
    assert int(agg.metric_sums[SECAGG_FAILED]) == 1 and float(agg.weight_sum) == 0.0


def numpy_secure_fedavg(data, params, *, rounds, clients_per_round, seed, lr, fp):
    """FedAvg in float64 numpy whose weighted sum is taken of fixed-point codes (integers)."""
    p = to_np(params)
    builder = make_builder(data, batch_size=4, local_epochs=1, seed=seed)
    for r in range(rounds):
        rows = []
        for c in sampled_clients(data, clients_per_round, seed, r):
            q = local_sgd(p, data, client_steps(builder, c, r), lr)
            w = float(data.sizes[c])
            delta = np.concatenate([(q["b"] - p["b"]).ravel(), (q["w"] - p["w"]).ravel()])
            rows.append(np.append(w * delta, w))
        ints = np.rint(np.stack(rows) * 2.0**fp.frac_bits).astype(np.int64).sum(0)
        total = ints / 2.0**fp.frac_bits
        mean = total[:-1] / total[-1]
        nb = p["b"].size
        p = {"b": p["b"] + mean[:nb], "w": p["w"] + mean[nb:].reshape(p["w"].shape)}
    return p


def test_fedavg_run_with_secure_aggregation_matches_numpy_reference():
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    base = fedavg(MODEL, optax.sgd(0.3), batch_size=4)
    secure = with_secure_aggregation(base, FP, neighbours=2)
    got = run(secure, VmapBackend("vmap"), data, params, rounds=2, clients_per_round=5, seed=0)
    want = numpy_secure_fedavg(data, params, rounds=2, clients_per_round=5, seed=0, lr=0.3,
                               fp=FP)
    np.testing.assert_allclose(got.server_state.params["w"], want["w"], atol=1e-5)
    np.testing.assert_allclose(got.server_state.params["b"], want["b"], atol=1e-5)
    assert [h[SECAGG_CLIPPED] for h in got.history] == [0, 0]
    assert [h[SECAGG_FAILED] for h in got.history] == [0, 0]
    with pytest.raises(ValueError, match="not additive"):
        run(secure, VmapBackend("vmap", chunk_size=2), data, params, rounds=1,
            clients_per_round=4, seed=0)


def test_secure_sum_and_argument_errors():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 100))
    total, clipped, info = secure_sum(x, FixedPoint(32, 16, 1.0), neighbours=2)
    assert clipped == 0 and info["rounds"] == 4
    assert np.max(np.abs(total - x.sum(0))) <= 4 * 2.0**-17
    alg = fedavg(MODEL, optax.sgd(0.3), batch_size=4)
    with pytest.raises(ValueError, match="neighbours must be None"):
        with_secure_aggregation(alg, FP, neighbours=3)
    with pytest.raises(ValueError, match="threshold_fraction"):
        with_secure_aggregation(alg, FP, threshold_fraction=0.4)
    with pytest.raises(ValueError, match="min_clients"):
        with_secure_aggregation(alg, FP, min_clients=1)


def test_the_package_imports_cryptography_only_inside_functions():
    """No module-level ``cryptography`` import: the core library works without it."""
    root = Path(__file__).resolve().parents[2] / "fedjax_lab" / "secagg"
    for path in sorted(root.glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # top-level statements only
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] == "cryptography" for n in names), path.name


def test_a_ring_the_cohort_can_overflow_is_refused_when_traced(outputs):
    alg, _, out = outputs
    small = FixedPoint(bits=16, frac_bits=8, bound=20.0)  # 5120 per client: 6 fit, 8 slots do not
    with pytest.raises(ValueError, match=r"8 clients .* can overflow the 16-bit ring"):
        jax.jit(with_secure_aggregation(alg, small).aggregate)(out)
