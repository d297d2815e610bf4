"""Availability: dropout/straggler statistics, dropped clients add nothing, partial work."""

import math

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg, fedprox
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.runner import run
from fedjax_lab.systems import Availability
from tests.algorithms._numpy_ref import (
    client_steps,
    local_sgd,
    make_builder,
    sampled_clients,
    to_np,
)
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)
K_SE = 5.0  # tolerance in standard errors (two-sided p ~ 6e-7 per check)


def test_dropout_and_straggler_statistics():
    avail = Availability(dropout=0.3, straggler_fraction=0.4)
    rounds, slots, tau = 20_000, 8, 6
    steps = np.full(slots, tau)
    steps[-1] = 1  # a single-step client can never straggle
    real = np.ones(slots, bool)
    dropped, limits, stragglers = zip(
        *(avail.draw(steps, real, seed=3, round_idx=r) for r in range(rounds)), strict=True
    )
    dropped, limits, stragglers = np.array(dropped), np.array(limits), np.array(stragglers)

    n = dropped.size
    p_hat = dropped.mean()
    assert abs(p_hat - 0.3) < K_SE * math.sqrt(0.3 * 0.7 / n)

    eligible = ~dropped[:, :-1]
    q_hat = stragglers[:, :-1][eligible].mean()
    assert abs(q_hat - 0.4) < K_SE * math.sqrt(0.4 * 0.6 / eligible.sum())
    assert not stragglers[:, -1].any()

    # Straggler steps ~ Uniform{1, ..., tau - 1}: every value with probability 1/(tau - 1).
    lim = limits[stragglers]
    assert lim.min() >= 1 and lim.max() <= tau - 1
    for v in range(1, tau):
        f = np.mean(lim == v)
        p = 1.0 / (tau - 1)
        assert abs(f - p) < K_SE * math.sqrt(p * (1 - p) / lim.size), v
    # Dropped clients do no steps, punctual ones all of theirs.
    assert np.all(limits[dropped] == 0)
    punctual = ~dropped & ~stragglers
    np.testing.assert_array_equal(limits[punctual], np.broadcast_to(steps, limits.shape)[punctual])


def test_draws_depend_only_on_seed_and_round():
    avail = Availability(dropout=0.5, straggler_fraction=0.5)
    steps, real = np.full(6, 4), np.ones(6, bool)
    a = avail.draw(steps, real, seed=1, round_idx=5)
    b = avail.draw(steps, real, seed=1, round_idx=5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    others = [avail.draw(steps, real, seed=1, round_idx=r)[0] for r in range(20)]
    assert len({o.tobytes() for o in others}) > 1


def _run_round(alg, data, clients, cohort_size, seed, availability=None):
    builder = CohortBuilder(data, batch_size=4, local_epochs=2, cohort_size=cohort_size,
                            seed=seed)
    cohort = builder.build(0, clients)
    info = {}
    if availability is not None:
        cohort, info = availability.apply(cohort, seed=seed, round_idx=0)
    state, _, metrics = VmapBackend("vmap").run_round(
        alg, alg.init(MODEL.init(jax.random.key(0))), (), cohort, jax.random.key(1))
    return state, metrics, info, cohort


def test_dropped_clients_contribute_nothing():
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    alg = fedavg(MODEL, optax.sgd(0.2), batch_size=4, local_epochs=2)
    avail = Availability(dropout=0.5)
    clients = [0, 1, 2, 3, 4, 5]
    state, metrics, info, cohort = _run_round(alg, data, clients, 8, seed=2, availability=avail)
    dropped = np.asarray(cohort.weight[:6]) == 0
    assert 0 < dropped.sum() < 6, "pick a seed where some but not all clients drop"
    assert info == {"dropped": float(dropped.sum()), "stragglers": 0.0}
    assert float(np.asarray(cohort.mask)[:6][dropped].sum()) == 0.0
    assert float(metrics["clients"]) == 6 - dropped.sum()
    kept = [c for c, d in zip(clients, dropped, strict=True) if not d]
    ref, ref_metrics, _, _ = _run_round(alg, data, kept, 8, seed=2)
    chex.assert_trees_all_close(state.params, ref.params, atol=1e-6)
    assert float(metrics["upload_bits"]) == float(ref_metrics["upload_bits"])


def numpy_fedprox_stragglers(data, params, avail, *, rounds, cpr, mu, lr, seed):
    """FedProx with partial work: straggler i keeps only its first limit_i local steps."""
    x = to_np(params)
    builder = make_builder(data, batch_size=4, local_epochs=2, seed=seed)
    for k in range(rounds):
        clients = sampled_clients(data, cpr, seed, k)
        steps = [client_steps(builder, i, k) for i in clients]
        _, limits, _ = avail.draw(np.array([len(s) for s in steps]), np.ones(cpr, bool),
                                  seed=seed, round_idx=k)
        total = {key: np.zeros_like(v) for key, v in x.items()}
        n_sum = 0.0
        for i, st, lim in zip(clients, steps, limits, strict=True):
            local = local_sgd(x, data, st[:lim], lr, prox_mu=mu)
            n = float(data.sizes[i])
            for key in x:
                total[key] += n * (local[key] - x[key])
            n_sum += n
        x = {key: x[key] + total[key] / n_sum for key in x}
    return x



@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9])
def test_fedprox_code_stragglers_exact_count_whole_epochs(fraction):
    """FedProx's released code: round(K (1 - f)) finish, stragglers do randint(1, E) epochs."""
    epochs, k = 20, 10
    avail = Availability(straggler_fraction=fraction, straggler_sampling="exact",
                         straggler_epochs=epochs)
    per_epoch = np.array([1, 2, 3, 7, 1, 4, 5, 2, 9, 3])  # ceil(n_i / B) of each slot
    steps = epochs * per_epoch
    real = np.ones(k, bool)
    seen = set()
    for r in range(300):
        dropped, limit, straggler = avail.draw(steps, real, seed=1, round_idx=r)
        assert straggler.sum() == k - round(k * (1 - fraction)) and not dropped.any()
        done = limit[straggler] // per_epoch[straggler]
        np.testing.assert_array_equal(limit[straggler] % per_epoch[straggler], 0)
        assert done.min(initial=1) >= 1 and done.max(initial=1) <= epochs - 1
        seen.update(done.tolist())
        np.testing.assert_array_equal(limit[~straggler], steps[~straggler])
    assert seen == (set(range(1, epochs)) if fraction else set())
    drop = Availability(straggler_fraction=fraction, straggler_policy="drop",
                        straggler_sampling="exact", straggler_epochs=epochs)
    dropped, limit, straggler = drop.draw(steps, real, seed=1, round_idx=7)
    # The same devices straggle under both policies (the code seeds both with the round).
    np.testing.assert_array_equal(straggler, avail.draw(steps, real, seed=1, round_idx=7)[2])
    np.testing.assert_array_equal(dropped, straggler)
    assert np.all(limit[straggler] == 0)
    with pytest.raises(ValueError, match="multiple of it"):
        Availability(straggler_fraction=0.5, straggler_epochs=3).draw(
            np.full(4, 7), np.ones(4, bool), seed=0, round_idx=0)
    with pytest.raises(ValueError, match="straggler_sampling"):
        Availability(straggler_sampling="sometimes")
    with pytest.raises(ValueError, match="straggler_epochs"):
        Availability(straggler_epochs=0)


