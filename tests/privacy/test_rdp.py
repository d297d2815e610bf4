"""Our RDP accountant against published epsilons, hand values and Google's dp_accounting."""

import math

import dp_accounting
import numpy as np
import pytest

from fedjax_lab.privacy.rdp import (
    DEFAULT_ORDERS,
    epsilon_from_rdp,
    epsilon_subsampled_gaussian,
    rdp_subsampled_gaussian,
)

TF_Q = 256 / 60000  # TF Privacy MNIST tutorial: batch 256 of 60000, 234 steps per epoch
TF_STEPS_PER_EPOCH = 60000 // 256


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "published"),
    [
        # Abadi et al. 2016, Sec. 3.1: "L = 0.01N, sigma = 4, delta = 1e-5, T = 10000 ...
        # epsilon ~ 1.26 using the moments accountant".
        (0.01, 4.0, 10000, 1.26),
        # tensorflow/privacy tutorials/README.md (mnist_dpsgd_tutorial, delta = 1e-5).
        (TF_Q, 1.12, 1 * TF_STEPS_PER_EPOCH, 1.00),
        (TF_Q, 1.12, 2 * TF_STEPS_PER_EPOCH, 1.04),
        (TF_Q, 1.12, 60 * TF_STEPS_PER_EPOCH, 2.92),
        (TF_Q, 1.2, 10 * TF_STEPS_PER_EPOCH, 1.20),
    ],
    ids=["abadi_sigma4", "tf_epoch1", "tf_epoch2", "tf_epoch60", "tf_sigma1.2"],
)
def test_classic_conversion_reproduces_published_epsilons(q, sigma, steps, published):
    # Published values are rounded to 2 decimals: the tolerance is half a unit of the last one.
    eps, _ = epsilon_subsampled_gaussian(q, sigma, steps, 1e-5, conversion="classic")
    assert abs(eps - published) <= 0.005, eps


def test_improved_conversion_hand_value_for_constant_rdp():
    # Constant RDP = pure DP; hand value from dp_accounting's own test (orders 2..32).
    orders = list(range(2, 33))
    eps, order = epsilon_from_rdp(orders, [1.1] * len(orders), 1e-5)
    assert eps == pytest.approx(1.32783806176, abs=1e-9)
    assert order == 32


def test_full_sampling_is_the_plain_gaussian_mechanism():
    orders = [2, 3, 10, 64]
    np.testing.assert_allclose(rdp_subsampled_gaussian(1.0, 2.0, orders),
                               [a / 8.0 for a in orders], rtol=1e-12)


def test_binomial_expansion_matches_direct_sum_in_float64():
    # Small alpha: the log-sum-exp evaluation equals the plain binomial sum.
    q, sigma = 0.3, 1.5
    for a in (2, 3, 7):
        direct = sum(math.comb(a, k) * (1 - q) ** (a - k) * q**k
                     * math.exp((k * k - k) / (2 * sigma**2)) for k in range(a + 1))
        got = rdp_subsampled_gaussian(q, sigma, [a])[0]
        assert got == pytest.approx(math.log(direct) / (a - 1), rel=1e-12)


@pytest.mark.parametrize(
    ("q", "sigma", "steps"),
    [(0.01, 4.0, 10000), (TF_Q, 1.12, 14040), (0.1, 0.8, 100), (0.5, 5.0, 3), (1e-4, 0.5, 10)],
    ids=["abadi", "tf", "q0.1", "q0.5", "tiny_q"],
)
def test_matches_dp_accounting_at_the_same_orders(q, sigma, steps):
    orders = list(DEFAULT_ORDERS)
    ours = rdp_subsampled_gaussian(q, sigma, orders) * steps
    accountant = dp_accounting.rdp.RdpAccountant(orders)
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    np.testing.assert_allclose(ours, accountant._rdp, rtol=1e-9)
    eps, order = epsilon_from_rdp(orders, ours, 1e-5)
    want, want_order = accountant.get_epsilon_and_optimal_order(1e-5)
    assert eps == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert order == want_order


def test_monotone_in_steps_noise_and_conversion():
    e1, _ = epsilon_subsampled_gaussian(0.01, 1.0, 100, 1e-5)
    e2, _ = epsilon_subsampled_gaussian(0.01, 1.0, 1000, 1e-5)
    e3, _ = epsilon_subsampled_gaussian(0.01, 2.0, 1000, 1e-5)
    c2, _ = epsilon_subsampled_gaussian(0.01, 1.0, 1000, 1e-5, conversion="classic")
    assert e1 < e2 and e3 < e2 and e2 < c2


def test_edge_cases():
    assert epsilon_subsampled_gaussian(0.0, 1.0, 100, 1e-5)[0] == 0.0
    assert epsilon_subsampled_gaussian(0.1, 0.0, 100, 1e-5)[0] == math.inf
    assert epsilon_subsampled_gaussian(0.1, 0.0, 0, 1e-5)[0] == 0.0
    assert epsilon_subsampled_gaussian(0.1, 1.0, 0, 1e-5)[0] == 0.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: rdp_subsampled_gaussian(1.5, 1.0), "sampling rate q must be"),
        (lambda: rdp_subsampled_gaussian(0.1, -1.0), "noise_multiplier must be"),
        (lambda: rdp_subsampled_gaussian(0.1, 1.0, [1.5]), "orders must be integers >= 2"),
        (lambda: rdp_subsampled_gaussian(0.1, 1.0, []), "orders is empty"),
        (lambda: epsilon_from_rdp([2, 3], [0.1], 1e-5), "one value per order"),
        (lambda: epsilon_from_rdp([2], [0.1], 0.0), "delta must be in"),
        (lambda: epsilon_from_rdp([2], [0.1], 1e-5, "fancy"), "conversion must be"),
        (lambda: epsilon_subsampled_gaussian(0.1, 1.0, -1, 1e-5), "steps must be"),
    ],
    ids=["q", "sigma", "order_frac", "orders_empty", "rdp_len", "delta", "conversion", "steps"],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
