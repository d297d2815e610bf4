"""Vertical FL against centralized training and a numpy reference of linear parties."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.core import softmax_cross_entropy
from fedjax_lab.topologies import (
    check_feature_groups,
    epoch_batches,
    feature_split,
    split_features,
    vertical_model,
    vertical_trainer,
)

D, CLASSES, N, B, LR, E = 7, 3, 10, 4, 0.5, 2


def data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, D)).astype(np.float32),
            rng.integers(0, CLASSES, N).astype(np.int32))


def random_params(vm, seed):
    """Params of ``vm``'s structure drawn with numpy (eval_shape: no init program compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32),
                        jax.eval_shape(vm.init, jax.random.key(0)))


def close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_feature_split_is_disjoint_covering_and_validated():
    groups = feature_split(10, 3)
    assert [g.tolist() for g in groups] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    shuffled = feature_split(10, 4, np.random.default_rng(0))
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(10))
    assert [len(g) for g in shuffled] == [3, 3, 2, 2]
    x = np.arange(2 * 10).reshape(2, 5, 2)
    np.testing.assert_array_equal(split_features(x, groups)[1], x.reshape(2, 10)[:, 4:7])
    with pytest.raises(ValueError, match="disjoint"):
        check_feature_groups([[0, 1], [1, 2]], 3)
    with pytest.raises(ValueError, match="cover"):
        check_feature_groups([[0], [2]], 3)
    with pytest.raises(ValueError, match="at least one column"):
        check_feature_groups([[0, 1, 2], []], 3)
    with pytest.raises(ValueError, match="outside"):
        check_feature_groups([[0, 1, 3]], 3)
    with pytest.raises(ValueError, match="repeats"):
        check_feature_groups([[0, 0, 1, 2]], 3)
    with pytest.raises(ValueError, match="num_parties"):
        feature_split(3, 4)
    with pytest.raises(ValueError, match="combine"):
        vertical_model([[0, 1, 2]], 3, 2, combine="max")
    vm = vertical_model([[0], [1, 2]], 3, 2)
    train = vertical_trainer(vm, optax.sgd(0.1), batch_size=2)
    index, mask = epoch_batches(4, 2, np.random.default_rng(0))
    x, y = np.zeros((4, 3), np.float32), np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="batch_size=2"):
        train(None, None, x, y, index[:, :1], mask[:, :1])
    with pytest.raises(ValueError, match=r"index must lie in \[0, 3\)"):
        train(None, None, x[:3], y[:3], index, mask)


def test_one_party_is_centralized_training():
    vm = vertical_model(feature_split(D, 1), D, CLASSES, embed_dim=4, bottom_hidden=(5,))
    params = random_params(vm, 0)
    opt = optax.sgd(LR)
    train = vertical_trainer(vm, opt, batch_size=B)
    x, y = data()
    state, ref = opt.init(params), params

    @jax.jit
    def grad(p, xb, yb, m):
        def loss(p):
            per = softmax_cross_entropy(vm.apply(p, xb), yb)
            return jnp.sum(per * m) / jnp.sum(m)
        return jax.grad(loss)(p)

    for epoch in range(E):
        index, mask = epoch_batches(N, B, np.random.default_rng(epoch))
        params, state, metrics = train(params, state, x, y, index, mask)
        for idx, m in zip(index, mask, strict=True):
            ref = jax.tree.map(lambda p, g: p - LR * g, ref, grad(ref, x[idx], y[idx], m))
    close(params, ref)
    assert metrics["total_bytes"] == 0  # the only party is the active party: nothing is sent


def numpy_reference(x, y, groups, bottoms, top, index, mask, combine):
    """Two-party vertical FL with linear bottoms and a linear top, gradients by hand."""
    bottoms = [{k: v.copy() for k, v in b.items()} for b in bottoms]
    top = {k: v.copy() for k, v in top.items()}
    for idx, m in zip(index, mask, strict=True):
        xs = [x[idx][:, g].astype(np.float64) for g in groups]
        h = [xp @ b["kernel"] + b["bias"] for xp, b in zip(xs, bottoms, strict=True)]
        z = np.concatenate(h, axis=1) if combine == "concat" else h[0] + h[1]
        logits = z @ top["kernel"] + top["bias"]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        dlogits = (p - np.eye(CLASSES)[y[idx]]) * (m / m.sum())[:, None]
        dz = dlogits @ top["kernel"].T
        e = h[0].shape[1]
        dh = [dz[:, :e], dz[:, e:]] if combine == "concat" else [dz, dz]
        top["kernel"] -= LR * z.T @ dlogits
        top["bias"] -= LR * dlogits.sum(axis=0)
        for xp, b, g in zip(xs, bottoms, dh, strict=True):
            b["kernel"] -= LR * xp.T @ g
            b["bias"] -= LR * g.sum(axis=0)
    return bottoms, top


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_two_linear_parties_match_numpy(combine):
    groups = [[0, 3, 5], [1, 2, 4, 6]]
    vm = vertical_model(groups, D, CLASSES, embed_dim=2, combine=combine)
    params = random_params(vm, 1)
    x, y = data(1)
    index, mask = epoch_batches(N, B, np.random.default_rng(7))
    train = vertical_trainer(vm, optax.sgd(LR), batch_size=B)
    new, _, metrics = train(params, optax.sgd(LR).init(params), x, y, index, mask)
    as_np = jax.tree.map(np.asarray, params)
    bottoms, top = numpy_reference(x, y, [np.asarray(g) for g in groups],
                                   [b["head"] for b in as_np["bottom"]], as_np["top"]["head"],
                                   index, mask, combine)
    close([b["head"] for b in new["bottom"]], bottoms)
    close(new["top"]["head"], top)
    # One passive party sends N embeddings of 2 floats per epoch and receives their gradients.
    assert (metrics["embedding_bytes"], metrics["gradient_bytes"], metrics["total_bytes"]) == (
        N * 2 * 4, N * 2 * 4, 2 * N * 2 * 4)
