"""A gradient store: projected per-sample training gradients on disk, computed once, scored many times.

:meth:`GradientStore.build` runs the model over the training data once and
writes each sample's projected gradient ``phi_j = P g_j`` (k numbers, float16
or bfloat16) into a memory-mapped file, and sums the projected Fisher
``F = (1/n) sum_j phi_j phi_j^T`` (k x k, float64, from the unrounded
gradients) on the way. Queries are then scored against the file without the
model touching the training data again (TRAK's and LoGra's way of serving
influence queries):

- ``regularization=None``: gradient similarity, ``phi_test . phi_j``;
- ``regularization=lambda``: ``phi_test^T (F + lambda I)^-1 phi_j``, the
  projected-Fisher influence that :class:`~torchfluence.DirectInfluence` with
  the same ``projector=`` computes.

The stored gradients are read in chunks and widened to float32 exactly;
scores are float32 products of the float32 query vectors with them, merged into
a streaming top-k (:class:`~torchfluence.StreamingTopK`) or written out.

A store is a directory:

- ``store.json``: format, version, the settings that made it (projector,
  parameters, dtypes, block size, loss, data size and, for an in-memory
  ``(x, y)`` pair, a digest of it), the model's fingerprint
  (:func:`torchfluence.durable.model_fingerprint`) and whether it is complete;
- ``gradients.bin``: the (n_train, k) row-major matrix, little-endian 16-bit floats;
- ``fisher.safetensors``: while building, the running Fisher sum and the
  build's progress record (which blocks are done) in one file, replaced
  atomically; when complete, ``fisher``, the (k, k) float64 mean, and the
  final record.

A build is resumable: a killed build, run again with the same arguments,
skips the recorded blocks and ends with the same bytes as an uninterrupted one
(each block's gradients depend on that block alone, and the Fisher is summed
in block order). The gradient file's pages are flushed before the record that
calls their block done is written; records are written with the same time rule
as resumable scoring (:mod:`torchfluence.journal`). Another model, other
settings or other data are refused with an error naming what differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from .budget import store_chunk_rows
from ._build_info import build_info
from ._functional import LossFn, ModelFunctions
from .checks import check_finite, check_positive_int, check_regularization
from .data import DataSource, SampleBlock, Samples
from .distributed import is_distributed
from .durable import atomic_write, data_digest, model_fingerprint, settings_fingerprint
from .gradients import GradientSource, gradient_source
from .influence import TopKInfluences
from .projected_space import (KroneckerGradients, Projection, describe_projection, projected_source,
                        projection_from_description)
from .journal import FORMAT as JOB_FORMAT
from .journal import Journal, identity_differences, new_record, parse_record
from .scoring import Runtime, result_sink, run_blocks
from .sinks import DenseSink, MemmapSink, ScoreSink, TopKSink

__all__ = ["GradientStore"]

FORMAT = "torchfluence.gradient-store"
VERSION = 2  # 2: the build record is a job record of torchfluence.journal
METADATA_FILE = "store.json"
GRADIENTS_FILE = "gradients.bin"
FISHER_FILE = "fisher.safetensors"
_RECORD_KEY = "torchfluence"
_STORAGE = {"float16": torch.float16, "bfloat16": torch.bfloat16}

PathLike = Union[str, "os.PathLike[str]"]
Queries = Union[Tensor, tuple]


class GradientStore:
    """Projected per-sample training gradients in a memory-mapped file, with their Fisher.

    Build one with :meth:`build`, open one with :meth:`open`.

    Attributes:
        path: the store's directory.
        metadata: the contents of ``store.json``.
    """

    def __init__(self, path: Path, metadata: dict[str, Any], fisher: Optional[Tensor]) -> None:
        self.path, self.metadata = path, metadata
        self._fisher = fisher
        self._projector: Optional[Projection] = None
        self._cholesky: dict[float, Tensor] = {}  # lambda -> Cholesky factor of F + lambda I (float64, CPU)

    # -- facts --------------------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        """Number of stored training samples."""
        return int(self.metadata["settings"]["n_train"])

    @property
    def k(self) -> int:
        """Length of each stored projected gradient."""
        return int(self.metadata["settings"]["k"])

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype, torch.float16 or torch.bfloat16."""
        return _STORAGE[self.metadata["settings"]["dtype"]]

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype the gradients were computed (and query gradients are computed) in."""
        return getattr(torch, self.metadata["settings"]["compute_dtype"])

    @property
    def model_fingerprint(self) -> str:
        """Fingerprint of the model the store was built with."""
        return self.metadata["model"]

    @property
    def projector(self) -> Projection:
        """The projector of the build, rebuilt from its description."""
        if self._projector is None:
            self._projector = projection_from_description(self.metadata["settings"]["projector"])
        return self._projector

    @property
    def fisher(self) -> Tensor:
        """The projected Fisher ``(1/n) sum_j phi_j phi_j^T``, (k, k) float64 (summed before rounding to 16 bits).

        Raises:
            ValueError: for a store built with ``fisher=False``.
        """
        if self._fisher is None:
            raise ValueError(f"the store at '{self.path}' was built with fisher=False: it holds no Fisher, so "
                             "regularization= (Fisher preconditioning) is not available; use regularization=None")
        return self._fisher

    @property
    def gradients(self) -> Tensor:
        """The stored gradients, (n_train, k) in :attr:`dtype`, memory-mapped.

        The mapping is copy-on-write: writing to the tensor never changes the file.
        """
        array = np.memmap(self.path / GRADIENTS_FILE, dtype=np.int16, mode="c", shape=(self.n_train, self.k))
        return torch.from_numpy(array).view(self.dtype)

    def __repr__(self) -> str:
        return (f"GradientStore('{self.path}', n_train={self.n_train}, k={self.k}, dtype={self.dtype}, "
                f"projector={self.metadata['settings']['projector']})")

    # -- building -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, loss: LossFn, train_data: DataSource, projector: Projection,
              path: PathLike, *, dtype: torch.dtype = torch.float16, block_size: int = 256, progress: bool = True,
              params: Optional[Sequence[str]] = None, output_transform: Optional[Callable[..., Tensor]] = None,
              compute_dtype: Optional[torch.dtype] = None, fused: bool = True, fisher: bool = True) -> GradientStore:
        """Writes the projected per-sample gradients of `train_data` under `path`; resumes a stopped build.

        Args:
            model: the trained model (``model.eval()`` first).
            loss: ``loss(outputs, targets)``, the batch mean (as for the solvers).
            train_data: a DataLoader, an ``(x, y)`` pair of tensors or a Dataset; read in order,
                once (and counted first when its length is unknown). A resumed build needs the
                same samples in the same order.
            projector: a :class:`~torchfluence.Projector` (DenseProjector, SparseJLProjector,
                KroneckerProjector) with ``p`` the number of selected parameters, or a
                :class:`~torchfluence.KroneckerProjection`; the store records how to rebuild it.
            path: a directory (created if missing) for the store's files.
            dtype: storage dtype, torch.float16 (default) or torch.bfloat16.
            block_size: samples per forward/backward pass.
            progress: show a progress bar.
            params: names of the parameters to use (default: all with ``requires_grad``).
            output_transform: as in :class:`~torchfluence.InfluenceFunctionModel`.
            compute_dtype: float32 or float64 for the gradients; None: the model's.
            fused: captured layers (one forward/backward per block) where the model has them.
            fisher: also sum the (k, k) float64 Fisher (needed for ``regularization=``).

        Returns:
            The finished store (a finished store at `path` with the same settings is opened as it is).

        Raises:
            ValueError: when `path` holds a store of another model, other settings or other
                data (naming what differs), or corrupt files; for bad arguments.
        """
        if is_distributed():
            raise NotImplementedError("GradientStore.build runs in one process (one file, one record), but a "
                                      "process group of several is active; build the store in one process")
        if dtype not in _STORAGE.values():
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16 (the storage dtype), got {dtype}")
        check_positive_int(block_size, "block_size")
        for name, value in (("progress", progress), ("fused", fused), ("fisher", fisher)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        path = _check_directory(path)
        functions = ModelFunctions(model, loss, params, compute_dtype, output_transform)
        source = projected_source(functions, gradient_source(functions, fused), projector)
        description = describe_projection(projector)
        if isinstance(source, KroneckerGradients):
            description["layers"] = [[layer.name, p.k_out, p.k_in]
                                     for layer, p in zip(source.layers, source.projectors)]
        samples = Samples(train_data, "train_data", block_size)
        n = samples.count()
        first = samples.first_block()
        functions.check_loss(first.x, first.y)
        k = source.num_params
        settings = {
            "n_train": n, "k": k, "dtype": _name(dtype), "compute_dtype": _name(functions.dtype),
            "block_size": block_size, "projector": description, "params": list(functions.names),
            "loss": _loss_name(loss), "output_transform": None if output_transform is None
            else _callable_name(output_transform), "fused": fused, "fisher": fisher,
            "train_data": data_digest(train_data),
        }
        settings = json.loads(json.dumps(settings))  # as it reads back from the file
        metadata = {"format": FORMAT, "version": VERSION, "settings": settings,
                    "settings_fingerprint": settings_fingerprint(settings), "model": model_fingerprint(model),
                    "complete": False, "torch_version": torch.__version__,
                    "torchfluence_version": build_info()["version"]}
        _run_build(path, metadata, source, samples, progress)
        return cls.open(path)

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: PathLike, model: Optional[nn.Module] = None) -> GradientStore:
        """The finished store at `path`.

        Args:
            path: a directory written by :meth:`build`.
            model: optional; when given, its fingerprint must equal the build's.

        Raises:
            FileNotFoundError: no store at `path`.
            ValueError: an incomplete or corrupt store, or a model other than the build's.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a directory path, got {type(path).__name__}")
        path = Path(path)
        metadata = _read_metadata(path)
        if metadata is None:
            raise FileNotFoundError(f"path: no gradient store at '{path}' (no {METADATA_FILE})")
        if not metadata["complete"]:
            raise ValueError(f"path: the gradient store at '{path}' is incomplete (its build stopped); run "
                             "GradientStore.build with the same arguments to finish it")
        settings = metadata["settings"]
        n, k = int(settings["n_train"]), int(settings["k"])
        size = (path / GRADIENTS_FILE).stat().st_size if (path / GRADIENTS_FILE).exists() else None
        if size != 2 * n * k:
            raise ValueError(f"path: '{path / GRADIENTS_FILE}' must hold {n} x {k} 16-bit values ({2 * n * k} "
                             f"bytes), got {'no file' if size is None else f'{size} bytes'}; the store is corrupt")
        record, tensors = _read_fisher(path)
        if record is None or not record["complete"] \
                or record["identity"]["settings_fingerprint"] != metadata["settings_fingerprint"] \
                or record["identity"]["model"] != metadata["model"]:
            raise ValueError(f"path: '{path / FISHER_FILE}' does not belong to the finished store in '{path}' "
                             "(missing, incomplete or of other settings); the store is corrupt")
        fisher = None
        if settings["fisher"]:
            fisher = tensors.get("fisher")
            if fisher is None or tuple(fisher.shape) != (k, k) or fisher.dtype != torch.float64:
                raise ValueError(f"path: '{path / FISHER_FILE}' must hold a ({k}, {k}) float64 'fisher'; the "
                                 "store is corrupt")
        store = cls(path, metadata, fisher)
        if model is not None:
            store._check_model(model)
        return store

    def _check_model(self, model: nn.Module) -> None:
        fingerprint = model_fingerprint(model)
        if fingerprint != self.model_fingerprint:
            raise ValueError(f"model: the store at '{self.path}' was built with another model (its parameters, "
                             f"buffers, shapes or dtypes differ: fingerprint {self.model_fingerprint} in the store, "
                             f"{fingerprint} for the model given)")

    # -- queries ------------------------------------------------------------------------------------
    def query_gradients(self, model: nn.Module, loss: LossFn, x: Tensor, y: Tensor, *,
                        output_transform: Optional[Callable[..., Tensor]] = None,
                        block_size: Optional[int] = None) -> Tensor:
        """Projected per-sample gradients of (x, y) with the store's projector, (n, k) in :attr:`compute_dtype`.

        Args:
            model: the model of the build (its fingerprint is checked).
            loss: the loss of the build.
            x, y: (n, ...) inputs and targets.
            output_transform: the one of the build, if it had one.
            block_size: samples per pass (default: the build's).
        """
        self._check_model(model)
        settings = self.metadata["settings"]
        if settings["output_transform"] is not None and output_transform is None:
            raise ValueError(f"output_transform: the store was built with output_transform="
                             f"{settings['output_transform']}; pass the same one for the query gradients")
        functions = ModelFunctions(model, loss, settings["params"], self.compute_dtype, output_transform)
        source: GradientSource = projected_source(functions, gradient_source(functions, settings["fused"]),
                                                  self.projector)
        if source.num_params != self.k:
            raise ValueError(f"model: its projected gradients have {source.num_params} numbers, the store's {self.k}")
        samples = Samples((x, y), "x, y", block_size or settings["block_size"])
        out = torch.empty(samples.count(), self.k, dtype=functions.dtype, device=functions.device)
        for block in samples.blocks():
            rows = out[block.offset:block.offset + block.size]
            source.grads(block.x, block.y, out=rows)
            check_finite(rows, "query gradients", block.offset)
        return out

    def query_vectors(self, queries: Queries, regularization: Optional[float] = None, *,
                      output_transform: Optional[Callable[..., Tensor]] = None) -> Tensor:
        """The vectors the stored gradients are multiplied with: ``Q`` or ``Q (F + lambda I)^-1``, (n_q, k) float64.

        Args:
            queries: (n_q, k) projected query gradients, or ``(model, loss, x_test, y_test)``.
            regularization: None (gradient similarity) or lambda >= 0 (Fisher preconditioning).
        """
        if isinstance(queries, (tuple, list)):
            if len(queries) != 4:
                raise ValueError(f"queries must be a (n_q, {self.k}) tensor or a (model, loss, x_test, y_test) tuple, "
                                 f"got a {type(queries).__name__} of {len(queries)} items")
            q = self.query_gradients(*queries, output_transform=output_transform)
        elif isinstance(queries, Tensor):
            if queries.dim() != 2 or queries.shape[1] != self.k or not queries.dtype.is_floating_point:
                raise ValueError(f"queries must be a floating (n_q, {self.k}) tensor of projected gradients, got "
                                 f"{queries.dtype} of shape {tuple(queries.shape)}")
            check_finite(queries, "queries")
            q = queries
        else:
            raise TypeError(f"queries must be a (n_q, {self.k}) tensor or a (model, loss, x_test, y_test) tuple, got "
                            f"{type(queries).__name__}")
        q = q.double()
        if regularization is None:
            return q
        regularization = check_regularization(regularization)
        return torch.cholesky_solve(q.T, self._factor(regularization).to(q.device)).T

    def _factor(self, regularization: float) -> Tensor:
        """Cholesky factor of F + lambda I, (k, k) float64, computed once per lambda."""
        if regularization not in self._cholesky:
            fisher = self.fisher
            eye = torch.eye(self.k, dtype=torch.float64)
            factor, info = torch.linalg.cholesky_ex(fisher + regularization * eye)
            if int(info) != 0:
                smallest = float(torch.linalg.eigvalsh(fisher)[0])
                raise ValueError(f"regularization: F + {regularization:.3g} I is not positive definite (the smallest "
                                 f"eigenvalue of the stored Fisher is {smallest:.3g}); use a larger regularization")
            self._cholesky[regularization] = factor
        return self._cholesky[regularization]

    def top_k(self, queries: Queries, k: int = 10, *, regularization: Optional[float] = None,
              device: Union[None, str, torch.device] = None, chunk_rows: Optional[int] = None,
              output_transform: Optional[Callable[..., Tensor]] = None) -> TopKInfluences:
        """The k most helpful and most harmful stored training samples per query.

        Args:
            queries: (n_q, k) projected query gradients (e.g. :meth:`query_gradients`), or
                ``(model, loss, x_test, y_test)`` (the model's fingerprint is checked).
            k: how many on each side, at most :attr:`n_train`.
            regularization: None: gradient similarity ``phi_q . phi_j``; lambda >= 0:
                ``phi_q^T (F + lambda I)^-1 phi_j`` with the stored Fisher.
            device: where to score (default: the queries' device, the CPU for a tuple).
            chunk_rows: stored rows read per step (default: 32 MiB of them).
            output_transform: for ``(model, ...)`` queries of a model built with one.

        Returns:
            :class:`~torchfluence.TopKInfluences` with (n_q, k) float32 values and int64
            training indices; ties go to the lower index.
        """
        check_positive_int(k, "k")
        if k > self.n_train:
            raise ValueError(f"k must be at most the number of stored training samples ({self.n_train}), got {k}")
        s = self._scoring_vectors(queries, regularization, device, output_transform)
        sink = TopKSink(s.shape[0], k, dtype=torch.float32, device=s.device)
        self._score(s, chunk_rows, [sink], "top-k of stored gradients")
        res = sink.result()
        return TopKInfluences(res.largest_indices, res.largest_values, res.smallest_indices, res.smallest_values)

    def scores(self, queries: Queries, *, regularization: Optional[float] = None,
               out: Union[None, PathLike, Tensor] = None, device: Union[None, str, torch.device] = None,
               chunk_rows: Optional[int] = None,
               output_transform: Optional[Callable[..., Tensor]] = None) -> Tensor:
        """Scores of every stored training sample for each query, (n_q, n_train) float32.

        Args:
            queries, regularization, device, chunk_rows, output_transform: as in :meth:`top_k`.
            out: None (a new tensor), a (n_q, n_train) float32 tensor to fill, or the path of a
                ``.npy`` file to create, memory-mapped, and fill (the returned tensor shares its pages).
        """
        s = self._scoring_vectors(queries, regularization, device, output_transform)
        shape = (s.shape[0], self.n_train)
        if isinstance(out, Tensor):
            sink = DenseSink(shape, dtype=torch.float32, device=out.device, sample_dim=1, out=out)
        elif out is None or isinstance(out, (str, os.PathLike)):
            sink, _ = result_sink(shape, None if out is None else Path(out), Runtime(torch.float32, s.device),
                                  sample_dim=1)
        else:
            raise TypeError(f"out must be None, a tensor or a .npy path, got {type(out).__name__}")
        self._score(s, chunk_rows, [sink], "influence scores")
        if isinstance(sink, MemmapSink):
            sink.flush()
        return sink.result()

    def _score(self, vectors: Tensor, chunk_rows: Optional[int], sinks: list, what: str) -> None:
        """Scores every stored row against the (n_q, k) float32 `vectors` into `sinks`, through the job runner."""
        rows = StoredRows(self.path / GRADIENTS_FILE, self.n_train, self.k, self.dtype,
                          store_chunk_rows(self.k) if chunk_rows is None else chunk_rows, vectors.device)
        run_blocks(rows, lambda block: vectors @ block.x.T, sinks, what, Runtime(torch.float32, vectors.device))

    def _scoring_vectors(self, queries: Queries, regularization: Optional[float],
                         device: Union[None, str, torch.device],
                         output_transform: Optional[Callable[..., Tensor]]) -> Tensor:
        """The float32 query vectors on the scoring device, (n_q, k)."""
        vectors = self.query_vectors(queries, regularization, output_transform=output_transform)
        if device is None:
            device = queries.device if isinstance(queries, Tensor) else vectors.device
        return vectors.to(device=device, dtype=torch.float32)


