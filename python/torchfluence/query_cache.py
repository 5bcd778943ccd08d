"""The last prepared test factors, kept for the next call on the same queries.

``train_influences(x_test, y_test)`` followed by ``top_k(x_test, y_test)`` (or any
two scoring calls on one query set) would otherwise solve the same queries twice:
on a ResNet-9 that is as long as the fit's second pass. A solver keeps the
prepared factors of its last query set here and reuses them when a call names

- the *same tensor objects* (identity, not equal values: comparing values would
  cost a pass over the queries), unmodified since (storage, shape, strides and
  torch's in-place version counter all unchanged), and
- a solver in the same state: the same fit, the same settings (regularization,
  options, dtypes, device) and model parameters not modified in place since.

Anything else is a miss, and the old entry is dropped *before* the new queries
are prepared, so that two query sets are never held at once. One entry at most;
:meth:`QueryCache.clear` (``solver.forget_queries()``) frees it.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Optional

from torch import Tensor

from .data import Batch

__all__ = ["QueryCache", "tensor_leaves"]


def tensor_leaves(value: Any) -> Optional[list[Tensor]]:
    """The tensors of a query argument (a tensor, a Batch, a dict/tuple/list of them); None for anything else."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Batch):
        value = value.values()
    elif isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        leaves: list[Tensor] = []
        for item in value:
            if isinstance(item, Tensor):
                leaves.append(item)
            elif isinstance(item, (Batch, dict, tuple, list)):
                inner = tensor_leaves(item)
                if inner is None:
                    return None
                leaves.extend(inner)
            elif not isinstance(item, (str, int, float, bool, type(None))):
                return None  # an object whose changes cannot be seen
        return leaves
    return None


def _fingerprint(t: Tensor) -> tuple:
    """What changes when a tensor's values may have changed without it becoming another object."""
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device)


class QueryCache:
    """One entry: the prepared factors of one query set under one solver state."""

    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []
        self._fingerprints: list[tuple] = []
        self._state: Any = None
        self._value: Any = None

    def get_or_prepare(self, queries: Iterable[Any], state: Any, prepare: Callable[[], Any]) -> Any:
        """The entry when `queries` and `state` match it, else ``prepare()`` (kept as the new entry).

        Args:
            queries: the query arguments as given (x_test, y_test); a query set that is
                not made of tensors is prepared and not kept.
            state: anything comparable with ``==`` that changes whenever the solver's
                results could (see the module docstring).
        """
        leaves: Optional[list[Tensor]] = []
        for value in queries:
            found = tensor_leaves(value)
            if found is None:
                leaves = None
                break
            leaves.extend(found)
        if leaves is not None and self._matches(leaves, state):
            return self._value
        self.clear()  # before preparing: never two query sets at once
        value = prepare()
        if leaves:
            self._refs = [weakref.ref(t) for t in leaves]
            self._fingerprints = [_fingerprint(t) for t in leaves]
            self._state, self._value = state, value
        return value

    def __getstate__(self) -> dict:
        """A pickled or copied solver (e.g. sent to dask workers) starts with an empty cache:
        weak references cannot be pickled, and the entry names tensors of this process."""
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def _matches(self, leaves: list[Tensor], state: Any) -> bool:
        if self._value is None or len(leaves) != len(self._refs) or not self._state == state:
            return False
        return all(ref() is t and _fingerprint(t) == fp for ref, t, fp in zip(self._refs, leaves, self._fingerprints))

    def clear(self) -> None:
        """Drops the entry (its memory is freed once no result refers to it)."""
        self._refs, self._fingerprints, self._state, self._value = [], [], None, None

    @property
    def holds(self) -> bool:
        """Whether an entry is kept."""
        return self._value is not None
