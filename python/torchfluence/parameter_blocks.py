"""Parameter blocks: groups of a solver's parameters whose curvature is solved apart.

A block-diagonal curvature keeps the curvature inside each block of parameters and
drops the terms between blocks. A *block structure* says which of the solver's
selected parameters form each block:

- ``"full"``: one block, named ``"full"``, of every selected parameter;
- ``"layer"``: one block per module that owns parameters, named as the module
  (``"0"`` for the first layer of an ``nn.Sequential``, ``"encoder.fc"`` for a nested
  one), holding that module's own parameters (a Linear's weight and bias together);
  a parameter registered on the root module is a block of its own, named as the parameter;
- ``"parameter"``: one block per parameter tensor, named as the parameter;
- a mapping ``{block name: [parameter names]}`` that puts every selected parameter in
  exactly one block.

The solvers read the flat parameter vector (the selected parameters in their order,
see :attr:`ModelFunctions.names <torchfluence._functional.ModelFunctions.names>`); a
block's columns in it are :func:`column_ranges`, gathered and scattered by
:func:`gather_columns` / :func:`scatter_columns`. DataInf
(:mod:`torchfluence.solvers.datainf`) and the block-diagonal solvers
(:mod:`torchfluence.solvers.block_diagonal`) both resolve their blocks here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable, Literal, Union

import torch
from torch import Tensor

from .checks import check_regularization

BlockStructure = Union[Literal["full", "layer", "parameter"], Mapping[str, Sequence[str]]]
Regularization = Union[float, Mapping[str, float]]
Ranges = list[tuple[int, int]]

STRUCTURES = ("full", "layer", "parameter")


def resolve_blocks(structure: BlockStructure, names: Sequence[str], *,
                   complete: bool = True) -> dict[str, list[str]]:
    """The blocks ``{block name: [parameter names]}`` of a block structure over the parameters `names`.

    ``"full"``, ``"layer"`` and ``"parameter"`` list each block's parameters in the
    order of `names`; a mapping keeps its own order of blocks and of the names in each.

    Args:
        structure: ``"full"``, ``"layer"``, ``"parameter"`` or ``{block name: [parameter names]}``
            (see the module's docstring).
        names: the selected parameters, in the solver's flat order.
        complete: a mapping must put every one of `names` in a block; False: parameters
            it leaves out are left out.

    Raises:
        ValueError: an unknown structure, an empty mapping or block, a name that is not one
            of `names` (they are named), a parameter in two blocks, or (with `complete`) one
            in none.
        TypeError: a structure that is neither a string nor a mapping, or a block that is
            not a list of names.
    """
    names = list(names)
    if isinstance(structure, str):
        if structure == "full":
            return {"full": names}
        if structure == "layer":
            return grouped(names, lambda name: name.rpartition(".")[0] or name)
        if structure == "parameter":
            return {name: [name] for name in names}
        raise ValueError(f"block_structure must be one of {list(STRUCTURES)} or a mapping {{block name: "
                         f"[parameter names]}}, got {structure!r}")
    if not isinstance(structure, Mapping):
        raise TypeError(f"block_structure must be one of {list(STRUCTURES)} or a mapping {{block name: "
                        f"[parameter names]}}, got {type(structure).__name__}")
    if not structure:
        raise ValueError("block_structure is an empty mapping: give at least one block")
    known = set(names)
    blocks: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for block, params in structure.items():
        names_only = isinstance(params, Sequence) and all(isinstance(p, str) for p in params)
        if isinstance(params, str) or not names_only:
            raise TypeError(f"block_structure[{block!r}] must be a list of parameter names, got {params!r}")
        if not params:
            raise ValueError(f"block_structure[{block!r}] is empty: a block needs at least one parameter")
        unknown = [p for p in params if p not in known]
        if unknown:
            raise ValueError(f"block_structure[{block!r}]: unknown parameter names {unknown} (not a selected "
                             f"parameter; selected: {names})")
        for p in params:
            if p in owner:
                raise ValueError(f"block_structure puts parameter {p!r} in two blocks, {owner[p]!r} and "
                                 f"{block!r}: the blocks must be disjoint")
            owner[p] = str(block)
        blocks[str(block)] = list(params)
    missing = [p for p in names if p not in owner]
    if complete and missing:
        raise ValueError(f"block_structure must assign every selected parameter to a block; missing: "
                         f"{missing}")
    return blocks


def grouped(names: Sequence[str], key: Callable[[str], str]) -> dict[str, list[str]]:
    """`names` grouped into blocks named ``key(name)``, in order of first appearance."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(key(name), []).append(name)
    return blocks


def smallest_regularization(regularization: Regularization) -> float:
    """The smallest lambda of one number or ``{block name: lambda}`` (0 for an empty mapping), each checked.

    Raises:
        ValueError: a value that is not a finite number >= 0 (a mapping's named by its block).
    """
    if not isinstance(regularization, Mapping):
        return check_regularization(regularization)
    values = [check_regularization(v, f"regularization[{k!r}]") for k, v in regularization.items()]
    return min(values, default=0.0)


def block_regularization(regularization: Regularization, blocks: Sequence[str], *, positive: bool = False,
                         why: str = "") -> dict[str, float]:
    """Each block's lambda: one number for every block, or a mapping with exactly one entry per block.

    Args:
        regularization: a number >= 0, or ``{block name: lambda}``.
        blocks: the block names, in order (the result's order).
        positive: each lambda must be > 0.
        why: said after the requirement when `positive` refuses a value (e.g. what divides by it).

    Raises:
        ValueError: a mapping that names an unknown block or leaves one out (both are named),
            or a value that is not a finite number >= 0 (> 0 with `positive`).
    """
    def checked(value: float, name: str) -> float:
        value = check_regularization(value, name)
        if positive and value <= 0:
            raise ValueError(f"{name} must be > 0{f' ({why})' if why else ''}, got {value!r}")
        return value

    blocks = list(blocks)
    if not isinstance(regularization, Mapping):
        return dict.fromkeys(blocks, checked(regularization, "regularization"))
    unknown = [k for k in regularization if k not in blocks]
    if unknown:
        raise ValueError(f"regularization: unknown block names {unknown}; the blocks are {blocks}")
    missing = [k for k in blocks if k not in regularization]
    if missing:
        raise ValueError(f"regularization must give a lambda for every block of {blocks}; missing: {missing}")
    return {k: checked(regularization[k], f"regularization[{k!r}]") for k in blocks}


def column_ranges(names: Sequence[str], sizes: Sequence[int],
                  blocks: Mapping[str, Sequence[str]]) -> dict[str, Ranges]:
    """``{block name: [(start, stop), ...]}``: each block's columns of the flat vector, in flat order.

    Args:
        names, sizes: the flat vector's parameters and their element counts, in order.
        blocks: ``{block name: [parameter names]}`` over `names`.

    Adjacent parameters of a block merge into one range, so a block whose parameters
    are contiguous is one slice.
    """
    spans, offset = {}, 0
    for name, size in zip(names, sizes):
        spans[name] = (offset, offset + size)
        offset += size
    out = {}
    for block, params in blocks.items():
        merged: list[list[int]] = []
        for start, stop in sorted(spans[p] for p in params):
            if merged and start == merged[-1][1]:
                merged[-1][1] = stop
            else:
                merged.append([start, stop])
        out[block] = [(a, b) for a, b in merged]
    return out


def gather_columns(t: Tensor, ranges: Ranges) -> Tensor:
    """The columns `ranges` of `t` (k, p) side by side, (k, p_block); a view when they are one range."""
    if len(ranges) == 1:
        start, stop = ranges[0]
        return t[:, start:stop]
    return torch.cat([t[:, a:b] for a, b in ranges], dim=1)


def scatter_columns(out: Tensor, ranges: Ranges, values: Tensor, *, add: bool = False) -> None:
    """Writes (or with `add`, adds) `values` (k, p_block) into the columns `ranges` of `out` (k, p)."""
    offset = 0
    for start, stop in ranges:
        part = values[:, offset:offset + stop - start]
        if add:
            out[:, start:stop] += part
        else:
            out[:, start:stop] = part
        offset += stop - start