class StoredRows:
    """The stored gradients as the job runner reads them: (rows, k) float32 chunks with their offsets.

    Args:
        file: the store's ``gradients.bin``.
        n_train, k: its shape.
        dtype: its storage dtype (float16 or bfloat16).
        chunk_rows: rows per chunk.
        device: where the chunks go.
    """

    def __init__(self, file: Path, n_train: int, k: int, dtype: torch.dtype, chunk_rows: int,
                 device: torch.device) -> None:
        self.file, self.n_train, self.k, self.dtype, self.device = file, n_train, k, dtype, device
        self.block_size = check_positive_int(chunk_rows, "chunk_rows")

    def known_count(self) -> int:
        return self.n_train

    def blocks(self, *, select: Optional[Callable[[int], bool]] = None) -> Iterator[SampleBlock]:
        array = np.memmap(self.file, dtype=np.int16, mode="r", shape=(self.n_train, self.k))
        try:
            for index, start in enumerate(range(0, self.n_train, self.block_size)):
                if select is not None and not select(index):
                    continue
                stop = min(self.n_train, start + self.block_size)
                # A copy of the pages (np.array), then an exact widening to float32.
                rows = torch.from_numpy(np.array(array[start:stop])).view(self.dtype).to(self.device).float()
                yield SampleBlock(rows, rows[:, :0], start)  # no targets: the rows are the gradients
        finally:
            del array


