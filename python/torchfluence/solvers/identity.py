"""Gradient similarity: influence with the identity in place of the inverse curvature (TracIn-style)."""

from __future__ import annotations

from torch import Tensor

from ..contract import SolverTraits
from ..influence import InfluenceFunctionModel


class GradientSimilarity(InfluenceFunctionModel):
    """Scores ``grad L(z_test_i) . grad L(z_j)``: no curvature, no regularization.

    The dot product of per-sample loss gradients at the final weights (TracIn with
    one checkpoint and unit learning rate, Pruthi et al. 2020). With
    ``projector=`` the gradients are projected first, so the scores are
    ``(P g_test) . (P g_j)``, unbiased for the unprojected ones and within the
    Johnson-Lindenstrauss error of them (TRAK without its curvature).

    Nothing is computed at fit time: :meth:`fit` records the training data
    (its size, for :meth:`train_influences` and :meth:`top_k`). Scoring streams
    the training blocks as every solver does (captured layers are contracted
    with the test gradients without per-sample training gradients in memory).
    :meth:`self_influences` are the squared gradient norms.

    Args:
        model, loss: as in :class:`~torchfluence.InfluenceFunctionModel`.
        (others as in :class:`~torchfluence.InfluenceFunctionModel`; ``regularization``,
        ``second_order`` and ``curvature`` are not taken: there is no curvature)
    """

    # The identity solves each row on its own; regularization, second_order and curvature do not apply.
    traits = SolverTraits(solves_rows_independently=True,
                          fixed_options=("regularization", "second_order", "curvature"),
                          block_structure_refusal="it uses no curvature, so there is none to split into "
                                                  "blocks")

    def __init__(self, model, loss, **kwargs) -> None:
        for name in ("regularization", "second_order", "curvature"):
            if name in kwargs:
                raise TypeError(f"GradientSimilarity uses no curvature and takes no {name} argument")
        super().__init__(model, loss, 0.0, **kwargs)

    def solve(self, vectors: Tensor) -> Tensor:
        """The identity: `vectors` (k, p) in the computation dtype, on the solver's device."""
        self._require_fitted()
        return vectors.to(device=self.device, dtype=self.dtype)

    # -- the solver contract: options and fitted state (torchfluence.contract) -----------------------
    def fitted_state(self) -> tuple[dict[str, Tensor], dict]:
        """Nothing: the fit records only the training data's size."""
        return {}, {}

    def restore_fitted_state(self, tensors: dict[str, Tensor], info: dict) -> None:
        pass

