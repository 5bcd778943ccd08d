"""The linear datamodeling score (LDS): how well influence scores predict retraining.

Influence scores say how much each training point moves each test loss. The
LDS (Park et al. 2023, "TRAK") checks this against ground truth: retrain the
model on m random subsets of the training set, and for each test point rank
the m retrained models twice, once by the summed scores of the training points
each subset holds (the linear datamodel's prediction) and once by the model's
actual test loss. The LDS of a test point is the Spearman rank correlation of
the two rankings; 1 means the scores order the subsets perfectly.

:func:`retrain_subsets` draws the subsets and runs the retraining (resumable
from a checkpoint); :func:`lds` scores a matrix of influences against them.

Sign convention: torchfluence's scores are positive for *helpful* training
points (up-weighting them lowers the test loss). A subset holding more helpful
points should therefore give a *lower* test loss, so with
``outputs_are="loss"`` the prediction is correlated with the negated losses.
With ``outputs_are="margin"`` (higher = better for the test point, e.g. the
correct-class logit minus the largest other logit) it is correlated with the
outputs as given. Either way a good scorer has an LDS near +1 and scores with
the wrong sign one near -1.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checks import check_choice
from .durable import atomic_write, digest

OutputKind = Literal["loss", "margin"]

__all__ = ["lds", "retrain_subsets"]


# -- the score ----------------------------------------------------------------------------------------

def lds(scores: Tensor, subsets: Tensor, outputs: Tensor, *, outputs_are: OutputKind = "loss") -> Tensor:
    """Per-test-point linear datamodeling score of influence scores against retrained models.

    For each test point i, the linear datamodel predicts the effect of training
    on subset k as ``pred[k, i] = sum_{j in subset k} scores[i, j]``
    (``subsets @ scores.T``); the LDS is the Spearman rank correlation over the
    m subsets of ``pred[:, i]`` and the retrained models' outputs ``outputs[:, i]``
    (negated for losses, see below). Ranks of tied values are their average
    rank, as in ``scipy.stats.spearmanr``. All arithmetic is float64. A rank
    correlation ignores any positive scaling of a test point's scores (and,
    when all subsets have the same size, as :func:`retrain_subsets` draws them,
    any constant added to them), so scores of the up-weighting influence (a 1/n
    factor away from the effect of removing a point) need no rescaling.

    Args:
        scores: (n_test, n_train) influence scores, any floating dtype, with
            torchfluence's sign: positive = helpful, i.e. up-weighting training
            point j lowers the loss of test point i.
        subsets: (m, n_train) bool; ``subsets[k, j]`` is True when retrained
            model k was trained on training point j. m >= 2.
        outputs: (m, n_test) floating; what retrained model k gives on test
            point i: its loss (``outputs_are="loss"``) or a margin / log-probability
            of the correct answer (``outputs_are="margin"``).
        outputs_are: ``"loss"`` (default): lower is better, so the prediction is
            correlated with ``-outputs``. ``"margin"``: higher is better, so it is
            correlated with ``outputs``.

    Returns:
        (n_test,) float64 on the device of `scores`: the LDS of each test point,
        in [-1, 1]. A test point whose outputs, or whose predictions, are the
        same for all m subsets has no ranking to compare: its LDS is NaN (as
        with ``scipy.stats.spearmanr``) and a RuntimeWarning says how many test
        points are NaN. Average with ``torch.nanmean`` to skip them.

    Raises:
        TypeError, ValueError: naming the argument, for a non-tensor, a wrong
            number of dimensions, a non-bool `subsets`, a non-floating `scores`
            or `outputs`, mismatched sizes or devices, fewer than 2 subsets, no
            training points, or a NaN/inf value.
    """
    check_choice(outputs_are, "outputs_are", ("loss", "margin"))
    _check_tensor(scores, "scores", 2, "(n_test, n_train)")
    _check_tensor(subsets, "subsets", 2, "(m, n_train)")
    _check_tensor(outputs, "outputs", 2, "(m, n_test)")
    if not scores.is_floating_point():
        raise TypeError(f"scores must have a floating dtype, got {scores.dtype}")
    if subsets.dtype != torch.bool:
        raise TypeError(f"subsets must be a bool mask (torch.bool), got {subsets.dtype}")
    if not outputs.is_floating_point():
        raise TypeError(f"outputs must have a floating dtype, got {outputs.dtype}")
    n_test, n_train = scores.shape
    m = subsets.shape[0]
    if n_train < 1:
        raise ValueError(f"scores must have at least one training column, got shape {tuple(scores.shape)}")
    if subsets.shape[1] != n_train:
        raise ValueError(f"subsets must have shape (m, n_train={n_train}) to match scores, "
                         f"got {tuple(subsets.shape)}")
    if m < 2:
        raise ValueError(f"subsets must hold at least 2 subsets (rows) for a rank correlation, got {m}")
    if tuple(outputs.shape) != (m, n_test):
        raise ValueError(f"outputs must have shape (m={m}, n_test={n_test}) to match subsets and scores, "
                         f"got {tuple(outputs.shape)}")
    for name, tensor in (("subsets", subsets), ("outputs", outputs)):
        if tensor.device != scores.device:
            raise ValueError(f"{name} must be on the device of scores ({scores.device}), got {tensor.device}")
    _check_all_finite(scores, "scores")
    _check_all_finite(outputs, "outputs")

    scores64 = scores.to(torch.float64)
    # A matrix product may round identical rows differently (BLAS treats edge rows apart),
    # which would rank repeated subsets against each other by 1-ulp noise: each distinct
    # subset is summed once, so repeated subsets tie exactly.
    distinct, which = torch.unique(subsets, dim=0, return_inverse=True)
    predictions = (distinct.to(torch.float64) @ scores64.T)[which]  # (m, n_test)
    target = outputs.to(torch.float64)
    if outputs_are == "loss":
        target = -target  # helpful subsets -> lower loss: rank the predictions against the negated losses
    result = _spearman_columns(predictions, target)
    undefined = int(torch.isnan(result).sum())
    if undefined:
        warnings.warn(f"lds: {undefined} of {n_test} test point(s) have constant outputs or constant "
                      "predictions over the subsets; their LDS is NaN", RuntimeWarning, stacklevel=2)
    return result


def _spearman_columns(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each column of `a` with the same column of `b`, in float64.

    Ties get their average rank. A column that is constant in `a` or in `b`
    gives NaN. Inputs are assumed finite (see :func:`lds` for the checked entry
    point).

    Args:
        a, b: (m, k) tensors of the same shape, m >= 2.

    Returns:
        (k,) float64, each in [-1, 1] or NaN.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must be (m, k) tensors of the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    m = a.shape[0]
    ra, rb = _average_ranks(a.to(torch.float64)), _average_ranks(b.to(torch.float64))
    # The average ranks of m values always sum to m (m + 1) / 2, so (m + 1) / 2 is their
    # exact mean; subtracting it (rather than a computed mean) keeps the centred ranks
    # exact half-integers, and identical rankings give exactly 1.
    center = (m + 1) / 2
    ca, cb = ra - center, rb - center
    num = (ca * cb).sum(dim=0)
    den = torch.sqrt((ca * ca).sum(dim=0) * (cb * cb).sum(dim=0))
    corr = (num / den).clamp(-1.0, 1.0)  # rounding of the square root can step 1 ulp outside
    constant = (a.amax(dim=0) == a.amin(dim=0)) | (b.amax(dim=0) == b.amin(dim=0))
    return torch.where(constant, torch.full_like(corr, math.nan), corr)


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks down each column of a (m, k) tensor, tied values sharing their average rank."""
    columns = values.T.contiguous()  # (k, m): searchsorted works along the last dimension
    ordered = columns.sort(dim=1).values
    below = torch.searchsorted(ordered, columns, side="left")  # values strictly smaller
    upto = torch.searchsorted(ordered, columns, side="right")  # values smaller or equal
    # The tie group occupies 0-based positions below .. upto - 1; its mean 1-based rank:
    return ((below + upto + 1).to(torch.float64) / 2).T