# -- the build: a resumable job of the job runner ------------------------------------------------------
class _GradientRows(ScoreSink):
    """The build's sink: each block's projected gradients (b, k) go to their rows of ``gradients.bin``
    (rounded to the storage dtype) and, unrounded, into the Fisher sum."""

    def __init__(self, file: Path, n: int, k: int, dtype: torch.dtype, fisher_sum: Tensor) -> None:
        self.array = np.memmap(file, dtype=np.int16, mode="r+", shape=(n, k))
        self.dtype, self.fisher_sum = dtype, fisher_sum

    def write(self, block: Tensor, offset: int) -> None:
        rows = block.to(self.dtype).cpu().view(torch.int16).numpy()
        self.array[offset:offset + block.shape[0]] = rows
        if self.fisher_sum.numel():
            self.fisher_sum += (block.T @ block).double()

    def flush(self) -> None:
        self.array.flush()

    def result(self) -> None:
        return None


class _BuildJournal(Journal):
    """The build's record in ``fisher.safetensors``: the finished blocks with the running Fisher sum.

    The rows' pages are flushed before each record that calls their block done. A finished
    record keeps the Fisher's mean (the sum is needed only to go on with a build).
    """

    def __init__(self, directory: Path, record: dict[str, Any], sink: Optional[_GradientRows], n: int) -> None:
        super().__init__(directory / FISHER_FILE, record)
        self.directory, self.sink, self.n = directory, sink, n

    def _write(self) -> None:
        self.sink.flush()
        fisher_sum = self.sink.fisher_sum.detach().to("cpu").contiguous()
        complete = self.record["complete"]
        tensors = {"fisher": fisher_sum / self.n} if complete and fisher_sum.numel() else {"fisher_sum": fisher_sum}
        atomic_write(self.path, safetensors_bytes(tensors, metadata={_RECORD_KEY: json.dumps(self.record)}))

    def _files(self) -> list[Path]:
        return [self.directory]

    def _remedy(self) -> str:
        return _remedy(self.directory)


