"""Inverse-curvature solvers, one per module."""

from .cg import CgInfluence, SolveInfo
from .direct import DirectInfluence
from .lissa import LissaInfluence

__all__ = ["CgInfluence", "DirectInfluence", "LissaInfluence", "SolveInfo"]
