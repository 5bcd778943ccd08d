"""Exception classes that name what went wrong, with pyDVL's names.

Each also subclasses the built-in exceptions code catches today, so
``except RuntimeError`` (torchfluence's not-fitted error before these classes) and
``except ValueError`` (pyDVL's base of all three) both keep working.
"""

from __future__ import annotations

__all__ = ["NotFittedException", "NotImplementedLayerRepresentationException", "UnsupportedInfluenceModeException"]


class NotFittedException(RuntimeError, ValueError):
    """A solver was used before :meth:`fit` (or a load) gave it its fitted state."""


class UnsupportedInfluenceModeException(ValueError):
    """``mode`` is neither ``"up"`` nor ``"perturbation"``."""

    def __init__(self, mode: object) -> None:
        super().__init__(f"mode must be one of ['up', 'perturbation'] (InfluenceMode.Up, InfluenceMode.Perturbation), "
                         f"got {mode!r}")
        self.mode = mode


class NotImplementedLayerRepresentationException(NotImplementedError, ValueError):
    """A layer's curvature has no representation in a solver's approximation (e.g. no Kronecker
    factorization with an inverse)."""
