"""Plots for inspecting influence values (matplotlib, optional).

Influence functions produce numbers for pairs of (test point, training point);
these plots are the usual ways of looking at them:

* :func:`plot_influence_distribution` and :func:`plot_influence_distribution_by_label`
  show histograms of the influence of every training point on one test point
  (one row of the ``(n_test, n_train)`` matrix returned with ``mode="up"``),
  overall or one overlaid histogram per training label. Training points of the
  test point's own class usually help (positive values here), the others
  are spread around zero; a long negative tail points to harmful, often mislabeled, points.
* :func:`plot_average_influence_by_label` does the same for the influence
  averaged over all test points (the whole matrix is passed in).
* :func:`plot_top_training_images` shows, for one test point, the training
  images with the largest (most helpful) and smallest (most harmful)
  influence; :func:`plot_top_images_per_class` shows the most and least
  influential training images within each class.
* :func:`plot_self_influence_vs_loss` scatters the self-influence of the
  training points against their training loss. Mislabeled points tend to sit
  in the top right (high loss, high self-influence); pass a mask of known
  flipped labels to mark them.

Every function takes PyTorch tensors or NumPy arrays, checks the shapes and
that values are finite, never calls ``plt.show()`` and never changes the
matplotlib backend. Single-panel plots take an optional ``ax`` and return the
:class:`~matplotlib.axes.Axes`; multi-panel plots take an optional ``fig``
(an empty figure to draw into) and return the :class:`~matplotlib.figure.Figure`.
matplotlib is imported only when a function is called.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import numpy as np

__all__ = [
    "plot_average_influence_by_label",
    "plot_influence_distribution",
    "plot_influence_distribution_by_label",
    "plot_self_influence_vs_loss",
    "plot_top_images_per_class",
    "plot_top_training_images",
]

LabelNames = Union[Mapping[Any, str], Sequence[str], None]

_HELPFUL_COLOR = "tab:green"
_HARMFUL_COLOR = "tab:red"


# ----------------------------------------------------------------------------- helpers

def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "torchfluence.plots needs matplotlib; install it with `pip install matplotlib`"
        ) from exc
    return plt


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "torchfluence.plots needs matplotlib; install it with `pip install matplotlib`"
        ) from exc


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Tensor or array-like to a NumPy array (tensors are detached and moved to the CPU)."""
    if x is None:
        raise TypeError(f"{name} must be a tensor or array, got None")
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # bfloat16 and other dtypes NumPy lacks
            return t.float().numpy()
    return np.asarray(x)


def _check_finite(arr: np.ndarray, name: str) -> None:
    if arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        first = np.argwhere(bad)[0]
        index = int(first[0]) if first.size == 1 else tuple(int(i) for i in first)
        raise ValueError(f"{name} must be finite, got {arr[tuple(first)]} at index {index}")


def _vector(x: Any, name: str, what: str = "n_train", *, numeric: bool = True) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D ({what},), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(arr.shape)}")
    if numeric:
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float64, copy=False)
    _check_finite(arr, name)
    return arr


def _same_length(arr: np.ndarray, name: str, ref: np.ndarray, ref_name: str) -> None:
    if arr.shape[0] != ref.shape[0]:
        raise ValueError(
            f"{name} must have the same length as {ref_name} ({ref.shape[0]}), got {arr.shape[0]}"
        )


def _labels(labels: Any, name: str, ref: np.ndarray, ref_name: str) -> np.ndarray:
    arr = _vector(labels, name, numeric=False)
    _same_length(arr, name, ref, ref_name)
    return arr


def _key(label: Any) -> Any:
    return label.item() if isinstance(label, np.generic) else label


def _label_text(label: Any, label_names: LabelNames) -> str:
    key = _key(label)
    if label_names is None:
        return str(key)
    try:
        if isinstance(label_names, Mapping):
            return str(label_names[key])
        return str(label_names[int(key)])
    except (KeyError, IndexError, TypeError, ValueError):
        raise ValueError(f"label_names has no entry for label {key!r}") from None


def _label_texts(labels_arr: np.ndarray, label_names: LabelNames) -> dict:
    """Displayed text of each distinct label, checked before anything is drawn."""
    return {label: _label_text(label, label_names) for label in np.unique(labels_arr).tolist()}


def _check_k(k: Any, n: int, n_name: str = "the number of training points") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k must be at most {n_name} ({n}), got {k}")
    return int(k)


def _images(images: Any, name: str = "images") -> np.ndarray:
    arr = _to_numpy(images, name)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must be (n, C, H, W) with C in {{1, 3}} or (n, H, W), got shape {tuple(arr.shape)}"
        )
    return _real_and_finite(arr, name)