def _run_build(path: Path, metadata: dict[str, Any], source: GradientSource, samples: Samples,
               progress: bool) -> None:
    """Builds (or goes on with) the store at `path`: every block's projected gradients, through the job runner."""
    existing = _read_metadata(path)
    if existing is not None:
        _check_same(existing, metadata, path)
        if existing["complete"]:
            return
    else:
        leftovers = [p.name for p in (path / GRADIENTS_FILE, path / FISHER_FILE) if p.exists()]
        if leftovers:
            raise ValueError(f"path: '{path}' holds {leftovers} but no {METADATA_FILE}: it is not a gradient "
                             f"store (or a damaged one); {_remedy(path)}")
        atomic_write(path / METADATA_FILE, json.dumps(metadata, indent=1).encode())
    settings = metadata["settings"]
    n, k = settings["n_train"], settings["k"]
    device = source.functions.device
    identity = {"model": metadata["model"], "settings": settings,
                "settings_fingerprint": metadata["settings_fingerprint"], "test_data": None,
                "train_data": settings["train_data"]}
    record, fisher_sum = _read_build_record(path, identity, k, settings["fisher"])
    if record is not None and record["complete"]:  # stopped after the final record, before store.json said so
        _write_complete_metadata(path, metadata)
        return
    if record is None:
        with open(path / GRADIENTS_FILE, "wb") as f:
            f.truncate(2 * n * k)
        record = new_record(identity)
    size = (path / GRADIENTS_FILE).stat().st_size if (path / GRADIENTS_FILE).exists() else None
    if size != 2 * n * k:
        raise ValueError(f"path: '{path / GRADIENTS_FILE}' must hold {2 * n * k} bytes, got "
                         f"{'no file' if size is None else size}; {_remedy(path)}")
    sink = _GradientRows(path / GRADIENTS_FILE, n, k, _STORAGE[settings["dtype"]], fisher_sum.to(device))
    job = _BuildJournal(path, record, sink, n)
    # Until a save has been timed, its cost is guessed from its size (1 GB/s): a large Fisher
    # sum is then not written after the very first block of a short build.
    job.throttle_from(fisher_sum.numel() * 8 / 1e9)
    try:
        run_blocks(samples, lambda block: source.grads(block.x, block.y), [sink], "gradient store",
                   Runtime(source.functions.dtype, device, progress), sample_dim=0, journal=job)
        if job.samples_done != n:
            raise ValueError(f"train_data yielded {job.samples_done} samples, but {n} were counted; the data "
                             "must yield the same samples on every pass")
        job.finish()
    finally:
        del sink.array
    _write_complete_metadata(path, metadata)


