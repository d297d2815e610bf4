"""experiments/robustness.py on a tiny grid (1 dataset x 2 attacks x 2 defenses x 2 fractions):
files written, and the properties that hold by construction, not by chance."""

import csv
import json
import math
import os

import pytest

from fedjax_lab.experiments_lib.robustness import CSV_FIELDS, main

# Data attacks only: every cell of a defense shares one program (2 compiles); the README test
# runs a model attack (sign_flip) through the same code.
TINY = ["--datasets", "digits", "--attacks", "backdoor,label_flip", "--defenses", "mean,krum",
        "--fractions", "0.6,0.2", "--rounds", "2", "--num-clients", "10",
        "--clients-per-round", "5", "--tolerated", "1", "--batch-size", "20"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("robustness")
    assert main([*TINY, "--out", str(out / "grid"), "--json", str(out / "grid.json")]) == 0
    with open(out / "grid" / "robustness.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(out / "grid.json", encoding="utf-8") as f:
        results = json.load(f)
    return out, rows, results


def test_files_and_rows(grid):
    out, rows, results = grid
    assert (out / "grid" / "heatmap_digits.png").stat().st_size > 0
    assert list(rows[0]) == list(CSV_FIELDS)
    # Per defense: the clean baseline + 2 attacks x 2 fractions.
    assert len(rows) == len(results["rows"]) == 2 * (1 + 2 * 2)
    assert {(r["defense"], r["attack"]) for r in results["rows"]} == {
        (d, a) for d in ("mean", "krum") for a in ("none", "backdoor", "label_flip")}
    # Programs are shared: one per defense for the baseline and both data attacks.
    assert results["compiles"] == {"padded_round": 2}


def test_properties_that_hold_by_construction(grid):
    _, _, results = grid
    # JSON writes NaN as "nan": read the numbers back as floats.
    rows = [{k: float(v) if k in ("attack_success", "detection_precision", "detection_recall",
                                  "accuracy_drop", "clean_accuracy", "baseline_accuracy")
             else v for k, v in r.items()} for r in results["rows"]]
    for row in rows:
        # round(fraction x 10 clients), non-decreasing in the fraction.
        assert row["num_malicious"] == round(row["fraction"] * 10)
        assert 0.0 <= row["clean_accuracy"] <= 1.0
        # Mean tolerates nothing; Krum f=1 of 5 tolerates 0.2, which 0.2 does not exceed.
        assert row["above_breakdown"] == (row["fraction"] > (0.0 if row["defense"] == "mean"
                                                             else 0.2))
        if row["attack"] == "none":
            assert row["accuracy_drop"] == 0.0 and row["fraction"] == 0.0
        else:
            assert row["accuracy_drop"] == pytest.approx(row["baseline_accuracy"]
                                                         - row["clean_accuracy"])
        if row["attack"] == "backdoor":
            assert 0.0 <= row["attack_success"] <= 1.0
        else:
            assert math.isnan(row["attack_success"])
        precision, recall = row["detection_precision"], row["detection_recall"]
        if row["defense"] == "mean":  # mean selects nothing: no detection to score
            assert math.isnan(precision) and math.isnan(recall)
        else:
            # Krum excludes 4 of 5 valid slots every round: precision is always defined.
            assert 0.0 <= precision <= 1.0
            if row["attack"] == "none":
                assert precision == 0.0 and math.isnan(recall)  # only honest clients to drop
            elif row["fraction"] == 0.6:
                # 6 of 10 malicious: every 5-client round samples one, so recall is defined.
                assert 0.0 <= recall <= 1.0
    # The fractions come out sorted whatever order they were given in.
    fractions = [r["fraction"] for r in rows if r["attack"] == "label_flip"
                 and r["defense"] == "mean"]
    assert fractions == sorted(fractions) == [0.2, 0.6]


@pytest.mark.parametrize("flags,message", [
    (["--attacks", "poison"], "--attacks must be distinct comma-separated names"),
    (["--fractions", "0.2,1.0"], "--fractions must be distinct numbers in (0, 1)"),
    (["--fractions", "0.01"], "round to no malicious client"),
    (["--defenses", "bulyan", "--tolerated", "2", "--clients-per-round", "8"],
     "--defenses bulyan (bulyan2) needs at least 11 clients per round"),
    (["--num-clients", "4", "--clients-per-round", "5"], "--clients-per-round (5) must be <="),
])
def test_bad_input_exits_2_before_compiling(flags, message, capsys, tmp_path):
    assert main([*TINY, "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o").exists()


def test_preset_parses_to_the_documented_grid():
    # The shipped preset (the README's full run) is a valid robustness.py command line.
    from fedjax_lab.experiments_lib.robustness import parse

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "experiments", "configs", "robustness_grid.yaml")
    cfg, json_out = parse(["--config", path])
    cfg.validate()
    assert json_out is None and cfg.rounds == 20 and cfg.fractions == "0.1,0.3,0.6"
