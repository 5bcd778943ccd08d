"""Kronecker-factored curvature: K-FAC and eigenvalue-corrected K-FAC (EK-FAC).

For a captured layer with per-sample gradient G_i = sum_t g_it a_it^T, the
layer's block of the Fisher, E_i[vec G_i vec G_i^T], is approximated by

    S (x) A,   A = E_i[sum_t a_it a_it^T],   S = E_i[sum_t g_it g_it^T] / T

(Martens & Grosse 2015; Grosse & Martens 2016 for convolutions). With
A = Q_A diag(l_A) Q_A^T and S = Q_S diag(l_S) Q_S^T, K-FAC's eigenvalues in the
Kronecker eigenbasis are l_S l_A^T; EK-FAC (George et al. 2018) replaces them by
the per-sample second moments of the gradients in that basis,
E_i[(Q_S^T G_i Q_A)^2], which are the best diagonal fit there. Either way

    (F + lambda I)^-1 vec(V) = Q_S ((Q_S^T V Q_A) / (eigenvalues + lambda)) Q_A^T

is exact for the approximation, block by block over layers.

An embedding (an index layer, :mod:`torchfluence.capture`) has one-hot inputs,
so its A is diagonal: the token frequencies. Its eigenbasis is the token basis
itself; it is kept as a vector, never as a (vocabulary x vocabulary) matrix, and
EK-FAC's per-sample second moments are summed from each sample's nonzero rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._covariance_eigh import covariance_eigh
from ..counter_random import SampleDraws
from ..target_sampling import TargetSampler, default_sampler, exact_output_grads, token_cross_entropy_sampler
from ..budget import temporary_rows
from ..capture import (Captured, Layer, capture, gram, describe_coverage, describe_missing, find_layers,
                       shared_weights, tied_parameters)
from ..checks import check_mode, check_regularization
from ..data import LABELS, Batch, SampleBlock, Samples
from ..distributed import all_reduce_count, all_reduce_sum, is_main_process, local_blocks
from ..captured_scores import index_pair_sums, index_sum, psg_self_dot
from ..curvature import curvature_operator
from ..gradients import CapturedGradients, PreparedQueries, gradient_source
from ..contract import SolverOptions, SolverTraits, option
from ..influence import FactorChecks, InfluenceFunctionModel
from ..persist import state_tensor
from ..precision import check_low_precision, factor_matmul
from ..projected_space import kronecker_layers, projected_engine
from ..scoring import run_blocks
from ..sinks import DenseSink


@dataclass
class KroneckerFactors:
    """One layer's fitted curvature (float64).

    Attributes:
        activation_eigenvectors: (d_in_total, d_in_total) Q_A; None for an embedding,
            whose A is diagonal and Q_A the identity (the token basis).
        gradient_eigenvectors: (d_out, d_out) Q_S.
        eigenvalues: (d_out, d_in_total) curvature in the Kronecker eigenbasis.
    """

    activation_eigenvectors: Optional[Tensor]
    gradient_eigenvectors: Tensor
    eigenvalues: Tensor


@dataclass(frozen=True)
class EkfacOptions(SolverOptions):
    """EkfacInfluence's own options (K-FAC's but the eigenvalue correction, which the class sets)."""

    fisher: str = option(fit=True, doc="true (sampled labels), exact or empirical")
    fisher_samples: int = option(fit=True, doc="label draws per sample for the true Fisher")
    seed: int = option(fit=True, doc="seed of the label draws")
    factor_dtype: Optional[torch.dtype] = option(fit=True, doc="16-bit operands of the factor products")
    capture_dtype: Optional[torch.dtype] = option(fit=True, doc="autocast dtype of the fit's model passes")


@dataclass(frozen=True)
class KfacOptions(EkfacOptions):
    """KfacInfluence's own options."""

    eigenvalue_correction: bool = option(fit=True, doc="refit the eigenvalues in the Kronecker eigenbasis")


