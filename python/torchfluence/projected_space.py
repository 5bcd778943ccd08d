"""Influence in a projected gradient space: k numbers ``phi_i = P g_i`` per sample instead of p.

With ``projector=`` a solver never sees the p-dimensional per-sample gradients:
its gradient source yields ``phi_i = P g_i`` (k numbers), its curvature is the
Fisher of those projected gradients,

    F = (1/n) sum_i phi_i phi_i^T        (k, k),

(TRAK, Park et al. 2023; LoGra, Choe et al. 2024), and scores are
``phi_test^T (F + lambda I)^-1 phi_j``. Every solver works as it does in
parameter space, with k in place of p: Direct builds the k x k matrix, CG,
LiSSA, Arnoldi and Nystroem take products with F. The targets are the data's
(the empirical Fisher). When P is square and invertible and F has full rank,
``P^T (P F_p P^T)^-1 P = F_p^-1``, so at lambda = 0 the scores are those of the
unprojected empirical Fisher (tests/test_projected.py).

Two kinds of projection:

- any :class:`~torchfluence.projectors.Projector` whose ``p`` is the number of
  selected parameters (dense, sparse JL): :class:`ProjectedGradients` projects
  each block's gradients piece by piece with :meth:`Projector.accumulate`: the
  captured layers in chunks of output rows (an embedding in chunks of its
  vocabulary), the uncaptured parameters one parameter at a time (their
  ``torch.func`` gradients formed together), so a block's full (b, p) gradient
  is never held; without captured layers (``fused=False``) the (b, p) block is
  formed by ``torch.func`` and projected whole.
- :class:`KroneckerProjection` (LoGra): one
  :class:`~torchfluence.projectors.KroneckerProjector` per captured layer,
  ``P_l = P_out kron P_in``. :class:`KroneckerGradients` projects each layer's
  inputs ``P_in a`` and output gradients ``P_out g`` and contracts them: no
  per-sample gradient of the layer is formed. Layer l then behaves as a layer of
  shape (k_out, k_in), so K-FAC and EK-FAC fit their Kronecker factors and
  eigenvalue corrections on the projected inputs and output gradients (LoGra's
  recipe), with test points projected the same way.

``second_order="hessian"`` is refused with a projector: the projected Hessian
``P H P^T`` needs products of H with lifted vectors ``P^T v`` in parameter
space, the very cost projecting avoids, and H is indefinite away from a
minimum; the Fisher of the projected gradients needs only the k-vectors.

Also not available with a projector: ``mode="perturbation"`` (a derivative in
parameter space), saving a solver (its options cannot rebuild the projector:
:class:`~torchfluence.GradientStore` keeps projected gradients on disk instead),
and DataInf (its blocks are groups of parameters).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._functional import ModelFunctions
from .capture import Captured, Layer, capture, describe_missing, find_layers, shared_weights
from .curvature import CurvatureOperator
from .captured_scores import index_sum
from .gradients import CapturedGradients, GradientSource
from .precision import matmul_float32
from .projectors import DenseProjector, KroneckerProjector, Projector, SparseJLProjector

__all__ = ["KroneckerProjection", "ProjectedGradients", "KroneckerGradients", "ProjectedFisher",
           "projected_source", "describe_projection", "projection_from_description"]

_SEED_MAX = 2**63 - 1
# Values of one piece of a layer's per-sample gradients (b x rows x d_in) formed at once
# before it is projected: 2^24 float32 values are 64 MiB, whatever the layer's size.
_PIECE_VALUES = 1 << 24


@dataclass(frozen=True)
class KroneckerProjection:
    """LoGra's projection: ``P_out kron P_in`` per captured layer, (k_out, k_in) numbers each.

    A layer of shape (d_out, d_in) (d_in counts a bias column) gets a
    :class:`~torchfluence.projectors.KroneckerProjector` of
    ``min(k_out, d_out) x min(k_in, d_in)`` numbers (a side no larger than
    asked is projected by a square Gaussian matrix, invertible with probability
    one), seeded by `seed` and the layer's position among the captured layers.
    The projected gradient is the layers' projections one after another, in the
    order of the model's modules; ``k`` is the sum of their sizes.

    Every selected parameter must belong to a captured layer (``nn.Linear``,
    ``nn.Conv1d/2d/3d``, ``nn.Embedding``, registered types), and no two layers
    may share a weight.

    Args:
        k_out: rows of each layer's projection, >= 1.
        k_in: columns of each layer's projection, >= 1.
        seed: in [0, 2**63 - 1]; the same seed gives the same projectors.
        dtype: float32 or float64 for the projection arithmetic; None: the computation dtype.
    """

    k_out: int
    k_in: int
    seed: int = 0
    dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        for name in ("k_out", "k_in", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"KroneckerProjection: {name} must be an int, got {type(value).__name__}")
        for name in ("k_out", "k_in"):
            if getattr(self, name) < 1:
                raise ValueError(f"KroneckerProjection: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed <= _SEED_MAX:
            raise ValueError(f"KroneckerProjection: seed must be in [0, 2**63 - 1], got {self.seed}")
        if self.dtype is not None and self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"KroneckerProjection: dtype must be None, torch.float32 or torch.float64, got "
                            f"{self.dtype}")

    def projectors(self, layers: list[Layer]) -> list[KroneckerProjector]:
        """One projector per layer, in the layers' order."""
        return [KroneckerProjector(layer.d_out, layer.d_in_total, min(self.k_out, layer.d_out),
                                   min(self.k_in, layer.d_in_total), seed=layer_seed(self.seed, i),
                                   dtype=self.dtype)
                for i, layer in enumerate(layers)]


