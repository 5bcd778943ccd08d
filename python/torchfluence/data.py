"""Data: user data as blocks of samples with global offsets.

Every path of the engine reads data through :class:`Samples`. It accepts a
DataLoader, an ``(x, y)`` pair of tensors, a map-style Dataset of ``(x, y)``
items, or any iterable of ``(x, y)`` batches, and yields :class:`SampleBlock`
objects of at most ``block_size`` samples, each knowing the global index of
its first sample. Input errors (mismatched lengths, NaN/inf inputs, empty
data) are reported here, once, with the global sample index.

Batches as Hugging Face datasets and collators give them are taken as they
are (:func:`split_batch`): a dict such as ``{"input_ids", "attention_mask",
"labels"}`` reaches the model as keyword arguments (all entries but
``"labels"``), and a tuple of more than two tensors as positional arguments
(all but the last). Their targets are the whole batch, a :class:`Batch`: a
loss ``loss(logits, targets)`` receives its ``"labels"`` (a tuple's last
element), a loss ``loss(output, batch)`` the batch itself
(:class:`~torchfluence._functional.ModelFunctions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable, Optional, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from .checks import check_finite

DataSource = Union[DataLoader, tuple, Dataset, Iterable]
BlockCheck = Callable[[Tensor, Tensor, int], None]

LABELS = "labels"  # the key of a dict batch that holds the targets (Hugging Face's name)


class Batch:
    """Structured samples: a dict of tensors (keyword arguments) or a tuple (positional), each (n, ...).

    What the engine does to an input tensor it does to every tensor here alike:
    slicing and indexing samples, moving, ``unsqueeze(0)``, and ``vmap`` over the
    first dimension (a Batch is a pytree node). Non-tensor entries ride along.

    Args:
        parts: a dict (``model(**parts)``) or a tuple (``model(*parts)``).
    """

    def __init__(self, parts: Union[Mapping, tuple]) -> None:
        self.parts = dict(parts) if isinstance(parts, Mapping) else tuple(parts)
        # Which entries are vmap's leaves: fixed here, since a pytree may carry other leaves than tensors.
        self._slots = [isinstance(v, Tensor) for v in self.values()]
        tensors = [t for t in self.values() if isinstance(t, Tensor)]
        if not tensors or any(t.dim() == 0 for t in tensors):
            raise ValueError(f"a batch needs tensors with a sample dimension, got {self.describe()}")
        self._n = tensors[0].shape[0]

    @property
    def keyword(self) -> bool:
        """Whether the parts are keyword arguments (a dict)."""
        return isinstance(self.parts, dict)

    def values(self) -> list:
        return list(self.parts.values()) if self.keyword else list(self.parts)

    def map(self, fn: Callable[[Tensor], Any]) -> "Batch":
        """A Batch of ``fn(t)`` for every tensor t (other entries as they are)."""
        apply = lambda v: fn(v) if isinstance(v, Tensor) else v  # noqa: E731
        if self.keyword:
            return Batch({k: apply(v) for k, v in self.parts.items()})
        return Batch(tuple(apply(v) for v in self.parts))

    def call(self, model: Callable) -> Any:
        return model(**self.parts) if self.keyword else model(*self.parts)

    def targets(self) -> Any:
        """What a ``loss(logits, targets)`` takes: the ``"labels"`` entry, or a tuple's last element."""
        if self.keyword:
            if LABELS not in self.parts:
                raise KeyError(f"the batch has no {LABELS!r} entry (keys {list(self.parts)})")
            return self.parts[LABELS]
        return self.parts[-1]

    def describe(self) -> str:
        def one(v):
            return f"tensor {tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
        if self.keyword:
            return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in self.parts.items()) + "}"
        return "(" + ", ".join(one(v) for v in self.parts) + ")"

    # -- what the engine asks of an input tensor ----------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """(n,): the number of samples (the parts' own shapes are their business)."""
        return torch.Size([self._n])

    @property
    def dtype(self) -> None:
        return None

    @property
    def device(self) -> torch.device:
        return next(t for t in self.values() if isinstance(t, Tensor)).device

    def dim(self) -> int:
        return 1

    def numel(self) -> int:
        return sum(t.numel() for t in self.values() if isinstance(t, Tensor))

    def is_floating_point(self) -> bool:
        return False  # never cast as a whole: ModelFunctions.cast_input casts its floating parts

    def is_complex(self) -> bool:
        return False  # checked part by part where blocks are made (Samples.blocks)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: Any) -> "Batch":
        return self.map(lambda t: t[index])

    def to(self, *args: Any, **kwargs: Any) -> "Batch":
        return self.map(lambda t: t.to(*args, **kwargs))

    def unsqueeze(self, dim: int) -> "Batch":
        return self.map(lambda t: t.unsqueeze(dim))

    def __repr__(self) -> str:
        return f"Batch({self.describe()})"