def _read_build_record(path: Path, identity: dict[str, Any], k: int,
                       with_fisher: bool) -> tuple[Optional[dict[str, Any]], Tensor]:
    """(record, running Fisher sum) of an earlier run of this build; (None, zeros) when there is none."""
    expected = (k, k) if with_fisher else (0,)
    record, tensors = _read_fisher(path)
    if record is None:  # stopped before its first record: nothing is done
        return None, torch.zeros(expected, dtype=torch.float64)
    saved = record["identity"]
    if saved["settings_fingerprint"] != identity["settings_fingerprint"] or saved["model"] != identity["model"]:
        raise ValueError(f"path: '{path / FISHER_FILE}' belongs to another build; {_remedy(path)}")
    if record["complete"]:
        return record, torch.zeros(expected, dtype=torch.float64)
    fisher_sum = tensors.get("fisher_sum")
    if fisher_sum is None or tuple(fisher_sum.shape) != expected or fisher_sum.dtype != torch.float64:
        raise ValueError(f"path: '{path / FISHER_FILE}' must hold a {expected} float64 'fisher_sum'; "
                         f"{_remedy(path)}")
    return record, fisher_sum


def _write_complete_metadata(path: Path, metadata: dict[str, Any]) -> None:
    metadata["complete"] = True
    atomic_write(path / METADATA_FILE, json.dumps(metadata, indent=1).encode())


