"""Sweep executions (vmap, map, host, auto): each computes the runs of ``runner.run``."""

from typing import NamedTuple

import chex
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import top_k, with_error_feedback
from fedjax_lab.runner import run
from fedjax_lab.sweep import (
    PACKING_LIMIT,
    VMAP_PARAMETER_LIMIT,
    resolve_execution,
    resolve_packing,
    sweep,
)
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
        # LinearModel's initial weights, reshaped: both models train the same numbers, so the
        # dense model's sequential runs are this one's references too (a reshape is exact).
        dense = LinearModel(self.dim, self.classes).init(key)
        return {"w": dense["w"].reshape(1, 1, self.dim, self.classes), "b": dense["b"]}

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
    """``runner.run`` of every (seed, point) of the dense model: final params and per-round
    losses (the conv-shaped model's runs are the same, its kernel reshaped)."""
    refs = {}
    model = MODELS["dense"]
    for s, seed in enumerate(SEEDS):
        for g, lr in enumerate(GRID["client_lr"]):
            # Packing off: the padded round (packing computes the same numbers, but its
            # cost-model probe would compile extra programs per run).
            res = run(make_algorithm(model, lr, GRID["server_lr"][0]),
                      VmapBackend("vmap", packing="off"), DATA,
                      model.init(jax.random.key(seed)), rounds=ROUNDS,
                      clients_per_round=PER_ROUND, seed=seed)
            refs[s, g] = (res.server_state.params, [rec["train_loss"] for rec in res.history])
    return refs


@pytest.mark.parametrize(
    ("kind", "kwargs", "want"),
    [
        ("dense", {"execution": "vmap"}, ("vmap", "vmap")),
        ("dense", {"points_per_batch": 2, "client_plan": "unrolled"}, ("map", "unrolled")),
        ("dense", {"execution": "host"}, ("host", "vmap")),
        ("dense", {"execution": "host", "client_plan": "unrolled"}, ("host", "unrolled")),
        ("conv", {}, ("host", "unrolled")),  # auto on CPU: no while loop around the model
        ("conv", {"execution": "vmap"}, ("vmap", "unrolled")),
    ],
    ids=["vmap", "map2_unrolled", "host", "host_unrolled", "auto_conv",
         "vmap_conv_unrolled"],
)
def test_every_execution_equals_the_sequential_runs(references, kind, kwargs, want):
    res = run_sweep(kind, **kwargs)
    if kind == "dense" or jax.default_backend() == "cpu":  # the conv choices are CPU rules
        assert (res.execution, res.client_plan) == want
    for s in range(len(SEEDS)):
        for g in range(len(GRID["client_lr"])):
            params, losses = references[s, g]
            got = jax.tree.map(lambda x, s=s, g=g: x[s, g], res.params)
            got["w"] = got["w"].reshape(params["w"].shape)  # the conv-shaped kernel
            chex.assert_trees_all_close(got, params, atol=1e-5, rtol=0)
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
    # The second point runs after the first: a residual leaking from it would show here.
    ref = run(make_algorithm(model, 0.5, 1.0, comp), VmapBackend("vmap", packing="off"), data,
              model.init(jax.random.key(1)), rounds=4, clients_per_round=3, seed=2)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0, 1], res.params),
                                ref.server_state.params, atol=1e-5, rtol=0)


def _shapes(*shapes):
    return {f"p{i}": jax.ShapeDtypeStruct(s, np.float32) for i, s in enumerate(shapes)}


