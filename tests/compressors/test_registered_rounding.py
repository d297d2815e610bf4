"""train.py's ``--rounding-bits``: its string choices build the compressors' rounding draws."""

import jax
import numpy as np
import pytest

from fedjax_lab.compressors import qsgd, terngrad
from fedjax_lab.train import TrainConfig
from tests.helpers import assert_refused

TREE = {"w": np.linspace(-1.0, 1.0, 257, dtype=np.float32)}


def _levels(compressor):
    payload = compressor.encode(TREE, (), key=jax.random.key(3))[0]
    return np.asarray(jax.tree.leaves(compressor.decode(payload))[0])


@pytest.mark.parametrize(
    ("flags", "direct"),
    [(["--compressor", "qsgd", "--num-levels", "2", "--rounding-bits", "hash"],
      qsgd(2, rounding_bits="hash")),
     (["--compressor", "qsgd", "--num-levels", "2", "--rounding-bits", "8"],
      qsgd(2, rounding_bits=8)),
     (["--compressor", "qsgd", "--num-levels", "2"], qsgd(2)),
     (["--compressor", "terngrad", "--rounding-bits", "16"], terngrad(rounding_bits=16))],
    ids=["qsgd-hash", "qsgd-8", "qsgd-default", "terngrad-16"],
)
def test_flag_builds_the_same_draws_as_the_python_call(flags, direct):
    built = TrainConfig.parse(["--rounds", "1", *flags]).build_compressor()
    np.testing.assert_array_equal(_levels(built), _levels(direct))


def test_the_choices_draw_differently():
    # Guards the test above: the three rounding draws must give different outputs on one key.
    outs = [_levels(qsgd(2, rounding_bits=r)) for r in (None, 8, "hash")]
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_unknown_rounding_exits_2(capsys, tmp_path):
    from fedjax_lab.experiment import main, run_fedavg_experiment

    assert_refused(main, (TrainConfig, run_fedavg_experiment,
                          ["--rounds", "1", "--compressor", "qsgd", "--rounding-bits", "7",
                           "--out", str(tmp_path)]), "--rounding-bits", capsys, tmp_path)


def test_none_is_the_default_draw():
    # A run's written config.yaml says `rounding-bits: none` when the flag was not given.
    built = TrainConfig.parse(["--rounds", "1", "--compressor", "qsgd", "--num-levels", "2",
                               "--rounding-bits", "none"]).build_compressor()
    np.testing.assert_array_equal(_levels(built), _levels(qsgd(2)))