# -- files ---------------------------------------------------------------------------------------------
def _check_directory(path: PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path must be a directory for the store's files, got '{path}', which is a file")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_metadata(path: Path) -> Optional[dict[str, Any]]:
    """The store's ``store.json``, checked; None when there is none."""
    file = path / METADATA_FILE
    if not file.exists():
        return None
    try:
        metadata = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"path: '{file}' is corrupt (not valid JSON: {e}); {_remedy(path)}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"path: '{file}' is not a gradient store's metadata (format {FORMAT!r} expected); "
                         f"{_remedy(path)}")
    if metadata.get("version") != VERSION:
        raise ValueError(f"path: '{file}' has version {metadata.get('version')!r}; this torchfluence reads version "
                         f"{VERSION}")
    keys = ("settings", "settings_fingerprint", "model", "complete")
    if any(key not in metadata for key in keys) or not isinstance(metadata["settings"], dict):
        raise ValueError(f"path: '{file}' is corrupt (it must hold {list(keys)}); {_remedy(path)}")
    return metadata


def _read_fisher(path: Path) -> tuple[Optional[dict[str, Any]], dict[str, Tensor]]:
    """(record, tensors) of ``fisher.safetensors``; (None, {}) when it does not exist yet."""
    file = path / FISHER_FILE
    if not file.exists():
        return None, {}
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
        record = json.loads(metadata[_RECORD_KEY])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"path: '{file}' is not a readable store record (truncated or corrupt: {e}); "
                         f"{_remedy(path)}") from None
    if not isinstance(record, dict) or record.get("format") != JOB_FORMAT:
        raise ValueError(f"path: '{file}' is corrupt (not a build record); {_remedy(path)}")
    record = parse_record(metadata[_RECORD_KEY], file, _remedy(path))
    return record, tensors


def _check_same(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Refuses to go on with a store of another model, other settings or other data."""
    found = identity_differences(saved, now, where="the store")
    if not found and saved["settings_fingerprint"] != now["settings_fingerprint"]:
        found.append("the settings fingerprint")
    if found:
        raise ValueError(f"path: '{path}' holds a gradient store of another build; what differs: "
                         f"{'; '.join(found)}. {_remedy(path)}")


def _remedy(path: Path) -> str:
    return f"delete the directory '{path}' to start over, or choose another path"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _callable_name(fn: Callable) -> str:
    kind = fn if isinstance(fn, type) else type(fn)
    if isinstance(fn, nn.Module) or not hasattr(fn, "__qualname__"):
        return f"{kind.__module__}.{kind.__qualname__}"
    return f"{getattr(fn, '__module__', '?')}.{fn.__qualname__}"


def _loss_name(loss: Callable) -> str:
    """The loss as the record names it: its function or class, and a module's options."""
    name = _callable_name(loss)
    if isinstance(loss, nn.Module):
        options = {key: value for key, value in vars(loss).items()
                   if not key.startswith("_") and isinstance(value, (bool, int, float, str, type(None)))}
        name += json.dumps(options, sort_keys=True)
    return name
