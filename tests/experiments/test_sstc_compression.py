"""experiments/sstc_compression.py (SSTC Table I): outputs, factors, accounting, flag errors."""

import csv
import dataclasses
import json
import math

import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.backends.vmap import VmapBackend
from fedjax_lab.compressors import stc, with_error_feedback
from fedjax_lab.compressors._codec import count_width, golomb_bits
from fedjax_lab.experiments_lib.sstc import (
    PAPER_TABLE_I,
    SSTCConfig,
    main,
    stc_metrics,
    table_markdown,
    with_payload_metrics,
)
from fedjax_lab.runner import run
from tests.data.test_tff_h5 import EMNIST_SIZES, emnist_clients, write_tff_h5
from tests.helpers import LinearModel, make_population

KEYS = ("stc_conv_factor", "sstc_conv_factor", "stc_total_factor", "sstc_total_factor",
        "stc_test_accuracy", "sstc_test_accuracy")


@pytest.mark.slow
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
    # Table I's compression (the paper's Eq. 1): STC 32 W_conv / (16 p), i.e. 2 / conv density
    # per round; SSTC 32 * 52,000 / (b_k k + 2 * 25 k) with b_k = 1 + floor(log2(2,080)) = 12
    # and k = round(0.125 * 2,080) = 260 kept kernels (the paper's §V-B numbers).
    assert res["eq1_bits"] == {"b_p": 16, "b_k": 12, "kept_kernels": 260,
                               "sstc_conv_bits": 12 * 260 + 50 * 260}
    np.testing.assert_allclose(res["stc_paper_conv_factor_per_round"],
                               2.0 / np.asarray(res["stc_conv_density_per_round"]), rtol=1e-6)
    np.testing.assert_allclose(res["sstc_paper_conv_factor_per_round"],
                               [32 * 52000 / (62 * 260)] * rounds, rtol=1e-9)
    # The table, in the three files and on stdout, with the paper's numbers beside the measured.
    table = json.loads((out / "table_i.json").read_text())
    assert [r["method"] for r in table] == ["FedAvg (32-bit)", "FedAvg + STC", "FedAvg + SSTC"]
    assert table == res["table"]
    for row, method in zip(table, ("fedavg", "stc", "sstc"), strict=True):
        acc = res["runs"][method]["test_accuracy"]
        assert row["max_accuracy"] == max(acc) and row["final_accuracy"] == acc[-1]
        if method == "fedavg":
            assert row["compression"] == row["exact_compression"] == 1.0
            assert row["paper_compression"] is None and row["paper_max_accuracy"] is None
        else:
            assert row["compression"] == res[f"{method}_paper_conv_factor"]
            assert row["exact_compression"] == res[f"{method}_conv_factor"]
            assert row["paper_compression"] == PAPER_TABLE_I[method]["compression"]
            assert row["paper_max_accuracy"] == PAPER_TABLE_I[method]["max_accuracy"]
    with open(out / "table_i.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["max_accuracy"]) for r in rows] == [r["max_accuracy"] for r in table]
    assert rows[0]["paper_compression"] == ""
    md = (out / "table_i.md").read_text()
    assert md == table_markdown(table)
    assert "| FedAvg + SSTC | 103.2x | 104.0x |" in md and "| 83.94 % |" in md
    assert md in capsys.readouterr().out


def test_paper_settings_are_the_defaults():
    # Mora et al. 2022, §V-A: E = 5, SGD lr 0.1, batch 16, 1000 rounds, 50 clients per round,
    # sparsity 1 %; Table I: k = 12.5 %.
    cfg = SSTCConfig()
    assert (cfg.local_epochs, cfg.lr, cfg.batch_size, cfg.rounds, cfg.clients_per_round,
            cfg.sparsity, cfg.kernel_fraction, cfg.image_size) == (5, 0.1, 16, 1000, 50, 0.01,
                                                                  0.125, 28)
    assert PAPER_TABLE_I["stc"]["compression"] == 41 and PAPER_TABLE_I["sstc"]["compression"] == 104


def test_fed_emnist_h5_is_the_natural_writer_population(tmp_path):
    # The paper's data: TFF's FEMNIST h5 files, one client per writer (tiny files here).
    from fedjax_lab.experiments_lib.sstc import build_problem

    write_tff_h5(tmp_path / "fed_emnist_train.h5", emnist_clients(EMNIST_SIZES, 0))
    write_tff_h5(tmp_path / "fed_emnist_test.h5", emnist_clients({c: 2 for c in EMNIST_SIZES}, 1))
    cfg = SSTCConfig(dataset="fed_emnist", data_dir=str(tmp_path), clients_per_round=2)
    cfg.validate()
    problem = build_problem(cfg)
    assert problem.data.num_clients == len(EMNIST_SIZES)
    assert sorted(problem.data.sizes.tolist()) == sorted(EMNIST_SIZES.values())
    assert (problem.conv_params, problem.num_kernels, problem.kernel_size) == (52000, 2080, 25)
    with pytest.raises(ValueError, match="--clients-per-round \\(4\\) must be <= the 3 writers"):
        build_problem(dataclasses.replace(cfg, clients_per_round=4))


def test_table_shows_non_finite_factors_as_such():
    row = {"method": "FedAvg + STC", "compression": math.inf, "paper_compression": 41.0,
           "exact_compression": math.nan, "max_accuracy": 0.5, "paper_max_accuracy": 0.8433,
           "final_accuracy": 0.25}
    assert "| FedAvg + STC | inf | 41.0x | nan | 50.00 % | 84.33 % | 25.00 % |" in table_markdown(
        [row])


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
        (["--dataset", "fed_emnist"], "--dataset fed_emnist needs --data-dir"),
        (["--image-size", "3"], "--image-size must be >= 4"),
    ],
    ids=["dataset", "data_dir", "cohort", "sparsity", "kernel_fraction", "lr", "rounds",
         "partition", "fed_emnist", "image_size"],
)
def test_bad_flags_exit_2(argv, message, capsys, tmp_path):
    assert main(["--quick", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
