"""Checkpoints: records that make long scoring jobs resumable.

A scoring job reads the training data in blocks and scores each block on its
own, so a job that stopped (killed, out of time, a crash) can go on from its
last finished block. Rerunning the same call with the same path skips the
blocks its record holds as done and ends with the same bits as an
uninterrupted run: a block's scores depend on that block alone, and the
streaming top-k merge is exact and independent of the block order.

- :class:`ScoreFile`: a ``.npy`` result, memory-mapped and written block by
  block, with its record in the JSON sidecar ``<path>.progress.json``;
- :class:`TopKCheckpoint`: a ``.safetensors`` file with the running top-k
  state (its tensors) and the record in the header's metadata.

Each record carries fingerprints of what made the job: the model, the
settings (solver class, regularization and the solver's options, dtypes,
block size, shapes, mode), the test data (or the given factors), the scored
training tensors when they are in memory, and the test factors themselves
(which catch a solver fitted on other data). A rerun with anything else is
refused with an error naming what differs. Records are replaced atomically
(a temporary file, flushed and fsynced, then ``os.replace``); a score file's
pages are flushed to disk before its record calls their block done; and a
truncated or corrupt file or record is reported, never trusted.
"""

from __future__ import annotations

import bisect
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from .contract import plain
from .data import SampleBlock, check_pair
from .distributed import is_distributed
from .durable import atomic_write, digest, settings_fingerprint
from .durable import data_digest
from .sinks import MemmapSink, TopKSink

PathLike = Union[str, Path]

FORMAT = "torchfluence-job"
VERSION = 1
SIDECAR_SUFFIX = ".progress.json"
METADATA_KEY = "torchfluence"  # the record's key in a top-k checkpoint's safetensors metadata

# A record is saved after a block once the time since the last save is at least this
# multiple of what that save took (flushing the pages, fsync): saving then costs at most
# ~1/SAVE_TIME_RATIO of the run, and an interrupted run loses about that much of its work.
SAVE_TIME_RATIO = 10

_ABSENT = object()  # a key missing from a record


@dataclass(frozen=True)
class JobSpec:
    """What a scoring call is, for its record.

    Attributes:
        job: the call: ``"influences"``, ``"influences_from_factors"``, ``"train_influences"``, ``"top_k"``.
        queries: what defines the queries: ``(x_test, y_test)`` (n_test, ...) or ``(factors,)`` (n_test, p).
        data: the scored training data; its bits are fingerprinted when it is an in-memory
            ``(x, y)`` pair of tensors, otherwise only its size is recorded.
        mode: ``"up"`` or ``"perturbation"``.
        extra: further settings of the call (top-k's ``k``).
    """

    job: str
    queries: tuple
    data: Any = None
    mode: str = "up"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def count(self) -> int:
        """The number of queries (test points), after checking the test pair."""
        if len(self.queries) == 2:
            check_pair(self.queries[0], self.queries[1], "x_test, y_test")
        return int(self.queries[0].shape[0])


# -- fingerprints ---------------------------------------------------------------------------------------
def job_identity(solver, spec: JobSpec, shape: Sequence[int], n_train: Optional[int]) -> dict[str, Any]:
    """The fingerprints a record is checked against: model, settings, test data, training data."""
    n_test = spec.count()
    names = ("x_test", "y_test") if len(spec.queries) == 2 else ("factors",)
    settings = dict(solver.settings(), job=spec.job, mode=spec.mode, n_test=n_test, n_train=n_train,
                    shape=[int(s) for s in shape], **{k: plain(v) for k, v in spec.extra.items()})
    settings = json.loads(json.dumps(settings))  # as it reads back from a record (tuples become lists)
    return {
        "model": solver.model_fingerprint(),
        "settings": settings,
        "settings_fingerprint": settings_fingerprint(settings),
        "test_data": digest(list(zip(names, spec.queries))),
        "train_data": data_digest(spec.data),
    }