_SLOT = object()  # where a leaf goes back in a flattened Batch's template


def _flatten(batch: Batch) -> tuple[list, Any]:
    """The tensors (the leaves) and a template holding everything else."""
    values = batch.values()
    keys = list(batch.parts) if batch.keyword else None
    leaves = [v for v, slot in zip(values, batch._slots) if slot]
    return leaves, (keys, [_SLOT if slot else v for v, slot in zip(values, batch._slots)])


def _unflatten(leaves: Iterable, context: Any) -> Batch:
    keys, template = context
    leaves = iter(leaves)
    values = [next(leaves) if v is _SLOT else v for v in template]
    batch = Batch.__new__(Batch)  # no checks: vmap passes per-sample values without the sample dimension
    batch.parts = dict(zip(keys, values)) if keys is not None else tuple(values)
    batch._slots = [v is _SLOT for v in template]
    batch._n = next((v.shape[0] for v in values if isinstance(v, Tensor) and v.dim() > 0), 1)
    return batch


pytree.register_pytree_node(Batch, _flatten, _unflatten)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """A batch as the engine's (inputs, targets).

    - ``(x, y)`` tensors: as they are;
    - a dict: inputs are a keyword :class:`Batch` of every entry but ``"labels"``, targets
      the whole dict as a Batch;
    - a tuple or list of more than two: inputs are a positional Batch of all but the last
      element, targets the whole tuple as a Batch.

    Args:
        batch: what a DataLoader yields.
    """
    if isinstance(batch, Batch):
        return Batch({k: v for k, v in batch.parts.items() if k != LABELS}) if batch.keyword \
            else Batch(batch.parts[:-1]), batch
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != LABELS}
        if not inputs:
            raise TypeError(f"a dict batch needs model inputs besides {LABELS!r}, got keys {list(batch)}")
        return Batch(inputs), Batch(batch)
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        return Batch(tuple(batch[:-1])), Batch(tuple(batch))
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"a batch must be an (inputs, targets) pair, a tuple of more items or a dict, got "
                    f"{_describe(batch)}")


@dataclass(frozen=True)
class SampleBlock:
    """A block of samples: inputs (b, ...), targets (b, ...), and the global index of the first."""

    x: Tensor
    y: Tensor
    offset: int

    @property
    def size(self) -> int:
        return self.x.shape[0]