def _check_tensor(value, name: str, dim: int, shape: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor {shape}, got shape {tuple(value.shape)}")


def _check_all_finite(tensor: Tensor, name: str) -> None:
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite, got {int(bad.sum())} NaN/inf value(s) "
                         f"(first at [{row}, {col}])")


# -- retraining ---------------------------------------------------------------------------------------

_FORMAT = "torchfluence-lds-retrain-v1"


def retrain_subsets(train_fn: Callable[[Tensor], Tensor], n_train: int, *, m: int, fraction: float = 0.5,
                    seed: int = 0, progress: bool = True,
                    checkpoint: Optional[Union[str, os.PathLike]] = None) -> tuple[Tensor, Tensor]:
    """Retrains on m random subsets of the training set and collects the test outputs for :func:`lds`.

    Every subset holds exactly ``k = round(fraction * n_train)`` training points
    (Python's ``round``: halves go to the even integer), drawn without
    replacement by ``torch.randperm`` from a ``torch.Generator`` seeded with
    `seed`; all m subsets are drawn before any training, so the same
    ``(n_train, m, fraction, seed)`` always gives the same subsets, however the
    work is split across runs. Each subset is passed to ``train_fn`` as its sorted
    indices; train_fn trains a model on those training points and returns what
    the model gives on each test point (its loss or a margin). The order, seeds
    and determinism of the training itself are train_fn's business (seed it
    from the indices or a counter of its own if it shuffles).

    With `checkpoint`, the outputs are written to that safetensors file after
    every finished subset (to a temporary file in the same folder, then renamed
    over the old one, so an interruption never leaves a partial file). A later
    call with the same path loads it and retrains only the subsets not finished
    yet; it refuses a checkpoint written for a different n_train, m, fraction or
    seed. A finished checkpoint is returned without calling train_fn. The file
    does not record what train_fn does: after changing the training (epochs,
    model, data), use a new path.

    Args:
        train_fn: ``train_fn(indices) -> outputs``: indices a (k,) int64 tensor
            of training indices in increasing order; outputs a (n_test,)
            floating tensor, finite, the same n_test for every call.
        n_train: number of training points (indices are in ``[0, n_train)``).
        m: number of subsets (retrained models); :func:`lds` needs m >= 2.
        fraction: share of the training set in each subset, with
            ``1 <= round(fraction * n_train) <= n_train - 1``.
        seed: seeds the subset draws.
        progress: show a tqdm progress bar.
        checkpoint: optional path of a ``.safetensors`` file to save finished
            rows to and resume from.

    Returns:
        ``(subsets, outputs)``: subsets (m, n_train) bool on the CPU, True where
        a model saw the training point; outputs (m, n_test) float64 on the CPU,
        row r being train_fn's result for subset r.

    Raises:
        TypeError, ValueError: for bad arguments (naming the argument), for a
            train_fn result of the wrong type, shape or with NaN/inf (naming the
            subset; finished subsets stay in the checkpoint), and for a
            checkpoint that does not match the arguments.
    """
    if not callable(train_fn):
        raise TypeError(f"train_fn must be callable, got {type(train_fn).__name__}")
    _check_int(n_train, "n_train", 2)
    _check_int(m, "m", 1)
    _check_int(seed, "seed", None)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be a number in (0, 1), got {fraction!r}")
    fraction = float(fraction)
    k = round(fraction * n_train)
    if not 1 <= k <= n_train - 1:
        raise ValueError(f"fraction * n_train must round to a subset size in [1, n_train - 1] = "
                         f"[1, {n_train - 1}], got round({fraction!r} * {n_train}) = {k}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")

    subsets = _draw_subsets(n_train, m=m, k=k, seed=seed)
    settings = {"format": _FORMAT, "n_train": str(n_train), "m": str(m), "fraction": repr(fraction),
                "seed": str(seed), "k": str(k), "subsets_sha256": digest([("subsets", subsets)])}
    path = None if checkpoint is None else _check_path(checkpoint)
    outputs: Optional[Tensor] = None
    done = torch.zeros(m, dtype=torch.bool)
    if path is not None and path.exists():
        outputs, done = _load_checkpoint(path, settings)

    with tqdm(total=m, initial=int(done.sum()), desc="retraining", disable=not progress) as bar:
        for row in range(m):
            if done[row]:
                continue
            indices = subsets[row].nonzero().flatten()  # (k,) int64, increasing
            result = _check_row(train_fn(indices), row, None if outputs is None else outputs.shape[1])
            if outputs is None:
                outputs = torch.zeros(m, result.shape[0], dtype=torch.float64)
            outputs[row] = result
            done[row] = True
            if path is not None:
                _save_checkpoint(path, outputs, done, settings)
            bar.update(1)
    return subsets, outputs


