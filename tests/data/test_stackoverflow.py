"""StackOverflow from tiny files in TFF's layout: vocabularies, preprocessing, per-user reads."""

import json

import h5py
import jax
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg
from fedjax_lab.backends import VmapBackend
from fedjax_lab.backends.packed import PackingPolicy
from fedjax_lab.data import datasets as D
from fedjax_lab.experiment import main, run_fedavg_experiment
from fedjax_lab.io.writers import read_jsonl
from fedjax_lab.metrics.evaluation import make_evaluator
from fedjax_lab.metrics.tasks import task_of
from fedjax_lab.models import nwp_lstm
from fedjax_lab.runner import run
from fedjax_lab.train import TrainConfig

WORDS = ["the", "to", "i", "a", "is", "how", "python", "list"]  # most frequent first
TAGS = {"python": 9, "java": 7, "c++": 5, "sql": 2}  # the vocabulary order (by count)
TRAIN = {  # user -> sentences (tokens, title, tags)
    "00001": [("how to sort a list", "sort list", "python|list"),
              ("i use java", "java question", "java")],
    "00002": [("the list is empty", "empty", "python|sql|rare-tag")],
    "00010": [("a b c d e f g h i j", "long", "c++"), ("is", "q", "unknown"),
              ("to to", "t", "sql|java")],
}
TEST = {"00001": [("how is python", "py", "python")], "00003": [("i a", "x", "java")]}


def _write_h5(path, users):
    with h5py.File(path, "w") as f:
        for user, rows in users.items():
            for i, key in enumerate(("tokens", "title", "tags")):
                f.create_dataset(f"examples/{user}/{key}", data=[r[i] for r in rows],
                                 dtype=h5py.string_dtype("utf-8"))
            f.create_dataset(f"examples/{user}/score", data=np.zeros(len(rows), np.int64))


def _write_files(d, words=WORDS, tags=TAGS):
    _write_h5(d / "stackoverflow_train.h5", TRAIN)
    _write_h5(d / "stackoverflow_test.h5", TEST)
    (d / "stackoverflow.word_count").write_text(
        "".join(f"{w} {100 - i}\n" for i, w in enumerate(words)))
    # Written out of order: the loader sorts by count, as TFF's load_tag_counts.
    (d / "stackoverflow.tag_count").write_text(json.dumps(dict(reversed(tags.items()))))


@pytest.fixture(scope="module")
def so_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stackoverflow")
    _write_files(d)
    return d


def test_next_word_token_ids_by_hand():
    ids = D.WordIds(WORDS[:6])  # pad 0, words 1..6, oov 7, bos 8, eos 9
    assert (ids.pad, ids.oov, ids.bos, ids.eos, ids.num_classes) == (0, 7, 8, 9, 10)
    x, y = ids.example("how to sort a list", seq_len=8)
    # bos how to sort(oov) a list(oov) eos pad pad
    np.testing.assert_array_equal(x, [8, 6, 2, 7, 4, 7, 9, 0])
    np.testing.assert_array_equal(y, [6, 2, 7, 4, 7, 9, 0, 0])
    x, y = ids.example("a b c d", seq_len=3)  # cut to 3 words: no eos
    np.testing.assert_array_equal(x, [8, 4, 7])
    np.testing.assert_array_equal(y, [4, 7, 7])


def test_bag_of_words_and_tags_by_hand():
    index = {w: i for i, w in enumerate(WORDS)}
    x = D.bag_of_words("how to sort a list sort list", index, len(WORDS))
    want = np.zeros(len(WORDS), np.float32)
    for w in ("how", "to", "a", "list", "list"):  # 7 words, "sort" twice out of vocabulary
        want[index[w]] += 1 / 7
    np.testing.assert_allclose(x, want, rtol=1e-6)
    np.testing.assert_array_equal(D.bag_of_words("", index, 8), np.zeros(8, np.float32))
    tags = {t: i for i, t in enumerate(TAGS)}
    np.testing.assert_array_equal(D.tag_targets("sql|rare-tag|python", tags, 4), [1, 0, 0, 1])


def test_nwp_dataset_reads_per_user(so_dir):
    ds = D.load_dataset("stackoverflow_nwp", data_dir=so_dir, vocab_size=6, seq_len=8)
    assert ds.target_kind == "sequence" and ds.num_classes == 10 and ds.input_shape == (8,)
    src = ds.train
    assert isinstance(src, D.UserSource) and src.client_names == ("00001", "00002", "00010")
    np.testing.assert_array_equal(src.offsets, [0, 2, 3, 6])
    assert (src.rows_read, src.clients_read) == (0, 0)  # opening reads only the shapes
    assert ds.test["x"].shape == (2, 8) and ds.test["y"].dtype == np.int32

    pop = D.federate(ds, "natural", None, seed=0)
    assert pop.is_lazy and pop.client_ids == src.client_names and pop.label_key is None
    got = pop.client(2)  # user 00010 only
    assert (src.rows_read, src.clients_read) == (3, 1)
    ids = D.WordIds(WORDS[:6])
    want = [ids.example(s, 8) for s, _, _ in TRAIN["00010"]]
    np.testing.assert_array_equal(got["x"], [w[0] for w in want])
    np.testing.assert_array_equal(got["y"], [w[1] for w in want])
    with pytest.raises(ValueError, match="partition='natural'"):
        D.federate(ds, "iid", 3, seed=0)
    with pytest.raises(ValueError, match="3 users; pass num_clients=3"):
        D.federate(ds, "natural", 5, seed=0)


