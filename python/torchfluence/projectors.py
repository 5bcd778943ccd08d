"""Random projections of per-sample gradients: p parameters down to k numbers.

A projector is a random linear map ``P`` of shape (k, p), scaled so that
``E[P^T P] = I``. Then ``E[<P g, P h>] = <g, h>`` for any fixed g and h: inner
products (influence scores, Gram matrices) computed on projected gradients are
unbiased, and by the Johnson-Lindenstrauss lemma they are within
``eps * |g| |h|`` of the originals for all pairs among m vectors with high
probability once ``k >= C log(m) / eps**2``.

Three kinds:

- :class:`DenseProjector`: a materialised Gaussian or Rademacher matrix (small p).
- :class:`SparseJLProjector`: Kane and Nelson's sparse JL transform, s non-zeros
  per column, applied by a compiled kernel (OpenMP, CUDA) that regenerates the
  matrix from a hash and never stores it; any p.
- :class:`KroneckerProjector`: one per captured layer, ``P = P_out kron P_in``
  (LoGra); projects a layer's per-sample gradient ``sum_t D_t A_t^T`` from the
  captured inputs A and output gradients D without forming it.

All of them consume (n, p) blocks of per-sample gradients through
:meth:`Projector.project`, or the gradient in consecutive column pieces (one
per layer, say) through :meth:`Projector.project_parts` and
:meth:`Projector.accumulate`, without concatenating them.

Random numbers: each projector draws from ``torch.Generator`` streams seeded by
a SplitMix64 mix of ``(seed, stream index)``
(:func:`torchfluence.counter_random.stream_seed`) on the CPU in float64, so a seed
gives the same matrix on every device and, up to rounding, in every dtype.
Different seeds give independent projectors (use one seed per layer).
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .counter_random import stream_seed

__all__ = ["Projector", "DenseProjector", "SparseJLProjector", "KroneckerProjector"]

_SEED_MAX = 2**63 - 1
_DTYPES = (torch.float32, torch.float64)
_DENSE_CHUNK = 1024  # columns of a DenseProjector drawn from one generator stream


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(stream_seed(seed, stream))


def _positive_int(name: str, value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{where}: {name} must be >= 1, got {value}")
    return value


def _device_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Projector(ABC):
    """A random linear map ``P: R^p -> R^k`` with ``E[P^T P] = I``.

    Inputs may be float16/bfloat16/float32/float64 on any device; the result is on
    the input's device, in ``dtype`` if one was given, otherwise float64 for float64
    inputs and float32 for the rest. A projector holds no per-call state.

    Args:
        p: input dimension (number of parameters), >= 1.
        k: output dimension, >= 1.
        seed: in [0, 2**63 - 1]; the same seed gives the same P.
        dtype: float32 or float64 for the results (and the arithmetic), or None to follow the input.

    Attributes:
        p, k, seed, dtype: as given.
    """

    def __init__(self, p: int, k: int, *, seed: int = 0, dtype: Optional[torch.dtype] = None):
        where = type(self).__name__
        self.p = _positive_int("p", p, where)
        self.k = _positive_int("k", k, where)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed <= _SEED_MAX:
            raise ValueError(f"{where}: seed must be in [0, 2**63 - 1], got {seed}")
        if dtype is not None and dtype not in _DTYPES:
            raise TypeError(f"{where}: dtype must be None, torch.float32 or torch.float64, got {dtype}")
        self.seed = seed
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, k={self.k}, seed={self.seed}, dtype={self.dtype})"

    def result_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """Dtype of the projections of inputs of `input_dtype`."""
        if self.dtype is not None:
            return self.dtype
        return torch.float64 if input_dtype == torch.float64 else torch.float32

    def _check_block(self, method: str, g, n: Optional[int] = None, width: Optional[int] = None,
                     arg: str = "g") -> None:
        where = f"{type(self).__name__}.{method}"
        if not isinstance(g, Tensor):
            raise TypeError(f"{where}: {arg} must be a torch.Tensor, got {type(g).__name__}")
        if g.dim() != 2:
            raise ValueError(f"{where}: {arg} must be 2-D (n, p), got shape {tuple(g.shape)}")
        if not g.dtype.is_floating_point:
            raise TypeError(f"{where}: {arg} must have a floating dtype, got {g.dtype}")
        if n is not None and g.shape[0] != n:
            raise ValueError(f"{where}: {arg} must have n = {n} rows, got shape {tuple(g.shape)}")
        if width is not None and g.shape[1] != width:
            raise ValueError(f"{where}: {arg} must have p = {width} columns, got shape {tuple(g.shape)}")

    def project(self, g: Tensor) -> Tensor:
        """Projects rows: ``g @ P.T``.

        Args:
            g: (n, p) per-sample gradients, any strides.

        Returns:
            (n, k) on g's device, in :meth:`result_dtype` of g's dtype.

        Raises:
            TypeError, ValueError: g is not a 2-D floating tensor with p columns.
        """
        self._check_block("project", g, width=self.p)
        out = torch.zeros(g.shape[0], self.k, dtype=self.result_dtype(g.dtype), device=g.device)
        return self.accumulate(g, out, 0)

    def project_parts(self, parts: Sequence[Tensor]) -> Tensor:
        """Projects rows given as consecutive column pieces: ``cat(parts, 1) @ P.T`` without the cat.

        Args:
            parts: tensors (n, p_i) with sum p_i = p (one per layer, say), on one device, one dtype.

        Returns:
            (n, k), as :meth:`project`.
        """
        where = f"{type(self).__name__}.project_parts"
        parts = list(parts)
        if not parts:
            raise ValueError(f"{where}: parts must hold at least one (n, p_i) tensor, got none")
        self._check_block("project_parts", parts[0], arg="parts[0]")
        n, dtype, device = parts[0].shape[0], parts[0].dtype, parts[0].device
        for i, part in enumerate(parts):
            self._check_block("project_parts", part, n=n, arg=f"parts[{i}]")
            if part.dtype != dtype or part.device != device:
                raise ValueError(
                    f"{where}: parts[{i}] must be {dtype} on {device} like parts[0], got {part.dtype} on "
                    f"{part.device}"
                )
        total = sum(part.shape[1] for part in parts)
        if total != self.p:
            raise ValueError(
                f"{where}: the parts must have p = {self.p} columns in all, got {total} "
                f"({[part.shape[1] for part in parts]})"
            )
        out = torch.zeros(n, self.k, dtype=self.result_dtype(dtype), device=device)
        offset = 0
        for part in parts:
            self.accumulate(part, out, offset)
            offset += part.shape[1]
        return out

    def accumulate(self, g: Tensor, out: Tensor, offset: int = 0) -> Tensor:
        """Adds the projection of one column block: ``out += g @ P[:, offset : offset + p_block].T``.

        Args:
            g: (n, p_block) columns offset .. offset + p_block - 1 of the gradients, any strides.
            out: (n, k) float32 or float64 on g's device, updated in place.
            offset: first column of the block, 0 <= offset <= p - p_block.

        Returns:
            out.
        """
        where = f"{type(self).__name__}.accumulate"
        if not isinstance(out, Tensor):
            raise TypeError(f"{where}: out must be a torch.Tensor, got {type(out).__name__}")
        self._check_block("accumulate", g)
        if out.dim() != 2 or out.shape[1] != self.k or out.shape[0] != g.shape[0]:
            raise ValueError(
                f"{where}: out must have shape (n, k) = ({g.shape[0]}, {self.k}), got {tuple(out.shape)}"
            )
        if out.dtype not in _DTYPES:
            raise TypeError(f"{where}: out must be float32 or float64, got {out.dtype}")
        if out.device != g.device:
            raise ValueError(f"{where}: out must be on g's device {g.device}, got {out.device}")
        if isinstance(offset, bool):
            raise TypeError(f"{where}: offset must be an int, got bool")
        try:
            offset = operator.index(offset)
        except TypeError:
            raise TypeError(f"{where}: offset must be an int, got {type(offset).__name__}") from None
        if not 0 <= offset <= self.p - g.shape[1]:
            raise ValueError(
                f"{where}: the block must lie in [0, p) = [0, {self.p}): need 0 <= offset <= "
                f"{self.p - g.shape[1]} for {g.shape[1]} columns, got offset {offset}"
            )
        if g.shape[0] > 0 and g.shape[1] > 0:
            self._accumulate(g, out, offset)
        return out

    @abstractmethod
    def _accumulate(self, g: Tensor, out: Tensor, offset: int) -> None:
        """out += g @ P[:, offset : offset + g.shape[1]].T, arguments already checked (non-empty)."""

    def matrix(self, dtype: torch.dtype = torch.float64, device="cpu") -> Tensor:
        """The explicit matrix P, (k, p); for small p (tests, inspection).

        Built by projecting the identity in column blocks, so it is exactly the
        matrix :meth:`project` applies.
        """
        device = torch.device(device)
        out = torch.empty(self.k, self.p, dtype=dtype, device=device)
        for c0 in range(0, self.p, _DENSE_CHUNK):
            w = min(_DENSE_CHUNK, self.p - c0)
            block = torch.zeros(w, self.k, dtype=dtype, device=device)
            self.accumulate(torch.eye(w, dtype=dtype, device=device), block, c0)
            out[:, c0 : c0 + w] = block.T
        return out


class DenseProjector(Projector):
    """A dense Gaussian (N(0, 1/k)) or Rademacher (+-1/sqrt(k)) matrix, materialised.

    Memory is k * p numbers per (device, dtype) used, so this is for small p; use
    :class:`SparseJLProjector` for large p. Column chunk i of 1024 columns is drawn
    from generator stream i of the seed, in float64 on the CPU, then cast and moved.

    Args:
        p, k, seed, dtype: see :class:`Projector`.
        distribution: "gaussian" or "rademacher".
    """

    def __init__(self, p: int, k: int, *, seed: int = 0, dtype: Optional[torch.dtype] = None,
                 distribution: str = "gaussian"):
        super().__init__(p, k, seed=seed, dtype=dtype)
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(
                f"DenseProjector: distribution must be 'gaussian' or 'rademacher', got {distribution!r}"
            )
        self.distribution = distribution
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", distribution={self.distribution!r})"

    def _matrix(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (_device_key(device), dtype)
        if key not in self._cache:
            out = torch.empty(self.k, self.p, dtype=dtype, device=device)
            for i, c0 in enumerate(range(0, self.p, _DENSE_CHUNK)):
                w, gen = min(_DENSE_CHUNK, self.p - c0), _generator(self.seed, i)
                if self.distribution == "gaussian":
                    block = torch.randn(self.k, w, generator=gen, dtype=torch.float64)
                else:
                    block = torch.randint(0, 2, (self.k, w), generator=gen).double() * 2 - 1
                out[:, c0 : c0 + w] = block / math.sqrt(self.k)
            self._cache[key] = out
        return self._cache[key]

    def matrix(self, dtype: torch.dtype = torch.float64, device="cpu") -> Tensor:
        return self._matrix(dtype, torch.device(device)).clone()

    def _accumulate(self, g: Tensor, out: Tensor, offset: int) -> None:
        P = self._matrix(out.dtype, out.device)[:, offset : offset + g.shape[1]]
        out.addmm_(g.to(out.dtype), P.T)


class SparseJLProjector(Projector):
    """Kane and Nelson's sparse JL transform: s non-zeros +-1/sqrt(s) per column, never stored.

    The k rows are cut into s blocks; each column has one non-zero in every block,
    at a bucket and with a sign given by a SplitMix64 hash of (seed, column, block)
    (csrc/sjlt.h). Columns then have norm exactly 1 and independent signs, so
    ``E[P^T P] = I``. Projecting costs n * p * s additions (against 2 n p k for a
    dense matrix) and no memory beyond the output. The compiled kernels (OpenMP on
    the CPU, CUDA) give the same bits on both devices, for any number of threads,
    and for a gradient projected whole or in consecutive column pieces
    (:meth:`project_parts`).

    Args:
        p, k, seed, dtype: see :class:`Projector`; k <= 2**30.
        s: non-zeros per column, 1 <= s <= min(k, 64). s = 1 is CountSketch; larger s
            lowers the variance for inputs dominated by a few coordinates.
    """

    def __init__(self, p: int, k: int, *, s: int = 4, seed: int = 0, dtype: Optional[torch.dtype] = None):
        super().__init__(p, k, seed=seed, dtype=dtype)
        s = _positive_int("s", s, "SparseJLProjector")
        if s > min(k, ops.SJLT_MAX_S):
            raise ValueError(
                f"SparseJLProjector: s must be in [1, min(k, {ops.SJLT_MAX_S})], got s = {s}, k = {k}"
            )
        if k > ops.SJLT_MAX_K:
            raise ValueError(f"SparseJLProjector: k must be <= {ops.SJLT_MAX_K}, got {k}")
        self.s = s

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", s={self.s})"

    def _accumulate(self, g: Tensor, out: Tensor, offset: int) -> None:
        # The kernel reads the dtypes it supports itself (half inputs on CUDA, accumulated
        # in float32); otherwise the input is brought to the dtype of the results first.
        if not (ops.sjlt.supports(g.dtype, g.device) and out.dtype == ops.accumulation_dtype(g.dtype)):
            g = g.to(out.dtype)
        ops.sjlt_accumulate(g, out, self.s, self.seed, offset)


class KroneckerProjector(Projector):
    """``P = P_out kron P_in`` for one layer whose per-sample gradient is ``sum_t D_t A_t^T`` (d_out, d_in).

    The projected gradient is ``P_out (sum_t D_t A_t^T) P_in^T = sum_t (P_out D_t)(P_in A_t)^T``
    (k_out, k_in), flattened row-major to k = k_out * k_in numbers, which
    :meth:`project_captured` computes from the captured layer inputs A and
    output gradients D in ``n T (d_out k_out + d_in k_in + k_out k_in)``
    multiply-adds, never forming the (d_out, d_in) gradient (LoGra, Choe et al.
    2024). Both factors are Gaussian, N(0, 1/k_out) and N(0, 1/k_in), from
    generator streams 0 and 1 of the seed, so ``E[P^T P] = I``.

    :meth:`project` takes the gradient already formed, flattened row-major as
    (n, d_out * d_in) (a bias as the last input column, like
    :meth:`torchfluence.capture.Layer.matrices`); both routes apply the same P.

    Args:
        d_out, d_in: the layer's matrix shape (d_in counts a bias column).
        k_out, k_in: projected sizes of each side.
        seed, dtype: see :class:`Projector`.
    """

    def __init__(self, d_out: int, d_in: int, k_out: int, k_in: int, *, seed: int = 0,
                 dtype: Optional[torch.dtype] = None):
        where = "KroneckerProjector"
        self.d_out, self.d_in = _positive_int("d_out", d_out, where), _positive_int("d_in", d_in, where)
        self.k_out, self.k_in = _positive_int("k_out", k_out, where), _positive_int("k_in", k_in, where)
        super().__init__(d_out * d_in, k_out * k_in, seed=seed, dtype=dtype)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @classmethod
    def for_layer(cls, layer, k_out: int, k_in: int, *, seed: int = 0,
                  dtype: Optional[torch.dtype] = None) -> KroneckerProjector:
        """A projector for a captured :class:`torchfluence.capture.Layer` (d_in counts the bias)."""
        return cls(layer.d_out, layer.d_in_total, k_out, k_in, seed=seed, dtype=dtype)

    def __repr__(self) -> str:
        return (f"KroneckerProjector(d_out={self.d_out}, d_in={self.d_in}, k_out={self.k_out}, "
                f"k_in={self.k_in}, seed={self.seed}, dtype={self.dtype})")

    def factors(self, dtype: torch.dtype = torch.float64, device="cpu") -> tuple[Tensor, Tensor]:
        """(P_out (k_out, d_out), P_in (k_in, d_in)) in `dtype` on `device` (cached; do not modify)."""
        device = torch.device(device)
        key = (_device_key(device), dtype)
        if key not in self._cache:
            f64 = torch.float64
            p_out = torch.randn(self.k_out, self.d_out, generator=_generator(self.seed, 0), dtype=f64)
            p_in = torch.randn(self.k_in, self.d_in, generator=_generator(self.seed, 1), dtype=f64)
            self._cache[key] = (
                (p_out / math.sqrt(self.k_out)).to(device=device, dtype=dtype),
                (p_in / math.sqrt(self.k_in)).to(device=device, dtype=dtype),
            )
        return self._cache[key]

    def project_captured(self, A: Tensor, D: Tensor) -> Tensor:
        """Projected per-sample gradients from a layer's capture, without forming the gradients.

        Args:
            A: (n, T, d_in) layer inputs per sample and position.
            D: (n, T, d_out) gradients of each sample's loss w.r.t. the layer outputs; A's device.

        Returns:
            (n, k_out * k_in): row i is the row-major flattening of
            ``sum_t (P_out D[i, t]) (P_in A[i, t])^T``, in :meth:`result_dtype` of A's dtype.

        Raises:
            TypeError, ValueError: naming the argument, the expected and the actual value.
        """
        where = "KroneckerProjector.project_captured"
        for name, t, width in (("A", A, ("d_in", self.d_in)), ("D", D, ("d_out", self.d_out))):
            if not isinstance(t, Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{where}: {name} must have a floating dtype, got {t.dtype}")
            if t.dim() != 3 or t.shape[2] != width[1]:
                raise ValueError(
                    f"{where}: {name} must have shape (n, T, {width[0]}) = (n, T, {width[1]}), got "
                    f"{tuple(t.shape)}"
                )
        if A.shape[:2] != D.shape[:2]:
            raise ValueError(
                f"{where}: A (n, T, d_in) and D (n, T, d_out) must agree in n and T, got "
                f"{tuple(A.shape)} and {tuple(D.shape)}"
            )
        if A.device != D.device:
            raise ValueError(f"{where}: D must be on A's device {A.device}, got {D.device}")
        dtype = self.result_dtype(A.dtype)
        p_out, p_in = self.factors(dtype, A.device)
        pa = A.to(dtype) @ p_in.T  # (n, T, k_in)
        pd = D.to(dtype) @ p_out.T  # (n, T, k_out)
        return torch.bmm(pd.transpose(1, 2), pa).reshape(A.shape[0], self.k)

    def _accumulate(self, g: Tensor, out: Tensor, offset: int) -> None:
        # The block covers gradient rows o0 .. o1 - 1, possibly partially at either
        # end: it is placed into zero-padded whole rows, which P_out[:, rows] X P_in^T projects.
        n, width = g.shape
        o0, o1 = offset // self.d_in, (offset + width - 1) // self.d_in + 1
        lead = offset - o0 * self.d_in
        p_out, p_in = self.factors(out.dtype, out.device)
        if lead == 0 and width == (o1 - o0) * self.d_in:
            x = g.to(out.dtype).reshape(n, o1 - o0, self.d_in)
        else:
            x = torch.zeros(n, (o1 - o0) * self.d_in, dtype=out.dtype, device=out.device)
            x[:, lead : lead + width] = g
            x = x.view(n, o1 - o0, self.d_in)
        out += (p_out[:, o0:o1] @ x @ p_in.T).reshape(n, self.k)
