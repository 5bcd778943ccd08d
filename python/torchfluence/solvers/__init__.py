"""Inverse-curvature solvers, one per module."""

from .arnoldi import ArnoldiInfluence
from .cg import CgInfluence, SolveInfo
from .direct import DirectInfluence
from .kfac import EkfacInfluence, KfacInfluence, KroneckerFactors
from .lissa import LissaInfluence
from .nystroem import NystroemSketchInfluence

__all__ = ["ArnoldiInfluence", "CgInfluence", "DirectInfluence", "EkfacInfluence", "KfacInfluence",
           "KroneckerFactors", "LissaInfluence", "NystroemSketchInfluence", "SolveInfo"]