def test_lr_dataset_features_and_targets(so_dir):
    ds = D.stackoverflow_lr(so_dir, vocab_size=8, num_tags=3, test_examples=1, seed=1)
    assert ds.target_kind == "multi_hot" and ds.num_classes == 3 and ds.input_shape == (8,)
    assert len(ds.test["x"]) == 1  # a sample of test_examples sentences
    got = ds.train.take(np.array([0, 2]))
    index = {w: i for i, w in enumerate(WORDS)}
    np.testing.assert_allclose(got["x"][1], D.bag_of_words("the list is empty empty", index, 8))
    # Tags python|list -> python only (list is no tag); python|sql|rare-tag -> python (sql is
    # the 4th tag, outside num_tags=3).
    np.testing.assert_array_equal(got["y"], [[1, 0, 0], [1, 0, 0]])


def test_tag_vocabulary_is_sorted_by_count(so_dir):
    assert D.load_tag_vocab(so_dir / "stackoverflow.tag_count", 3) == ["python", "java", "c++"]
    assert D.load_word_vocab(so_dir / "stackoverflow.word_count", 2) == ["the", "to"]


def test_missing_and_short_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stackoverflow_train.h5, stackoverflow_test.h5"
                       r", stackoverflow.word_count, stackoverflow.tag_count not found.*"
                       r"tff-datasets-public/stackoverflow.tar.bz2"):
        D.stackoverflow_lr(tmp_path)
    _write_files(tmp_path, words=WORDS[:3])
    with pytest.raises(ValueError, match="lists 3 words, fewer than vocab_size=10000"):
        D.stackoverflow_nwp(tmp_path)
    with pytest.raises(ValueError, match="num_tags must be a positive integer"):
        D.stackoverflow_lr(tmp_path, vocab_size=3, num_tags=0)


def test_nwp_two_rounds_through_the_runner(so_dir):
    ds = D.stackoverflow_nwp(so_dir, vocab_size=6, seq_len=8)
    train = D.federate(ds, "natural", None, seed=0)
    model = nwp_lstm(num_classes=ds.num_classes, seq_len=8, embed_dim=4, hidden=5, dense=3)
    task = task_of(ds)
    evaluate = make_evaluator(model.apply, ds.test, per_example_loss=task.loss,
                              metrics=task.metrics)
    result = run(fedavg(model, optax.sgd(0.1), batch_size=2, local_epochs=1),
                 VmapBackend(packing=PackingPolicy("off")),
                 train, model.init(jax.random.key(0)), rounds=2, clients_per_round=2, seed=0,
                 num_classes=model.num_classes, evaluate=evaluate, eval_every=1)
    last = result.history[-1]
    assert np.isfinite(last["train_loss"]) and np.isfinite(last["test_loss"])
    assert 0.0 <= last["test_accuracy"] <= 1.0


def test_lr_two_round_cli_run(tmp_path, capsys):
    # The CLI's vocabularies are the paper's: 10,000 words and 500 tags.
    words = WORDS + [f"w{i}" for i in range(10_000 - len(WORDS))]
    tags = {**TAGS, **{f"t{i}": 1 for i in range(500 - len(TAGS))}}
    _write_files(tmp_path, words=words, tags=tags)
    out = tmp_path / "run"
    argv = ["--dataset", "stackoverflow_lr", "--data-dir", str(tmp_path), "--partition",
            "natural", "--num-clients", "3", "--clients-per-round", "2", "--rounds", "2",
            "--model", "logreg", "--batch-size", "2", "--local-epochs", "1", "--eval-every", "1",
            "--packing", "off", "--progress", "false", "--out", str(out)]
    assert main(TrainConfig, run_fedavg_experiment, argv) == 0, capsys.readouterr().err
    records = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["round"] for r in records] == [1, 2]
    for key in ("test_loss", "test_accuracy", "test_precision_at_5", "test_recall_at_5"):
        assert np.isfinite(records[-1][key]), key
    # A class model for next-word targets is refused before anything compiles.
    bad = [*argv, "--overwrite", "true"]
    bad[1], bad[bad.index("logreg")] = "stackoverflow_nwp", "mlp"
    assert main(TrainConfig, run_fedavg_experiment, bad) == 2
    assert "use a per-position model: --model nwp_lstm" in capsys.readouterr().err
    assert main(TrainConfig, run_fedavg_experiment,
                [*argv, "--partition", "iid", "--overwrite", "true"]) == 2
    assert "pass --partition natural" in capsys.readouterr().err


def test_a_user_with_fields_of_different_lengths_is_named(tmp_path):
    _write_files(tmp_path)
    with h5py.File(tmp_path / "stackoverflow_train.h5", "a") as f:
        del f["examples/00002/title"]
        f.create_dataset("examples/00002/title", data=["a", "b"], dtype=h5py.string_dtype())
    ds = D.stackoverflow_lr(tmp_path, vocab_size=8, num_tags=3)
    with pytest.raises(ValueError, match=r"user '00002': fields .* have different lengths"):
        ds.train.take(np.array([2]))


def test_sweeps_refuse_non_class_targets(tmp_path):
    from fedjax_lab.sweep import SweepConfig

    with pytest.raises(ValueError, match="not supported by sweeps"):
        SweepConfig(dataset="stackoverflow_nwp", data_dir=str(tmp_path)).validate()
