"""The job runner: blocks of training samples scored against prepared queries, into sinks.

Every scoring job of the package runs through :func:`run_blocks`: a solver's
influence matrix, self-influences, top-k and per-layer scores, the gradient
store's queries, and the pytorch-influence-functions drop-in. One loop owns
what each of them needs:

- the blocks this process scores (all of them, or its share under
  ``torch.distributed``; :func:`torchfluence.distributed.block_selector`);
- out-of-memory splitting (:class:`~torchfluence.oom.SplitOnOOM`);
- NaN/inf checks that name the sample (:class:`~torchfluence.checks.FiniteChecks`);
- the resumable record (:class:`~torchfluence.journal.Journal`): finished blocks
  are skipped, a block is recorded as done only once its scores are in the sinks
  and known to be finite, and an interrupted job (an exception, Ctrl-C) saves
  what it finished before the error propagates;
- progress bars and the float32 matmul precision of the products.

Each scored block is written to every sink, so one pass can fill several
results (the matrix and the top-k together, :func:`score_into`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checks import FiniteChecks
from .data import SampleBlock
from .distributed import block_selector, is_distributed, world
from .journal import Journal, ScoreFile
from .oom import SplitOnOOM
from .precision import matmul_precision
from .sinks import DenseSink, MemmapSink, ScoreSink, SharedMemmapSink

Output = Union[None, str, Path]
Score = Callable[[SampleBlock], Tensor]


class BlockStream(Protocol):
    """What the runner reads: consecutive blocks of samples with global offsets.

    :class:`~torchfluence.data.Samples` is one; the gradient store's rows are another.
    """

    block_size: int

    def known_count(self) -> Optional[int]:
        """The number of samples when known without reading them, else None."""

    def blocks(self, *, select: Optional[Callable[[int], bool]] = None) -> Iterator[SampleBlock]:
        """The blocks in order; `select(index)` false skips a block (its samples still count)."""


@dataclass(frozen=True)
class Runtime:
    """How a job runs: the dtype and device of its results, its progress bars, its matmul precision.

    Attributes:
        dtype, device: of dense results and top-k values.
        progress: show a tqdm bar (on the first process only).
        allow_tf32: let CUDA float32 products run in TF32 (False: IEEE float32).
    """

    dtype: torch.dtype
    device: torch.device
    progress: bool = False
    allow_tf32: bool = False


class BlockIndex:
    """Block selectors combined (a block is kept when all keep it), remembering the index last asked about.

    ``blocks(select=...)`` calls ``select(i)`` for each block index in order and yields a
    block right after the call that kept it, so :attr:`last` is the index of the block in hand.

    Args:
        selects: predicates on the block index; None entries keep every block.
    """

    def __init__(self, *selects: Optional[Callable[[int], bool]]) -> None:
        self._selects = [s for s in selects if s is not None]
        self.last = -1

    def select(self, index: int) -> bool:
        self.last = index
        return all(s(index) for s in self._selects)


def run_blocks(blocks: BlockStream, score: Score, sinks: Sequence[ScoreSink], what: str, runtime: Runtime, *,
               sample_dim: int = -1, journal: Optional[Journal] = None) -> None:
    """Scores every block of `blocks` this process owns and writes it to each sink.

    Args:
        blocks: the samples, read once, in order.
        score: ``block -> values`` whose dimension `sample_dim` indexes the block's samples.
        sinks: where each block's values go; each is gathered across processes at the end.
        what: the job's name, for the progress bar and for NaN/inf errors.
        runtime: results' dtype and device, progress, matmul precision.
        sample_dim: the dimension of the values that indexes samples.
        journal: the record of a resumable job: blocks it holds as done are skipped, and each
            scored block is recorded once the sinks hold it and its values are finite.

    Raises:
        ValueError: NaN or inf in a block's values, naming the sample (and query row).
    """
    known = blocks.known_count()
    rank, size = world()
    total = None if known is None else len(range(rank, math.ceil(known / blocks.block_size), size))
    index = BlockIndex(block_selector(), None if journal is None else journal.select)
    scorer = SplitOnOOM(score, sample_dim, None if journal is None else journal.score_chunk)
    bar = tqdm(blocks.blocks(select=index.select), total=total, desc=what,
               initial=0 if journal is None else journal.blocks_done,
               disable=not runtime.progress or total == 1 or rank != 0)
    checks = FiniteChecks(what, sample_dim=sample_dim)
    # False while a block is partly in the sinks but not yet in the journal: an interruption
    # then must not save, or the record would vouch for sinks that hold part of a block.
    consistent = True
    try:
        with matmul_precision(runtime.allow_tf32):
            for block in bar:
                values = scorer(block)
                checks.add(values, block.offset)
                consistent = False
                for sink in sinks:
                    sink.write(values, block.offset)
                due = journal is not None and journal.done(index.last, block, scorer.chunk)
                consistent = True
                if due:
                    checks.flush()  # a block is recorded as done only once its scores are known finite
                    journal.save()
        checks.finish()
    except BaseException:
        if journal is not None and consistent:
            _keep_finished(journal, checks)
        raise
    finally:
        bar.close()
    for sink in sinks:
        sink.gather()


def _keep_finished(journal: Journal, checks: FiniteChecks) -> None:
    """Saves the finished blocks of an interrupted job (an exception, Ctrl-C); a kill keeps the last save."""
    try:
        checks.flush()
    except ValueError:
        return  # a finished block holds NaN/inf: that error propagates, and nothing new is saved
    journal.save()


def result_sink(shape: tuple[int, ...], out: Output, runtime: Runtime, *, sample_dim: int = -1,
                open_job: Optional[Callable[[Path], ScoreFile]] = None) -> tuple[DenseSink, Optional[ScoreFile]]:
    """The sink for a dense result of `shape`: in memory, or the ``.npy`` file `out`.

    Args:
        out: None (a tensor in memory) or the path of a ``.npy`` file.
        open_job: opens the resumable job writing `out` (its record beside it); None: a plain
            memory-mapped file. Under ``torch.distributed`` the file is shared by the processes,
            each writing its own columns, and is not resumable.

    Returns:
        (sink, the job's record or None).
    """
    if out is None:
        return DenseSink(shape, dtype=runtime.dtype, device=runtime.device, sample_dim=sample_dim), None
    if not isinstance(out, (str, Path)):
        raise TypeError(f"out must be a path of a .npy file or None, got {type(out).__name__}")
    if is_distributed():
        return SharedMemmapSink(out, shape, dtype=runtime.dtype, sample_dim=sample_dim), None
    if open_job is None:
        return MemmapSink(out, shape, dtype=runtime.dtype, sample_dim=sample_dim), None
    job = open_job(Path(out))
    return job.sink, job


def score_into(blocks: BlockStream, score: Score, sinks: Sequence[ScoreSink], what: str, runtime: Runtime, *,
               journal: Optional[Journal] = None, sample_dim: int = -1) -> None:
    """:func:`run_blocks`, unless the resumable `journal` says the job is already complete."""
    if journal is None or not journal.complete:
        run_blocks(blocks, score, sinks, what, runtime, sample_dim=sample_dim, journal=journal)


def finished(sink: ScoreSink, journal: Optional[Journal]):
    """The result of a job: the sink's, or the journal's once it marked the job complete."""
    return sink.result() if journal is None else journal.finish()