def test_fedprox_keeps_stragglers_partial_work():
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    avail = Availability(straggler_fraction=0.7, straggler_policy="partial")
    alg = fedprox(MODEL, optax.sgd(0.2), mu=0.5, batch_size=4, local_epochs=2)
    res = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=4, seed=9,
              availability=avail)
    assert sum(h["stragglers"] for h in res.history) > 0
    assert all(h["dropped"] == 0 for h in res.history)
    ref = numpy_fedprox_stragglers(data, params, avail, rounds=3, cpr=4, mu=0.5, lr=0.2, seed=9)
    np.testing.assert_allclose(res.server_state.params["w"], ref["w"], atol=1e-5)
    np.testing.assert_allclose(res.server_state.params["b"], ref["b"], atol=1e-5)
    # Fewer local steps on average than the punctual run.
    full = run(alg, VmapBackend("vmap"), data, params, rounds=3, clients_per_round=4, seed=9)
    assert sum(h["local_steps"] for h in res.history) < sum(h["local_steps"] for h in full.history)


def test_drop_policy_discards_stragglers_like_fedavg():
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    alg = fedavg(MODEL, optax.sgd(0.2), batch_size=4, local_epochs=2)
    avail = Availability(straggler_fraction=0.5, straggler_policy="drop")
    clients = [0, 1, 2, 3, 4, 5]
    state, _, info, cohort = _run_round(alg, data, clients, 6, seed=4, availability=avail)
    gone = np.asarray(cohort.weight) == 0
    assert 0 < gone.sum() < 6, "pick a seed where some but not all clients straggle"
    assert info == {"dropped": float(gone.sum()), "stragglers": float(gone.sum())}
    kept = [c for c, g in zip(clients, gone, strict=True) if not g]
    ref, _, _, _ = _run_round(alg, data, kept, 6, seed=4)
    chex.assert_trees_all_close(state.params, ref.params, atol=1e-6)


@pytest.mark.parametrize("device_table", [True, False], ids=["device", "host"])
def test_padded_slots_are_untouched_and_types_kept(device_table):
    data = make_population([5, 9, 6], seed=2)
    builder = CohortBuilder(data, batch_size=4, local_epochs=1, cohort_size=5, seed=0,
                            device_table=device_table)
    cohort = builder.build(0, [0, 2])
    out, info = Availability(dropout=1.0).apply(cohort, seed=0, round_idx=0)
    assert info["dropped"] == 2.0
    assert type(out.mask) is type(cohort.mask) and type(out.weight) is type(cohort.weight)
    assert float(np.asarray(out.mask).sum()) == 0.0
    np.testing.assert_array_equal(np.asarray(out.client_ids), np.asarray(cohort.client_ids))
    same, info = Availability().apply(cohort, seed=0, round_idx=0)
    assert info == {"dropped": 0.0, "stragglers": 0.0}
    np.testing.assert_array_equal(np.asarray(same.mask), np.asarray(cohort.mask))
    np.testing.assert_array_equal(np.asarray(same.weight), np.asarray(cohort.weight))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\]"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\]"),
        ({"dropout": math.nan}, ValueError, r"dropout must be in \[0, 1\]"),
        ({"straggler_fraction": True}, TypeError, "straggler_fraction must be a float"),
        ({"straggler_policy": "wait"}, ValueError, "straggler_policy must be 'partial'"),
    ],
    ids=["dropout>1", "dropout<0", "nan", "bool", "policy"],
)
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        Availability(**kwargs)


def test_runner_rejects_a_non_availability():
    data = make_population([5, 6], seed=0)
    alg = fedavg(MODEL, optax.sgd(0.1), batch_size=4)
    with pytest.raises(TypeError, match=r"availability must be a fedjax_lab\.systems"):
        run(alg, VmapBackend("vmap"), data, MODEL.init(jax.random.key(0)), rounds=1,
            clients_per_round=1, seed=0, availability={"dropout": 0.1})
