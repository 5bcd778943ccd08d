"""The influence-function model interface shared by every solver.

For a test point z and a training point z_j, with H the Hessian (or the
Gauss-Newton matrix) of the mean training loss and lambda the regularization,

    influences[i, j] = grad L(z_test_i)^T (H + lambda I)^-1 grad L(z_j)

(the sign convention of pyDVL). Up-weighting z_j by a small eps changes the
test loss by about -eps * influences[i, j], so a positive value means z_j is
*helpful* to z_test_i (it lowers the loss) and a negative one *harmful*.
Koh & Liang's I_up,loss is the negative of this number.

The engine is four parts, each chosen once at construction:

    data (:mod:`.data`)  ->  gradient source (:mod:`.gradients`)
        ->  curvature operator (:mod:`.curvature`) inside the solver  ->  sinks (:mod:`.sinks`)

Every scoring job runs through :func:`torchfluence.scoring.run_blocks`, the one
loop that scores blocks of samples and hands them to the sinks. What a solver
class declares about itself (its options, traits and fitted state) is the
contract of :mod:`torchfluence.contract`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

from ._functional import LossFn, ModelFunctions, resolve_dtype
from .backbone import BackboneFeatures, HeadSpec, split_trainable_tail
from .budget import query_rows
from .checks import FiniteChecks, check_finite, check_mode, check_positive_int, check_regularization
from .exceptions import NotFittedException
from .contract import COMMON_FIT_OPTIONS, SolverOptions, SolverTraits, plain
from .curvature import CurvatureOperator, curvature_operator
from .data import Batch, DataSource, SampleBlock, Samples
from .distributed import all_reduce_sum, local_blocks
from .durable import model_fingerprint
from .gradients import GradientSource, PreparedQueries, gradient_source
from .journal import JobSpec, ScoreFile, TopKCheckpoint
from .linear_head import loss_kind
from .parameter_blocks import BlockStructure
from .persist import MissingTrainData, load_solver, save_solver
from .precision import check_score_dtype, matmul_precision
from .projected_space import Projection, describe_projection, projected_engine, resolve_second_order
from .query_cache import QueryCache
from .scoring import Output, Runtime, finished, result_sink, run_blocks, score_into
from .sinks import DenseSink, RowsSink, TopKSink

SecondOrder = Literal["hessian", "gauss_newton", "empirical_fisher"]
Mode = Literal["up", "perturbation"]


@dataclass
class TopKInfluences:
    """The k most helpful and most harmful training points for each test point.

    Attributes:
        helpful_indices, helpful_values: (n_test, k), largest influence first.
        harmful_indices, harmful_values: (n_test, k), most negative first.
        scores: the (n_test, n_train) matrix the ranking was made from, when
            :meth:`InfluenceFunctionModel.top_k` was asked for it (``with_scores=True``).
        self_influences: (n_train,) each training sample's self-influence, when asked for
            (``with_self_influences=True``); equal to :meth:`InfluenceFunctionModel.self_influences`.
    Indices count training samples in the order the data yields them.
    """

    helpful_indices: Tensor
    helpful_values: Tensor
    harmful_indices: Tensor
    harmful_values: Tensor
    scores: Optional[Tensor] = None
    self_influences: Optional[Tensor] = None


class FactorChecks(NamedTuple):
    """The NaN/inf checks of one preparation of test factors (deferred on a GPU)."""

    gradients: FiniteChecks  # the test points' per-sample gradients
    factors: FiniteChecks  # their solves


class InfluenceFunctionModel(ABC):
    """Base class: curvature from training data, solves, and scores.

    Args:
        model: a trained ``nn.Module`` (call ``model.eval()`` first).
        loss: ``loss(outputs, targets)`` returning the mean loss of the batch.
        regularization: lambda >= 0 added to the curvature's diagonal; with `block_structure`, one
            number for every block or ``{block name: lambda}`` with one entry per block.
        params: names of the parameters to use (default: all with ``requires_grad``);
            in head mode, names inside the head.
        second_order: ``"hessian"``, ``"gauss_newton"`` (the generalised
            Gauss-Newton matrix J^T H_out J, positive semi-definite for convex losses) or
            ``"empirical_fisher"`` (the mean of per-sample gradient outer products
            (1/n) sum_i g_i g_i^T, positive semi-definite for any loss:
            :class:`~torchfluence.curvature.EmpiricalFisher`).
            None (default): ``"hessian"``; with a `projector` always ``"fisher"``, the Fisher
            of the projected gradients (``"hessian"`` is refused there: :mod:`torchfluence.projected_space`).
        dtype: computation dtype, float32 or float64; None (default): the model's.
        block_size: samples per block; bounds memory at about block_size x num_params values.
        progress: show tqdm progress bars on long loops.
        fused: score the parameters of captured layers (``nn.Linear``, ``nn.Conv1d/2d/3d``,
            registered types) from their inputs and output gradients
            (:func:`torchfluence.psg_dot`) without per-sample gradients in memory;
            the other parameters go through ``torch.func``. False: ``torch.func`` for all.
        head: head mode: the backbone runs once per sample and the solver works on
            the trainable head alone. A module, its name, or ``"auto"`` (the
            trainable tail behind the frozen part). None (default): automatic when
            ``params`` is not given and the trainable parameters form such a tail
            (found by tracing the model with ``torch.fx``); False: never.
            Results equal the generic path's.
        cache_dir: head mode: memory-map the training features there.
        curvature: a :class:`~torchfluence.curvature.CurvatureOperator` class to use
            instead of the one ``second_order`` picks (it is built on this solver's
            model functions). K-FAC and EK-FAC fit Kronecker factors and ignore it.
        score_dtype: operand dtype of the scoring products (test factors against
            training gradients): None (default) for the computation dtype, or
            ``torch.bfloat16`` / ``torch.float16`` for tensor-core GEMMs on a GPU. Scores
            are accumulated and returned in float32 either way; expect ~1e-2 relative
            error per score with bfloat16 (rankings agree to ~0.99 rank correlation).
            Fitting and solving stay in the computation dtype.
        allow_tf32: let CUDA float32 matrix products run in TF32. False (default):
            they run in IEEE float32 whatever the process-wide torch flag says.
        output_transform: ``raw_output -> Tensor`` applied to what ``model(x)`` returns
            before the loss sees it, in every path (torch.func and captured layers).
            None (default): a Tensor is used as it is, a tuple or list gives its first
            element, a dict or Hugging Face ``ModelOutput`` its ``"logits"`` (any other
            object its ``.logits``); other outputs raise a TypeError asking for this
            argument. The loss always receives a Tensor.
        projector: work in a projected gradient space (:mod:`torchfluence.projected_space`):
            a :class:`~torchfluence.Projector` whose ``p`` is the number of selected
            parameters, or a :class:`~torchfluence.KroneckerProjection` (one
            ``P_out kron P_in`` per captured layer, LoGra). Per-sample gradients are
            then k-vectors ``P g_i`` (:attr:`num_params` is k), the curvature is their
            Fisher ``(1/n) sum_i (P g_i)(P g_i)^T`` (K-FAC / EK-FAC: Kronecker factors
            of the projected inputs and output gradients), and factors and scores live
            in the k-space. None (default): no projection.
        block_structure: a block-diagonal curvature (the solvers whose ``traits.accepts_block_structure``
            is set): ``"layer"``, ``"parameter"``, ``"full"`` or ``{block name: [parameter names]}``
            (:mod:`torchfluence.parameter_blocks`). The curvature of each block of parameters
            is solved on its own, with its own regularization, and the terms between blocks
            are dropped; factors stay flat in the parameter order. None (default): the
            full curvature. Not with `projector` (a projection mixes the parameters).

    Language models: inputs may be integer token ids (n, T); they are never cast.
    With per-token targets (n, T) padded with -100, a loss such as
    ``lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)``
    is taken sample by sample: each sequence's loss is the mean over its own
    unmasked tokens, and the objective is the mean over sequences. An attention mask
    travels inside x: stack ``(input_ids, attention_mask)`` into one (n, 2, T) long
    tensor and unpack it in a wrapper module's forward.
    """

    # The solver contract (torchfluence.contract): each solver class declares these.
    Options: ClassVar[type[SolverOptions]] = SolverOptions  # the class's own constructor options
    traits: ClassVar[SolverTraits] = SolverTraits()

    def __init__(self, model: nn.Module, loss: LossFn, regularization: float = 0.0, *,
                 params: Optional[Sequence[str]] = None, second_order: Optional[SecondOrder] = None,
                 dtype: Optional[torch.dtype] = None, block_size: int = 256, progress: bool = False,
                 fused: bool = True, head: Union[None, bool, HeadSpec] = None,
                 cache_dir: Optional[Union[str, Path]] = None,
                 curvature: Optional[type[CurvatureOperator]] = None,
                 score_dtype: Optional[torch.dtype] = None, allow_tf32: bool = False,
                 output_transform: Optional[Callable[..., Tensor]] = None,
                 projector: Optional[Projection] = None,
                 block_structure: Optional[BlockStructure] = None) -> None:
        second_order = resolve_second_order(second_order, projector, curvature)
        if block_structure is not None:
            self.traits.check_block_structure(type(self).__name__, projector)
        self.regularization = check_regularization(regularization)
        if not isinstance(allow_tf32, bool):
            raise TypeError(f"allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
        self.allow_tf32 = allow_tf32
        self.block_size = check_positive_int(block_size, "block_size")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.second_order, self.progress, self.fused = second_order, progress, fused
        self.model = model  # the model as given (in head mode, backbone and head)
        # The last query set's prepared factors (torchfluence.query_cache); set False to keep none.
        self.cache_queries = True
        self._query_cache = QueryCache()  # emptied by every fit or restore
        self.features: Optional[BackboneFeatures] = None
        self._full_model: Optional[nn.Module] = None  # for mode="perturbation" in automatic head mode
        split = None
        if head is None and params is None and cache_dir is None:
            split = split_trainable_tail(model)
            if split is not None:
                head, self._full_model = "auto", model
        if head is True:
            head = "auto"
        if head is not None and head is not False:
            if cache_dir is not None and not isinstance(cache_dir, (str, Path)):
                raise TypeError(f"cache_dir must be a path, got {type(cache_dir).__name__}")
            trainable = [p for p in model.parameters() if p.requires_grad] or list(model.parameters())
            self.features = BackboneFeatures(model, head, resolve_dtype(dtype, trainable), cache_dir, progress,
                                             split=split)
            model = self.features.head
        elif cache_dir is not None:
            raise ValueError("cache_dir is for head mode: pass head= too")
        self.functions = ModelFunctions(model, loss, params, dtype, output_transform)
        self.score_dtype = check_score_dtype(score_dtype, self.functions.dtype)
        check_finite(self.functions.theta, "model parameters", -1)
        self.source: GradientSource = gradient_source(self.functions, fused)
        if curvature is not None and not (isinstance(curvature, type) and issubclass(curvature, CurvatureOperator)):
            raise TypeError(f"curvature must be a CurvatureOperator subclass, got {curvature!r}")
        self.curvature_operator: CurvatureOperator = (curvature_operator(self.functions, second_order)
                                                      if curvature is None else curvature(self.functions))
        self.projector = projector
        if projector is not None:
            if not self.traits.accepts_projector:
                raise ValueError(f"{type(self).__name__} does not take projector=: {self.traits.projector_refusal}")
            self.source, self.curvature_operator = projected_engine(self.functions, self.source, projector)
        self._loss_kind = loss_kind(loss)
        self._classes: Optional[int] = None
        self.n_train: Optional[int] = None
        self._train: Optional[Samples] = None
        self._train_source: Optional[DataSource] = None  # what fit was given, to reuse its blocks

    # -- properties ---------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Length of the gradient vectors the solver works with: the selected parameters, or k with a projector."""
        return self.source.num_params

    @property
    def is_fitted(self) -> bool:
        return self.n_train is not None

    @property
    def device(self) -> torch.device:
        return self.functions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.functions.dtype

    @property
    def runtime(self) -> Runtime:
        """How this solver's scoring jobs run: result dtype and device, progress bars, matmul precision."""
        return Runtime(self.dtype, self.device, bool(self.progress), self.allow_tf32)

    def model_fingerprint(self) -> str:
        """A hash of the model's parameters and buffers (:func:`torchfluence.durable.model_fingerprint`)."""
        return model_fingerprint(self.model)

    def to(self, device: Union[str, torch.device]) -> "InfluenceFunctionModel":
        """Moves the model, and the fitted state if any, to `device`; returns self.

        The solver is rebuilt on the moved model from its constructor options, and a fitted
        one gets its fitted state back (:meth:`fitted_state`) on the new device.
        """
        device = torch.device(device)
        if device.type == self.device.type and (device.index is None or device.index == self.device.index):
            return self
        if self.features is not None or self.projector is not None:
            raise NotImplementedError(f"{type(self).__name__}.to({str(device)!r}): a solver in head mode or with "
                                      "a projector is moved by building it again on the moved model")
        state = self.fitted_state() if self.is_fitted else None
        fitted = (self.n_train, self._classes, self._train, self._train_source)
        loss = getattr(self, "loss", None) or self.functions.loss
        moved = type(self).from_constructor_options(self.model.to(device), loss, self.constructor_options())
        self.__dict__.update(moved.__dict__)
        if state is not None:
            n_train, classes, train, source = fitted
            self.restore(state[0], state[1], n_train=n_train, classes=classes, train=train, train_source=source)
        return self

    # -- data ---------------------------------------------------------------------------------------
    def samples(self, data: DataSource, name: str = "data") -> Samples:
        """`data` as :class:`~torchfluence.data.Samples` of ``block_size`` blocks, with head-mode features."""
        return Samples(data, name, self.block_size, check=self._check_targets, transform=self.features)

    def _check_targets(self, x: Tensor, y: Tensor, offset: int) -> None:
        """Class-index targets of a cross-entropy loss: integer and in range."""
        if isinstance(y, Batch):  # dict and tuple batches: the loss finds its targets (ModelFunctions.sample_loss)
            return
        if self._loss_kind != "cross_entropy" or y.is_floating_point() and y.dim() > 1:
            return  # other losses check their own targets; (n, C) float targets are probabilities
        if y.dtype != torch.long:
            raise TypeError(f"targets for cross_entropy must be class indices of dtype torch.long (int64), got "
                            f"{y.dtype} of shape {tuple(y.shape)}")
        if self._classes is not None and y.numel():
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self._classes:
                bad = int(((y < 0) | (y >= self._classes)).nonzero()[0][0])
                where = f"sample {offset + bad}" if offset >= 0 else f"position {bad} of a batch"
                raise ValueError(f"targets must be class indices in [0, {self._classes}) for the model's "
                                 f"{self._classes} outputs, got {int(y[bad])} at {where}")

    def _inputs(self, x: Tensor, y: Tensor, name: str) -> Samples:
        return self.samples((x, y), name)

    def _scored_samples(self, x: Tensor, y: Tensor) -> Samples:
        """(x, y) as Samples; in head mode, the cached features when (x, y) is exactly the fitted data.

        A user who fitted on ``DataLoader(TensorDataset(x, y))`` (or on ``(x, y)``) and then
        scores ``x, y`` gets the features cached at fit time instead of a second backbone
        pass. Only the same tensor objects, read in order by the default sampler and
        collate function, count as the fitted data.
        """
        if self.features is not None and self._train is not None and _same_data(self._train_source, x, y):
            return self._train
        return self._inputs(x, y, "x, y")

    # -- fitting ------------------------------------------------------------------------------------
    def fit(self, train_data: DataSource) -> "InfluenceFunctionModel":
        """Computes what the solver needs from the training data.

        Args:
            train_data: a DataLoader of (x, y) batches, an (x, y) pair of tensors, or a
                Dataset of (x, y) items. The curvature is that of the mean training loss:
                each block's curvature is weighted by its size.
        """
        # Head mode reads raw inputs once here, to cache their features.
        samples = Samples(train_data, "train_data", self.block_size, check=self._check_targets)
        samples.require_reiterable(f"{type(self).__name__}.fit")
        first = next(samples.batches(), None)
        if first is None:
            raise ValueError("train_data is empty: it yielded no samples")
        x, y = first[0][:1], first[1][:1]
        check_finite(x, "train_data inputs", 0)
        self._check_targets(x, y, 0)
        outputs = self.functions.check_loss(x if self.features is None else self.features(x), y)
        if self._loss_kind == "cross_entropy" and outputs.dim() == 2:
            self._classes = outputs.shape[1]
        samples.validate_in_memory()
        if self.features is not None:
            samples = self.features.cache(samples)
        self._train_source = train_data
        return self.fit_samples(samples)

    def fit_samples(self, samples: Samples) -> "InfluenceFunctionModel":
        """:meth:`fit` on data already in the solver's input space (for solvers built on another's data)."""
        self.n_train = samples.count()
        self._train = samples
        self._query_cache.clear()  # its factors belong to the previous fit
        with matmul_precision(self.allow_tf32):
            self._fit(samples)
        return self

    def forget_queries(self) -> None:
        """Frees the prepared factors kept from the last query set (see :attr:`cache_queries`)."""
        self._query_cache.clear()

    def _fit(self, train: Samples) -> None:  # noqa: B027 - optional hook
        """Solver-specific work at fit time (default: none)."""

    def _require_fitted(self) -> Samples:
        if self._train is None:
            raise NotFittedException(f"{type(self).__name__} is not fitted: call .fit(train_loader) first")
        return self._train

    # -- curvature ----------------------------------------------------------------------------------
    def curvature_vp(self, vectors: Tensor, data: Optional[Samples] = None) -> Tensor:
        """H times each row of `vectors` (k, p) over all training data, without regularization."""
        data = self._require_fitted() if data is None else data
        n = data.count()
        total = torch.zeros_like(vectors)
        for block in local_blocks(data):
            total += (block.size / n) * self.curvature_operator.batch_vp(vectors, block.x, block.y)
        return all_reduce_sum(total)

    # -- gradients ----------------------------------------------------------------------------------
    def grads(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample gradients of the loss, (n, p), computed block_size samples at a time."""
        samples = self._inputs(x, y, "x, y")
        out = torch.empty(samples.count(), self.num_params, dtype=self.dtype, device=self.device)
        for block in samples.blocks():
            rows = out[block.offset:block.offset + block.size]
            self.source.grads(block.x, block.y, out=rows)
            check_finite(rows, "per-sample gradients", block.offset)
        return out

    # -- solving ------------------------------------------------------------------------------------
    @abstractmethod
    def solve(self, vectors: Tensor) -> Tensor:
        """(H + lambda I)^-1 times each row of `vectors`, (k, p) -> (k, p)."""

    def influence_factors(self, x_test: Tensor, y_test: Tensor) -> Tensor:
        """Preconditioned test gradients (H + lambda I)^-1 grad L(z_test), (n_test, p)."""
        self._require_fitted()
        with matmul_precision(self.allow_tf32):
            factors = self.solve(self.grads(x_test, y_test))
        check_finite(factors, "influence factors", 0)
        return factors

    def _factor_rows(self) -> int:
        """Test rows per block of factors: a block holds its gradients and their solve, 2 x rows x p values.

        At most ``block_size``, and within :func:`torchfluence.budget.query_rows`: with millions
        of parameters a full block of test gradients would not fit beside the scoring layout.
        """
        return query_rows(self.num_params, self.dtype, self.device, copies=2, most=self.block_size)

    def _prepared_factors(self, x_test: Tensor, y_test: Tensor) -> PreparedQueries:
        """The test factors laid out for scoring, in the scoring dtype; reused when the last call
        had the same query tensors and the solver is unchanged since (:mod:`torchfluence.query_cache`).

        Every scoring call on a query set comes through here, so ``train_influences`` then
        ``top_k`` on the same ``x_test, y_test`` solves the queries once. The entry is kept
        until the next query set, a refit, :meth:`forget_queries`, or ``cache_queries = False``.
        """
        self._require_fitted()
        if not self.cache_queries:
            self._query_cache.clear()
            return self._prepare_factors(x_test, y_test)
        return self._query_cache.get_or_prepare((x_test, y_test), self._solver_state(),
                                                lambda: self._prepare_factors(x_test, y_test))

    def _solver_state(self) -> tuple:
        """What the prepared factors depend on besides the queries and the fit (a fit empties the
        cache): the settings, the device and the parameters (torch's version counters change
        with every in-place update)."""
        settings = json.dumps(plain(self.settings()), sort_keys=True, default=str)
        versions = tuple(p._version for p in self.model.parameters())
        return settings, str(self.device), versions, self.functions.theta._version

    def _prepare_factors(self, x_test: Tensor, y_test: Tensor) -> PreparedQueries:
        """The test factors laid out for scoring, in the scoring dtype.

        A solver whose solve treats each row on its own (``traits.solves_rows_independently``)
        computes them :meth:`_factor_rows` test points at a time, straight into the scoring
        layout, so the (n_test, p) factors in the computation dtype are never held beside it.
        """
        self._require_fitted()
        dtype = self.score_dtype or self.dtype
        if not self.traits.solves_rows_independently:
            return self.source.prepare(self.influence_factors(x_test, y_test), dtype)
        samples = Samples((x_test, y_test), "x_test, y_test", self._factor_rows(), check=self._check_targets,
                          transform=self.features)
        prepared = self.source.allocate_queries(samples.count(), dtype)
        # On a GPU the checks are read once at the end: no host sync per block or layer.
        checks = FactorChecks(FiniteChecks("per-sample gradients"), FiniteChecks("influence factors"))
        with matmul_precision(self.allow_tf32):
            for block in samples.blocks():
                self._write_factor_block(prepared, block, checks)
        checks.gradients.finish()
        checks.factors.finish()
        return prepared

    def _write_factor_block(self, prepared: PreparedQueries, block: SampleBlock, checks: "FactorChecks") -> None:
        """Writes the factors of one block of test points into their rows of `prepared`."""
        g = self.source.grads(block.x, block.y)
        checks.gradients.add(g, block.offset)
        factors = self.solve(g)
        del g
        checks.factors.add(factors, block.offset)
        self.source.write_queries(prepared, factors, block.offset)

    # -- scores -------------------------------------------------------------------------------------
    def influences(self, x_test: Tensor, y_test: Tensor, x: Optional[Tensor] = None,
                   y: Optional[Tensor] = None, mode: Mode = "up", *, out: Output = None) -> Tensor:
        """Influence of each (x, y) on each test point.

        Args:
            x_test, y_test: (n_test, ...) test inputs and targets.
            x, y: (n, ...) training inputs and targets (default: the test points).
            mode: ``"up"`` (up-weighting) or ``"perturbation"`` (input perturbation).
            out: optional path of a ``.npy`` file to write the result into block by
                block (memory-mapped); the returned tensor shares its pages. The job is
                resumable: ``<out>.progress.json`` records the finished blocks, and the same
                call with the same `out` goes on where an interrupted one stopped, with the
                same result bits (a finished job's file is returned as it is). Another model,
                other data or other settings are refused (:mod:`torchfluence.journal`).

        Returns:
            (n_test, n) for ``"up"``; (n_test, n, *x.shape[1:]) for ``"perturbation"``.
        """
        if (x is None) != (y is None):
            raise ValueError("x and y must be given together (or both left out to use the test points)")
        check_mode(mode)
        if x is None:
            x, y = x_test, y_test
        if mode == "up":
            self._require_fitted()
            samples = self._scored_samples(x, y)
            spec = JobSpec("influences", (x_test, y_test), (x, y))
            return self._up_scores(lambda: self._prepared_factors(x_test, y_test), samples, out, spec)
        self._check_perturbation()
        return self.influences_from_factors(self.influence_factors(x_test, y_test), x, y, mode=mode, out=out)

    def influences_from_factors(self, factors: Tensor, x: Tensor, y: Tensor, mode: Mode = "up", *,
                                out: Output = None) -> Tensor:
        """Scores of (x, y) against precomputed factors (n_test, p); `out` as in :meth:`influences`.

        Returns:
            (n_test, n) for ``"up"``; (n_test, n, *x.shape[1:]) for ``"perturbation"``.
        """
        self._require_fitted()
        check_mode(mode)
        factors = self._check_factors(factors)
        samples = self._scored_samples(x, y)
        n = samples.count()
        spec = JobSpec("influences_from_factors", (factors,), (x, y), mode)
        if mode == "up":
            return self._up_scores(lambda: self.source.prepare(factors, self.score_dtype), samples, out, spec)
        self._check_perturbation()
        functions = self._perturbation_functions()
        raw = Samples((x, y), "x, y", self.block_size, check=self._check_targets)  # gradients need the inputs
        sink, journal = self._result_sink((factors.shape[0], n, *x.shape[1:]), out, spec, sample_dim=1)
        score_into(raw, lambda b: functions.perturbation_scores(factors, b.x, b.y), [sink], "perturbation scores",
                   self.runtime, journal=journal, sample_dim=1)
        return finished(sink, journal)

    def scores_from_factors(self, factors: Tensor, data: DataSource, *, out: Output = None) -> Tensor:
        """Mode-"up" scores of every sample of `data` against precomputed factors, in one pass.

        Like :meth:`influences_from_factors`, for data of any supported kind (a DataLoader,
        an ``(x, y)`` pair, a Dataset, batches) read once, in order.

        Args:
            factors: (n_test, p) from :meth:`influence_factors`.
            data: the samples to score.
            out: optional ``.npy`` file to write the matrix into (memory-mapped; not resumable).

        Returns:
            (n_test, n) scores.
        """
        self._require_fitted()
        factors = self._check_factors(factors)
        samples = self.samples(data, "data")
        sink, _ = result_sink((factors.shape[0], samples.count()), out, self.runtime, sample_dim=1)
        prepared = self.source.prepare(factors, self.score_dtype)
        run_blocks(samples, self._block_scorer(prepared), [sink], "influence scores", self.runtime)
        return sink.result()

    def per_token_influences(self, x_test: Tensor, y_test: Tensor, x: Optional[Tensor] = None,
                             y: Optional[Tensor] = None) -> Tensor:
        """Influence of each training sequence on each test point, split over its tokens.

        ``result[q, j, t]`` is the part of the influence carried through position t of
        sequence j: each captured layer's per-position term ``<Q, g_t a_t^T>`` of its
        gradient, contracted with the preconditioned query, summed over layers (as
        kronfluence's ``compute_per_token_scores``). It sums over t to :meth:`influences`;
        it equals the score of token t's own loss term where positions do not interact;
        with a loss that averages a sequence's N tokens it is the token-summed loss's score
        divided by N (:mod:`torchfluence.per_token`). Needs every selected parameter in a
        captured layer (K-FAC/EK-FAC's default), refused otherwise.

        Args:
            x_test, y_test: (n_test, T, ...) test inputs and targets.
            x, y: (n, T, ...) training sequences and targets (default: the test points).

        Returns:
            (n_test, n, T).
        """
        from .per_token import per_token_scores
        if (x is None) != (y is None):
            raise ValueError("x and y must be given together (or both left out to use the test points)")
        self._require_fitted()
        if x is None:
            x, y = x_test, y_test
        return per_token_scores(self, lambda: self._prepared_factors(x_test, y_test), x, y)

    def per_token_influences_from_factors(self, factors: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """:meth:`per_token_influences` against precomputed factors (n_test, p); returns (n_test, n, T)."""
        from .per_token import per_token_scores
        self._require_fitted()
        factors = self._check_factors(factors)
        return per_token_scores(self, lambda: self.source.prepare(factors, self.score_dtype), x, y)

    def _up_scores(self, prepare: Callable[[], PreparedQueries], samples: Samples, out: Output,
                   spec: JobSpec) -> Tensor:
        """(n_test, n) scores against the factors `prepare()` lays out; a finished `out` job skips them."""
        factors = prepare() if out is None else None
        n_test = spec.count() if factors is None else factors.count
        sink, journal = self._result_sink((n_test, samples.count()), out, spec, sample_dim=1)
        if journal is None or not journal.complete:
            factors = prepare() if factors is None else factors
            if journal is not None:
                journal.check_factors(factors.parts)
            run_blocks(samples, self._block_scorer(factors), [sink], "influence scores", self.runtime,
                       journal=journal)
        return finished(sink, journal)

    def _block_scorer(self, factors: PreparedQueries) -> Callable[[SampleBlock], Tensor]:
        """``block -> (n_test, b)`` scores of a block of training samples against prepared test factors."""
        return lambda block: self.source.score_block(factors, block.x, block.y)

    def _result_sink(self, shape: tuple[int, ...], out: Output, spec: JobSpec, *,
                     sample_dim: int) -> tuple[DenseSink, Optional[ScoreFile]]:
        """The sink of a dense result of `shape`: in memory, or `out`, a resumable job described by `spec`."""
        return result_sink(shape, out, self.runtime, sample_dim=sample_dim,
                           open_job=lambda path: ScoreFile.open(path, self, spec, shape, sample_dim))

    def _perturbation_functions(self) -> ModelFunctions:
        """The model as a function of the parameters (the full model in automatic head mode)."""
        if self._full_model is None:
            return self.functions
        prefix = "" if self.features.backbone is not None else f"{self.features.head_name}."
        f = self.functions
        return ModelFunctions(self._full_model, f.loss, [prefix + name for name in f.names], f.dtype,
                              output_transform=f.output_transform)

    def _check_perturbation(self) -> None:
        if self.projector is not None:
            raise ValueError("mode='perturbation' differentiates the scores with respect to the inputs in parameter "
                             "space, which a projector leaves; use mode='up', or a solver without projector=")
        if self.features is not None and self._full_model is None:
            raise ValueError("head mode supports mode='up' only: mode='perturbation' needs gradients through the "
                             "backbone; use the solver on the full model without head=")

    def train_influences(self, x_test: Tensor, y_test: Tensor, *, out: Output = None) -> Tensor:
        """(n_test, n_train) influences of every fitted training sample.

        In head mode, from the cached features. `out` (a resumable ``.npy`` job) as in :meth:`influences`.
        """
        train = self._require_fitted()
        spec = JobSpec("train_influences", (x_test, y_test), self._train_source)
        return self._up_scores(lambda: self._prepared_factors(x_test, y_test), train, out, spec)

    def self_influences(self, x: Tensor, y: Tensor) -> Tensor:
        """grad L(z_j)^T (H + lambda I)^-1 grad L(z_j) for each sample, (n,)."""
        self._require_fitted()
        samples = self._inputs(x, y, "x, y")
        sink = DenseSink((samples.count(),), dtype=self.dtype, device=self.device)
        run_blocks(samples, self._self_influence_block, [sink], "self-influences", self.runtime)
        return sink.result()

    def _self_influence_block(self, block: SampleBlock) -> Tensor:
        g = self.source.grads(block.x, block.y)
        return (g * self.solve(g)).sum(dim=1)

    def _scores_and_self_influences(self, factors: PreparedQueries, block: SampleBlock) -> Tensor:
        """(n_test + 1, b): the block's scores against prepared test factors, then its samples'
        self-influences as the last row. Solvers that get both from one capture override this."""
        scores = self.source.score_block(factors, block.x, block.y)
        return torch.cat([scores, self._self_influence_block(block).to(scores.dtype).unsqueeze(0)])

    def top_k(self, x_test: Tensor, y_test: Tensor, train_data: Optional[DataSource] = None,
              k: int = 10, *, checkpoint: Output = None, with_scores: bool = False,
              with_self_influences: bool = False, out: Output = None) -> TopKInfluences:
        """The k most helpful and harmful training points per test point, streamed.

        Score blocks of the training data are merged into running top-k lists, so
        the (n_test, n_train) matrix is never held unless it is asked for.

        Args:
            train_data: the training data to rank (default: the fitted data, whose
                head-mode features are cached); a one-shot iterable is fine here, it is read once.
            k: how many on each side, at most the number of training samples.
            checkpoint: optional path of a ``.safetensors`` file that makes the job resumable:
                the running top-k state is saved there as blocks finish, and the same call
                with the same path goes on from it, with the same result bits as an
                uninterrupted run (a finished job returns at once). Another model, other data
                or other settings are refused (:mod:`torchfluence.journal`).
            with_scores: also keep the full (n_test, n_train) matrix, filled by the same pass
                over the training data (:attr:`TopKInfluences.scores`); equal to
                :meth:`train_influences` / :meth:`influences` on the same data.
            with_self_influences: also each training sample's self-influence
                (:attr:`TopKInfluences.self_influences`), from the same pass: K-FAC and EK-FAC
                take both from one forward and backward per block; the others add their
                own self-influence work per block (:meth:`self_influences`).
            out: with `with_scores`, a ``.npy`` file to write the matrix into (memory-mapped;
                the returned tensor shares its pages). Not resumable: use
                ``influences(..., out=)`` for a resumable matrix.
        """
        check_positive_int(k, "k")
        for name, flag in (("with_scores", with_scores), ("with_self_influences", with_self_influences)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if out is not None and not with_scores:
            raise ValueError("out is where the matrix of with_scores=True goes; pass with_scores=True too")
        if with_scores and checkpoint is not None:
            raise ValueError("checkpoint= resumes the top-k state alone; with with_scores=True score the matrix "
                             "resumably with influences(..., out=) or train_influences(..., out=) instead")
        if with_self_influences and checkpoint is not None:
            raise ValueError("checkpoint= resumes the top-k state alone; drop with_self_influences=True, or "
                             "compute them apart with self_influences()")
        same = train_data is None or train_data is self._train_source
        train = self._require_fitted() if same else self.samples(train_data, "train_data")
        known = train.known_count()
        if known is not None and k > known:
            raise ValueError(f"k must be at most the number of training samples ({known}), got {k}")
        journal = None
        if checkpoint is not None:
            data = self._train_source if same else train_data
            spec = JobSpec("top_k", (x_test, y_test), data, extra={"k": k})
            journal = TopKCheckpoint.open(checkpoint, self, spec, k, known)
        factors = None
        if journal is None or not journal.complete:
            factors = self._prepared_factors(x_test, y_test)
            if journal is not None:
                journal.check_factors(factors.parts)
        sink = journal.sink if journal is not None else TopKSink(factors.count, k, dtype=self.dtype,
                                                                 device=self.device)
        sinks, matrix, selves = [sink], None, None
        if with_scores:
            matrix, _ = result_sink((factors.count, train.count()), out, self.runtime, sample_dim=1)
            sinks.append(matrix)
        scorer, what = self._block_scorer(factors) if factors is not None else None, "top-k"
        if with_self_influences:  # one more row per block: the training samples' self-influences
            selves = DenseSink((train.count(),), dtype=self.dtype, device=self.device)
            sinks = [*(RowsSink(s, slice(0, factors.count)) for s in sinks), RowsSink(selves, factors.count)]
            scorer = lambda block: self._scores_and_self_influences(factors, block)  # noqa: E731
            what = f"top-k (query rows, then self-influences as row {factors.count})"
        if factors is not None:
            run_blocks(train, scorer, sinks, what, self.runtime, journal=journal)
        res = finished(sink, journal)
        return TopKInfluences(res.largest_indices, res.largest_values, res.smallest_indices, res.smallest_values,
                              None if matrix is None else matrix.result(),
                              None if selves is None else selves.result())

    def _check_factors(self, factors: Tensor) -> Tensor:
        if not isinstance(factors, Tensor) or factors.dim() != 2 or factors.shape[1] != self.num_params:
            got = tuple(factors.shape) if isinstance(factors, Tensor) else type(factors).__name__
            raise ValueError(f"factors must have shape (n_test, {self.num_params}), got {got}")
        return factors.to(device=self.device, dtype=self.dtype)

    # -- the solver contract (torchfluence.contract) -------------------------------------------------
    def options(self) -> SolverOptions:
        """This solver's own options (those of its class beyond the common ones), as its ``Options``."""
        return self.Options.of(self)

    @classmethod
    def fit_options(cls) -> frozenset[str]:
        """Names of the constructor options the fitted state depends on: a load keeps their saved values."""
        return COMMON_FIT_OPTIONS | cls.Options.fit_fields()

    def common_options(self) -> dict[str, Any]:
        """The options every solver takes, as the keyword arguments that rebuild this one on the same model.

        ``head`` and ``params`` rebuild the same head/backbone split; ``curvature`` is the class
        given to the constructor (None for the one ``second_order`` picks).
        """
        names = list(self.functions.names)
        if self.features is None:
            head: dict[str, Any] = {"head": False, "params": names}
        elif self._full_model is not None:  # found automatically (head=None, params=None): find it again
            head = {"head": None, "params": None}
        else:  # a traced trainable tail came from head="auto"; a module head is rebuilt from its name
            head = {"head": "auto" if self.features.backbone is not None else self.features.head_name,
                    "params": names}
        default = type(curvature_operator(self.functions, self.second_order))
        given = type(self.curvature_operator)
        return {"regularization": self.regularization, "second_order": self.second_order, "dtype": self.dtype,
                "block_size": self.block_size, "progress": bool(self.progress), "fused": self.fused,
                "score_dtype": self.score_dtype, "allow_tf32": self.allow_tf32,
                "curvature": None if given is default else given, **head}

    def constructor_options(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this solver from a model and a loss (dtypes as torch dtypes).

        The common options minus those the class sets itself (``traits.fixed_options``),
        plus the class's own (:meth:`options`).
        """
        options = self.common_options()
        for name in self.traits.fixed_options:
            options.pop(name, None)
        options.update(self.options().values())
        return options

    @classmethod
    def from_constructor_options(cls, model: nn.Module, loss: LossFn,
                                 options: dict[str, Any]) -> "InfluenceFunctionModel":
        """The solver built from :meth:`constructor_options` as a load reads them back."""
        return cls(model, loss, **options)

    def settings(self) -> dict[str, Any]:
        """What decides this solver's scores besides the model and the data, as JSON values.

        A resumable job's record is checked against it (:mod:`torchfluence.journal`): the
        class, parameters, dtypes, device type, head, curvature operator and projection, the
        regularization, block size and the other common options, and the class's own options.
        """
        settings: dict[str, Any] = {
            "solver": f"{type(self).__module__}.{type(self).__qualname__}",
            "params": list(self.functions.names),
            "dtype": str(self.dtype),
            "score_dtype": str(self.score_dtype),
            "device": self.device.type,
            "head": None if self.features is None else str(self.features.head_name),
            "curvature": type(self.curvature_operator).__qualname__,
            "regularization": self.regularization,
            "second_order": self.second_order,
            "block_size": self.block_size,
            "fused": self.fused,
            "allow_tf32": self.allow_tf32,
        }
        if self.projector is not None:
            try:
                settings["projector"] = describe_projection(self.projector)
            except TypeError:  # a user-defined Projector: its class, sizes and seed
                kind = type(self.projector)
                settings["projector"] = {"kind": f"{kind.__module__}.{kind.__qualname__}",
                                         **{a: getattr(self.projector, a, None) for a in ("p", "k", "seed")}}
        for name, value in self.options().values().items():
            try:
                settings.setdefault(name, plain(value))
            except TypeError:  # no JSON form (a callable): recorded by its type's name
                settings.setdefault(name, type(value).__qualname__)
        return settings

    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors, JSON facts) that the fit left and the solves need, for :meth:`save`."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved: it does not define fitted_state()")

    def restore_fitted_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        """Puts what :meth:`fitted_state` returned back into a freshly built solver (tensors on its device)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be loaded: it does not define "
                                  "restore_fitted_state()")

    def restore(self, tensors: dict[str, Tensor], info: dict, *, n_train: int, classes: Optional[int],
                train: Optional[Samples], train_source: Optional[DataSource] = None, missing: str = "") -> None:
        """Makes this freshly built solver fitted from a saved state, as its fit would have left it.

        Args:
            tensors: the saved tensors (any device; moved to the solver's).
            info: the JSON facts saved beside them.
            n_train: the number of training samples of the fit.
            classes: the model's class count for target checks (cross-entropy), or None.
            train: the training samples in the solver's input space, or None: then reading
                them raises an error that starts with `missing`.
            train_source: the data `train` was read from (what :meth:`top_k` compares with).
        """
        self.n_train = n_train
        self._classes = classes
        self._train = train if train is not None else MissingTrainData(missing, n_train, self.block_size)
        self._train_source = train_source if train is not None else None
        self._query_cache.clear()  # its factors belong to the previous fit
        on_device = {key: value.to(self.device) for key, value in tensors.items()}
        with matmul_precision(self.allow_tf32):
            self.restore_fitted_state(on_device, dict(info))

    # -- saved state (torchfluence.persist) ---------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Writes the fitted solver to one safetensors file, for :meth:`load` in any process.

        The file holds the fitted state (no pickle), the options that rebuild the
        solver, the training-sample count and the model's fingerprint
        (:mod:`torchfluence.persist`). The write is atomic.

        Args:
            path: the file to write (conventionally ``*.safetensors``); replaced if it exists.

        Returns:
            `path` as a :class:`~pathlib.Path`.

        Raises:
            NotImplementedError: for a solver built with ``projector=`` (the saved options
                cannot rebuild a projector); a :class:`~torchfluence.GradientStore` keeps
                projected training gradients on disk instead.
        """
        if self.projector is not None:
            raise NotImplementedError(f"{type(self).__name__} with projector= cannot be saved: the file's options do "
                                      "not record the projector, so a load would rebuild a solver in parameter "
                                      "space; keep the projected gradients in a torchfluence.GradientStore instead")
        return save_solver(self, path)

    @classmethod
    def load(cls, path: Union[str, Path], model: nn.Module, loss: LossFn, *,
             train_data: Optional[DataSource] = None, **overrides) -> "InfluenceFunctionModel":
        """The solver saved at `path`, rebuilt on `model` without refitting.

        Refuses a file of another solver class (call ``InfluenceFunctionModel.load``
        to take whichever class the file holds), a model whose parameters or
        buffers differ from those of the fit, and a damaged file or an unknown
        format version. See :mod:`torchfluence.persist` for which options a load
        may override and which solvers need `train_data`.

        Args:
            path: a file written by :meth:`save`.
            model: the model with exactly the weights of the fit (trainable parameters
                and head as then).
            loss: the loss of the fit.
            train_data: the training data of the fit, in the same order (its count is
                checked). Required by CG, LiSSA and DataInf; for the other solvers
                it is read only by :meth:`train_influences` and :meth:`top_k` without data.
            overrides: constructor options to change, e.g. ``block_size``, ``progress``,
                ``score_dtype``, ``regularization``.
        """
        return load_solver(cls, path, model, loss, any_subclass=cls is InfluenceFunctionModel, train_data=train_data,
                           overrides=overrides)


def _same_data(source: Optional[DataSource], x: Tensor, y: Tensor) -> bool:
    """Whether `source` yields exactly the samples of the tensors (x, y), in order."""
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return source[0] is x and source[1] is y
    if not isinstance(source, DataLoader):
        return False
    dataset = source.dataset
    return (isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2
            and dataset.tensors[0] is x and dataset.tensors[1] is y
            and isinstance(source.sampler, SequentialSampler) and not source.drop_last
            and source.collate_fn is default_collate and type(source.batch_sampler) is BatchSampler)