def _draw_subsets(n_train: int, *, m: int, k: int, seed: int) -> Tensor:
    """The (m, n_train) bool mask of m random k-point subsets that :func:`retrain_subsets` trains on.

    Row r is the first k entries of the r-th ``torch.randperm(n_train)`` drawn
    from one ``torch.Generator`` seeded with `seed`.
    """
    generator = torch.Generator().manual_seed(seed)
    subsets = torch.zeros(m, n_train, dtype=torch.bool)
    for row in range(m):
        subsets[row, torch.randperm(n_train, generator=generator)[:k]] = True
    return subsets


def _check_int(value, name: str, minimum: Optional[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_path(checkpoint) -> Path:
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path (str or os.PathLike), got {type(checkpoint).__name__}")
    path = Path(checkpoint)
    if path.exists() and not path.is_file():
        raise ValueError(f"checkpoint must be a file path, got {str(path)!r}, which is a directory")
    if not path.parent.is_dir():
        raise ValueError(f"checkpoint's folder must exist, got {str(path.parent)!r}")
    return path


def _check_row(result, row: int, n_test: Optional[int]) -> Tensor:
    """train_fn's result for subset `row` as a (n_test,) float64 CPU tensor, or an error naming the subset."""
    if not isinstance(result, Tensor):
        raise TypeError(f"train_fn must return a torch.Tensor (n_test,), got {type(result).__name__} "
                        f"for subset {row}")
    if result.dim() != 1:
        raise ValueError(f"train_fn must return a 1-D tensor (n_test,), got shape {tuple(result.shape)} "
                         f"for subset {row}")
    if not result.is_floating_point():
        raise TypeError(f"train_fn must return a floating tensor, got {result.dtype} for subset {row}")
    if n_test is not None and result.shape[0] != n_test:
        raise ValueError(f"train_fn must return the same n_test={n_test} values for every subset, got "
                         f"{result.shape[0]} for subset {row}")
    result = result.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(result)
    if bool(bad.any()):
        raise ValueError(f"train_fn returned {int(bad.sum())} NaN/inf value(s) for subset {row} (first at "
                         f"test point {int(bad.nonzero()[0])}); subsets finished before it are kept")
    return result


def _save_checkpoint(path: Path, outputs: Tensor, done: Tensor, settings: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write(path, save({"outputs": outputs, "done": done}, metadata=settings))


def _load_checkpoint(path: Path, settings: dict[str, str]) -> tuple[Tensor, Tensor]:
    from safetensors import safe_open

    where = f"checkpoint {str(path)!r}"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # any unreadable file: say which and why
        raise ValueError(f"{where} is not a readable safetensors file: {error}") from error
    if metadata.get("format") != _FORMAT or set(tensors) != {"outputs", "done"}:
        raise ValueError(f"{where} was not written by retrain_subsets "
                         f"(format {metadata.get('format')!r}, tensors {sorted(tensors)})")
    for key in ("n_train", "m", "fraction", "seed"):
        if metadata.get(key) != settings[key]:
            raise ValueError(f"{where} was made with {key}={metadata.get(key)}, but this call "
                             f"has {key}={settings[key]}; use another checkpoint path or the same arguments")
    if metadata.get("subsets_sha256") != settings["subsets_sha256"]:
        raise ValueError(f"{where} was made from other subsets than this torch version "
                         "draws for the same seed; use another checkpoint path")
    outputs, done = tensors["outputs"], tensors["done"]
    m = int(settings["m"])
    if (outputs.dim() != 2 or outputs.shape[0] != m or outputs.dtype != torch.float64
            or tuple(done.shape) != (m,) or done.dtype != torch.bool):
        raise ValueError(f"{where} holds outputs {tuple(outputs.shape)} {outputs.dtype} and done "
                         f"{tuple(done.shape)} {done.dtype}; expected ({m}, n_test) float64 and ({m},) bool")
    return outputs.clone(), done.clone()