def identity_differences(saved: Mapping[str, Any], now: Mapping[str, Any], where: str = "the record") -> list[str]:
    """What differs in the model fingerprint and the settings between saved work and this call, in words.

    Args:
        saved, now: mappings with ``"model"`` (a fingerprint) and ``"settings"`` (a dict).
        where: how the messages name the saved side.
    """
    found = []
    if saved["model"] != now["model"]:
        found.append(f"the model (its parameters or buffers; fingerprint {saved['model']} in {where}, "
                     f"{now['model']} now)")
    before, after = saved["settings"], now["settings"]
    for key in sorted(set(before) | set(after)):
        if before.get(key, _ABSENT) != after.get(key, _ABSENT):
            was, now_ = before.get(key, "<absent>"), after.get(key, "<absent>")
            found.append(f"{key} ({was!r} in {where}, {now_!r} now)")
    return found


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between a record's identity and this call's, in words."""
    found = identity_differences(saved, now)
    if saved["test_data"] != now["test_data"]:
        found.append("the test data (x_test, y_test or the factors hash differently)")
    if saved["train_data"] != now["train_data"]:
        found.append("the training data (its tensors hash differently)")
    if not found and saved["settings_fingerprint"] != now["settings_fingerprint"]:
        found.append("the settings fingerprint")
    return found


# -- records --------------------------------------------------------------------------------------------
def new_record(identity: dict[str, Any]) -> dict[str, Any]:
    """A record of a job with nothing done yet."""
    return {"format": FORMAT, "version": VERSION, "identity": identity, "factors": None, "blocks": [],
            "score_chunk": None, "complete": False}


def parse_record(text: Union[str, bytes], where: Path, remedy: str) -> dict[str, Any]:
    """A record read from `where`, after checking its structure; a clear error when it is corrupt."""
    try:
        record = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is corrupt (not valid JSON: {e}); {remedy}") from None
    problem = _record_problem(record)
    if problem:
        raise ValueError(f"{where} is corrupt or not a torchfluence job record ({problem}); {remedy}")
    return record


def _record_problem(record: Any) -> Optional[str]:
    """What is wrong with a record's structure, or None."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return f"expected a JSON object with format {FORMAT!r}"
    if record.get("version") != VERSION:
        return f"version must be {VERSION}, got {record.get('version')!r}"
    identity = record.get("identity")
    keys = ("model", "settings", "settings_fingerprint", "test_data", "train_data")
    if not isinstance(identity, dict) or any(k not in identity for k in keys) \
            or not isinstance(identity["settings"], dict):
        return f"identity must hold {list(keys)}"
    if not isinstance(record.get("complete"), bool):
        return f"complete must be true or false, got {record.get('complete')!r}"
    chunk = record.get("score_chunk", _ABSENT)
    if chunk is not None and not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1):
        return f"score_chunk must be null or a positive int, got {chunk!r}"
    if record.get("factors", _ABSENT) is not None and not isinstance(record.get("factors"), str):
        return f"factors must be null or a digest, got {record.get('factors', '<absent>')!r}"
    blocks = record.get("blocks")
    if not isinstance(blocks, list):
        return f"blocks must be a list, got {blocks!r}"
    last_index = last_sample = 0
    for b in blocks:
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in b)):
            return f"each block range must be [first_block, end_block, first_sample, end_sample], got {b!r}"
        if not (last_index <= b[0] < b[1] and last_sample <= b[2] < b[3]):
            return f"block ranges must be sorted, disjoint and non-empty, got {blocks}"
        last_index, last_sample = b[1], b[3]
    return None


class _Throttle:
    """Decides when a record is saved: once SAVE_TIME_RATIO times the last save's duration has passed."""

    def __init__(self) -> None:
        self.end = time.monotonic()
        self.cost = 0.0

    def due(self) -> bool:
        return time.monotonic() - self.end >= SAVE_TIME_RATIO * self.cost

    def timed(self, save: Callable[[], None]) -> None:
        start = time.monotonic()
        save()
        self.end = time.monotonic()
        self.cost = self.end - start