Projection = Union[Projector, KroneckerProjection]


def layer_seed(seed: int, index: int) -> int:
    """The seed of layer `index`'s projector under a :class:`KroneckerProjection` seed (63 bits)."""
    digest = hashlib.sha256(f"torchfluence.kronecker-projection|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -- gradient sources ---------------------------------------------------------------------------------
class ProjectedGradients(GradientSource):
    """Per-sample gradients projected by a :class:`~torchfluence.projectors.Projector`, (b, k).

    With captured layers (the default ``fused=True`` source) each block is one
    forward and backward; each layer's per-sample gradients are formed a piece
    of output rows at a time (at most ~2^24 values) and added into the
    projection with :meth:`Projector.accumulate`, an embedding's from its
    nonzero rows, and the uncaptured parameters one parameter at a time. Otherwise
    (``torch.func``) the (b, p) block is formed and projected.

    Args:
        inner: the source of the unprojected gradients (its model functions are used).
        projector: a projector with ``p`` equal to the number of selected parameters.
    """

    def __init__(self, inner: GradientSource, projector: Projector) -> None:
        super().__init__(inner.functions)
        p = inner.functions.num_params
        if projector.p != p:
            raise ValueError(f"projector: its p must be the number of selected parameters, {p}, got "
                             f"p = {projector.p} ({projector!r})")
        self.inner, self.projector = inner, projector
        self.layers: list[Layer] = inner.layers if isinstance(inner, CapturedGradients) else []
        self._rest: list[tuple[str, int, int]] = []  # (name, offset, size) of the uncaptured parameters
        if isinstance(inner, CapturedGradients) and inner.rest is not None:
            f = inner.functions
            offsets = dict(zip(f.names, torch.tensor([0, *f.sizes]).cumsum(0).tolist()))
            sizes = dict(zip(f.names, f.sizes))
            self._rest = [(name, offsets[name], sizes[name]) for name in inner.rest.names]

    @property
    def num_params(self) -> int:
        return self.projector.k

    def grads(self, x: Tensor, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Projected per-sample gradients ``g_i P^T`` of the block, (b, k) in the computation dtype."""
        f = self.functions
        if not self.layers:
            phi = self.projector.project(self.inner.grads(x, y))
        else:
            phi = torch.zeros(x.shape[0], self.projector.k, dtype=self.projector.result_dtype(f.dtype),
                              device=f.device)
            cap = capture(f, self.layers, x, y)
            for layer, a, g in zip(self.layers, cap.activations, cap.output_grads):
                self._accumulate_layer(layer, a, g, phi)
            if self._rest:
                rest = self.inner.rest.per_sample_grads(x, y)
                start = 0
                for _, offset, size in self._rest:
                    self.projector.accumulate(rest[:, start:start + size], phi, offset)
                    start += size
        phi = phi.to(f.dtype)
        if out is None:
            return phi
        out.copy_(phi)
        return out

    def _accumulate_layer(self, layer: Layer, a: Tensor, g: Tensor, phi: Tensor) -> None:
        """Adds one layer's projected per-sample gradients to phi (b, k), piece by piece."""
        b = g.shape[0]
        if layer.index:
            # Weight stored (d_in, d_out): rows r0 .. r1 of it are columns
            # start + r0 * d_out .. start + r1 * d_out of the flat vector.
            rows = max(1, _PIECE_VALUES // max(1, b * layer.d_out))
            sample = torch.arange(b, device=a.device).unsqueeze(1).expand_as(a)
            for r0 in range(0, layer.d_in, rows):
                r1 = min(layer.d_in, r0 + rows)
                mask = (a >= r0) & (a < r1)
                keys = sample[mask] * (r1 - r0) + (a[mask] - r0)
                piece = index_sum(keys, g[mask], b * (r1 - r0)).view(b, -1)
                self.projector.accumulate(piece, phi, layer.weight_slice.start + r0 * layer.d_out)
            return
        d_in = layer.d_in
        if layer.transposed:  # weight stored (d_in, d_out) (Hugging Face's Conv1D): pieces of input rows
            rows = max(1, _PIECE_VALUES // max(1, b * layer.d_out))
            for i0 in range(0, d_in, rows):
                i1 = min(d_in, i0 + rows)
                piece = torch.einsum("nti,nto->nio", a[..., i0:i1], g)  # (b, rows, d_out)
                self.projector.accumulate(piece.reshape(b, -1), phi, layer.weight_slice.start + i0 * layer.d_out)
            if layer.bias_slice is not None:
                self.projector.accumulate(g.sum(dim=1), phi, layer.bias_slice.start)
            return
        rows = max(1, _PIECE_VALUES // max(1, b * layer.d_in_total))
        for o0 in range(0, layer.d_out, rows):
            o1 = min(layer.d_out, o0 + rows)
            piece = torch.einsum("nto,nti->noi", g[..., o0:o1], a)  # (b, rows, d_in_total)
            self.projector.accumulate(piece[..., :d_in].reshape(b, -1), phi,
                                      layer.weight_slice.start + o0 * d_in)
            if layer.bias_slice is not None:
                self.projector.accumulate(piece[..., d_in], phi, layer.bias_slice.start + o0)


class KroneckerGradients(GradientSource):
    """Per-sample gradients projected layer by layer by ``P_out kron P_in`` (a :class:`KroneckerProjection`).

    Layer l's projection is ``sum_t (P_out g_t)(P_in a_t)^T`` (k_out, k_in),
    flattened row-major, at columns ``offsets[l] .. offsets[l + 1]`` of the
    (b, k) result. An embedding's projected input at position t is column
    ``id_t`` of P_in (zero at ``padding_idx``, which gets no gradient).

    Attributes:
        layers: the model's captured layers.
        projectors: one :class:`~torchfluence.projectors.KroneckerProjector` per layer.
        projected_layers: the layers of the projected space: dense, shape
            (k_out, k_in), no bias, at their columns of the k-vector (for K-FAC).
    """

    def __init__(self, functions: ModelFunctions, spec: KroneckerProjection) -> None:
        super().__init__(functions)
        layers, missing = find_layers(functions)
        if missing or not layers:
            covered = describe_missing(functions, missing) if missing else "no captured layer at all"
            raise ValueError(
                f"projector: a KroneckerProjection projects captured layers only, and every selected parameter "
                f"must belong to one; not covered: {covered}. Pass params= with the captured layers' "
                "parameters, or use a SparseJLProjector")
        tied = shared_weights(layers)
        if tied:
            raise ValueError(f"projector: layers {tied} share one weight, whose gradient is the sum of theirs and "
                             "has no per-layer Kronecker projection; leave the tied weight out with params=, or "
                             "use a SparseJLProjector")
        self.spec, self.layers = spec, layers
        self.projectors = spec.projectors(layers)
        self.dtype = spec.dtype or functions.dtype
        offsets = [0]
        for projector in self.projectors:
            offsets.append(offsets[-1] + projector.k)
        self.offsets = offsets
        self.projected_layers = [
            Layer(layer.name, layer.module, layer.rule, slice(o0, o1), None, proj.k_out, proj.k_in, verified=True)
            for layer, proj, o0, o1 in zip(layers, self.projectors, offsets[:-1], offsets[1:])]

    @property
    def num_params(self) -> int:
        return self.offsets[-1]

    def project_capture(self, cap: Captured) -> Captured:
        """A capture of the model's layers as one of the projected layers: ``P_in a``, ``P_out g``.

        Output gradients may carry leading dimensions (K, n, T, d_out) (several
        backward passes); they are kept.
        """
        activations, output_grads = [], []
        for layer, proj, a, g in zip(self.layers, self.projectors, cap.activations, cap.output_grads):
            p_out, p_in = proj.factors(self.dtype, g.device)
            if layer.index:
                pa = p_in.T[a]  # (n, T, k_in): column id_t of P_in
                padding = getattr(layer.module, "padding_idx", None)
                if padding is not None:
                    pa = pa.masked_fill((a == padding).unsqueeze(-1), 0)
            else:
                pa = a.to(self.dtype) @ p_in.T
            activations.append(pa.to(self.functions.dtype))
            output_grads.append((g.to(self.dtype) @ p_out.T).to(self.functions.dtype))
        return Captured(activations, output_grads, cap.outputs)

    def grads(self, x: Tensor, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Projected per-sample gradients, (b, k) in the computation dtype."""
        cap = self.project_capture(capture(self.functions, self.layers, x, y))
        if out is None:
            out = torch.empty(x.shape[0], self.num_params, dtype=self.functions.dtype, device=self.functions.device)
        for layer, pa, pg in zip(self.projected_layers, cap.activations, cap.output_grads):
            out[:, layer.weight_slice] = torch.bmm(pg.transpose(1, 2), pa).reshape(x.shape[0], -1)
        return out

    def score_block_by_layer(self, queries: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """{layer name: (n_query, b)}: each layer's columns of the projected space; they sum to :meth:`score_block`."""
        g = self.grads(x, y)
        q = queries.to(g.dtype)
        return {layer.name: matmul_float32(q[:, p.weight_slice], g[:, p.weight_slice].T)
                for layer, p in zip(self.layers, self.projected_layers)}


def projected_source(functions: ModelFunctions, inner: GradientSource, projector: Projection) -> GradientSource:
    """The gradient source for `projector` over `functions` (whose unprojected source is `inner`)."""
    if isinstance(projector, KroneckerProjection):
        return KroneckerGradients(functions, projector)
    if isinstance(projector, Projector):
        return ProjectedGradients(inner, projector)
    raise TypeError(f"projector must be a torchfluence.Projector (DenseProjector, SparseJLProjector, ...) or a "
                    f"KroneckerProjection, got {type(projector).__name__}")


# -- curvature ----------------------------------------------------------------------------------------
class ProjectedFisher(CurvatureOperator):
    """The Fisher of a batch's projected per-sample gradients: ``V -> (V Phi^T) Phi / b`` for Phi (b, k).

    Over the training data (each block weighted by its size) this is
    ``F = (1/n) sum_i phi_i phi_i^T``, positive semi-definite. The last block's
    projected gradients are kept, so that several products with one block (an
    explicit matrix built a column block at a time) project it once.

    Args:
        source: the projected gradient source.
    """

    def __init__(self, source: GradientSource) -> None:
        super().__init__(source.functions)
        self.source = source
        self._last: Optional[tuple[Tensor, Tensor, int, int, Tensor]] = None

    def batch_vp(self, vectors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        phi = self._grads(x, y).to(vectors.dtype)
        return (vectors @ phi.T) @ phi / phi.shape[0]

    def _grads(self, x: Tensor, y: Tensor) -> Tensor:
        # The same tensor objects, not modified in place since (version counters): the same block.
        last = self._last
        if last is not None and last[0] is x and last[1] is y and last[2] == x._version and last[3] == y._version:
            return last[4]
        phi = self.source.grads(x, y)
        self._last = (x, y, x._version, y._version, phi)
        return phi


# -- the solver's engine ----------------------------------------------------------------------------------
def resolve_second_order(second_order: Optional[str], projector: Optional[Projection], curvature: Any) -> str:
    """A solver's curvature choice, checked: ``"hessian"``, ``"gauss_newton"`` or ``"empirical_fisher"``, or
    ``"fisher"`` with a projector.

    Without a projector None means ``"hessian"``. With one the curvature is always
    the Fisher of the projected gradients (``"fisher"``): None, ``"gauss_newton"``
    (which the Fisher estimates) and ``"empirical_fisher"`` (which it is) give it.

    Raises:
        ValueError: an unknown value; ``second_order="hessian"`` or a ``curvature=`` class
            together with a projector.
    """
    if projector is None:
        second_order = "hessian" if second_order is None else second_order
        if second_order not in ("hessian", "gauss_newton", "empirical_fisher"):
            raise ValueError(f"second_order must be one of ['hessian', 'gauss_newton', 'empirical_fisher'], "
                             f"got {second_order!r}")
        return second_order
    if second_order == "hessian":
        raise ValueError(
            "second_order='hessian' cannot be used with projector=: in a projected space the curvature is the "
            "Fisher of the projected per-sample gradients, F = (1/n) sum_i (P g_i)(P g_i)^T, built from the "
            "k-vectors alone; the projected Hessian P H P^T would need Hessian-vector products with lifted "
            "vectors P^T v in the full parameter space (the cost projecting avoids), and H is indefinite away "
            "from a minimum. Leave second_order out (or pass 'gauss_newton', which the Fisher estimates)")
    if second_order not in (None, "gauss_newton", "empirical_fisher", "fisher"):
        raise ValueError(f"second_order must be None, 'gauss_newton', 'empirical_fisher' or 'fisher' with a "
                         f"projector, got {second_order!r}")
    if curvature is not None:
        raise ValueError(f"curvature= ({curvature!r}) acts in parameter space and cannot be combined with "
                         "projector=: the curvature in projected space is the Fisher of the projected gradients")
    return "fisher"


def projected_engine(functions: ModelFunctions, source: GradientSource,
                     projector: Projection) -> tuple[GradientSource, CurvatureOperator]:
    """The projected gradient source over `source`, and the Fisher of its projected gradients."""
    projected = projected_source(functions, source, projector)
    return projected, ProjectedFisher(projected)


def kronecker_layers(solver_name: str, source: GradientSource,
                     projector: Optional[Projection]) -> Optional[KroneckerGradients]:
    """K-FAC's projected space: `source` when it is a Kronecker source, None without a projector.

    Raises:
        TypeError: a projector other than a :class:`KroneckerProjection` (K-FAC needs layers).
    """
    if projector is None:
        return None
    if not isinstance(source, KroneckerGradients):
        raise TypeError(f"{solver_name} needs the layer structure of the gradients, which "
                        f"{type(projector).__name__} mixes; pass projector=KroneckerProjection(k_out, k_in) "
                        "(LoGra: Kronecker factors of projected inputs and output gradients), or use "
                        "DirectInfluence / CgInfluence with this projector")
    return source


# -- descriptions (for stores and records) ------------------------------------------------------------------
def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in ("float32", "float64"):
        raise ValueError(f"projector description: dtype must be null, 'float32' or 'float64', got {name!r}")
    return getattr(torch, name)


def describe_projection(projector: Projection) -> dict[str, Any]:
    """A JSON description that :func:`projection_from_description` rebuilds the same projector from.

    Raises:
        TypeError: for a projector type other than the four built in (its matrix cannot be described).
    """
    kind = type(projector)
    if kind is DenseProjector:
        return {"kind": "dense", "p": projector.p, "k": projector.k, "seed": projector.seed,
                "dtype": _dtype_name(projector.dtype), "distribution": projector.distribution}
    if kind is SparseJLProjector:
        return {"kind": "sjlt", "p": projector.p, "k": projector.k, "s": projector.s, "seed": projector.seed,
                "dtype": _dtype_name(projector.dtype)}
    if kind is KroneckerProjector:
        return {"kind": "kronecker_matrix", "d_out": projector.d_out, "d_in": projector.d_in,
                "k_out": projector.k_out, "k_in": projector.k_in, "seed": projector.seed,
                "dtype": _dtype_name(projector.dtype)}
    if kind is KroneckerProjection:
        return {"kind": "kronecker", "k_out": projector.k_out, "k_in": projector.k_in, "seed": projector.seed,
                "dtype": _dtype_name(projector.dtype)}
    raise TypeError(f"projector must be a DenseProjector, SparseJLProjector, KroneckerProjector or "
                    f"KroneckerProjection (a saved store records how to rebuild it), got {kind.__name__}")


def projection_from_description(description: dict[str, Any]) -> Projection:
    """The projector :func:`describe_projection` described."""
    kind = description.get("kind")
    d = {key: value for key, value in description.items() if key != "kind"}
    dtype = _dtype_of(d.pop("dtype", None))
    if kind == "dense":
        return DenseProjector(d["p"], d["k"], seed=d["seed"], dtype=dtype, distribution=d["distribution"])
    if kind == "sjlt":
        return SparseJLProjector(d["p"], d["k"], s=d["s"], seed=d["seed"], dtype=dtype)
    if kind == "kronecker_matrix":
        return KroneckerProjector(d["d_out"], d["d_in"], d["k_out"], d["k_in"], seed=d["seed"], dtype=dtype)
    if kind == "kronecker":
        return KroneckerProjection(d["k_out"], d["k_in"], seed=d["seed"], dtype=dtype)
    raise ValueError(f"projector description: unknown kind {kind!r}")