class KfacInfluence(InfluenceFunctionModel):
    """Influence through K-FAC: a block-diagonal (per layer) Kronecker-factored Fisher.

    Scales to models with millions of parameters: fitting is two passes of
    forward + backward over the training data (one for EK-FAC's correction),
    and memory is d_in^2 + d_out^2 per layer. The curvature is that of the
    captured layers (``nn.Linear``, ``nn.Conv1d``/``Conv2d``/``Conv3d``, ``nn.Embedding``,
    Hugging Face's ``Conv1D``, types added with :func:`torchfluence.capture.register_layer`).
    With ``params`` left out, the other parameters (normalisation layers, bare
    parameters, a weight tied between an embedding and the output layer) are left
    out of the influences, and a warning says in one line which parameters are
    covered and which are not (as kronfluence does); passing ``params`` with such
    parameters is an error.

    The curvature approximated is the Fisher, equal to the Gauss-Newton matrix
    for negative-log-likelihood losses (cross-entropy, Gaussian MSE, BCE).

    Args:
        fisher: ``"true"`` (default) draws each sample's target from the model's
            predictive distribution, which estimates the Gauss-Newton matrix;
            ``"exact"`` takes the expectation over that distribution in closed form
            (one backward pass per class; cross-entropy and MSE on (n, C) outputs), with
            no Monte Carlo noise; ``"empirical"`` uses the data's targets.
        sample_targets: ``outputs -> targets`` for ``fisher="true"`` with a loss
            other than cross-entropy, MSE or BCE-with-logits.
        fisher_samples: targets drawn per input with ``fisher="true"``; each draw is
            one more forward + backward, and lowers the Monte Carlo noise of the factors.
        seed: seeds the target draws.
        eigenvalue_correction: EK-FAC when True (see :class:`EkfacInfluence`).
        factor_dtype: ``torch.bfloat16`` (or float16) runs the fit's products (covariances,
            rotations into the eigenbasis for EK-FAC's eigenvalues) and the query
            preconditioning with 16-bit operands and float32 accumulation; sums over
            samples stay float32/float64 and eigendecompositions float64
            (:mod:`torchfluence.precision`). For tensor-core GPUs, and CPUs with bf16
            instructions (AVX512-BF16, AMX), where bf16 products run natively and their
            results are rounded to bf16 (:func:`~torchfluence.precision.factor_matmul`);
            on other CPUs the same operand rounding without a speed-up. Default None: the
            model's dtype.
        capture_dtype: ``torch.bfloat16`` (or float16) runs the model's forward and backward
            passes of the fit under ``torch.autocast`` (as kronfluence's AMP settings do);
            the captured activations and output gradients are then widened to the model's
            dtype for the sums. The capture rules are checked against plain autograd
            without autocast first, as always. The gradients that are scored (queries,
            training data) never run under autocast: on the digits CNN that costs per-query
            Spearman down to 0.11 (``benchmarks/RESULTS.md``). Default None: no autocast.
        (others as in :class:`~torchfluence.InfluenceFunctionModel`; ``second_order`` is not taken)
    """

    Options = KfacOptions
    # A fixed linear map per row; the curvature is always the Fisher / Gauss-Newton matrix.
    traits = SolverTraits(solves_rows_independently=True, fixed_options=("second_order",),
                          block_structure_refusal="K-FAC and EK-FAC are block-diagonal per layer "
                                                  "already (one Kronecker-factored block per captured "
                                                  "layer); restrict params to choose the layers")

    def __init__(self, model, loss, regularization: float = 0.0, *,
                 fisher: Literal["true", "exact", "empirical"] = "true",
                 sample_targets: Optional[Callable] = None, fisher_samples: int = 1, seed: int = 0,
                 eigenvalue_correction: bool = False, params: Optional[Sequence[str]] = None,
                 factor_dtype: Optional[torch.dtype] = None, capture_dtype: Optional[torch.dtype] = None,
                 **kwargs) -> None:
        if "second_order" in kwargs:
            raise TypeError(f"{type(self).__name__} approximates the Fisher / Gauss-Newton matrix and takes no "
                            "second_order argument")
        super().__init__(model, loss, regularization, second_order="gauss_newton", params=params, **kwargs)
        if fisher not in ("true", "exact", "empirical"):
            raise ValueError(f"fisher must be 'true', 'exact' or 'empirical', got {fisher!r}")
        if not isinstance(fisher_samples, int) or fisher_samples < 1:
            raise ValueError(f"fisher_samples must be a positive int, got {fisher_samples!r}")
        self.fisher, self.fisher_samples, self.seed = fisher, fisher_samples, seed
        self.eigenvalue_correction = eigenvalue_correction
        self.factor_dtype = check_low_precision(factor_dtype, self.dtype, "factor_dtype")
        self.capture_dtype = check_low_precision(capture_dtype, self.dtype, "capture_dtype")
        self._sample_targets = sample_targets
        self._draws: Optional[SampleDraws] = None  # the default samplers' random numbers
        self.layers, missing = find_layers(self.functions)
        if params is None and self.layers and (missing or tied_parameters(self.functions, self.layers)):
            self._leave_out(missing + tied_parameters(self.functions, self.layers))
            self.layers, missing = find_layers(self.functions)
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs every selected parameter in a supported layer (nn.Linear, "
                f"nn.Conv1d/2d/3d or one added with torchfluence.capture.register_layer); not covered: "
                f"{describe_missing(self.functions, missing)}. Pass params= to select the supported layers' "
                "parameters only")
        tied = shared_weights(self.layers)
        if tied:
            raise ValueError(
                f"{type(self).__name__}: layers {tied} share one weight (tied embedding and output layer), which "
                "has no block-diagonal Kronecker-factored curvature; leave the tied weight out with params=, or "
                "use a solver on the full curvature (e.g. CgInfluence, ArnoldiInfluence)")
        self.factors: dict[str, KroneckerFactors] = {}
        # With a KroneckerProjection (LoGra) the factors are those of the projected inputs
        # P_in a and output gradients P_out g: self.layers become the (k_out, k_in) layers
        # of the projected space, and the model's layers are still the ones captured.
        self._captured_layers, self._projection = self.layers, kronecker_layers(type(self).__name__, self.source, self.projector)
        if self._projection is not None:
            self.layers = self._projection.projected_layers

    def _leave_out(self, names: list[str]) -> None:
        """Narrows the selected parameters to the captured layers', warning once with what is left out."""
        before = self.functions
        kept = [n for n in before.names if n not in set(names)]
        if kept:  # else the caller's error names what is not covered
            functions = self.functions = before.subset(kept)
            self.source = gradient_source(functions, self.fused)
            self.curvature_operator = curvature_operator(functions, self.second_order)
            if self.projector is not None:
                self.source, self.curvature_operator = projected_engine(functions, self.source, self.projector)
        layers = find_layers(self.functions)[0] if kept else []
        warnings.warn(f"{type(self).__name__} {describe_coverage(before, layers, names)}; to choose the "
                      "parameters yourself, pass params= or set requires_grad=False on those to leave out",
                      stacklevel=4)

    # -- fitting --------------------------------------------------------------------------------
    def _sampler(self, train: Samples) -> Optional[TargetSampler]:
        self._draws = None
        if self.fisher in ("empirical", "exact"):
            return None
        if self._sample_targets is not None:
            return self._sample_targets
        self._draws = SampleDraws(self.seed)  # addressed per block by _captures
        sampler = default_sampler(self.functions.loss, self._draws)
        if sampler is None:
            # A lambda may still be a (per-token) cross-entropy: judged by its values. A loss of the
            # output and the batch is judged with drawn labels in the batch's "labels".
            first = train.first_block()
            f, y2 = self.functions, first.y[:2].to(self.device)
            with torch.no_grad():
                outputs = f.outputs(f.theta, f.cast_input(first.x[:2]))
            loss = f.loss if f.loss_style != "batch" else (
                lambda o, t: f.loss(f._rebuilt_output(o), _with_labels(y2, t).parts))
            sampler = token_cross_entropy_sampler(loss, outputs, _labels(y2), self._draws)
        if sampler is None:
            raise ValueError(
                f"fisher='true' needs targets drawn from the model, but the loss {self.functions.loss!r} is "
                "not one torchfluence knows how to sample for (cross-entropy, MSE, BCE-with-logits, passed as "
                "the torch function or module); pass sample_targets=outputs -> targets, or fisher='empirical'")
        return sampler

    def _captures(self, train: Samples, sampler: Optional[TargetSampler], desc: str, stage: int):
        """Captures of this process's training blocks (all of them without a process group).

        The default samplers' targets are addressed by (seed, stage, draw, global sample
        index) (:class:`~torchfluence.counter_random.SampleDraws`): a sample gets the same
        targets whatever the block size, the loader's batches or the number of processes.
        """
        exact = self.fisher == "exact"
        if exact and exact_output_grads(self.functions.loss, torch.zeros(1, 2)) is None:
            raise ValueError(
                f"fisher='exact' needs the output Hessian's factors, known for cross-entropy and MSE passed as the "
                f"torch function or module, got loss {self.functions.loss!r}; use fisher='true'")
        out_grads = (lambda o: exact_output_grads(self.functions.loss, o)) if exact else None
        for block in tqdm(local_blocks(train), desc=desc, disable=not self.progress or not is_main_process()):
            for draw in range(self.fisher_samples if sampler is not None else 1):
                if self._draws is not None:
                    self._draws.at(stage, draw, block.offset)
                drawn = sampler
                if getattr(sampler, "needs_targets", False):  # keeps the data's masked positions
                    y = block.y.to(self.device)
                    drawn = lambda o, y=y: _with_labels(y, sampler(o, _labels(y)))  # noqa: E731
                cap = self._capture(block.x, block.y, drawn, out_grads, fit=True)
                if exact and any(g.dim() != 4 for g in cap.output_grads):
                    raise ValueError("fisher='exact' supports outputs of shape (n, classes) only; use fisher='true'")
                yield cap

    def _capture(self, x: Tensor, y: Tensor, sampler: Optional[TargetSampler] = None,
                 output_grads: Optional[Callable[[Tensor], Tensor]] = None, *, fit: bool = False) -> Captured:
        """One block's capture of :attr:`layers` (projected by the KroneckerProjection, if any).

        With `fit`, under autocast with ``capture_dtype`` (:func:`~torchfluence.capture.capture`).
        The queries' and the training data's gradients never are: a per-sample gradient from
        bf16 passes loses the small gradients of well-fit samples (measured: per-query Spearman
        down to 0.11 on the digits CNN), while the factors average their rounding away.
        """
        cap = capture(self.functions, self._captured_layers, x, y, sampler, output_grads,
                      autocast_dtype=self.capture_dtype if fit else None)
        return cap if self._projection is None else self._projection.project_capture(cap)

    def _fit(self, train: Samples) -> None:
        sampler = self._sampler(train)
        dev = self.device
        # An embedding's A is diagonal (token counts): a vector.
        a_sums = [torch.zeros((layer.d_in,) if layer.index else (layer.d_in_total,) * 2, dtype=torch.float64,
                              device=dev) for layer in self.layers]
        s_sums = [torch.zeros(layer.d_out, layer.d_out, dtype=torch.float64, device=dev) for layer in self.layers]
        n = 0
        for cap in self._captures(train, sampler, "K-FAC factors", stage=0):
            n += cap.outputs.shape[0]
            for i, (layer, g) in enumerate(zip(self.layers, cap.output_grads)):
                g2 = g.reshape(-1, g.shape[-1])
                if layer.index:
                    a_sums[i] += _index_counts(layer, cap.activation(i)).double()
                else:
                    a_sums[i] += cap.activation_covariance(i, self.factor_dtype).double()
                s_sums[i] += gram(g2, self.factor_dtype).double() / g.shape[-2]
        for total in (*a_sums, *s_sums):
            all_reduce_sum(total)
        n = all_reduce_count(n, dev)
        bases = []
        for layer, a_sum, s_sum in zip(self.layers, a_sums, s_sums):
            a_fac, s_fac = a_sum / n, s_sum / n
            _check_finite(layer, a_fac, "activation covariance A")
            _check_finite(layer, s_fac, "gradient covariance S")
            l_a, q_a = (a_fac, None) if layer.index else covariance_eigh(a_fac)
            l_s, q_s = covariance_eigh(s_fac)
            # Covariances are PSD; eigh's rounding can leave tiny negatives.
            bases.append((q_a, q_s, torch.outer(l_s.clamp_min(0), l_a.clamp_min(0))))
        if self.eigenvalue_correction:
            corrected = self._corrected_eigenvalues(train, bases, sampler)
            bases = [(q_a, q_s, lam) for (q_a, q_s, _), lam in zip(bases, corrected)]
        self.factors = {layer.name: KroneckerFactors(q_a, q_s, lam)
                        for layer, (q_a, q_s, lam) in zip(self.layers, bases)}
        for layer in self.layers:
            _check_finite(layer, self.factors[layer.name].eigenvalues, "eigenvalues")
        self._check_invertible()
        # Solves run in the model's dtype; the factors stay float64 for inspection.
        self._solve_factors = [(_to(f.activation_eigenvectors, self.dtype), f.gradient_eigenvectors.to(self.dtype),
                                f.eigenvalues.to(self.dtype)) for f in self.factors.values()]

    def _corrected_eigenvalues(self, train: Samples, bases, sampler) -> list[Tensor]:
        sums = [torch.zeros_like(lam) for _, _, lam in bases]
        typed = [(_to(q_a, self.dtype), q_s.to(self.dtype)) for q_a, q_s, _ in bases]
        n = 0
        for cap in self._captures(train, sampler, "EK-FAC eigenvalues", stage=1):
            n += cap.outputs.shape[0]
            b = cap.outputs.shape[0]
            for i, (layer, g) in enumerate(zip(self.layers, cap.output_grads)):
                q_a, q_s = typed[i]
                g = g.reshape(-1, b, *g.shape[-2:])  # (K, b, T, d_out), K = 1 unless fisher="exact"
                if layer.index:
                    sums[i] += _index_rotated_squares(layer, cap.activation(i), g @ q_s).double()
                    continue
                sums[i] += _rotated_squares(cap, i, g, q_s, q_a, self.factor_dtype).double()
        for total in sums:
            all_reduce_sum(total)
        n = all_reduce_count(n, self.device)
        return [s / n for s in sums]

    def with_regularization(self, regularization: float) -> "KfacInfluence":
        """Sets lambda without refitting; returns self."""
        self.regularization = check_regularization(regularization)
        if self.factors:
            self._check_invertible()
        return self

    def _check_invertible(self) -> None:
        for name, f in self.factors.items():
            smallest = float(f.eigenvalues.min())
            if smallest + self.regularization <= 0:
                raise ValueError(
                    f"layer {name!r}: its Kronecker-factored curvature has an eigenvalue of {smallest:.3g}, so "
                    f"with regularization={self.regularization:.3g} it is singular; use regularization > 0 "
                    f"(e.g. {max(1e-3 * float(f.eigenvalues.mean()), 1e-8):.2g})")

    # -- solving ----------------------------------------------------------------------------------
    def solve(self, vectors: Tensor) -> Tensor:
        self._require_fitted()
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        out = torch.empty_like(vectors)
        for layer, (q_a, q_s, lam) in zip(self.layers, self._solve_factors):
            # Rows in chunks whose (chunk, d_out, d_in) temporaries stay small on a CPU (temporary_rows).
            step = temporary_rows(layer.d_out * layer.d_in_total, vectors.device, vectors.dtype)
            for start in range(0, vectors.shape[0], step):
                rows, target = vectors[start:start + step], out[start:start + step]
                if q_a is None:  # an embedding: its eigenbasis on the input side is the token basis
                    layer.write(q_s @ ((q_s.T @ layer.matrices(rows)) / (lam + self.regularization)), target)
                    continue
                rotated = _rotate(q_s, layer.matrices(rows), q_a, self.factor_dtype)  # (chunk, d_out, d_in_total)
                layer.write(self._solve_rotated(rotated, q_s, q_a, lam), target)
        return out

    def _solve_rotated(self, rotated: Tensor, q_s: Tensor, q_a: Tensor, lam: Tensor) -> Tensor:
        """``Q_S (R / (eigenvalues + lambda)) Q_A^T``: the solve of gradients R given in the eigenbasis."""
        return _rotate(q_s.T, rotated / (lam + self.regularization), q_a.T, self.factor_dtype)

    def _write_factor_block(self, prepared: PreparedQueries, block: SampleBlock, checks: FactorChecks) -> None:
        """Test factors from the block's capture, rotated into the eigenbasis in the cheaper order.

        ``Q_S^T G Q_A`` of a query's gradient ``G = sum_t g_t a_t^T`` costs
        ``d_out d_in (d_out + d_in)`` once G is formed, but only ``T (d_in^2 + d_out^2 +
        d_out d_in)`` from its T positions rotated first (:func:`_rotated_gradients`): 30x
        fewer for a 512-channel 3x3 convolution at 4 x 4 positions. Only the rotation back,
        ``Q_S M Q_A^T``, needs the full matrices. Each layer's factors are written straight
        into its part of the prepared queries: no (n_test, p) gradient or factor matrix.
        """
        if not self._queries_from_captures():
            return super()._write_factor_block(prepared, block, checks)
        cap = self._capture(block.x, block.y)
        for i, (layer, (q_a, q_s, lam)) in enumerate(zip(self.layers, self._solve_factors)):
            part = prepared.parts[i].view(-1, layer.d_out, layer.d_in_total)
            T = cap.output_grads[i].shape[-2]
            step = temporary_rows(layer.d_out * max(layer.d_in_total, T), self.device, self.dtype)
            for start in range(0, block.size, step):
                stop = min(start + step, block.size)
                rotated = _rotated_gradients(cap, i, start, stop, q_s, q_a, operand_dtype=self.factor_dtype)
                checks.gradients.add(rotated, block.offset + start)
                factors = self._solve_rotated(rotated, q_s, q_a, lam)
                checks.factors.add(factors, block.offset + start)
                part[block.offset + start:block.offset + stop] = factors

    def _queries_from_captures(self) -> bool:
        """Whether the prepared queries are exactly this solver's dense captured layers, in order."""
        source = self.source
        return (isinstance(source, CapturedGradients) and source.rest is None and self._projection is None
                and len(source.layers) == len(self.layers)
                and all(a.module is b.module and (a.weight_slice, a.bias_slice) == (b.weight_slice, b.bias_slice)
                        and not a.index for a, b in zip(source.layers, self.layers)))

    def _self_influence_block(self, block: SampleBlock) -> Tensor:
        """g_j^T (F + lambda I)^-1 g_j for the block's samples, (b,).

        With ``fused`` (the default), from each layer's captured activations and
        output gradients rotated into its Kronecker eigenbasis, without forming the
        per-sample gradients when a layer has one position per sample.
        """
        if not self.fused:
            return super()._self_influence_block(block)
        return self._captured_self_influences(self._capture(block.x, block.y), block.size)

    def _captured_self_influences(self, cap: Captured, n: int) -> Tensor:
        out = torch.zeros(n, dtype=self.dtype, device=self.device)
        for (q_a, q_s, lam), a, g in zip(self._solve_factors, cap.activations, cap.output_grads):
            out += psg_self_dot(1 / (lam + self.regularization), a if q_a is None else a @ q_a, g @ q_s)
        return out

    def _scores_and_self_influences(self, factors: PreparedQueries, block: SampleBlock) -> Tensor:
        """Both from one capture of the block where the scored layers are this solver's own."""
        if not (self.fused and self._queries_from_captures()):
            return super()._scores_and_self_influences(factors, block)
        cap = self._capture(block.x, block.y)
        # Scores first: the self-influences form convolutions' patches, which would change the scores' route.
        scores = self.source.score_captured(self.source.prepare(factors), cap, block.x, block.y)
        return torch.cat([scores, self._captured_self_influences(cap, block.size).to(scores.dtype).unsqueeze(0)])

    # -- per-layer scores -----------------------------------------------------------------------------
    def influences_from_factors_by_layer(self, factors: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Mode-"up" scores split by layer: {layer name: (n_test, n)}; they sum to :meth:`influences_from_factors`."""
        self._require_fitted()
        factors = self._check_factors(factors)
        samples = self._inputs(x, y, "x, y")
        sink = DenseSink((len(self.layers), factors.shape[0], samples.count()), dtype=self.dtype, device=self.device)
        run_blocks(samples, lambda b: self._scores_by_layer(factors, b), [sink], "influence scores by layer",
                   self.runtime)
        return {layer.name: scores for layer, scores in zip(self.layers, sink.result())}

    def _scores_by_layer(self, factors: Tensor, block: SampleBlock) -> Tensor:
        """(n_layers, n_test, b) scores of one block, through psg_dot when fused."""
        by_layer = self.source.score_block_by_layer(factors, block.x, block.y)
        if by_layer is not None:
            return torch.stack([by_layer[layer.name] for layer in self.layers])
        g = self.source.grads(block.x, block.y)  # fused=False: from dense per-sample gradients
        return torch.stack([sum(factors[:, c] @ g[:, c].T for c in _layer_columns(layer)) for layer in self.layers])


    def influences_by_layer(self, x_test: Tensor, y_test: Tensor, x: Optional[Tensor] = None,
                            y: Optional[Tensor] = None, mode: str = "up") -> dict[str, Tensor]:
        """Like :meth:`influences` (mode ``"up"`` only), split by layer: {layer name: (n_test, n)}."""
        check_mode(mode)
        if mode != "up":
            raise ValueError(f"influences_by_layer supports mode='up' only, got {mode!r}")
        if (x is None) != (y is None):
            raise ValueError("x and y must be given together (or both left out to use the test points)")
        factors = self.influence_factors(x_test, y_test)
        if x is None:
            x, y = x_test, y_test
        return self.influences_from_factors_by_layer(factors, x, y)

    # -- the solver contract: options and fitted state (torchfluence.contract) -----------------------
    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        """Each layer's float64 Q_A, Q_S and (corrected) eigenvalues, keyed ``"<layer>/<what>"``."""
        tensors = {}
        for name, f in self.factors.items():
            if f.activation_eigenvectors is not None:  # None for an embedding: the token basis
                tensors[f"{name}/activation_eigenvectors"] = f.activation_eigenvectors
            tensors[f"{name}/gradient_eigenvectors"] = f.gradient_eigenvectors
            tensors[f"{name}/eigenvalues"] = f.eigenvalues
        return tensors, {"layers": list(self.factors)}

    def restore_fitted_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        names = [layer.name for layer in self.layers]
        if info["layers"] != names:
            raise ValueError(f"saved state: the factors are for layers {info['layers']}, the model's selected "
                             f"layers are {names}")
        f64 = torch.float64
        self.factors = {layer.name: KroneckerFactors(
            None if layer.index
            else state_tensor(tensors, f"{layer.name}/activation_eigenvectors", (layer.d_in_total,) * 2, f64),
            state_tensor(tensors, f"{layer.name}/gradient_eigenvectors", (layer.d_out,) * 2, f64),
            state_tensor(tensors, f"{layer.name}/eigenvalues", (layer.d_out, layer.d_in_total), f64))
            for layer in self.layers}
        self._check_invertible()
        # As at the end of _fit: solves run in the model's dtype.
        self._solve_factors = [(_to(f.activation_eigenvectors, self.dtype), f.gradient_eigenvectors.to(self.dtype),
                                f.eigenvalues.to(self.dtype)) for f in self.factors.values()]


class EkfacInfluence(KfacInfluence):
    """Influence through EK-FAC: K-FAC's eigenbasis with eigenvalues refitted to the gradients.

    The correction costs one more forward + backward pass at fit, and makes the
    approximation exact along the Kronecker eigenbasis's diagonal, which makes
    it markedly more faithful than K-FAC (George et al. 2018; Grosse et al. 2023).
    Arguments as in :class:`KfacInfluence`.
    """

    Options = EkfacOptions

    def __init__(self, model, loss, regularization: float = 0.0, **kwargs) -> None:
        if "eigenvalue_correction" in kwargs:
            raise TypeError("EkfacInfluence always corrects the eigenvalues; use KfacInfluence for plain K-FAC")
        super().__init__(model, loss, regularization, eigenvalue_correction=True, **kwargs)



def _rotated_squares(cap: Captured, i: int, g: Tensor, q_s: Tensor, q_a: Tensor,
                     operand_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Sum over samples of the squared per-sample gradients in the Kronecker eigenbasis, (d_out, d_in).

    The rotated gradients come from :func:`_rotated_gradients`, in chunks of samples.

    Args:
        cap: the block's capture; i: the layer; g: (K, b, T, d_out) output gradients.
        operand_dtype: 16-bit operands of the rotations (:func:`_rotated_gradients`).
    """
    K, b, T, d_out = g.shape
    d_in = q_a.shape[0]
    if operand_dtype is not None:  # once here, not in every chunk's products
        q_s, q_a = q_s.to(operand_dtype), q_a.to(operand_dtype)
    # Samples go through in chunks whose (chunk, d_out, d_in) temporaries stay below the
    # allocator's mmap threshold (32 MiB): larger ones are returned to the OS when freed and
    # page-faulted in again by the next chunk, which measured 3x slower than the product itself.
    chunk = temporary_rows(d_out * max(d_in, T), g.device, g.dtype)
    total = torch.zeros(d_out, d_in, dtype=g.dtype, device=g.device)
    for k in range(K):
        for start in range(0, b, chunk):
            rotated = _rotated_gradients(cap, i, start, min(start + chunk, b), q_s, q_a, None if K == 1 else g[k],
                                         operand_dtype)
            total += rotated.square_().sum(dim=0)  # in place: no second (chunk, d_out, d_in)
    return total


def _rotated_gradients(cap: Captured, i: int, start: int, stop: int, q_s: Tensor, q_a: Tensor,
                       output_grads: Optional[Tensor] = None, operand_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Per-sample gradients of samples start..stop in layer i's Kronecker eigenbasis, (b, d_out, d_in_total).

    ``Q_S^T (sum_t g_t a_t^T) Q_A`` in the order with fewer multiply-adds per sample, from
    the shapes alone: rotating the T positions first costs ``T (d_in^2 + d_out^2 + d_out
    d_in)``, forming the gradient first ``T d_out d_in + d_out d_in (d_out + d_in)``.
    Convolutions at high resolution (T >> d_in) form first (without patches where the
    capture allows: :meth:`Captured.layer_grads`); wide layers at few positions rotate first.

    Args:
        output_grads: (n, T, d_out) replacing the captured ones (one of fisher="exact"'s passes).
        operand_dtype: 16-bit operands for every product, and a float32 result for the last
            (:func:`~torchfluence.precision.factor_matmul`); None: the captures' dtype.
    """
    g = cap.output_grads[i] if output_grads is None else output_grads
    T, d_out, d_in = g.shape[-2], g.shape[-1], q_a.shape[0]
    rotate_first = T * (d_in * d_in + d_out * d_out + d_out * d_in)
    form_first = T * d_out * d_in + d_out * d_in * (d_out + d_in)
    if form_first < rotate_first:
        return _rotate(q_s, cap.layer_grads(i, start, stop, output_grads), q_a, operand_dtype)
    if operand_dtype is None:
        return torch.einsum("nto,nti->noi", g[start:stop] @ q_s, cap.activation(i)[start:stop] @ q_a)
    # The rotated positions are the last product's operands: rounded to 16 bits as they come out
    # (a 16-bit GEMM rounds its float32 sums once, as a float32 result rounded next would be).
    g_rot = g[start:stop].to(operand_dtype) @ q_s.to(operand_dtype)  # (b, T, d_out)
    a_rot = cap.activation(i)[start:stop].to(operand_dtype) @ q_a.to(operand_dtype)  # (b, T, d_in)
    return factor_matmul(g_rot.transpose(1, 2), a_rot, operand_dtype)


def _rotate(q_s: Tensor, matrices: Tensor, q_a: Tensor, operand_dtype: Optional[torch.dtype]) -> Tensor:
    """``Q_S^T M Q_A`` for (b, d_out, d_in) matrices M; with 16-bit `operand_dtype`, both products
    have 16-bit operands, the first a 16-bit result (the second's operand), the second a float32
    one (:func:`~torchfluence.precision.factor_matmul`)."""
    if operand_dtype is None:
        return q_s.T @ matrices @ q_a
    half = q_s.T.to(operand_dtype) @ matrices.to(operand_dtype)  # the next product's operand, as in _rotated_gradients
    return factor_matmul(half, q_a, operand_dtype)


def _labels(y):
    """The targets a loss(logits, targets) takes: y itself, or a dict or tuple batch's labels."""
    return y.targets() if isinstance(y, Batch) else y


def _with_labels(y, labels: Tensor):
    """`labels` in place of y's: the tensor itself, or a dict or tuple batch with its labels replaced."""
    if not isinstance(y, Batch):
        return labels
    if y.keyword:
        return Batch({**y.parts, LABELS: labels})
    return Batch((*y.parts[:-1], labels))


def _to(q: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if q is None else q.to(dtype)


def _index_counts(layer: Layer, ids: Tensor) -> Tensor:
    """An embedding's sum_t onehot(id_t) onehot(id_t)^T over a block: the diagonal, token counts (d_in,).

    Positions holding ``padding_idx`` are left out: that row gets no gradient.
    """
    ids = ids.reshape(-1)
    padding = getattr(layer.module, "padding_idx", None)
    if padding is not None:
        ids = ids[ids != padding]
    return torch.bincount(ids, minlength=layer.d_in)


def _index_rotated_squares(layer: Layer, ids: Tensor, rotated: Tensor) -> Tensor:
    """sum over samples of the squared per-sample gradients of an embedding in its eigenbasis, (d_out, d_in).

    Args:
        ids: (b, T) token ids; rotated: (K, b, T, d_out) output gradients times Q_S.
    Each sample's gradient ``Q_S^T sum_t g_t onehot(id_t)^T`` has one nonzero column
    per distinct token of the sample, so only those are formed and squared.
    """
    K = rotated.shape[0]
    _, tokens, rows = index_pair_sums(ids.repeat(K, 1), rotated.reshape(-1, *rotated.shape[2:]), layer.d_in)
    return index_sum(tokens, rows.square(), layer.d_in).T  # (d_out, d_in)


def _layer_columns(layer: Layer) -> list[slice]:
    return [layer.weight_slice] + ([layer.bias_slice] if layer.bias_slice is not None else [])


def _check_finite(layer: Layer, value: Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"layer {layer.name!r}: the {what} has NaN or inf entries; check the inputs and the model for "
            "overflow (or use dtype=torch.float64)")