class Samples:
    """Blocks of (x, y) samples from any supported data source.

    Args:
        data: a DataLoader, an ``(x, y)`` pair of tensors, a map-style Dataset of
            ``(x, y)`` items, or an iterable of ``(x, y)`` batches. A one-shot
            iterable (a generator) can be read once: :meth:`require_reiterable`
            refuses it where several passes are needed.
        name: the argument's name, for error messages.
        block_size: the largest block yielded.
        check: optional ``(x, y, offset) -> None`` run on every block (target checks).
        transform: optional ``x -> x'`` applied to every block's inputs (head mode's features).
    """

    def __init__(self, data: DataSource, name: str, block_size: int, *, check: Optional[BlockCheck] = None,
                 transform: Optional[Callable[[Tensor], Tensor]] = None,
                 minibatch_size: Optional[int] = None) -> None:
        self.name, self.block_size, self.check, self.transform = name, block_size, check, transform
        if minibatch_size is None:
            loader_size = getattr(data, "batch_size", None) if isinstance(data, DataLoader) else None
            minibatch_size = loader_size or block_size
        self.minibatch_size = minibatch_size  # the size of random minibatches (a DataLoader's own batch size)
        self._pair: Optional[tuple[Tensor, Tensor]] = None
        if isinstance(data, Mapping) or (isinstance(data, (tuple, list)) and len(data) == 2
                                         and isinstance(data[0], Mapping) and data[1] is None):
            data = split_batch(data if isinstance(data, Mapping) else data[0])  # one in-memory dict batch
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, (Tensor, Batch)) for t in data):
            check_pair(data[0], data[1], name)
            self._pair = (data[0], data[1])
            self._source: Any = None
        elif isinstance(data, Dataset) and not isinstance(data, IterableDataset):
            self._source = DataLoader(data, batch_size=block_size, shuffle=False)
        elif isinstance(data, IterableDataset):
            self._source = DataLoader(data, batch_size=block_size)
        elif isinstance(data, Tensor) or not isinstance(data, Iterable):
            raise TypeError(f"{name} must be a DataLoader, an (x, y) pair of tensors, a dict batch, a Dataset of "
                            f"(x, y) items or an iterable of (x, y) or dict batches, got {_describe(data)}")
        else:
            self._source = data
        self._count: Optional[int] = None
        self._consumed = False
        # An in-memory pair is checked on its first full pass only: later passes read the
        # same tensors, and on a GPU each check would be a host synchronisation per block.
        self._pair_checked = False

    # -- facts --------------------------------------------------------------------------------------
    @property
    def reiterable(self) -> bool:
        """Whether the data can be read more than once (False for generators and iterators)."""
        return self._pair is not None or not isinstance(self._source, Iterator)

    def require_reiterable(self, why: str) -> None:
        if not self.reiterable:
            raise TypeError(f"{self.name} is a one-shot iterator ({type(self._source).__name__}), but {why} reads "
                            "the data several times; pass a DataLoader, an (x, y) pair of tensors or a Dataset")

    def count(self) -> int:
        """The number of samples (one pass over the data when no length is known)."""
        if self._count is None:
            self._count = self._known_length()
            if self._count is None:
                self.require_reiterable("counting the samples")
                # Raw batches: counting needs no checks and no transform (head mode's backbone pass).
                self._count = sum(int(x.shape[0]) for x, _ in self.batches())
            if self._count == 0:
                raise ValueError(f"{self.name} is empty: it holds no samples")
        return self._count

    def known_count(self) -> Optional[int]:
        """The number of samples if it is known without reading the data, else None."""
        return self._count if self._count is not None else self._known_length()

    def _known_length(self) -> Optional[int]:
        if self._pair is not None:
            return self._pair[0].shape[0]
        loader = self._source
        if not isinstance(loader, DataLoader) or loader.batch_size is None or isinstance(loader.dataset,
                                                                                          IterableDataset):
            return None
        try:
            n = len(loader.sampler)  # type: ignore[arg-type]
        except TypeError:
            return None
        return (n // loader.batch_size) * loader.batch_size if loader.drop_last else n

    # -- iteration ----------------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The source's own batches, checked for shape and type (empty batches skipped)."""
        if self._pair is not None:
            if self._pair[0].shape[0]:
                yield self._pair
            return
        if not self.reiterable:
            if self._consumed:
                raise TypeError(f"{self.name} is a one-shot iterator that was already read; pass a DataLoader or "
                                "an (x, y) pair of tensors to read it again")
            self._consumed = True
        for batch in self._source:
            if not isinstance(batch, (tuple, list, Mapping)) or len(batch) < 2 and not isinstance(batch, Mapping):
                got = f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list)) \
                    else _describe(batch)
                raise TypeError(f"{self.name} must yield (inputs, targets) pairs, tuples of more items or dicts, "
                                f"got {got}")
            x, y = split_batch(batch)
            check_pair(x, y, self.name)
            if x.shape[0]:
                yield x, y

    def blocks(self, *, checked: bool = True, select: Optional[Callable[[int], bool]] = None) -> Iterator[SampleBlock]:
        """Blocks of at most ``block_size`` samples with global offsets, in data order.

        Args:
            checked: check inputs and targets (NaN/inf, target ranges).
            select: optional predicate on the block's index (0, 1, ...): blocks it
                rejects are read (their samples still count towards the offsets) but
                neither checked, transformed nor yielded. Resumed jobs skip finished
                blocks with it, and each process of a distributed job keeps its share.

        Raises ValueError for NaN/inf inputs or targets (naming the sample), and
        when a full pass yields a different number of samples than was counted.
        """
        offset = 0
        index = -1
        checked = checked and not self._pair_checked
        for x, y in self.batches():
            for start in range(0, x.shape[0], self.block_size):
                xb, yb = x[start:start + self.block_size], y[start:start + self.block_size]
                index += 1
                if select is not None and not select(index):
                    offset += xb.shape[0]
                    continue
                if checked:
                    for what, t in _tensors(xb, "inputs") + _tensors(yb, "targets"):
                        check_finite(t, f"{self.name} {what}", offset)
                    if self.check is not None:
                        self.check(xb, yb, offset)
                if self.transform is not None:
                    xb = self.transform(xb)
                yield SampleBlock(xb, yb, offset)
                offset += xb.shape[0]
        if offset == 0:
            raise ValueError(f"{self.name} is empty: it yielded no samples")
        if self._count is not None and offset != self._count:
            raise ValueError(f"{self.name} yielded {offset} samples in this pass, but {self._count} before; the "
                             "data must yield the same samples on every pass (use drop_last=False)")
        if checked and select is None and self._pair is not None:
            self._pair_checked = True  # every block was checked

    def validate_in_memory(self) -> None:
        """Checks every block now when the data is an in-memory pair (cheap: no loading, no model)."""
        if self._pair is not None:
            for _ in self.blocks():
                pass

    def first_block(self) -> SampleBlock:
        """The first block (reads only the first batch)."""
        return next(iter(self.blocks()))

    def shuffled_batches(self, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """An endless stream of random minibatches, reproducible from `seed`.

        A shuffling DataLoader is read as it is; a non-shuffling one through a
        shuffling copy with the same batch size seeded by `seed`; an (x, y) pair
        in random blocks of ``minibatch_size``, drawn exactly as that shuffling
        copy would draw them (so cached features give the same minibatches).
        """
        self.require_reiterable("random minibatches")
        generator = torch.Generator().manual_seed(seed)
        source = self._source
        if self._pair is not None:
            x, y = self._pair
            while True:
                order = torch.randperm(x.shape[0], generator=generator)
                for start in range(0, x.shape[0], self.minibatch_size):
                    index = order[start:start + self.minibatch_size].to(x.device)
                    yield self._prepare(x[index], y[index.to(y.device)])
        if isinstance(source, DataLoader) and not isinstance(source.sampler, RandomSampler) \
                and source.batch_size is not None and not isinstance(source.dataset, IterableDataset):
            # Each pass reads the dataset in a fresh seeded permutation: the same permutations,
            # and so the same minibatches, as an (x, y) pair of the same samples above.
            n = len(source.dataset)  # type: ignore[arg-type]
            while True:
                order = torch.randperm(n, generator=generator).tolist()
                epoch = DataLoader(source.dataset, batch_size=source.batch_size, sampler=order,
                                   collate_fn=source.collate_fn, num_workers=source.num_workers,
                                   drop_last=source.drop_last, generator=torch.Generator().manual_seed(seed))
                for x, y in Samples(epoch, self.name, self.block_size).batches():
                    yield self._prepare(x, y)
        while True:  # a shuffling DataLoader or another source gives its own order on every pass
            yielded = False
            for x, y in Samples(source, self.name, self.block_size).batches():
                yielded = True
                yield self._prepare(x, y)
            if not yielded:
                raise ValueError(f"{self.name} is empty: it yielded no samples")

    def _prepare(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        for what, t in _tensors(x, "inputs"):
            check_finite(t, f"{self.name} {what}")
        if self.check is not None:
            self.check(x, y, -1)
        return (self.transform(x) if self.transform is not None else x), y


def _tensors(value: Any, what: str) -> list[tuple[str, Tensor]]:
    """(name, tensor) of a tensor, or of each tensor of a Batch (named by its key)."""
    if isinstance(value, Batch):
        keys = list(value.parts) if value.keyword else range(len(value.parts))
        return [(f"{what} {k!r}" if value.keyword else f"{what} [{k}]", t)
                for k, t in zip(keys, value.values()) if isinstance(t, Tensor)]
    return [(what, value)]


def check_pair(x: Tensor, y: Tensor, name: str = "data") -> None:
    """x and y are tensors (or Batches) with the same number of samples."""
    if isinstance(x, Batch) or isinstance(y, Batch):
        sizes = {len(t) for _, t in _tensors(x, "inputs") + _tensors(y, "targets")}
        if len(sizes) > 1:
            raise ValueError(f"{name}: every tensor of a batch must have the same number of samples, got "
                             f"inputs {_describe(x)} and targets {_describe(y)}")
        return
    for what, t in (("inputs", x), ("targets", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} {what} must be a torch.Tensor, got {_describe(t)}")
        if t.dim() == 0:
            raise ValueError(f"{name} {what} must have a sample dimension, got a 0-d tensor")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: inputs and targets must have the same number of samples, got {x.shape[0]} "
                         f"and {y.shape[0]}")


def _describe(value: Any) -> str:
    if isinstance(value, Batch):
        return f"a batch {value.describe()}"
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