def _single_image(image: Any, name: str) -> np.ndarray:
    arr = _to_numpy(image, name)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(
            f"{name} must be (C, H, W) with C in {{1, 3}} or (H, W), got shape {tuple(arr.shape)}"
        )
    return _real_and_finite(arr, name)


def _real_and_finite(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    _check_finite(arr, name)
    return arr


def _image_inputs(images: Any, influences: Any, labels: Any, flipped: Any, k: Any):
    """Checked (values, images, labels, flipped mask or None, k) of the top-images plots."""
    values = _vector(influences, "influences")
    imgs = _images(images)
    _same_length(imgs, "images", values, "influences")
    labels_arr = _labels(labels, "labels", values, "influences")
    mask = None if flipped is None else _bool_mask(flipped, "flipped", values, "influences")
    return values, imgs, labels_arr, mask, _check_k(k, values.shape[0])


def _show_image(ax, image: np.ndarray, cmap: str) -> None:
    """Draws one (C, H, W) image scaled to [0, 1] by its own minimum and maximum."""
    img = image.astype(np.float64)
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else np.full_like(img, 0.5)
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap=cmap, vmin=0.0, vmax=1.0)
    else:
        ax.imshow(np.transpose(img, (1, 2, 0)))
    ax.set_xticks([])
    ax.set_yticks([])


