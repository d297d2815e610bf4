"""Sweeps: every grid point equals runner.run with that setting; results, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.algorithms.fedprox import fedprox
from fedjax_lab.algorithms.robust import median, with_aggregator
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import top_k, with_error_feedback
from fedjax_lab.runner import run
from fedjax_lab.sweep import parse_values, sweep
from tests.helpers import LinearModel, make_population

MODEL = LinearModel(dim=5, classes=3)
DATA = make_population([7, 12, 3, 9, 15, 5, 8, 10], seed=1)
GRID = {"client_lr": [0.1, 0.3], "server_lr": [1.0, 0.5]}
SEEDS = [0, 3]


def init(seed):
    return MODEL.init(jax.random.key(seed))


def make_fedavg(h):
    return fedavg(MODEL, optax.sgd(h["client_lr"]), batch_size=4,
                  server_optimizer=optax.sgd(h["server_lr"]))


@pytest.fixture(scope="module")
def result():
    return sweep(make_fedavg, GRID, DATA, init, seeds=SEEDS, rounds=3, clients_per_round=3)


def _flat(tree):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize(("seed_idx", "point"), [(1, 3), (0, 0), (1, 1)],
                         ids=["seed3_lr0.3_slr0.5", "seed0_lr0.1_slr1", "seed3_lr0.1_slr0.5"])
def test_grid_point_equals_a_normal_run(result, seed_idx, point):
    h = result.points[point]
    seed = SEEDS[seed_idx]
    alg = fedavg(MODEL, optax.sgd(h["client_lr"]), batch_size=4,
                 server_optimizer=optax.sgd(h["server_lr"]))
    ref = run(alg, VmapBackend("vmap"), DATA, init(seed), rounds=3, clients_per_round=3,
              seed=seed)
    got = jax.tree.map(lambda x: x[seed_idx, point], result.params)
    chex.assert_trees_all_close(got, ref.server_state.params, atol=1e-5, rtol=0)
    for k in ("train_loss", "train_examples", "update_norm"):
        np.testing.assert_allclose(result.history[k][seed_idx, point],
                                   [rec[k] for rec in ref.history], atol=1e-5, rtol=1e-6)


def test_runs_differ_across_points_and_seeds(result):
    # Catches a sweep that ignores the traced hyperparameters or the seed.
    finals = _flat(jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), result.params))
    per_run = finals.reshape(len(SEEDS) * len(result.points), -1)
    gaps = [np.abs(per_run[i] - per_run[j]).max() for i in range(len(per_run))
            for j in range(i)]
    assert min(gaps) > 1e-4


@pytest.mark.parametrize("per_batch", [1, 3], ids=["batch1", "batch3"])
def test_points_per_batch_computes_the_same_runs(result, per_batch):
    other = sweep(make_fedavg, GRID, DATA, init, seeds=SEEDS, rounds=3, clients_per_round=3,
                  points_per_batch=per_batch)
    chex.assert_trees_all_close(other.params, result.params, atol=1e-6, rtol=0)


def test_stateful_clients_persist_like_the_runner():
    # Error feedback keeps a residual per client across rounds: the sweep's device-side
    # population table must gather/scatter it exactly like runner.ClientStateStore.
    data = make_population([6, 9, 4, 7], seed=2)
    comp = with_error_feedback(top_k(3))

    def make(h):
        return fedavg(MODEL, optax.sgd(h["client_lr"]), batch_size=4, compressor=comp)

    res = sweep(make, {"client_lr": [0.2, 0.5]}, data, init(1), seeds=[2], rounds=4,
                clients_per_round=3)
    ref = run(make({"client_lr": 0.5}), VmapBackend("vmap"), data, init(1), rounds=4,
              clients_per_round=3, seed=2)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0, 1], res.params),
                                ref.server_state.params, atol=1e-5, rtol=0)


def test_robust_aggregation_can_be_swept():
    def make(h):
        return with_aggregator(make_fedavg(h), median())

    res = sweep(make, {"client_lr": [0.3], "server_lr": [0.5]}, DATA, init, seeds=[3],
                rounds=2, clients_per_round=5)
    ref = run(make({"client_lr": 0.3, "server_lr": 0.5}), VmapBackend("vmap"), DATA, init(3),
              rounds=2, clients_per_round=5, seed=3)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0, 0], res.params),
                                ref.server_state.params, atol=1e-5, rtol=0)


def test_rows_summary_heatmap_and_csv(result, tmp_path):
    rows = result.rows()
    assert len(rows) == len(SEEDS) * 4
    assert {"client_lr", "server_lr", "seed", "final_train_loss"} <= set(rows[0])
    summary = result.summary_rows()
    point = summary[3]
    losses = [r["final_train_loss"] for r in rows if r["client_lr"] == point["client_lr"]
              and r["server_lr"] == point["server_lr"]]
    assert point["final_train_loss_mean"] == pytest.approx(np.mean(losses))
    assert point["final_train_loss_std"] == pytest.approx(np.std(losses, ddof=1))
    xs, ys, values = result.grid_values("final_train_loss", "client_lr", "server_lr")
    assert xs == [0.1, 0.3] and ys == [0.5, 1.0]
    assert values[0, 1] == pytest.approx(point["final_train_loss_mean"])
    result.plot_heatmap(str(tmp_path / "h.png"), "final_train_loss", "client_lr", "seed")
    assert (tmp_path / "h.png").stat().st_size > 1000
    result.write_csv(str(tmp_path / "rows.csv"))
    lines = (tmp_path / "rows.csv").read_text().splitlines()
    assert len(lines) == 1 + len(rows) and lines[0].startswith("client_lr,server_lr,seed")
    with pytest.raises(ValueError, match="unknown metric"):
        result.grid_values("accuracy", "client_lr", "seed")
    with pytest.raises(ValueError, match="must be 'seed' or one of"):
        result.grid_values("final_train_loss", "mu", "seed")


def test_evaluate_is_applied_to_every_final_model():
    def evaluate(params):
        return {"w_sum": float(jnp.sum(params["w"]))}

    res = sweep(make_fedavg, GRID, DATA, init, seeds=SEEDS, rounds=1, clients_per_round=2,
                evaluate=evaluate)
    want = np.asarray(jnp.sum(res.params["w"], axis=(2, 3)))
    np.testing.assert_allclose(res.final["w_sum"], want, rtol=1e-6)


def test_fedprox_mu_can_be_swept():
    res = sweep(lambda h: fedprox(MODEL, optax.sgd(0.3), mu=h["mu"], batch_size=4),
                {"mu": [0.0, 2.0]}, DATA, init, seeds=[1], rounds=2, clients_per_round=3)
    for point, mu in enumerate([0.0, 2.0]):
        ref = run(fedprox(MODEL, optax.sgd(0.3), mu=mu, batch_size=4), VmapBackend("vmap"),
                  DATA, init(1), rounds=2, clients_per_round=3, seed=1)
        got = jax.tree.map(lambda x, p=point: x[0, p], res.params)
        chex.assert_trees_all_close(got, ref.server_state.params, atol=1e-5, rtol=0)
    assert not np.allclose(_flat(jax.tree.map(lambda x: x[0, 0], res.params)),
                           _flat(jax.tree.map(lambda x: x[0, 1], res.params)), atol=1e-4)


def test_python_checks_on_swept_values_are_reported():

    def branching(h):
        alg = make_fedavg({"client_lr": 0.1, "server_lr": 1.0})

        def client_update(state, cs, batches, *, key):
            if h["client_lr"] > 0.2:  # Python control flow on a traced value
                return alg.client_update(state, cs, batches, key=key)
            return alg.client_update(state, cs, batches, key=key)

        return alg._replace(client_update=client_update)

    with pytest.raises(ValueError, match="cannot be swept in one program"):
        sweep(branching, {"client_lr": [0.1, 0.3]}, DATA, init, seeds=[0], rounds=1,
              clients_per_round=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": {}}, "grid must be a non-empty"),
        ({"grid": {"client_lr": []}}, "must be a non-empty list"),
        ({"grid": {"client_lr": [0.1, float("nan")]}}, "must hold finite numbers"),
        ({"grid": {"seed": [1.0]}}, "other than 'seed'"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"seeds": [1, 1]}, "seeds must be distinct"),
        ({"seeds": [-1]}, "seeds must be integers >= 0"),
        ({"rounds": 0}, "rounds must be an integer >= 1"),
        ({"clients_per_round": 9}, "clients_per_round must be in"),
        ({"points_per_batch": 0}, "points_per_batch must be a positive integer"),
    ],
    ids=["empty", "no_values", "nan", "seed_name", "no_seeds", "dup_seeds", "neg_seed",
         "rounds0", "cpr", "per_batch0"],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"grid": {"client_lr": [0.1], "server_lr": [1.0]}, "seeds": [0], "rounds": 1,
            "clients_per_round": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        sweep(make_fedavg, args.pop("grid"), DATA, init, **args)


def test_parse_values():
    assert parse_values("0.1, 0.3,1") == [0.1, 0.3, 1.0]
    np.testing.assert_allclose(parse_values("geom:0.01:1:3"), [0.01, 0.1, 1.0])
    assert parse_values("geom:0.5:0.5:1") == [0.5]
    for bad, match in (("geom:1:0.1:3", "needs 0 < LO <= HI"), ("geom:1:2", "geom:LO:HI:N"),
                       ("a,b", "comma-separated"), ("", "finite comma-separated"),
                       ("1,inf", "finite comma-separated")):
        with pytest.raises(ValueError, match=match):
            parse_values(bad)
