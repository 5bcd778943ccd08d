"""Inverse-curvature solvers, one per module."""

from .arnoldi import ArnoldiInfluence
from .cg import CgInfluence, SolveInfo
from .datainf import InverseHarmonicMeanInfluence
from .direct import DirectInfluence
from .identity import GradientSimilarity
from .kfac import EkfacInfluence, KfacInfluence, KroneckerFactors
from .lissa import LissaInfluence
from .nystroem import NystroemSketchInfluence

__all__ = ["ArnoldiInfluence", "CgInfluence", "DirectInfluence", "EkfacInfluence", "GradientSimilarity",
           "InverseHarmonicMeanInfluence", "KfacInfluence", "KroneckerFactors", "LissaInfluence",
           "NystroemSketchInfluence", "SolveInfo"]
