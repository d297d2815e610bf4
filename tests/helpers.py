"""Small shared fixtures for tests: a linear softmax model and its numpy reference."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.compressors import _codec, _select
from fedjax_lab.compressors._base import tree_layout
from fedjax_lab.compressors.qsgd import QSGDPayload, _gap_exponents
from fedjax_lab.data.federated import FederatedData

# Round-record fields that say how a backend laid out the round (slot-steps computed, packed
# slots), not what it computed: they differ between backends and plans by design.
LAYOUT_FIELDS = frozenset({"computed_steps", "packed_slots"})


class LinearModel(NamedTuple):
    """Multinomial logistic regression with the ``apply`` of fedjax_lab models."""

    dim: int
    classes: int

    def init(self, key: jax.Array) -> dict:
        return {
            "w": 0.1 * jax.random.normal(key, (self.dim, self.classes)),
            "b": jnp.zeros(self.classes),
        }

    @staticmethod
    def apply(params: dict, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], -1) @ params["w"] + params["b"][None, :]


def np_softmax_ce_grad(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Gradient of the mean softmax cross entropy of a linear model (float64 numpy)."""
    logits = x @ w + b
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.sum(axis=0) / len(y)


class CountingSource:
    """An in-memory ``RowSource`` that records every ``take`` (rows read on demand)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.reads: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows)
        assert np.all(np.diff(rows) > 0), "RowSource.take gets sorted unique rows"
        self.reads.append(rows.copy())
        return {k: v[rows] for k, v in self.arrays.items()}

    def feature_spec(self) -> dict:
        return {k: (v.shape[1:], v.dtype) for k, v in self.arrays.items()}


def lazy_population(sizes: list[int], seed: int = 0) -> tuple[FederatedData, CountingSource]:
    """``make_population(sizes, seed=seed)`` whose examples are read on demand, shuffled on
    "disk" so that the partition's reordering is exercised; returns it and its source."""
    eager = make_population(sizes, seed=seed)
    n = eager.num_examples
    disk_order = np.random.default_rng(seed + 100).permutation(n)  # disk row -> population row
    source = CountingSource({k: v[disk_order] for k, v in eager.arrays.items()})
    where = np.argsort(disk_order)  # population row -> disk row
    parts = [where[eager.offsets[i]:eager.offsets[i + 1]] for i in range(eager.num_clients)]
    return FederatedData.from_partition(source, parts, eager.client_ids), source


def make_population(
    sizes: list[int], dim: int = 5, classes: int = 3, seed: int = 0
) -> FederatedData:
    """Clients with the given sizes and client-specific linear labelling (heterogeneous)."""
    rng = np.random.default_rng(seed)
    clients = {}
    for i, n in enumerate(sizes):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        w = rng.normal(size=(dim, classes))
        clients[f"c{i}"] = {"x": x, "y": np.argmax(x @ w, axis=1).astype(np.int32)}
    return FederatedData.from_clients(clients)


# Runs an experiment and hard-kills its process (os._exit: no cleanup, no finally blocks)
# right after metrics.jsonl got the line of round $KILL_AFTER_ROUND.
KILL_AFTER = r"""
import os, sys
from fedjax_lab.io import writers
from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.train import FedAvgConfig
write = writers.JsonlWriter.write
def write_then_die(self, record):
    write(self, record)
    if record["round"] == int(os.environ["KILL_AFTER_ROUND"]):
        os._exit(17)
writers.JsonlWriter.write = write_then_die
sys.exit(main(FedAvgConfig, run_fedavg_experiment, sys.argv[1:]))
"""

# A small FedAdam experiment that checkpoints every 2 of its 5 rounds (kill-and-resume tests).
CKPT_FLAGS = ["--dataset", "synthetic_iid", "--partition", "iid", "--num-clients", "8",
              "--clients-per-round", "3", "--model", "logreg", "--local-epochs", "1",
              "--eval-every", "2", "--progress", "false", "--seed", "4", "--rounds", "5",
              "--checkpoint-every", "2", "--server-optimizer", "adam", "--server-lr", "0.05"]


def checkpointed_server_state(directory, algorithm, params, rounds: int):
    """The server state of the newest checkpoint in ``directory`` (taken after ``rounds``)."""
    from fedjax_lab.io.checkpoint import Checkpointer
    from fedjax_lab.runner import ClientStateStore

    ckpt = Checkpointer(str(directory))
    try:
        restored = ckpt.restore(algorithm.init(params),
                                ClientStateStore(algorithm.client_init(params)))
    finally:
        ckpt.close()
    assert restored.rounds_done == rounds
    return restored.server_state


def experiment_server_state(out, flags):
    """The final checkpointed server state of the FedAvg run with ``flags`` in ``out``."""
    from fedjax_lab.experiment import build_problem
    from fedjax_lab.train import FedAvgConfig

    cfg = FedAvgConfig.parse(flags)
    _, _, model, _, params = build_problem(cfg)
    return checkpointed_server_state(out / "checkpoints", cfg.make_algorithm(model), params,
                                     cfg.rounds)


