"""experiments/train.py --secure-aggregation: the flags run the real SecAgg/SecAgg+ protocol
(fedjax_lab.secagg.with_secure_aggregation) each round, and bad combinations exit 2 before
anything is built."""

import numpy as np
import pytest

from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.train import TrainConfig
from tests.helpers import assert_refused, persistent_compilation_cache

TINY = ["--rounds", "2", "--num-clients", "8", "--clients-per-round", "4", "--eval-every", "2",
        "--model", "logreg", "--no-progress", "--packing", "off", "--local-epochs", "1",
        "--client-lr", "0.1", "--batch-size", "20", "--seed", "1"]
# Metrics that differ between a plain and a secure run by design or by the clock.
NOT_COMPARED = ("round_seconds", "wall_time", "secagg_clipped", "secagg_failed")


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def _run(out, *flags):
    assert main(TrainConfig, run_fedavg_experiment, [*TINY, "--out", str(out), *flags]) == 0
    return read_jsonl(str(out / "metrics.jsonl"))


def test_secure_rounds_equal_plain_rounds_to_the_fixed_point_resolution(tmp_path):
    plain = _run(tmp_path / "plain")
    # SecAgg+ with 2 neighbours; 24 fractional bits: the decoded sum of 4 clients is within
    # 4 * 2^-25 of the float sum per coordinate, far below the tolerance used here.
    secure = _run(tmp_path / "secure", "--secure-aggregation", "--secagg-neighbours", "2")
    assert len(plain) == len(secure) == 2
    for p, s in zip(plain, secure, strict=True):
        assert s["secagg_clipped"] == 0 and s["secagg_failed"] == 0
        assert sorted(k for k in p if k not in NOT_COMPARED) == sorted(
            k for k in s if k not in NOT_COMPARED)
        keys = sorted(k for k in p if k not in NOT_COMPARED)
        np.testing.assert_allclose([float(s[k]) for k in keys], [float(p[k]) for k in keys],
                                   rtol=1e-5, atol=1e-6)
    config = (tmp_path / "secure" / "config.yaml").read_text()
    assert "secure-aggregation: true" in config and "secagg-neighbours: 2" in config
    assert "secure-aggregation" not in (tmp_path / "plain" / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--secure-aggregation", "--compressor", "top_k"], "use --compressor identity"),
        (["--secure-aggregation", "--aggregator", "median"], "use --aggregator mean"),
        (["--secure-aggregation", "--clip-norm", "1"], "use --aggregator mean"),
        (["--secure-aggregation", "--backend", "sharded"], "use --backend vmap"),
        (["--secure-aggregation", "--chunk-size", "2"], "without --chunk-size"),
        (["--secure-aggregation", "--clients-per-round", "1"], "--clients-per-round >= 2"),
        (["--secure-aggregation", "--secagg-neighbours", "3"],
         "--secagg-neighbours must be an even number >= 2"),
        (["--secure-aggregation", "--secagg-bits", "70"], "--secagg-bits/--secagg-frac-bits"),
        (["--secure-aggregation", "--secagg-bits", "33", "--secagg-frac-bits", "20",
          "--secagg-bound", "2048"], "--secagg-bits with --clients-per-round 4"),
        (["--secagg-bits", "32"], "--secagg-bits needs --secure-aggregation"),
    ],
    ids=["compressor", "aggregator", "clip", "sharded", "chunks", "one-client", "odd-k",
         "bits", "capacity", "no-flag"],
)
def test_bad_input_exits_2(flags, message, capsys, tmp_path):
    assert_refused(main, (TrainConfig, run_fedavg_experiment,
                          [*TINY, "--out", str(tmp_path), *flags]), message, capsys, tmp_path)


def test_edge_backend_gets_the_protocol_settings(monkeypatch, tmp_path):
    # --backend edge: the edge server runs the protocol over the wire (tests/backends/
    # test_edge_secagg.py), so the algorithm stays plain and the backend gets the settings.
    import fedjax_lab.backends.edge as edge
    from fedjax_lab.experiment import build_edge_backend
    from fedjax_lab.models import get_model

    made = []
    monkeypatch.setattr(edge, "EdgeBackend", lambda **kwargs: made.append(kwargs))
    cfg = TrainConfig.parse([*TINY, "--out", str(tmp_path), "--backend", "edge",
                             "--edge-clients", "2", "--secure-aggregation",
                             "--secagg-neighbours", "2", "--secagg-frac-bits", "20"])
    build_edge_backend(cfg)
    (kwargs,) = made
    secure = kwargs["secure_aggregation"]
    assert secure.neighbours == 2 and secure.fixed_point.frac_bits == 20
    algorithm = cfg.make_algorithm(get_model("logreg", (8, 8, 1), 10))
    assert algorithm.additive  # not wrapped: the edge backend does the secure sum
