"""torchfluence: fast influence functions for PyTorch.

The compiled kernels live in ``torchfluence._C``; the public API is re-exported here.
"""

from __future__ import annotations

from . import capture
from . import evaluation as evaluation
from ._build_info import build_info
from .capture import register_layer
from .curvature import AutogradHessian, CurvatureOperator, EmpiricalFisher, GaussNewton, LinearHeadCurvature
from .data import Batch, SampleBlock, Samples, split_batch
from .captured_scores import psg_dot
from .head import HeadInfluence
from .influence import InfluenceFunctionModel, TopKInfluences
from .linear_head import linear_head_hessian, linear_head_hvp
from .projected_space import KroneckerProjection
from .projectors import DenseProjector, KroneckerProjector, Projector, SparseJLProjector
from .solvers import (
                      ArnoldiInfluence,
                      CgInfluence,
                      DirectInfluence,
                      EkfacInfluence,
                      GradientSimilarity,
                      InverseHarmonicMeanInfluence,
                      KfacInfluence,
                      LissaInfluence,
                      NystroemSketchInfluence,
                      SolveInfo,
)
from .store import GradientStore
from .topk import InfluenceBlock, StreamingTopK, TopKResult, influence_block, influence_scores, top_k_of_scores

__version__: str = build_info()["version"]

__all__ = [
    "ArnoldiInfluence",
    "AutogradHessian",
    "CurvatureOperator",
    "DenseProjector",
    "EmpiricalFisher",
    "GradientSimilarity",
    "GradientStore",
    "KroneckerProjection",
    "KroneckerProjector",
    "Projector",
    "SparseJLProjector",
    "GaussNewton",
    "LinearHeadCurvature",
    "Batch",
    "SampleBlock",
    "Samples",
    "split_batch",
    "CgInfluence",
    "DirectInfluence",
    "EkfacInfluence",
    "HeadInfluence",
    "InverseHarmonicMeanInfluence",
    "KfacInfluence",
    "NystroemSketchInfluence",
    "capture",
    "register_layer",
    "InfluenceFunctionModel",
    "LissaInfluence",
    "SolveInfo",
    "TopKInfluences",
    "InfluenceBlock",
    "StreamingTopK",
    "TopKResult",
    "__version__",
    "build_info",
    "influence_block",
    "influence_scores",
    "linear_head_hessian",
    "linear_head_hvp",
    "psg_dot",
    "top_k_of_scores",
]