@contextlib.contextmanager
def persistent_compilation_cache(directory):
    """Within the block, XLA executables are cached on disk in ``directory`` (a fresh folder):
    a program compiled again with identical HLO (another backend instance or run building the
    same round program, a reference run next to the run under test) is loaded instead of
    compiled. Speed only: tracing is unchanged, and so are the backends' compile counters (they
    count traces) and chex.assert_max_traces. ``directory=None`` turns the cache off within the
    block. The previous settings are restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], None if directory is None else str(directory))
    jax.config.update(names[1], 0)
    jax.config.update(names[2], 0)
    compilation_cache.reset_cache()  # the cache reads its settings once
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def exit_code(main_fn, *args) -> int | str | None:
    """``main_fn(*args)``'s return value, or the code of the ``SystemExit`` it raised.

    The experiment CLIs refuse bad values by returning 2 after one ``error:`` line; argparse
    refuses unparsable ones (types, choices) by raising ``SystemExit(2)`` itself. Tests of
    refusals treat both the same.
    """
    try:
        return main_fn(*args)
    except SystemExit as e:
        return e.code


def assert_refused(main_fn, args, message: str, capsys, out_dir) -> None:
    """Asserts that ``main_fn(*args)`` exits 2 with `message` on stderr and writes no metrics."""
    assert exit_code(main_fn, *args) == 2
    assert message in capsys.readouterr().err
    assert not (out_dir / "metrics.jsonl").exists()


def decode_or_reject(compressor, data: bytes, template) -> bool:
    """``from_bytes`` either raises ValueError (False) or returns the payload that re-encodes
    to exactly `data` (True): a codec accepts only canonical encodings."""
    try:
        payload = compressor.from_bytes(data, template)
    except ValueError:
        return False
    assert compressor.to_bytes(payload) == data, "accepted bytes must be the canonical encoding"
    return True


# ---- plain-Python bit strings: references for the host wire codecs --------------------------
def bitstring_bytes(bitstring: str) -> bytes:
    """A '0'/'1' string as bytes, MSB first, zero padded to whole bytes."""
    bitstring += "0" * (-len(bitstring) % 8)
    if not bitstring:
        return b""
    return int(bitstring, 2).to_bytes(len(bitstring) // 8, "big")


def unary_bits(counts) -> str:
    return "".join("0" * int(q) + "1" for q in counts)


def gamma_bits(values) -> str:
    """Elias-γ of ``values`` in the codec's separated order: every prefix, then every mantissa."""
    values = [int(v) for v in values]
    return unary_bits(v.bit_length() - 1 for v in values) + "".join(
        format(v, "b")[1:] for v in values
    )


def qsgd_reference_stream(levels: np.ndarray) -> str:
    """The bit section of a QSGD payload (flag, then the shorter coding), from Python ints."""
    d = levels.size
    if d == 0:
        return ""
    values = [int(v) for v in levels]
    nonzero = [(i, v) for i, v in enumerate(values) if v]
    signs = "".join("1" if v < 0 else "0" for _, v in nonzero)
    dense = gamma_bits([abs(v) + 1 for v in values]) + signs
    gaps, previous = [], -1
    for i, _ in nonzero:
        gaps.append(i - previous)
        previous = i
    count = format(len(nonzero), f"0{_codec.count_width(d)}b")
    sparse = count + gamma_bits(gaps) + gamma_bits([abs(v) for _, v in nonzero]) + signs
    return "1" + sparse if len(sparse) < len(dense) else "0" + dense


def qsgd_payload(levels: np.ndarray, s: int, bucket: int | None = None):
    """A QSGD payload of one flat leaf with unit norms and the given signed levels."""
    d = levels.size
    bucket = bucket or max(d, 1)
    layout = tree_layout({"x": np.zeros(d, np.float32)}, what="test")
    norms = np.ones(-(-d // bucket), np.float32)
    dtype = np.int8 if s <= 127 else np.int16
    return QSGDPayload(norms, levels.astype(dtype), layout, s, bucket)


# Reference for QSGD's packed gap accounting (qsgd._gap_exponents) on any magnitudes.
def sparse_code_bits(lv: jax.Array) -> jax.Array:
    """``Σ_{l_i > 0} γ(i - previous non-zero) + 1 + γ(l_i)`` for int32 magnitudes ``lv`` (int32).

    The sparse stream's per-non-zero part for any magnitudes, ``3 n + 2 (Σ e(gap) + Σ e(l))``,
    with the gaps from the library's packed-word ``qsgd._gap_exponents``.
    """
    words = _select._pack_words(lv > 0)
    n = jnp.sum(jax.lax.population_count(words).astype(jnp.int32))
    gaps = jnp.sum(_gap_exponents(words))
    magnitudes = jnp.sum(jnp.where(lv > 0, _codec.floor_log2(jnp.maximum(lv, 1)), 0))
    return 3 * n + 2 * (gaps + magnitudes)
