"""experiments/sstc_compression.py (SSTC Table I): outputs, factors, accounting, flag errors."""

import json

import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import stc, with_error_feedback
from fedjax_lab.compressors._codec import count_width, golomb_bits
from fedjax_lab.experiments_lib.sstc import main, stc_metrics, with_payload_metrics
from fedjax_lab.runner import run
from tests.helpers import LinearModel, make_population

KEYS = ("stc_conv_factor", "sstc_conv_factor", "stc_total_factor", "sstc_total_factor",
        "stc_test_accuracy", "sstc_test_accuracy")


def test_quick_cli_writes_factors_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--quick", "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    for key in KEYS:
        assert key in res
    assert (out / "accuracy_vs_bits.png").stat().st_size > 1000
    rounds = res["config"]["rounds"]
    for method in ("stc", "sstc"):
        for name in ("conv_factor", "total_factor", "conv_density"):
            per_round = res[f"{method}_{name}_per_round"]
            assert len(per_round) == rounds
            np.testing.assert_allclose(res[f"{method}_{name}"], np.mean(per_round), rtol=1e-6)
        assert res[f"{method}_conv_factor"] > 1 and res[f"{method}_total_factor"] > 1
        assert 0 <= res[f"{method}_test_accuracy"] <= 1
    fedavg_bits = res["runs"]["fedavg"]["upload_bits"]
    clients = res["config"]["clients_per_round"]
    assert fedavg_bits == [32.0 * res["num_params"] * clients] * rounds
    # The total factor is 32-bit FedAvg's upload over the compressor's exact bits().
    for method in ("stc", "sstc"):
        np.testing.assert_allclose(
            res[f"{method}_total_factor_per_round"],
            np.asarray(fedavg_bits) / np.asarray(res["runs"][method]["upload_bits"]),
            rtol=1e-6,
        )
    # What the formulas guarantee (the ordering SSTC > STC itself is NOT guaranteed: it needs
    # STC to put enough non-zeros in conv layers). With the FEMNIST CNN (conv layers of 1x32
    # and 32x64 kernels of 5x5, b_k = 6 and 12 bits) SSTC's conv part is fixed up to which layer
    # each of the K kept kernels sits in; every STC conv non-zero costs >= b* + 2 bits.
    dc = res["conv_params"]
    assert dc == 5 * 5 * 1 * 32 + 5 * 5 * 32 * 64
    num_keep = round(res["config"]["kernel_fraction"] * (32 + 32 * 64))
    base = 6 + 12 + num_keep * 2 * 25
    sstc_bits = res["runs"]["sstc"]["conv_bits_per_client"]
    assert all(base + 6 * num_keep <= b <= base + 12 * num_keep for b in sstc_bits)
    b_star = golomb_bits(res["config"]["sparsity"])
    k = round(res["config"]["sparsity"] * res["num_params"])
    stc_bits = res["runs"]["stc"]["conv_bits_per_client"]
    stc_nz = np.asarray(res["stc_conv_density_per_round"]) * dc
    assert np.all(np.asarray(stc_bits) >= count_width(k) + stc_nz * (b_star + 2) - 1e-6)
    # Hence SSTC wins whenever STC's conv non-zeros exceed this count:
    enough = (base + 12 * num_keep - count_width(k)) / (b_star + 2)
    for nz, f_stc, f_sstc in zip(stc_nz, res["stc_conv_factor_per_round"],
                                 res["sstc_conv_factor_per_round"], strict=True):
        if nz > enough:
            assert f_sstc > f_stc
    assert "conv factor" in capsys.readouterr().out


def test_payload_metrics_do_not_change_training():
    data = make_population([7, 4, 9, 5])
    model = LinearModel(5, 3)
    params = model.init(jax.random.key(0))
    comp = with_error_feedback(stc(0.2))
    base = fedavg(model, optax.sgd(0.1), batch_size=3, compressor=comp)
    # Treat the weight matrix as "conv" so the accounting sees a non-trivial part.
    wrapped = with_payload_metrics(base, stc_metrics((False, True)))
    kwargs = dict(rounds=2, clients_per_round=3, seed=0)
    ref = run(base, VmapBackend("vmap"), data, params, **kwargs)
    got = run(wrapped, VmapBackend("vmap"), data, params, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, got.server_state.params,
                 ref.server_state.params)
    k = round(0.2 * 18)
    for rec, ref_rec in zip(got.history, ref.history, strict=True):
        assert rec["upload_bits"] == ref_rec["upload_bits"]
        assert rec["sent"] == rec["clients"] == 3
        assert 0 <= rec["conv_nonzeros"] <= rec["nonzeros"] <= 3 * k
        assert rec["conv_bits"] >= 3 * count_width(k)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "imagenet"], "--dataset must be one of"),
        (["--dataset", "emnist"], "--dataset emnist needs --data-dir"),
        (["--clients-per-round", "9"], "--clients-per-round (9) must be <= --num-clients"),
        (["--sparsity", "0"], "--sparsity must be in (0, 1]"),
        (["--kernel-fraction", "1.5"], "--kernel-fraction must be in (0, 1]"),
        (["--lr", "-1"], "--lr must be a finite float > 0"),
        (["--rounds", "0"], "--rounds must be an integer >= 1"),
        (["--partition", "natural"], "--partition must be one of"),
    ],
    ids=["dataset", "data_dir", "cohort", "sparsity", "kernel_fraction", "lr", "rounds",
         "partition"],
)
def test_bad_flags_exit_2(argv, message, capsys, tmp_path):
    assert main(["--quick", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
