"""Local DP FedAvg: numpy reference (L2 / L1 clipping), the noise each upload carries (10^4
uploads of one client, vmapped) and the local-DP accountant against closed forms."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import ldp_fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.data.cohort import CohortBuilder
from fedjax_lab.privacy import analytic_gaussian_epsilon, ldp_privacy, ldp_round_epsilon
from fedjax_lab.runner import run
from tests.algorithms._numpy_ref import client_steps, local_sgd, make_builder, to_np
from tests.helpers import LinearModel, make_population
from tests.privacy._dp_ref import BATCH, LR, l1, l2, round_deltas, scaled

MODEL = LinearModel(dim=5, classes=3)


def make(mechanism, m=0.0, clip=0.5):
    return ldp_fedavg(MODEL, optax.sgd(LR), batch_size=BATCH, clip_norm=clip,
                      noise_multiplier=m, mechanism=mechanism)


@pytest.mark.parametrize("mechanism", ["laplace"])
def test_noise_free_ldp_fedavg_matches_numpy(mechanism):
    # m = 0: each client's update clipped in L1 (laplace), uniform mean. (The L2 clip of the
    # gaussian mechanism is checked against numpy by the mean of the noise below: one compile
    # fewer.)
    data = make_population([7, 12, 3, 9, 15, 5], seed=1)
    params = MODEL.init(jax.random.key(0))
    clip, norm = (0.9, l2) if mechanism == "gaussian" else (3.0, l1)
    result = run(make(mechanism, clip=clip), VmapBackend("vmap"), data, params, rounds=2,
                 clients_per_round=4, seed=7)
    p, clipped = to_np(params), 0
    for r in range(2):
        deltas = round_deltas(data, p, r, clients_per_round=4, seed=7)
        clipped += sum(norm(d) > clip for d in deltas)
        mean = {k: sum(scaled(d, min(1.0, clip / norm(d)))[k] for d in deltas) / len(deltas)
                for k in p}
        p = {k: p[k] + mean[k] for k in p}
    np.testing.assert_allclose(result.server_state.params["w"], p["w"], atol=1e-6)
    np.testing.assert_allclose(result.server_state.params["b"], p["b"], atol=1e-6)
    assert sum(h["clipped_clients"] for h in result.history) == clipped
    assert 0 < clipped < 8  # both branches of the clip were exercised


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_each_upload_carries_the_stated_noise(mechanism):
    # One client's upload 10^4 times with independent keys (jit(vmap)): upload - clip(delta)
    # (delta from the numpy reference) is i.i.d. N(0, (m C)^2) or Lap(m C) per coordinate.
    # Tolerances: 5 standard errors; the Laplace case also checks E|x| = b (a Gaussian of the
    # same variance has E|x| = 1.128 b).
    n, m, clip = 10_000, 0.8, 0.5
    data = make_population([9], seed=2)
    params = MODEL.init(jax.random.key(1))
    alg = make(mechanism, m=m, clip=clip)
    cohort = CohortBuilder(data, batch_size=BATCH, local_epochs=1, cohort_size=1, seed=0,
                           device_table=False).build(0, np.arange(1))
    cohort = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape[1:])), cohort)
    outputs, _ = jax.jit(lambda c, k: VmapBackend("vmap").client_outputs(
        alg, alg.init(params), (), c, k))(cohort, jax.random.split(jax.random.key(3), n))
    p = to_np(params)
    builder = make_builder(data, batch_size=BATCH, local_epochs=1, seed=0)
    q = local_sgd(p, data, client_steps(builder, 0, 0), LR)
    delta = {k: q[k] - p[k] for k in p}
    norm = l2(delta) if mechanism == "gaussian" else l1(delta)
    assert norm > clip
    want = scaled(delta, clip / norm)
    noise = np.concatenate([np.asarray(outputs.update[k], np.float64).reshape(n, -1)
                            - want[k].reshape(1, -1) for k in ("w", "b")], axis=1)
    b = m * clip
    var = 2 * b**2 if mechanism == "laplace" else b**2
    # Fourth moment of Laplace is 24 b^4 (Gaussian: 3 sigma^4): sd of the sample variance.
    kurt = 6.0 if mechanism == "laplace" else 3.0
    assert abs(noise.var() - var) <= 5 * var * math.sqrt((kurt - 1) / noise.size)
    assert abs(noise.mean()) <= 5 * math.sqrt(var / noise.size)
    if mechanism == "laplace":
        assert abs(np.abs(noise).mean() - b) <= 5 * b / math.sqrt(noise.size)
    # Different clients' noise is independent (correlation across uploads ~ 0).
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) <= 5 / math.sqrt(n)


def test_laplace_accountant_against_closed_forms():
    m, k, delta = 4.0, 10, 1e-5
    eps0 = 2.0 / m  # L1 sensitivity 2C, scale m C
    assert ldp_round_epsilon("laplace", m) == eps0
    own = ldp_privacy(mechanism="laplace", noise_multiplier=m, participations=k, delta=delta,
                      accountant="rdp")
    assert own.epsilon == pytest.approx(k * eps0) and own.delta == 0.0  # basic composition
    pld = ldp_privacy(mechanism="laplace", noise_multiplier=m, participations=k, delta=delta,
                      accountant="dp_accounting_pld")
    rdp = ldp_privacy(mechanism="laplace", noise_multiplier=m, participations=k, delta=delta,
                      accountant="dp_accounting")
    assert pld.epsilon < rdp.epsilon < k * eps0  # PLD is the tightest; both beat basic
    # One upload: delta(eps) = 1 - exp((eps - eps0) / 2) for the Laplace mechanism, so
    # eps(delta) = eps0 + 2 log(1 - delta).
    one = ldp_privacy(mechanism="laplace", noise_multiplier=m, participations=1, delta=0.05,
                      accountant="dp_accounting_pld")
    assert one.epsilon == pytest.approx(eps0 + 2 * math.log(1 - 0.05), abs=2e-3)


def test_gaussian_accountant_against_the_analytic_gaussian():
    m, k, delta = 8.0, 20, 1e-5
    # k uploads with multiplier m/2 compose to one Gaussian with multiplier m / (2 sqrt(k)).
    exact = analytic_gaussian_epsilon(m / (2 * math.sqrt(k)), delta)
    import dp_accounting.gaussian_mechanism as gm

    assert exact == pytest.approx(gm.get_epsilon_gaussian(m / (2 * math.sqrt(k)), delta),
                                  rel=1e-9)
    pld = ldp_privacy(mechanism="gaussian", noise_multiplier=m, participations=k, delta=delta,
                      accountant="dp_accounting_pld")
    assert pld.epsilon == pytest.approx(exact, rel=2e-3)
    own = ldp_privacy(mechanism="gaussian", noise_multiplier=m, participations=k, delta=delta,
                      accountant="rdp")
    google = ldp_privacy(mechanism="gaussian", noise_multiplier=m, participations=k,
                         delta=delta, accountant="dp_accounting")
    # Same RDP curve alpha k / (2 (m/2)^2); ours uses integer orders only.
    assert google.epsilon <= own.epsilon <= 1.01 * google.epsilon
    assert exact < google.epsilon  # RDP conversion is never tighter than the exact curve
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(m / 2), k)
    assert google.epsilon == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    assert ldp_round_epsilon("gaussian", m, delta) == pytest.approx(
        analytic_gaussian_epsilon(m / 2, delta))


@pytest.mark.parametrize(
    ("override", "match"),
    [({"mechanism": "cauchy"}, "mechanism must be"), ({"noise_multiplier": -1.0},
     "noise_multiplier must be"), ({"participations": -1}, "participations must be"),
     ({"delta": 0.0}, "delta must be"), ({"accountant": "moments"}, "accountant must be")],
    ids=["mechanism", "m", "k", "delta", "accountant"],
)
def test_bad_accountant_input_raises(override, match):
    args = {"mechanism": "gaussian", "noise_multiplier": 1.0, "participations": 3,
            "delta": 1e-5, **override}
    with pytest.raises(ValueError, match=match):
        ldp_privacy(**args)
    with pytest.raises(ValueError, match="mechanism must be"):
        ldp_fedavg(MODEL, optax.sgd(LR), batch_size=BATCH, clip_norm=1.0, noise_multiplier=1.0,
                   mechanism="cauchy")
