"""torchfluence: fast influence functions for PyTorch.

The compiled kernels live in ``torchfluence._C``; the public API is re-exported here.
"""

from __future__ import annotations

from ._build_info import build_info
from .influence import InfluenceFunctionModel, TopKInfluences
from .solvers import CgInfluence, DirectInfluence, LissaInfluence, SolveInfo
from .topk import InfluenceBlock, StreamingTopK, TopKResult, influence_block, influence_scores

__version__: str = build_info()["version"]

__all__ = [
    "CgInfluence",
    "DirectInfluence",
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
]