def _ranked(values: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Indices of the k largest (or smallest) values; ties go to the lower index."""
    order = np.argsort(-values if largest else values, kind="stable")
    return order[:k]


def _image_title(kind: str, rank: int, index: int, label_text: str, value: float, fmt: str,
                 flipped: bool) -> str:
    mark = " (flipped)" if flipped else ""
    return f"{kind} {rank}: #{index}\nlabel {label_text}{mark}\n{value:{fmt}}"


def _new_axes(ax):
    if ax is not None:
        return ax
    fig, ax = _pyplot().subplots()
    return ax


def _new_figure(fig, figsize):
    if fig is not None:
        return fig
    return _pyplot().figure(figsize=figsize, layout="constrained")


def _bool_mask(mask: Any, name: str, ref: np.ndarray, ref_name: str) -> np.ndarray:
    arr = _to_numpy(mask, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (n_train,), got shape {tuple(arr.shape)}")
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean mask, got dtype {arr.dtype}")
    _same_length(arr, name, ref, ref_name)
    return arr


# ----------------------------------------------------------------------------- histograms

def plot_influence_distribution(influences: Any, title_extra: str = "", *, bins: Any = 50,
                                ax=None):
    """Histogram of the influence of all training points on one test point.

    Args:
        influences: (n_train,) influence of each training point on the test
            point, e.g. ``influence_matrix[i]`` for ``mode="up"``.
        title_extra: appended to the title.
        bins: passed to ``Axes.hist``.
        ax: the Axes to draw on (default: a new figure).

    Returns:
        The matplotlib Axes.
    """
    _require_matplotlib()
    values = _vector(influences, "influences")
    ax = _new_axes(ax)
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    ax.set_xlabel("influence")
    ax.set_ylabel("number of training points")
    title = "Influence of the training points"
    ax.set_title(f"{title} {title_extra}".strip())
    return ax


def plot_influence_distribution_by_label(influences: Any, labels: Any, title_extra: str = "", *,
                                         label_names: LabelNames = None, bins: Any = 50,
                                         alpha: float = 0.5, ax=None):
    """Overlaid histograms of the influence on one test point, one per training label.

    All histograms share the same bin edges so their counts compare directly.

    Args:
        influences: (n_train,) influence of each training point on the test point.
        labels: (n_train,) label of each training point (numbers or strings).
        title_extra: appended to the title, e.g. the test point's label.
        label_names: optional mapping (or sequence indexed by label) from label to
            the name shown in the legend; by default the label itself is shown.
        bins: number of bins or explicit edges, as for ``numpy.histogram_bin_edges``.
        alpha: opacity of each histogram.
        ax: the Axes to draw on (default: a new figure).

    Returns:
        The matplotlib Axes; its legend lists the labels in sorted order.
    """
    _require_matplotlib()
    values = _vector(influences, "influences")
    labels_arr = _labels(labels, "labels", values, "influences")
    return _hist_by_label(values, labels_arr, "Influence of the training points", title_extra,
                          label_names, bins, alpha, ax)


def plot_average_influence_by_label(influence_matrix: Any, train_labels: Any, title_extra: str = "",
                                    *, label_names: LabelNames = None, bins: Any = 50,
                                    alpha: float = 0.5, ax=None):
    """Histograms per training label of the influence averaged over the test points.

    Args:
        influence_matrix: (n_test, n_train) influences, as returned with ``mode="up"``;
            it is averaged over the test points (``influence_matrix.mean(0)``) first.
        train_labels: (n_train,) label of each training point.
        title_extra, label_names, bins, alpha, ax: as in
            :func:`plot_influence_distribution_by_label`.

    Returns:
        The matplotlib Axes.
    """
    _require_matplotlib()
    matrix = _to_numpy(influence_matrix, "influence_matrix")
    if matrix.ndim != 2:
        raise ValueError(f"influence_matrix must be 2-D (n_test, n_train), got shape {tuple(matrix.shape)}")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"influence_matrix must not be empty, got shape {tuple(matrix.shape)}")
    if matrix.dtype.kind not in "biuf":
        raise TypeError(f"influence_matrix must hold real numbers, got dtype {matrix.dtype}")
    matrix = matrix.astype(np.float64, copy=False)
    _check_finite(matrix, "influence_matrix")
    values = matrix.mean(axis=0)
    labels_arr = _vector(train_labels, "train_labels", numeric=False)
    if labels_arr.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"train_labels must have one entry per column of influence_matrix ({matrix.shape[1]}), "
            f"got {labels_arr.shape[0]}"
        )
    title = f"Influence of the training points, averaged over {matrix.shape[0]} test points"
    return _hist_by_label(values, labels_arr, title, title_extra, label_names, bins, alpha, ax)


def _hist_by_label(values, labels_arr, title, title_extra, label_names, bins, alpha, ax):
    texts = _label_texts(labels_arr, label_names)
    edges = np.histogram_bin_edges(values, bins=bins)
    ax = _new_axes(ax)
    for label, text in texts.items():
        ax.hist(values[labels_arr == label], bins=edges, alpha=alpha, label=text)
    ax.set_xlabel("influence")
    ax.set_ylabel("number of training points")
    ax.legend(title="training label")
    ax.set_title(f"{title} {title_extra}".strip())
    return ax


# ----------------------------------------------------------------------------- images

def plot_top_training_images(images: Any, influences: Any, labels: Any, k: int = 5, *,
                             test_image: Any = None, test_label: Any = None,
                             flipped: Any = None, label_names: LabelNames = None,
                             cmap: str = "gray", value_format: str = ".3g", fig=None):
    """The k most helpful and k most harmful training images for one test point.

    The top row shows the training images with the largest influence (most
    helpful, in order), the bottom row those with the smallest (most harmful,
    most negative first); ties go to the lower index. Each title reads
    ``"<helpful|harmful> <rank>: #<index>"``, then the label and the influence.
    Every image is scaled to its own minimum and maximum for display.

    Args:
        images: (n_train, C, H, W) with C in {1, 3}, or (n_train, H, W); any range.
        influences: (n_train,) influence of each training point on the test point.
        labels: (n_train,) training labels.
        k: how many images on each side, 1 <= k <= n_train.
        test_image: optional (C, H, W) or (H, W) test image, shown first.
        test_label: optional label of the test image, shown in its title.
        flipped: optional (n_train,) boolean mask; marked images get "(flipped)".
        label_names: optional mapping (or sequence) from label to displayed name.
        cmap: colormap for single-channel images.
        value_format: format spec for the influence values.
        fig: an empty Figure to draw into (default: a new one).

    Returns:
        The matplotlib Figure, with 2 * k axes (plus one for the test image).
    """
    _require_matplotlib()
    values, imgs, labels_arr, mask, k = _image_inputs(images, influences, labels, flipped, k)
    test = None if test_image is None else _single_image(test_image, "test_image")
    test_text = "test point"
    if test_label is not None:
        lab = _to_numpy(test_label, "test_label")
        if lab.size != 1:
            raise ValueError(f"test_label must be a single label, got shape {tuple(lab.shape)}")
        test_text += f"\nlabel {_label_text(lab.reshape(-1)[0], label_names)}"
    texts = _label_texts(labels_arr, label_names)

    offset = 0 if test is None else 1
    fig = _new_figure(fig, (1.7 * (k + offset), 4.4))
    grid = fig.add_gridspec(2, k + offset)
    if test is not None:
        ax = fig.add_subplot(grid[:, 0])
        _show_image(ax, test, cmap)
        ax.set_title(test_text, fontsize=8)
    for row, (kind, largest, color) in enumerate((("helpful", True, _HELPFUL_COLOR),
                                                  ("harmful", False, _HARMFUL_COLOR))):
        for rank, idx in enumerate(_ranked(values, k, largest).tolist(), start=1):
            ax = fig.add_subplot(grid[row, offset + rank - 1])
            _show_image(ax, imgs[idx], cmap)
            is_flipped = bool(mask[idx]) if mask is not None else False
            ax.set_title(_image_title(kind, rank, idx, texts[_key(labels_arr[idx])],
                                      values[idx], value_format, is_flipped),
                         fontsize=7, color="black" if not is_flipped else "darkred")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2)
    fig.suptitle("Most helpful (top) and most harmful (bottom) training images", fontsize=9)
    return fig


def plot_top_images_per_class(images: Any, influences: Any, labels: Any, k: int = 3, *,
                              flipped: Any = None, label_names: LabelNames = None,
                              cmap: str = "gray", value_format: str = ".3g", fig=None):
    """The k most and k least influential training images within each class.

    One row per label (sorted): the left k images have the largest influence
    among the training points of that label ("most", largest first), the right k the
    smallest ("least", smallest first); ties go to the lower index. A class with
    fewer than k points shows all of them on each side. Titles read
    ``"<most|least> <rank>: #<index>"``, then the label and the influence.

    Args:
        images: (n_train, C, H, W) with C in {1, 3}, or (n_train, H, W); any range.
        influences: (n_train,) influences, e.g. on one test point or averaged
            over the test set (``influence_matrix.mean(0)``).
        labels: (n_train,) training labels.
        k: how many images per side and class, >= 1.
        flipped, label_names, cmap, value_format: as in :func:`plot_top_training_images`.
        fig: an empty Figure to draw into (default: a new one).

    Returns:
        The matplotlib Figure, with one axes per image shown.
    """
    _require_matplotlib()
    values, imgs, labels_arr, mask, k = _image_inputs(images, influences, labels, flipped, k)

    texts = _label_texts(labels_arr, label_names)
    fig = _new_figure(fig, (1.5 * 2 * k, 1.9 * len(texts)))
    grid = fig.add_gridspec(len(texts), 2 * k)
    for row, (label, name) in enumerate(texts.items()):
        members = np.flatnonzero(labels_arr == label)
        kk = min(k, members.shape[0])
        for side, (kind, largest, color) in enumerate((("most", True, _HELPFUL_COLOR),
                                                       ("least", False, _HARMFUL_COLOR))):
            chosen = members[_ranked(values[members], kk, largest)]
            for rank, idx in enumerate(chosen.tolist(), start=1):
                ax = fig.add_subplot(grid[row, side * k + rank - 1])
                _show_image(ax, imgs[idx], cmap)
                is_flipped = bool(mask[idx]) if mask is not None else False
                ax.set_title(_image_title(kind, rank, idx, name, values[idx], value_format, is_flipped),
                             fontsize=7, color="black" if not is_flipped else "darkred")
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(2)
    fig.suptitle("Most (left) and least (right) influential training images per class", fontsize=9)
    return fig


# ----------------------------------------------------------------------------- self-influence

def plot_self_influence_vs_loss(self_influence: Any, losses: Any, flipped: Any = None, *,
                                xscale: str = "linear", yscale: str = "linear", ax=None):
    """Scatter of the self-influence of each training point against its training loss.

    Points with a high loss and a high self-influence are the usual suspects
    for wrong labels. With ``flipped``, the points whose label is known to be
    wrong are drawn in a second collection (red crosses) and a legend is added.

    Args:
        self_influence: (n_train,) self-influence of each training point (y axis).
        losses: (n_train,) training loss of each point (x axis).
        flipped: optional (n_train,) boolean mask of flipped labels.
        xscale, yscale: axis scales, e.g. ``"log"`` or ``"symlog"``.
        ax: the Axes to draw on (default: a new figure).

    Returns:
        The matplotlib Axes. ``ax.collections[0]`` holds the points (the
        unflipped ones when ``flipped`` is given), ``ax.collections[1]`` the flipped ones.
    """
    _require_matplotlib()
    si = _vector(self_influence, "self_influence")
    loss = _vector(losses, "losses")
    _same_length(loss, "losses", si, "self_influence")
    ax = _new_axes(ax)
    if flipped is None:
        ax.scatter(loss, si, s=12, alpha=0.6, color="tab:blue")
    else:
        mask = _bool_mask(flipped, "flipped", si, "self_influence")
        ax.scatter(loss[~mask], si[~mask], s=12, alpha=0.6, color="tab:blue",
                   label=f"label kept ({int((~mask).sum())})")
        ax.scatter(loss[mask], si[mask], s=28, alpha=0.9, color="tab:red", marker="x",
                   label=f"label flipped ({int(mask.sum())})")
        ax.legend()
    ax.set_xscale(xscale)
    ax.set_yscale(yscale)
    ax.set_xlabel("training loss")
    ax.set_ylabel("self-influence")
    ax.set_title("Self-influence against training loss")
    return ax
