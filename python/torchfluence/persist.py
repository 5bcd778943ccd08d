"""Saved solvers: a fitted solver's state in one safetensors file, and the solver rebuilt from it.

Fitting is the expensive part of an influence computation (passes over the
training data, eigendecompositions); scoring reuses the result for every query.
:meth:`InfluenceFunctionModel.save <torchfluence.InfluenceFunctionModel.save>`
writes what the solver's solves need to one ``.safetensors`` file, and
:meth:`InfluenceFunctionModel.load <torchfluence.InfluenceFunctionModel.load>`
rebuilds the solver from it on a model with the same weights, in another
process or on another machine, without refitting.

The file holds raw tensors and a JSON header (the safetensors ``metadata``
under the key ``"torchfluence"``): the format and its version, the solver class,
the constructor options that rebuild it, the fitted state's scalar facts, the
number of training samples, a fingerprint of the model
(:func:`torchfluence.durable.model_fingerprint`), a digest of the tensors,
and the torch and torchfluence versions. Nothing is pickled, so loading a file
runs no code from it. Writes are atomic: a temporary file in the same
directory, flushed to disk, then renamed over the target.

What a load may change. Options the fitted state was computed with are taken
from the file, and an override with a different value is refused:
``params``, ``head``, ``second_order``, ``dtype``, ``curvature`` for every
solver, and each solver's own (``_fit_options``: e.g. the rank and seed of
Arnoldi and Nystroem, K-FAC's ``fisher``, CG's preconditioner). Every other
saved option may be overridden: the runtime ones (``block_size``,
``progress``, ``score_dtype``, ``allow_tf32``, ``fused``, and ``cache_dir``,
which is not saved) and the solve-time ones (CG's ``rtol``, ``maxiter``,
``block``; LiSSA's recursion settings; Arnoldi's ``complement``).
``regularization`` may be overridden for every solver: no saved state depends
on it (DirectInfluence saves H and refactors H + lambda I for a new lambda).

Training data. CG, LiSSA and DataInf read the training data in every solve,
so their load needs ``train_data=`` (the data they were fitted on, in the same
order; its sample count is checked against the file). The other solvers solve
from the saved state alone; without ``train_data`` they score any samples passed
explicitly, and only :meth:`train_influences` and :meth:`top_k` without data
(which read the fitted training data) raise an error that says to pass it.

Per solver (saved tensors; options kept from the file besides the common ones;
whether ``train_data`` is required):

- DirectInfluence: H (float64) and the Cholesky factor of H + lambda I; nothing
  else kept (``column_block`` may change; a new lambda refactors H); optional.
- ArnoldiInfluence: the kept Ritz pairs; ``rank``, ``krylov_dimension``,
  ``krylov_block``, ``tol``, ``seed``; optional.
- NystroemSketchInfluence: the sketch's eigenpairs; ``rank``, ``seed``; optional.
- KfacInfluence, EkfacInfluence: each layer's Q_A (none for an embedding), Q_S
  and eigenvalues (EK-FAC's corrected ones); ``fisher``, ``fisher_samples``,
  ``seed``, ``eigenvalue_correction``; optional.
- CgInfluence: the preconditioner's state (Jacobi diagonal, Nystrom sketch or
  (E)K-FAC factors); ``preconditioner``, ``preconditioner_samples``,
  ``preconditioner_rank``; required.
- LissaInfluence: nothing (its fit only records the data); none; required.
  The minibatches come from the data and ``seed``: the same data, read with the
  same batch size (a DataLoader's, else ``block_size``), gives the same ones.
- InverseHarmonicMeanInfluence (DataInf): nothing; ``block_structure``; required.
- With ``block_structure=`` (Direct, CG, LiSSA, Arnoldi, Nystroem): each block's
  state as above, under ``block/<block name>/``; ``block_structure`` is kept, and
  ``regularization`` is saved as ``{block name: lambda}``.
- The pyDVL-compatible classes (:mod:`torchfluence.pydvl`) are rebuilt from
  their own constructor arguments; ``block_structure`` and
  ``second_order_mode`` are kept (and ``rank``, ``preconditioner``,
  ``update_diagonal`` where they apply); a block-diagonal solver saves each
  block's state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ._build_info import build_info
from .curvature import CurvatureOperator
from .data import DataSource, SampleBlock, Samples
from .durable import atomic_write, model_fingerprint
from .durable import digest as _digest
from .linear_head import loss_kind

FORMAT = "torchfluence.solver"
FORMAT_VERSION = 1
METADATA_KEY = "torchfluence"

_DTYPE_OPTIONS = ("dtype", "score_dtype", "factor_dtype", "capture_dtype")
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}

PathLike = Union[str, "os.PathLike[str]"]


# -- save ---------------------------------------------------------------------------------------------
def save_solver(solver: Any, path: PathLike) -> Path:
    """Writes the fitted `solver` to `path` (see :meth:`InfluenceFunctionModel.save`); returns the path.

    What is written comes from the solver's contract (:mod:`torchfluence.contract`):
    ``fitted_state()``, ``constructor_options()``, ``fit_options()`` and ``traits``.
    """
    path = _check_path(path)
    name = type(solver).__name__
    if not solver.is_fitted:
        raise RuntimeError(f"{name} is not fitted: call .fit(train_data) before .save(path)")
    _check_unchanged(solver)
    state, info = solver.fitted_state()
    # Copies on the host: contiguous, and sharing no storage (safetensors refuses aliased tensors).
    tensors = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}
    # Memory layouts other than row-major (eigh's column-major eigenvectors) are restored at load:
    # a product's BLAS path, and so its rounding, depends on its operands' strides.
    layouts = {key: list(value.stride()) for key, value in state.items()
               if not value.is_contiguous() and _dense(value)}
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "solver": qualified_name(type(solver)),
        "options": _encode_options(solver, solver.constructor_options()),
        "fit_options": sorted(type(solver).fit_options()),
        "structure": structure(solver),
        "needs_train_data": type(solver).traits.solve_reads_train_data,
        "n_train": int(solver.n_train),
        "classes": solver._classes,
        "loss": loss_kind(solver.functions.loss),
        "model_fingerprint": solver.model_fingerprint(),
        "state": info,
        "tensors_digest": _digest(tensors),
        "layouts": layouts,
        "torch_version": torch.__version__,
        "torchfluence_version": build_info()["version"],
    }
    try:
        text = json.dumps(header)  # insertion order: the order of blocks and layers matters
    except TypeError as error:
        raise TypeError(f"{name}: its settings cannot be written as JSON ({error})") from error
    _write_atomic(tensors, path, {METADATA_KEY: text})
    return path


def structure(solver: Any) -> dict[str, Any]:
    """What the solver works on: parameter names and count, dtype, head (None outside head mode)."""
    return {"params": list(solver.functions.names), "num_params": solver.num_params,
            "dtype": _dtype_name(solver.dtype),
            "head": None if solver.features is None else solver.features.head_name}


def _check_unchanged(solver: Any) -> None:
    """Refuses to save when the model's tensors changed after the solver copied them.

    The solver works on copies of the parameters made at construction (and of the
    frozen tensors when it casts them); the file's fingerprint is of the model as
    it is now, so both must agree for the fingerprint to describe the saved state.
    """
    f = solver.functions
    named = dict(f.model.named_parameters())
    current = torch.cat([named[n].detach().reshape(-1).to(device=f.theta.device, dtype=f.dtype)
                         for n in f.names])
    snapshots = [(f.model, f.frozen)]
    if solver.features is not None:
        source = solver.features.backbone if solver.features.backbone is not None else solver.features.model
        snapshots.append((source, solver.features.state))
    changed = not torch.equal(current, f.theta)
    for module, snapshot in snapshots:
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        for key, copy in snapshot.items():
            if key in tensors and not changed:
                now = tensors[key].detach().to(device=copy.device, dtype=copy.dtype)
                changed = not torch.equal(now, copy)
    if changed:
        raise RuntimeError(f"{type(solver).__name__}: the model's parameters or buffers changed after the "
                           "solver was built, so its fitted state belongs to the old values and the saved "
                           "model fingerprint would not; build and fit a new solver on the current model")


# -- load ---------------------------------------------------------------------------------------------
def load_solver(cls: type, path: PathLike, model: nn.Module, loss: Any, *, any_subclass: bool,
                train_data: Optional[DataSource] = None, overrides: Optional[Mapping[str, Any]] = None) -> Any:
    """A solver rebuilt from `path` (see :meth:`InfluenceFunctionModel.load`).

    Args:
        cls: the solver class asked for.
        any_subclass: take whichever subclass of `cls` the file holds (``InfluenceFunctionModel.load``);
            False: the file must hold exactly `cls`.
    """
    path = _check_path(path)
    overrides = dict(overrides or {})
    header, tensors = read(path)
    target = _solver_class(cls, header["solver"], path, any_subclass)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fingerprint = model_fingerprint(model)
    if fingerprint != header["model_fingerprint"]:
        raise ValueError(
            f"model: '{path}' was fitted on a different model (its parameters, buffers, shapes or dtypes "
            f"differ: fingerprint {header['model_fingerprint']} in the file, {fingerprint} for the model "
            "given); load it with the exact weights it was fitted on")
    saved_kind, kind = header.get("loss"), loss_kind(loss)
    if saved_kind is not None and kind is not None and saved_kind != kind:
        raise ValueError(f"loss: '{path}' was fitted with a {saved_kind} loss, got a {kind} loss")
    n_train = header["n_train"]
    if target.traits.solve_reads_train_data and train_data is None:
        raise ValueError(f"train_data: {target.__name__} reads the training data in every solve, so load "
                         f"needs train_data= (the {n_train} samples it was fitted on, in the same order)")
    kwargs = _load_options(target, header, overrides, path, model)
    solver = target.from_constructor_options(model, loss, kwargs)
    if kwargs.get("head") == "auto" and header["options"].get("head") is None:
        solver._full_model = model  # found automatically at fit: mode="perturbation" stays available
    _check_structure(solver, header, path)
    train = None if train_data is None else training_samples(solver, train_data, n_train)
    solver.restore(tensors, header["state"], n_train=n_train, classes=header["classes"], train=train,
                   train_source=train_data, missing=f"{target.__name__} was loaded from '{path}' without train_data")
    return solver


def training_samples(solver: Any, train_data: DataSource, n_train: int) -> Samples:
    """`train_data` as the fit read it (head-mode features cached), checked to hold n_train samples."""
    samples = Samples(train_data, "train_data", solver.block_size, check=solver._check_targets)
    samples.require_reiterable(f"{type(solver).__name__}.load")
    samples.validate_in_memory()
    count = samples.count()
    if count != n_train:
        raise ValueError(f"train_data must be the {n_train} training samples the solver was fitted on, got "
                         f"{count} samples")
    if solver.features is not None:
        samples = solver.features.cache(samples)
    return samples


def read(path: PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(header, tensors on the CPU) of a saved solver, after checking its format, version and digest."""
    path = _check_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no saved solver at '{path}' (no such file)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for any damage
        raise ValueError(f"path: '{path}' is not a readable safetensors file (truncated or corrupt?): "
                         f"{error}") from error
    text = metadata.get(METADATA_KEY)
    if text is None:
        raise ValueError(f"path: '{path}' is a safetensors file but not a saved torchfluence solver (its "
                         f"header has no {METADATA_KEY!r} entry)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"path: '{path}' has a corrupt torchfluence header: {error}") from error
    found = header.get("format") if isinstance(header, dict) else None
    if found != FORMAT:
        raise ValueError(f"path: '{path}' is not a saved torchfluence solver (format {found!r}, expected "
                         f"{FORMAT!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"path: '{path}' has format version {version!r}, written by torchfluence "
                         f"{header.get('torchfluence_version')}; this torchfluence reads version "
                         f"{FORMAT_VERSION}")
    if _digest(tensors) != header.get("tensors_digest"):
        raise ValueError(f"path: '{path}' is corrupt: its tensors do not match the digest in its header")
    for key, stride in header.get("layouts", {}).items():
        value = tensors[key]
        tensors[key] = torch.empty_strided(value.shape, stride, dtype=value.dtype).copy_(value)
    return header, tensors


def state_tensor(tensors: Mapping[str, Tensor], key: str, shape: Sequence[Optional[int]],
                 dtype: Optional[torch.dtype] = None) -> Tensor:
    """``tensors[key]`` checked to exist with `shape` (None: any size) and `dtype`, for a solver's restore."""
    if key not in tensors:
        raise ValueError(f"saved state: tensor {key!r} is missing; the file holds {sorted(tensors)}")
    value = tensors[key]
    if value.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, value.shape)):
        raise ValueError(f"saved state: tensor {key!r} must have shape {tuple(shape)} (None: any), got "
                         f"{tuple(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"saved state: tensor {key!r} must be {dtype}, got {value.dtype}")
    return value


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _solver_class(cls: type, saved: str, path: Path, any_subclass: bool) -> type:
    """The class to rebuild: `cls` when it is the saved one; with `any_subclass`, the saved subclass of `cls`."""
    if any_subclass:
        found = _subclass_named(cls, saved)
        if found is None:
            raise ValueError(f"path: '{path}' holds a {saved}, which is not a loaded solver class; import "
                             "the module that defines it, then load again")
        return found
    if qualified_name(cls) != saved:
        raise ValueError(f"path: '{path}' holds a saved {saved}, not a {qualified_name(cls)}; load it with "
                         f"{saved.rpartition('.')[2]}.load (or InfluenceFunctionModel.load)")
    return cls


def _subclass_named(base: type, name: str) -> Optional[type]:
    stack = list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        if qualified_name(cls) == name:
            return cls
        stack.extend(cls.__subclasses__())
    return None


def _load_options(cls: type, header: Mapping[str, Any], overrides: dict[str, Any], path: Path,
                  model: nn.Module) -> dict[str, Any]:
    """The saved constructor options with the allowed overrides applied, decoded for the constructor."""
    saved = header["options"]
    fixed = set(header.get("fit_options", ())) | cls.fit_options()
    extra = set(cls.traits.load_only_options)
    unknown = sorted(set(overrides) - set(saved) - extra)
    if unknown:
        raise TypeError(f"{cls.__name__}.load got unknown option(s) {unknown}; it takes "
                        f"{sorted(set(saved) | extra)}")
    for name, value in overrides.items():
        if name in fixed and name in saved and _encode(name, value, model) != saved[name]:
            raise ValueError(
                f"{name}: '{path}' was fitted with {name}={saved[name]!r}, which its saved state depends on; "
                f"got {name}={_encode(name, value, model)!r} (fit a new solver to change it)")
    options = {name: _decode(name, value) for name, value in saved.items()}
    options.update({name: value for name, value in overrides.items() if name not in fixed})
    if overrides.get("cache_dir") is not None and options.get("head") is None and "head" in saved:
        options["head"] = "auto"  # a head found automatically; cache_dir needs head= said explicitly
    return options


def _check_structure(solver: Any, header: Mapping[str, Any], path: Path) -> None:
    """The rebuilt solver must work on the same parameters, head and dtype as the saved one."""
    saved, now = header["structure"], structure(solver)
    for key in ("head", "params", "num_params", "dtype"):
        if saved.get(key) != now[key]:
            raise ValueError(
                f"model: the solver rebuilt from '{path}' differs from the saved one in {key}: saved "
                f"{saved.get(key)!r}, now {now[key]!r}; the model's trainable parameters (requires_grad) and "
                "head must be as at fit")
    rebuilt = _encode_options(solver, solver.constructor_options())
    for key in sorted(type(solver).fit_options() & set(rebuilt)):
        if rebuilt[key] != header["options"].get(key):
            raise ValueError(f"{key}: the solver rebuilt from '{path}' has {key}={rebuilt[key]!r}, but it "
                             f"was fitted with {key}={header['options'].get(key)!r}")


# -- option encoding ----------------------------------------------------------------------------------
def _encode_options(solver: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _encode(name, value, solver.model) for name, value in options.items()}


def _encode(name: str, value: Any, model: Optional[nn.Module] = None) -> Any:
    """An option as JSON: dtypes by name, enums by value, classes by qualified name, a head by its name."""
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    if isinstance(value, Enum):  # pyDVL's BlockMode, SecondOrderMode: their values
        return value.value
    if isinstance(value, type):
        return qualified_name(value)
    if isinstance(value, nn.Module) and name == "head" and model is not None:
        return next((n for n, m in model.named_modules() if m is value), repr(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _encode(name, v, model) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(name, v, model) for v in value]
    return value


def _decode(name: str, value: Any) -> Any:
    if name in _DTYPE_OPTIONS and value is not None:
        return _DTYPES[value]
    if name == "curvature" and value is not None:
        found = _subclass_named(CurvatureOperator, value)
        if found is None:
            raise ValueError(f"curvature: the solver was fitted with curvature={value}, which is not a "
                             "loaded CurvatureOperator class; import its module, then load again")
        return found
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- files --------------------------------------------------------------------------------------------
def _check_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _dense(tensor: Tensor) -> bool:
    """Whether `tensor`'s strides are a permutation of a contiguous layout (no gaps, no overlap)."""
    expected = 1
    for dim in sorted(range(tensor.dim()), key=tensor.stride):
        if tensor.shape[dim] != 1 and tensor.stride(dim) != expected:
            return False
        expected *= tensor.shape[dim]
    return True


def _write_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """The safetensors file, streamed to disk by :func:`~torchfluence.durable.atomic_write`."""
    from safetensors.torch import save_file

    atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


# -- a loaded solver without its training data --------------------------------------------------------
class MissingTrainData(Samples):
    """Stands in for the training samples of a solver loaded without ``train_data``.

    Solvers whose state is closed-form never read it to solve; anything that does
    read it (:meth:`train_influences`, :meth:`top_k` without data) gets an error
    that says to pass ``train_data`` at load.
    """

    def __init__(self, why: str, n_train: int, block_size: int) -> None:
        # No data source at all (Samples.__init__ needs one): the attributes a reader may
        # look at are set here, and every method that would read samples raises instead.
        self.name, self.block_size, self.check, self.transform = "train_data", block_size, None, None
        self.minibatch_size = block_size
        self._pair, self._source, self._count = None, None, None
        self._consumed, self._pair_checked = False, False
        self._message = (f"{why}, so its {n_train} training samples are not at hand; pass train_data= (the "
                         "data it was fitted on) to load to score or rank the training data, or pass the "
                         "samples to score explicitly")

    def _missing(self) -> RuntimeError:
        return RuntimeError(self._message)

    @property
    def reiterable(self) -> bool:
        return True

    def require_reiterable(self, why: str) -> None:
        raise self._missing()

    def count(self) -> int:
        raise self._missing()

    def known_count(self) -> Optional[int]:
        raise self._missing()

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        raise self._missing()

    def blocks(self, **kwargs: Any) -> Iterator[SampleBlock]:
        raise self._missing()

    def validate_in_memory(self) -> None:
        raise self._missing()

    def first_block(self) -> SampleBlock:
        raise self._missing()

    def shuffled_batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        raise self._missing()
