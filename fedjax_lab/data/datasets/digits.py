"""scikit-learn's bundled handwritten digits (offline), with class-subset and resize options."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedjax_lab.data.datasets._base import Dataset, check_dataset

# The train/test split is part of the dataset definition (like MNIST's fixed test set): it uses
# this fixed seed, not the run seed, so every run and every partition sees the same test set.
_SPLIT_SEED = 20240101
_TEST_FRACTION = 0.2


def _linear_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` weights of 1-D linear interpolation with half-pixel centres.

    Triangle kernel widened by ``1 / scale`` when shrinking (antialiasing), weights renormalised
    at the borders: the same convention as ``jax.image.resize(..., "linear", antialias=True)``.
    Each row is non-negative and sums to one, so the output stays in the input's value range.
    """
    scale = size_out / size_in
    radius = max(1.0, 1.0 / scale)
    centres = (np.arange(size_out) + 0.5) / scale - 0.5
    dist = np.abs(np.arange(size_in)[None, :] - centres[:, None])
    weights = np.maximum(0.0, 1.0 - dist / radius)
    return weights / weights.sum(axis=1, keepdims=True)


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``[N, H, W, C]`` images to ``[N, *size, C]`` (float64 math)."""
    rows = _linear_resize_matrix(images.shape[1], size[0])
    cols = _linear_resize_matrix(images.shape[2], size[1])
    out = np.einsum("ph,nhwc,qw->npqc", rows, images.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)


def digits(classes: Sequence[int] | None = None, resize: Sequence[int] | None = None) -> Dataset:
    """The UCI handwritten digits bundled with scikit-learn (``load_digits``; 1797 8x8 images).

    Pixels (0..16) are scaled to float32 ``[0, 1]``, shape ``[N, 8, 8, 1]``. The train/test split
    is a fixed stratified 80/20 split (per class, ``round(0.2 * n_class)`` test examples drawn
    with a fixed internal seed): the split is part of the dataset definition, not of the run
    seed.

    Args:
      classes: optional subset of digits to keep, relabelled ``0..k-1`` in the given order
        (e.g. ``(0, 8)`` for FedPAQ's "0 vs 8" logistic regression). At least two distinct
        digits in ``0..9``. The split is made before filtering, so a subset's test set is the
        subset of the full test set.
      resize: optional ``(height, width)``; bilinear resize (e.g. ``(28, 28)`` for the
        FEMNIST CNN), antialiased when shrinking.

    Returns:
      A `Dataset` named ``"digits"`` without natural clients.
    """
    # Imported here: scikit-learn is slow to import and only this loader needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[..., None]
    y = bunch.target.astype(np.int32)

    rng = np.random.default_rng(_SPLIT_SEED)
    is_test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_test = round(_TEST_FRACTION * len(members))
        is_test[rng.permutation(members)[:n_test]] = True

    num_classes = 10
    if classes is not None:
        wanted = [int(c) for c in classes]
        if (
            len(wanted) < 2
            or len(set(wanted)) != len(wanted)
            or not all(0 <= c <= 9 for c in wanted)
        ):
            raise ValueError(
                f"`classes` must be >= 2 distinct digits in 0..9 (e.g. (0, 8)), got {classes!r}"
            )
        keep = np.isin(y, wanted)
        relabel = np.full(10, -1, dtype=np.int32)
        relabel[wanted] = np.arange(len(wanted), dtype=np.int32)
        x, y, is_test = x[keep], relabel[y[keep]], is_test[keep]
        num_classes = len(wanted)

    if resize is not None:
        size = tuple(resize)
        if len(size) != 2 or not all(
            isinstance(s, int | np.integer) and not isinstance(s, bool) and s >= 1 for s in size
        ):
            raise ValueError(f"`resize` must be (height, width) positive ints, got {resize!r}")
        x = _resize(x, (int(size[0]), int(size[1])))

    return check_dataset(
        Dataset(
            name="digits",
            train={"x": x[~is_test], "y": y[~is_test]},
            test={"x": x[is_test], "y": y[is_test]},
            num_classes=num_classes,
            input_shape=tuple(x.shape[1:]),
            train_client_ids=None,
        )
    )
