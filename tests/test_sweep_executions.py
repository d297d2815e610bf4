"""Sweep executions (vmap, map, host, auto): each computes the runs of ``runner.run``."""

from typing import NamedTuple

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import top_k, with_error_feedback
from fedjax_lab.runner import run
from fedjax_lab.sweep import VMAP_PARAMETER_LIMIT, resolve_execution, sweep
from tests.helpers import LinearModel, make_population

DATA = make_population([7, 12, 3, 9, 15, 5, 8, 10], seed=1)
GRID = {"client_lr": [0.1, 0.4], "server_lr": [0.7]}
SEEDS = [0, 3]
ROUNDS, PER_ROUND = 3, 3


class ConvShapedLinear(NamedTuple):
    """Softmax regression whose weight is stored as a 1x1 conv kernel ``[1, 1, dim, classes]``:
    convex like ``LinearModel``, but its rank-4 leaf makes the plan rules treat it as a conv
    model (the host execution then runs its clients as an unrolled loop on CPU)."""

    dim: int
    classes: int

    def init(self, key: jax.Array) -> dict:
        return {"w": 0.1 * jax.random.normal(key, (1, 1, self.dim, self.classes)),
                "b": jax.numpy.zeros(self.classes)}

    @staticmethod
    def apply(params: dict, x: jax.Array) -> jax.Array:
        w = params["w"].reshape(params["w"].shape[2:])
        return x.reshape(x.shape[0], -1) @ w + params["b"][None, :]


MODELS = {"dense": LinearModel(dim=5, classes=3), "conv": ConvShapedLinear(dim=5, classes=3)}


def make_algorithm(model, client_lr, server_lr, compressor=None):
    return fedavg(model, optax.sgd(client_lr), batch_size=4,
                  server_optimizer=optax.sgd(server_lr), compressor=compressor)


def run_sweep(kind, **kwargs):
    model = MODELS[kind]
    return sweep(lambda h: make_algorithm(model, h["client_lr"], h["server_lr"]), GRID, DATA,
                 lambda s: model.init(jax.random.key(s)), seeds=SEEDS, rounds=ROUNDS,
                 clients_per_round=PER_ROUND, **kwargs)


@pytest.fixture(scope="module")
def references():
    """``runner.run`` of every (model, seed, point): final params and per-round losses."""
    refs = {}
    for kind, model in MODELS.items():
        for s, seed in enumerate(SEEDS):
            for g, lr in enumerate(GRID["client_lr"]):
                # Packing off: the padded round (packing computes the same numbers, but its
                # cost-model probe would compile extra programs per run).
                res = run(make_algorithm(model, lr, GRID["server_lr"][0]),
                          VmapBackend("vmap", packing="off"), DATA,
                          model.init(jax.random.key(seed)), rounds=ROUNDS,
                          clients_per_round=PER_ROUND, seed=seed)
                refs[kind, s, g] = (res.server_state.params,
                                    [rec["train_loss"] for rec in res.history])
    return refs


@pytest.mark.parametrize(
    ("kind", "kwargs", "want"),
    [
        ("dense", {"execution": "vmap"}, "vmap"),
        ("dense", {"execution": "map"}, "map"),
        ("dense", {"points_per_batch": 2, "execution": "map"}, "map"),
        ("dense", {"execution": "host"}, "host"),  # clients vmapped (the round's vmap plan)
        ("conv", {}, "host"),  # auto on CPU: clients an unrolled loop, no while loop
        ("conv", {"execution": "vmap"}, "vmap"),
    ],
    ids=["vmap", "map1", "map2", "host_dense", "auto_conv_host", "vmap_conv"],
)
def test_every_execution_equals_the_sequential_runs(references, kind, kwargs, want):
    if kind == "conv" and not kwargs and jax.default_backend() != "cpu":
        pytest.skip("auto picks host for conv models on CPU only")
    res = run_sweep(kind, **kwargs)
    assert res.execution == want
    for s in range(len(SEEDS)):
        for g in range(len(GRID["client_lr"])):
            params, losses = references[kind, s, g]
            chex.assert_trees_all_close(jax.tree.map(lambda x, s=s, g=g: x[s, g], res.params),
                                        params, atol=1e-5, rtol=0)
            np.testing.assert_allclose(res.history["train_loss"][s, g], losses, atol=1e-5,
                                       rtol=0)


def test_host_execution_keeps_client_states_like_the_runner():
    # Error feedback: the host execution carries (and donates) the population table between
    # its round calls; a residual lost or shared across points would change the runs.
    data = make_population([6, 9, 4, 7], seed=2)
    model = MODELS["dense"]
    comp = with_error_feedback(top_k(3))
    res = sweep(lambda h: make_algorithm(model, h["client_lr"], 1.0, comp),
                {"client_lr": [0.2, 0.5]}, data, model.init(jax.random.key(1)), seeds=[2],
                rounds=4, clients_per_round=3, execution="host")
    for g, lr in enumerate([0.2, 0.5]):
        ref = run(make_algorithm(model, lr, 1.0, comp), VmapBackend("vmap", packing="off"), data,
                  model.init(jax.random.key(1)), rounds=4, clients_per_round=3, seed=2)
        chex.assert_trees_all_close(jax.tree.map(lambda x, g=g: x[0, g], res.params),
                                    ref.server_state.params, atol=1e-5, rtol=0)


def _shapes(*shapes):
    return {f"p{i}": jax.ShapeDtypeStruct(s, np.float32) for i, s in enumerate(shapes)}


def test_auto_rule():
    small, large = _shapes((64, 10), (10,)), _shapes((VMAP_PARAMETER_LIMIT, 2))
    conv = _shapes((5, 5, 1, 32), (32,))
    assert resolve_execution("auto", 4, large, 10, 2, 16) == ("map", 4)
    assert resolve_execution("map", None, small, 10, 2, 16) == ("map", 1)
    assert resolve_execution("vmap", None, large, 10, 2, 16) == ("vmap", None)
    assert resolve_execution("host", None, small, 10, 2, 16) == ("host", None)
    if jax.default_backend() == "cpu":
        assert resolve_execution("auto", None, small, 10, 2, 16) == ("vmap", None)
        assert resolve_execution("auto", None, large, 10, 2, 16) == ("map", 1)
        assert resolve_execution("auto", None, conv, 10, 2, 16) == ("host", None)
    else:
        assert resolve_execution("auto", None, conv, 10, 2, 16) == ("vmap", None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"execution": "scan"}, "execution must be one of"),
        ({"execution": "vmap", "points_per_batch": 2}, "points_per_batch groups points"),
        ({"execution": "host", "points_per_batch": 1}, "points_per_batch groups points"),
    ],
    ids=["unknown", "vmap_per_batch", "host_per_batch"],
)
def test_bad_execution_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_sweep("dense", **kwargs)