class Journal(ABC):
    """The record of one resumable job: which blocks are done, and the job's fingerprints.

    The scoring loop asks :meth:`select` which blocks still need scoring, reports each
    finished block to :meth:`done` (which says when a save is due), calls :meth:`save`,
    and :meth:`finish` once every block is done.

    Attributes:
        path: the file the user named.
        sink: where the job's scores go (restored from the file on resume).
    """

    path: Path
    sink: Any

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record = path, record
        self._starts = [b[0] for b in record["blocks"]]
        self._throttle = _Throttle()

    def throttle_from(self, seconds: float) -> None:
        """Assumes a save takes `seconds` until one has been timed (a large record is then not saved at once)."""
        self._throttle.cost = seconds

    @property
    def complete(self) -> bool:
        """Whether the job finished: its result can be returned without scoring."""
        return self.record["complete"]

    @property
    def score_chunk(self) -> Optional[int]:
        """The most samples scored at once after an out-of-memory split (None: whole blocks)."""
        return self.record["score_chunk"]

    @property
    def blocks_done(self) -> int:
        return sum(b[1] - b[0] for b in self.record["blocks"])

    @property
    def samples_done(self) -> int:
        return sum(b[3] - b[2] for b in self.record["blocks"])

    def select(self, index: int) -> bool:
        """Whether block `index` still needs scoring."""
        at = bisect.bisect_right(self._starts, index) - 1
        return at < 0 or self.record["blocks"][at][1] <= index

    def check_factors(self, factors: Sequence[Tensor]) -> None:
        """Refuses test factors other than those the finished blocks were scored with."""
        now = digest([(str(i), f) for i, f in enumerate(factors)])
        saved = self.record["factors"]
        if saved is not None and saved != now and self.record["blocks"]:
            raise ValueError(
                f"{self.path} belongs to another job: the test factors differ from those its finished blocks "
                f"were scored with, although model, settings and data agree (the solver was fitted on other "
                f"training data, or its solve is not reproducible on this machine). {self._remedy()}")
        self.record["factors"] = now

    def done(self, index: int, block: SampleBlock, score_chunk: Optional[int]) -> bool:
        """Records block `index` (its scores are in the sink) as done; returns whether a save is due.

        Raises:
            ValueError: when the block's samples disagree with the recorded neighbouring
                blocks (the data yields other batches than when the job started).
        """
        blocks, start, stop = self.record["blocks"], block.offset, block.offset + block.size
        at = bisect.bisect_right(self._starts, index)
        before = blocks[at - 1] if at else None
        after = blocks[at] if at < len(blocks) else None
        if before is not None and before[1] > index:
            raise RuntimeError(f"block {index} was scored twice in {self.path}'s job")
        # Finished blocks next to this one must end (start) exactly where it starts (ends); others
        # must lie wholly before (after) it.
        if before is not None and (before[3] != start if before[1] == index else before[3] > start):
            self._moved(index, start, stop, before[3])
        if after is not None and (after[2] != stop if after[0] == index + 1 else after[2] < stop):
            self._moved(index, start, stop, after[2])
        if before is not None and before[1] == index:
            before[1], before[3] = index + 1, stop
        else:
            blocks.insert(at, [index, index + 1, start, stop])
            at += 1
        merged = blocks[at - 1]
        if after is not None and after[0] == merged[1]:
            merged[1], merged[3] = after[1], after[3]
            blocks.remove(after)
        self._starts = [b[0] for b in blocks]
        self.record["score_chunk"] = score_chunk
        return self._throttle.due()

    def _moved(self, index: int, start: int, stop: int, boundary: int) -> None:
        raise ValueError(
            f"block {index} holds samples {start}..{stop - 1}, but {self.path}'s record puts a boundary of "
            f"its finished blocks at sample {boundary}: the data must yield the same samples in the same "
            f"batches as when the job started. {self._remedy()}")

    def save(self) -> None:
        """Writes the record (and what it vouches for) to disk, atomically."""
        self._throttle.timed(self._write)

    def finish(self) -> Any:
        """Marks the job complete and saves it; returns the sink's result."""
        result = self.sink.result()
        if not self.record["complete"]:
            self.record["complete"] = True
            self.save()
        return result

    @abstractmethod
    def _write(self) -> None:
        """Makes the sink's data durable, then replaces the record."""

    @abstractmethod
    def _files(self) -> list[Path]:
        """The job's files, for messages."""

    def _remedy(self) -> str:
        files = " and ".join(str(f) for f in self._files())
        return f"Delete {files} to start over, or choose another path."

    def _check_count(self, n_train: int, where: Path) -> None:
        """The record's finished samples fit in the data (all of it when complete)."""
        done = self.samples_done
        if done > n_train or (self.complete and done != n_train):
            state = "a complete job" if self.complete else "an unfinished job"
            raise ValueError(f"{where} is corrupt: it records {done} finished samples for {state} over "
                             f"{n_train} samples. {self._remedy()}")

    def _check_identity(self, identity: Mapping[str, Any]) -> None:
        found = _differences(self.record["identity"], identity)
        if found:
            raise ValueError(f"{self.path} belongs to another job; what differs: {'; '.join(found)}. "
                             f"{self._remedy()}")


