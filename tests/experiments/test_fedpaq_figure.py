"""experiments/fedpaq.py (FedPAQ Figure 1, eight panels, + the O(1/T) theory check)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.algorithms.fedpaq import fedpaq
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import qsgd
from fedjax_lab.data.datasets import digits
from fedjax_lab.experiments_lib.fedpaq import (
    METHODS,
    PAPER_PANELS,
    FedPAQFigureConfig,
    build_problem,
    class_subset,
    main,
    panels,
    time_to_loss,
)
from fedjax_lab.experiments_lib.fedpaq_theory import centralized_minimum, fit_loglog_slope
from fedjax_lab.runner import run

TINY = ["--quick", "--num-clients", "10", "--samples-per-node", "20", "--total-iterations",
        "10", "--lr-steps", "0.01,0.05", "--nn-steps", "0.05", "--theory-iterations", "32",
        "--theory-seeds", "2"]


def _rows(setting):
    return {k: [(v.label, v.tau, v.r, v.s) for v in curves]
            for k, (_, curves) in panels(setting, 50, 100).items()}


def test_panels_are_the_papers_table():
    # §5.1 and §5.2 of the paper, written out by hand: (label, tau, r, s).
    s_vals, r_vals, taus = (1, 5, 10, None), (5, 10, 25, 50), (1, 2, 5, 10, 50)
    lr, nn = _rows("lr"), _rows("nn")
    assert [(t, r, s) for _, t, r, s in lr["1"]] == [(5, 25, s) for s in s_vals]
    assert [(t, r, s) for _, t, r, s in lr["2"]] == [(5, r, 1) for r in r_vals]
    assert [(t, r, s) for _, t, r, s in lr["3"]] == [(t, 25, 1) for t in taus]
    assert lr["4"] == [("fedpaq", 2, 50, 1), ("fedavg", 2, 50, None), ("qsgd", 1, 50, 1)]
    assert [(t, r, s) for _, t, r, s in nn["1"]] == [(2, 25, s) for s in s_vals]
    assert [(t, r, s) for _, t, r, s in nn["2"]] == [(2, r, 1) for r in r_vals]
    assert [(t, r, s) for _, t, r, s in nn["3"]] == [(t, 25, 1) for t in taus]
    assert nn["4"] == [("fedpaq", 10, 20, 1), ("fedavg", 10, 20, None), ("qsgd", 1, 50, 1)]
    assert [label for label, *_ in lr["1"]] == ["s=1", "s=5", "s=10", "s=inf"]
    # The spec says which settings the text leaves open: panel 3's fixed pair, r and tau lists.
    for setting in ("lr", "nn"):
        assert PAPER_PANELS[setting]["3"].inferred and PAPER_PANELS[setting]["2"].inferred
        assert not PAPER_PANELS[setting]["4"].inferred
    assert not PAPER_PANELS["lr"]["1"].inferred


def test_panels_scale_r_with_n_and_drop_periods_not_dividing_T():
    p = panels("nn", 10, 20)
    assert [v.r for v in p["2"][1]] == [1, 2, 5, 10]
    assert [(v.tau, v.r) for v in p["4"][1]] == [(10, 4), (10, 4), (1, 10)]
    assert [v.tau for v in p["3"][1]] == [1, 2, 5, 10]
    with pytest.raises(ValueError, match="multiple of 10"):
        panels("lr", 25, 100)


def _time_to_loss_loop(ts, losses, levels):
    out = []
    for level in levels:
        hit = None
        for t, f in zip(ts, losses, strict=True):
            if math.isfinite(f) and f <= level:
                hit = t
                break
        out.append(hit)
    return out


def test_time_to_loss_matches_a_python_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ts = np.cumsum(rng.uniform(0.5, 2.0, 12))
        losses = rng.uniform(0.0, 1.0, 12)
        losses[rng.integers(12)] = np.nan
        levels = list(rng.uniform(-0.1, 1.1, 6))
        got = time_to_loss(ts, losses, levels)
        assert got == _time_to_loss_loop(list(ts), list(losses), levels)
    # Never reached is None, not 0 (and the t = 0 point counts when it is already low enough).
    assert time_to_loss([0.0, 1.0], [0.5, 0.4], [0.45, 0.5, 0.1]) == [1.0, 0.0, None]
    with pytest.raises(ValueError, match="one length"):
        time_to_loss([0.0, 1.0], [0.5], [0.1])


def test_slope_fit_recovers_exact_power_laws():
    ts = [100, 200, 400, 800, 1600]
    slope, b = fit_loglog_slope(ts, [3.0 / t for t in ts])
    assert slope == pytest.approx(-1.0, abs=1e-12) and b == pytest.approx(math.log(3.0))
    assert fit_loglog_slope(ts, [t**-2 for t in ts])[0] == pytest.approx(-2.0, abs=1e-12)
    with pytest.raises(ValueError, match="gaps must be finite and > 0"):
        fit_loglog_slope(ts, [1.0, 0.5, 0.0, 0.1, 0.1])


def test_centralized_minimum_of_a_quadratic():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(6, 6))
    a = m @ m.T + 0.5 * np.eye(6)
    b = rng.normal(size=6)
    x_star = np.linalg.solve(a, b)
    f_star = -0.5 * b @ x_star
    ev = np.linalg.eigvalsh(a)
    aj, bj = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    got, gnorm = centralized_minimum(lambda x, d: 0.5 * x @ d[0] @ x - d[1] @ x,
                                     jnp.zeros(6, jnp.float32), (aj, bj), float(ev[-1]),
                                     float(ev[0]), 2000)
    assert got == pytest.approx(f_star, abs=1e-5) and gnorm < 1e-3


def test_class_subset_relabels_in_order():
    ds = digits()
    sub = class_subset(ds, (8, 0))
    ref = digits(classes=(8, 0))
    np.testing.assert_array_equal(sub.train["y"], ref.train["y"])
    np.testing.assert_array_equal(sub.test["x"], ref.test["x"])
    with pytest.raises(ValueError, match="classes must be distinct labels"):
        class_subset(ds, (0, 0))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fedpaq")
    out = tmp / "fig"
    code = main([*TINY, "--out", str(out), "--json", str(tmp / "r.json")])
    assert code == 0
    return out, json.loads((tmp / "r.json").read_text())


@pytest.mark.slow
def test_cli_writes_eight_panels_tuned_steps_and_time_to_loss(tiny_run):
    out, res = tiny_run
    assert (out / "figure1.png").stat().st_size > 10_000
    assert set(res["settings"]) == {"lr", "nn"}
    assert "stand-in" in res["settings"]["lr"]["source"]
    assert "CIFAR-10's shape" in res["settings"]["nn"]["source"]
    # The paper's models: MNIST logistic regression, four hidden layers with > 92K parameters.
    assert res["settings"]["lr"]["num_params"] == (28 * 28 + 1) * 2
    assert res["settings"]["nn"]["num_params"] > 92_000
    for setting, sres in res["settings"].items():
        assert set(sres["panels"]) == {"1", "2", "3", "4"}
        assert set(sres["panels"]["4"]["curves"]) == set(METHODS)
        assert sres["num_train_examples"] == 200 and sres["client_sizes"] == [20, 20]
        levels = sres["loss_levels"]
        assert len(levels) == 5 and levels == sorted(levels, reverse=True)
        for panel in sres["panels"].values():
            for label, c in panel["curves"].items():
                assert len(c["sim_time"]) == len(c["train_loss"]) == c["rounds"] + 1
                assert np.all(np.diff(c["sim_time"]) > 0)
                grid = [0.01, 0.05] if setting == "lr" else [0.05]
                assert c["step_grid"] == pytest.approx(grid) and c["step"] in c["step_grid"]
                finals = [v if v is not None else np.inf for v in c["final_loss_per_step"]]
                assert c["train_loss"][-1] == pytest.approx(min(finals), rel=1e-6)
                assert panel["time_to_loss"][label] == _time_to_loss_loop(
                    c["sim_time"], c["train_loss"], levels)
        # Every level is reached by the curve with the best final loss; nothing is a 0 time.
        times = [t for p in sres["panels"].values() for ts in p["time_to_loss"].values()
                 for t in ts]
        assert all(t is None or t > 0 for t in times)
    theory = res["theory"]
    assert theory["T"] == [2, 4, 8, 16, 32] and len(theory["gap"]) == 5
    assert theory["f_star_grad_norm"] < 1e-3
    assert theory["slope"] is None or math.isfinite(theory["slope"])


@pytest.mark.slow
def test_sweep_curve_equals_the_runner(tiny_run):
    """The curve from the sweep (loss in the compiled round, host-side clock) is the run
    ``runner.run`` gives with the time model, to 1e-5."""
    _, res = tiny_run
    cfg = FedPAQFigureConfig(num_clients=10, samples_per_node=20, total_iterations=10,
                             quick=True)
    problem = build_problem(cfg, "lr")
    curve = res["settings"]["lr"]["panels"]["4"]["curves"]["fedpaq"]
    alg = fedpaq(problem.model, problem.optimizer(curve["step"]), num_steps=curve["tau"],
                 batch_size=cfg.batch_size, compressor=qsgd(num_levels=curve["s"]))
    result = run(alg, VmapBackend("vmap"), problem.data, problem.params, rounds=curve["rounds"],
                 clients_per_round=curve["r"], seed=cfg.seed, time_model=problem.time_model,
                 evaluate=lambda p: {"loss": float(problem.objective(p))}, eval_every=1)
    np.testing.assert_allclose([h["sim_time"] for h in result.history], curve["sim_time"][1:],
                               rtol=1e-6)
    np.testing.assert_allclose([h["loss"] for h in result.history], curve["train_loss"][1:],
                               rtol=1e-5, atol=1e-6)
    assert float(problem.objective(problem.params)) == pytest.approx(
        curve["train_loss"][0], rel=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--total-iterations", "15"], "--total-iterations must be a multiple of 10"),
        (["--settings", "cnn"], "--settings must be a subset"),
        (["--num-clients", "25"], "--num-clients must be a multiple of 10"),
        (["--lr-ratio", "0"], "--lr-ratio must be a finite float > 0"),
        (["--nn-hidden", "30,x"], "--nn-hidden must be comma-separated"),
        (["--lr-steps", "0.1,-1"], "--lr-steps must be finite step sizes > 0"),
        (["--loss-fractions", "0.5,2"], "--loss-fractions must be"),
        (["--samples-per-node", "5"], "must be >= --batch-size"),
        (["--data-dir", "/nonexistent"], "holds no TFDS 'mnist'"),
    ],
    ids=["T", "settings", "n", "ratio", "hidden", "steps", "fractions", "m", "data-dir"],
)
def test_bad_flags_exit_2(argv, message, capsys, tmp_path):
    assert main([*TINY, "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