def test_auto_rule():
    small, large = _shapes((64, 10), (10,)), _shapes((VMAP_PARAMETER_LIMIT, 2))
    conv = _shapes((5, 5, 1, 32), (32,))

    def rule(execution, per_batch, plan, params, clients=10, steps=2):
        return resolve_execution(execution, per_batch, plan, params, clients, steps, 16)

    assert rule("auto", 4, "auto", large) == ("map", 4, "vmap")
    assert rule("map", None, "unrolled", small) == ("map", 1, "unrolled")
    assert rule("vmap", None, "auto", large) == ("vmap", None, "vmap")
    assert rule("host", None, "auto", small) == ("host", None, "vmap")
    if jax.default_backend() == "cpu":
        assert rule("auto", None, "auto", small) == ("vmap", None, "vmap")
        # Skewed client sizes: rounds padded to the longest one would more than double the steps.
        assert resolve_execution("auto", None, "auto", small, 10, 2, 16, 2.5) == (
            "host", None, "vmap")
        assert resolve_execution("auto", None, "auto", small, 10, 2, 16, 2.0) == (
            "vmap", None, "vmap")
        assert rule("auto", None, "auto", large) == ("host", None, "unrolled")
        assert rule("auto", None, "auto", large, 10, 13) == ("host", None, "vmap")  # > 128
        assert rule("auto", None, "vmap", large) == ("host", None, "vmap")
        assert rule("auto", None, "auto", conv) == ("host", None, "unrolled")
        assert rule("auto", None, "auto", conv, 10, 13) == ("host", None, "unrolled")
    else:
        assert rule("auto", None, "auto", conv) == ("vmap", None, "vmap")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"execution": "scan"}, "execution must be one of"),
        ({"execution": "vmap", "points_per_batch": 2}, "points_per_batch groups points"),
        ({"execution": "host", "points_per_batch": 1}, "points_per_batch groups points"),
        ({"client_plan": "loop"}, "client_plan must be one of"),
    ],
    ids=["unknown", "vmap_per_batch", "host_per_batch", "client_plan"],
)
def test_bad_execution_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_sweep("dense", **kwargs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--execution", "scan"], "--execution must be one of auto, vmap, map, host"),
        (["--execution", "host", "--points-per-batch", "2"], "--points-per-batch groups"),
        (["--packing", "yes"], "--packing must be one of auto, on, off"),
        (["--packing", "on", "--execution", "vmap"], "--packing on packs the rounds of"),
        (["--packing", "on", "--points-per-batch", "2"], "--packing on packs the rounds of"),
    ],
    ids=["unknown", "host_per_batch", "packing_unknown", "packing_vmap", "packing_per_batch"],
)
def test_cli_execution_flag_is_validated(argv, message, capsys):
    from fedjax_lab.sweep import main

    assert main(argv) == 2  # refused before anything is built
    assert message in capsys.readouterr().err


def test_host_rounds_keep_their_own_steps_on_skewed_sizes():
    # One client holds 60 examples (15 steps at batch 4), the others 1-3 (one step): most
    # rounds are far shorter than the longest. The host execution runs each round at its own
    # step count (one compilation per count), `auto` picks it for a small dense model because
    # padding every round to the longest would more than double the steps, and every run still
    # equals runner.run.
    data = make_population([60, 1, 2, 3, 1, 2, 3, 1], seed=4)
    model = MODELS["dense"]
    res = sweep(lambda h: make_algorithm(model, h["client_lr"], 1.0), {"client_lr": [0.1, 0.3]},
                data, model.init(jax.random.key(1)), seeds=[5], rounds=6, clients_per_round=2)
    assert res.execution == "host"
    for g, lr in enumerate((0.1, 0.3)):
        ref = run(make_algorithm(model, lr, 1.0), VmapBackend("vmap", packing="off"), data,
                  model.init(jax.random.key(1)), rounds=6, clients_per_round=2, seed=5)
        chex.assert_trees_all_close(jax.tree.map(lambda x, g=g: x[0, g], res.params),
                                    ref.server_state.params, atol=1e-5, rtol=0)


SKEWED = make_population([60, 1, 2, 3, 1, 2, 3, 1, 30, 5, 4, 2], seed=4)