class ScoreFile(Journal):
    """A resumable score matrix in a ``.npy`` file, with its record in ``<path>.progress.json``.

    Use :meth:`open`. Its :attr:`sink` is a :class:`~torchfluence.sinks.MemmapSink` over
    the file: new, or reopened with its finished blocks when the record matches.
    """

    def __init__(self, path: Path, record: dict[str, Any], sink: MemmapSink) -> None:
        super().__init__(path, record)
        self.sink = sink
        self.sidecar = sidecar_path(path)

    @classmethod
    def open(cls, path: PathLike, solver, spec: JobSpec, shape: tuple[int, ...],
             sample_dim: int) -> ScoreFile:
        """The job writing `shape` scores into `path`, resumed when its record matches this call.

        Args:
            path: the ``.npy`` file.
            solver: the :class:`~torchfluence.influence.InfluenceFunctionModel` that scores.
            spec: what the call is.
            shape: the result's shape; ``shape[sample_dim]`` counts training samples.
            sample_dim: the dimension that indexes training samples.

        Raises:
            ValueError: when the record belongs to another job (naming what differs), or the
                record or the ``.npy`` file is corrupt or truncated.
        """
        if not isinstance(path, (str, Path)):
            raise TypeError(f"out must be a path of a .npy file or None, got {type(path).__name__}")
        _refuse_distributed("out=")
        path = Path(path)
        sample_dim %= len(shape)
        identity = job_identity(solver, spec, shape, shape[sample_dim])
        sidecar = sidecar_path(path)
        if sidecar.exists():
            job = cls(path, parse_record(_read(sidecar), sidecar, _remedy_for([path, sidecar])), None)
            job._check_identity(identity)
            job._check_count(shape[sample_dim], sidecar)
            if job.record["blocks"]:
                if not path.exists():
                    raise FileNotFoundError(f"{sidecar} records {job.blocks_done} finished blocks, but "
                                            f"{path} is missing. {job._remedy()}")
                try:
                    job.sink = MemmapSink(path, shape, dtype=solver.dtype, sample_dim=sample_dim, resume=True,
                                          filled=job.samples_done)
                except ValueError as e:
                    raise ValueError(f"{e}. {job._remedy()}") from None
                return job
        sink = MemmapSink(path, shape, dtype=solver.dtype, sample_dim=sample_dim)
        job = cls(path, new_record(identity), sink)
        job.save()
        return job

    def _write(self) -> None:
        self.sink.flush()  # the block's pages reach the file before the record calls it done
        atomic_write(self.sidecar, json.dumps(self.record, indent=1).encode())

    def _files(self) -> list[Path]:
        return [self.path, self.sidecar]


class TopKCheckpoint(Journal):
    """A resumable streaming top-k: the state's tensors and the record in one ``.safetensors`` file.

    Use :meth:`open`. Its :attr:`sink` is a :class:`~torchfluence.sinks.TopKSink`, restored
    from the file when the record matches. Each save writes the whole state (4 (n_test, k)
    lists), so the saves follow the same time rule as a score file's.
    """

    def __init__(self, path: Path, record: dict[str, Any], sink: TopKSink) -> None:
        super().__init__(path, record)
        self.sink = sink

    @classmethod
    def open(cls, path: PathLike, solver, spec: JobSpec, k: int, n_train: Optional[int]) -> TopKCheckpoint:
        """The top-k job of `spec` checkpointed at `path`, resumed when the file matches this call.

        Args:
            path: the ``.safetensors`` checkpoint.
            solver: the :class:`~torchfluence.influence.InfluenceFunctionModel` that scores.
            spec: what the call is.
            k: how many on each side.
            n_train: the number of training samples when known without reading the data.

        Raises:
            ValueError: when the checkpoint belongs to another job (naming what differs), or it is
                corrupt or truncated.
        """
        if not isinstance(path, (str, Path)):
            raise TypeError(f"checkpoint must be a path of a .safetensors file or None, got "
                            f"{type(path).__name__}")
        _refuse_distributed("checkpoint=")
        path = Path(path)
        n_test = spec.count()
        identity = job_identity(solver, spec, (n_test, k), n_train)
        sink = TopKSink(n_test, k, dtype=solver.dtype, device=solver.device)
        if path.exists():
            remedy = _remedy_for([path])
            record, tensors = _read_safetensors(path, remedy)
            job = cls(path, record, sink)
            job._check_identity(identity)
            if n_train is not None:
                job._check_count(n_train, path)
            try:
                sink.state.load_state_dict(tensors)
            except ValueError as e:
                raise ValueError(f"{path} is corrupt ({e}); {remedy}") from None
            return job
        path.parent.mkdir(parents=True, exist_ok=True)
        job = cls(path, new_record(identity), sink)
        job.save()
        return job

    def _write(self) -> None:
        state = self.sink.state.state_dict()
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
        atomic_write(self.path, safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(self.record)}))

    def _files(self) -> list[Path]:
        return [self.path]


def _refuse_distributed(argument: str) -> None:
    if is_distributed():
        raise NotImplementedError(f"{argument} (a resumable job with one record) runs in one process, but a "
                                  "process group of several is active; score without it, or in one process")


def sidecar_path(path: PathLike) -> Path:
    """The record of the score file `path`: ``<path>.progress.json``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _remedy_for(files: list[Path]) -> str:
    return f"delete {' and '.join(str(f) for f in files)} to start over, or choose another path"


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_safetensors(path: Path, remedy: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(record, tensors) of a top-k checkpoint; a clear error when it is truncated or corrupt."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .safetensors checkpoint (truncated or corrupt: {e}); "
                         f"{remedy}") from None
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a torchfluence top-k checkpoint (no {METADATA_KEY!r} entry in its "
                         f"metadata); {remedy}")
    return parse_record(metadata[METADATA_KEY], path, remedy), tensors
