"""experiments/fedprox_synthetic.py (FedProx §5.2): outputs, FedAvg vs FedProx, dissimilarity."""

import json
import math

import jax
import numpy as np
import pytest

from fedjax_lab.data.datasets import federate, synthetic
from fedjax_lab.experiments_lib.fedprox_synthetic import (
    CURVE_METRICS,
    best_mu,
    gradient_dissimilarity,
    main,
    make_round_evaluator,
)
from fedjax_lab.models import get_model
from tests.helpers import assert_refused

# One dataset, 0 % and 90 % stragglers, FedAvg / FedProx mu=0 / mu=1, 3 rounds of 2 epochs.
TINY = ["--quick", "--rounds", "3", "--local-epochs", "2"]


def numpy_device_grads(kernel, bias, x, y, owner, num_devices):
    """Per-device gradients of the mean softmax cross-entropy of x @ kernel + bias, by hand."""
    logits = x @ kernel + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    err = p - np.eye(kernel.shape[1])[y]
    grads, losses = [], []
    for k in range(num_devices):
        m = owner == k
        grads.append(np.concatenate([(x[m].T @ err[m]).ravel(), err[m].sum(0)]) / m.sum())
        losses.append(-np.log(p[m, y[m]]).mean())
    return np.array(grads), np.array(losses)


def test_round_evaluator_matches_numpy():
    ds = synthetic(1.0, 1.0, 5, seed=3)
    data = federate(ds, "natural", None, seed=0)
    model = get_model("logreg", ds.input_shape, ds.num_classes)
    params = model.init(jax.random.key(1))
    kernel = np.asarray(params["dense"]["kernel"], np.float64)
    bias = np.asarray(params["dense"]["bias"], np.float64)
    np.testing.assert_allclose(model.apply(params, data.arrays["x"][:4]),
                               data.arrays["x"][:4] @ kernel + bias, rtol=1e-4, atol=1e-4)
    owner = np.repeat(np.arange(5), data.sizes)
    x = np.asarray(data.arrays["x"], np.float64)
    grads, losses = numpy_device_grads(kernel, bias, x, data.arrays["y"], owner, 5)
    n = data.sizes.astype(np.float64)
    centre = (n / n.sum()) @ grads
    expected = np.mean([np.sum((g - centre) ** 2) for g in grads])
    got = make_round_evaluator(model.apply, data, ds.test)(params)
    assert got["grad_variance"] == pytest.approx(expected, rel=1e-4)
    assert gradient_dissimilarity(grads, n) == pytest.approx(expected, rel=1e-12)
    assert got["train_loss"] == pytest.approx(float(losses @ n / n.sum()), rel=1e-5)
    test_pred = np.argmax(np.asarray(ds.test["x"], np.float64) @ kernel + bias, axis=1)
    assert got["test_accuracy"] == pytest.approx(np.mean(test_pred == ds.test["y"]), abs=1e-6)
    # Identical devices have no dissimilarity.
    assert gradient_dissimilarity(np.ones((3, 4)), np.array([1.0, 2.0, 3.0])) == 0.0


def test_best_mu_is_the_lowest_final_loss_and_never_a_nan():
    curves = {"fedprox_mu0.1": {"final_train_loss": 0.5},
              "fedprox_mu1": {"final_train_loss": 0.4},
              "fedprox_mu0.01": {"final_train_loss": math.nan}}
    assert best_mu(curves, (0.01, 0.1, 1.0)) == 1.0
    curves["fedprox_mu1"]["final_train_loss"] = math.inf
    assert best_mu(curves, (0.01, 0.1, 1.0)) == 0.1


def test_quick_run_fedavg_drops_and_fedprox_keeps_stragglers(tmp_path, capsys):
    out = tmp_path / "fig"
    code = main([*TINY, "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    for metric in CURVE_METRICS:
        assert (out / f"{metric}.png").stat().st_size > 1000
    (ds,) = res["datasets"].values()
    assert ds["stats"]["devices"] == 30
    assert set(ds["cells"]) == {"0%", "90%"}
    for cell in ds["cells"].values():
        assert set(cell["curves"]) == {"fedavg", "fedprox_mu0", "fedprox_mu1"}
        assert cell["best_mu"] == 1.0
        for curve in cell["curves"].values():
            for metric in CURVE_METRICS:
                assert len(curve[metric]) == 4 and np.all(np.isfinite(curve[metric]))
    # No stragglers: FedAvg's dropping and FedProx's keeping of partial work are the same
    # rule, and FedProx with mu = 0 is FedAvg: the curves are identical, not just close.
    zero = ds["cells"]["0%"]["curves"]
    for metric in CURVE_METRICS:
        assert zero["fedavg"][metric] == zero["fedprox_mu0"][metric]
    # 90 %: of 10 sampled devices exactly 9 straggle every round; FedAvg drops all 9 (it
    # averages one device), FedProx mu = 0 keeps their partial epochs, so the curves part.
    ninety = ds["cells"]["90%"]["curves"]
    assert ninety["fedavg"]["dropped"] == [9.0] * 3 == ninety["fedavg"]["stragglers"]
    assert ninety["fedprox_mu0"]["stragglers"] == [9.0] * 3
    assert ninety["fedprox_mu0"]["dropped"] == [0.0] * 3
    assert ninety["fedavg"]["train_loss"][0] == ninety["fedprox_mu0"]["train_loss"][0]
    assert ninety["fedavg"]["train_loss"][1:] != ninety["fedprox_mu0"]["train_loss"][1:]
    assert "[Synthetic(1,1) 90% stragglers] fedavg loss" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--datasets", "2_2"], "--datasets must be distinct names"),
        (["--stragglers", "0,1"], "--stragglers must be fractions in [0, 1)"),
        (["--mus", "0"], "--mus must be finite floats > 0"),
        (["--clients-per-round", "31"], "--clients-per-round (31) must be <= --num-clients"),
        (["--lr", "-1"], "--lr must be a finite float > 0"),
        (["--train-fraction", "1"], "--train-fraction must lie in (0, 1)"),
        (["--mus", "a,b"], "--mus must be comma-separated numbers"),
        (["--straggler-model", "coin"], "--straggler-model: invalid choice"),
    ],
    ids=["datasets", "stragglers", "mu", "cpr", "lr", "fraction", "mu-text", "model"],
)
def test_bad_flags_exit_2(argv, message, capsys, tmp_path):
    assert_refused(main, ([*TINY, "--out", str(tmp_path), *argv],), message, capsys, tmp_path)