@pytest.mark.parametrize(
    ("packing", "compressor", "client_plan"),
    [
        ("on", None, "vmap"),  # the cost model's layout (one slot on CPU: clients in a row)
        (PackingPolicy(slots=2, segment_steps=4), None, "vmap"),  # vmapped slots, tail calls
        (PackingPolicy(slots=2, segment_steps=4), "error_feedback", "vmap"),  # client states
        (PackingPolicy(slots=2, segment_steps=2), None, "unrolled"),  # straight-line steps
    ],
    ids=["on", "two_slots", "two_slots_error_feedback", "two_slots_unrolled"],
)
def test_packed_host_rounds_equal_the_runner(packing, compressor, client_plan):
    # A heavy-tailed population (one client 15 steps at batch 4, most one step): the host
    # execution packs each round's clients into slots like the vmap backend, and every
    # (seed, point) run still equals runner.run, with the stateful algorithm's residuals
    # gathered and scattered by client id around the packed round.
    model = MODELS["dense"]
    comp = with_error_feedback(top_k(3)) if compressor else None
    seeds, lrs = [5, 6], [0.1, 0.3]
    res = sweep(lambda h: make_algorithm(model, h["client_lr"], 1.0, comp), {"client_lr": lrs},
                SKEWED, lambda s: model.init(jax.random.key(s)), seeds=seeds, rounds=6,
                clients_per_round=4, execution="host", packing=packing, client_plan=client_plan)
    assert res.packed_layouts and res.client_plan == client_plan
    for s, seed in enumerate(seeds):
        for g, lr in enumerate(lrs):
            ref = run(make_algorithm(model, lr, 1.0, comp), VmapBackend("vmap", packing="off"),
                      SKEWED, model.init(jax.random.key(seed)), rounds=6, clients_per_round=4,
                      seed=seed)
            chex.assert_trees_all_close(jax.tree.map(lambda x, s=s, g=g: x[s, g], res.params),
                                        ref.server_state.params, atol=1e-5, rtol=0)
            np.testing.assert_allclose(res.history["train_loss"][s, g],
                                       [rec["train_loss"] for rec in ref.history], atol=1e-5,
                                       rtol=0)


def test_packed_host_rounds_compute_fewer_steps_than_padded_ones():
    model = MODELS["dense"]

    def host(packing):
        return sweep(lambda h: make_algorithm(model, h["client_lr"], 1.0), {"client_lr": [0.2]},
                     SKEWED, model.init(jax.random.key(1)), seeds=[5], rounds=6,
                     clients_per_round=4, execution="host", packing=packing)

    padded, packed = host("off"), host(PackingPolicy(slots=2, segment_steps=4))
    assert padded.packed_layouts == () and packed.packed_layouts == ((2, 4),)
    assert padded.real_steps == packed.real_steps > 0
    # Padded: 4 clients x each round's own steps; packed: 2 slots x each layout's length.
    assert packed.computed_steps < 0.6 * padded.computed_steps
    chex.assert_trees_all_close(packed.params, padded.params, atol=1e-5, rtol=0)


def test_auto_packing_leaves_evenly_sized_rounds_padded():
    # DATA's clients have 1-4 steps: the rounds' own padding stays under PACKING_LIMIT, so the
    # host execution keeps its one program per step count (no cost-model probe, no layouts).
    res = run_sweep("dense", execution="host")
    assert res.packed_layouts == ()
    assert res.computed_steps <= PACKING_LIMIT * res.real_steps


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"packing": "always"}, "packing must be one of"),
        ({"execution": "vmap", "packing": "on"}, "packs the rounds of execution='host'"),
        ({"execution": "map", "packing": PackingPolicy(slots=2)}, "packs the rounds"),
    ],
    ids=["unknown", "vmap_on", "map_slots"],
)
def test_bad_packing_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_sweep("dense", **kwargs)


def test_packing_rule():
    small, large = _shapes((64, 10), (10,)), _shapes((VMAP_PARAMETER_LIMIT, 2))
    conv = _shapes((5, 5, 1, 32), (32,))
    # Only the host execution packs; "on"/"off" are obeyed there.
    assert resolve_packing("on", "vmap", large, 10.0) == "off"
    assert resolve_packing("off", "host", large, 10.0) == "off"
    assert resolve_packing("on", "host", small, 1.0) == "on"
    # Padding under the limit: rounds stay padded; above it the cost model decides.
    assert resolve_packing("auto", "host", small, PACKING_LIMIT) == "off"
    assert resolve_packing("auto", "host", small, 2 * PACKING_LIMIT) == "auto"
    assert resolve_packing("auto", "host", conv, 2 * PACKING_LIMIT) == "auto"
    if jax.default_backend() == "cpu":
        # A packable update keeps a larger dense model's clients vmapped (to be packed: one
        # slot on CPU, clients back to back) instead of unrolling them.
        assert resolve_execution("auto", None, "auto", large, 10, 2, 16, packable=True) == (
            "host", None, "vmap")
        assert resolve_packing("auto", "host", large, 1.0) == "on"
        assert resolve_execution("auto", None, "auto", large, 10, 2, 16) == (
            "host", None, "unrolled")


def test_packing_on_selects_the_host_execution_under_auto():
    res = run_sweep("dense", packing="on")
    assert res.execution == "host" and res.packed_layouts
