"""Exception classes that name what went wrong, with pyDVL's names.

Each also subclasses the built-in exceptions code catches today, so
``except RuntimeError`` (torchfluence's not-fitted error before these classes) and
``except ValueError`` (pyDVL's base of all three) both keep working.
"""

from __future__ import annotations

__all__ = ["NotFittedException", "NotImplementedLayerRepresentationException", "UnsupportedInfluenceModeException"]


class _AlsoPydvls(type):
    """Metaclass: the class also matches pyDVL's exception class of the same name.

    pyDVL's own code around a torchfluence solver (its influence calculators, which check
    the mode themselves) raises pyDVL's class; with this, ``isinstance``, ``issubclass``
    and ``pytest.raises`` written against the torchfluence name match both, without
    importing pyDVL. (A bare ``except`` clause checks real inheritance only: CPython does
    not consult the metaclass there.)
    """

    def __subclasscheck__(cls, subclass: type) -> bool:
        return type.__subclasscheck__(cls, subclass) or any(
            base.__name__ == cls.__name__ and base.__module__.split(".")[0] == "pydvl"
            for base in getattr(subclass, "__mro__", ()))

    def __instancecheck__(cls, instance: object) -> bool:
        return cls.__subclasscheck__(type(instance))


class NotFittedException(RuntimeError, ValueError, metaclass=_AlsoPydvls):
    """A solver was used before :meth:`fit` (or a load) gave it its fitted state."""


class UnsupportedInfluenceModeException(ValueError, metaclass=_AlsoPydvls):
    """``mode`` is neither ``"up"`` nor ``"perturbation"``."""

    def __init__(self, mode: object) -> None:
        super().__init__(f"mode must be one of ['up', 'perturbation'], got {mode!r}")
        self.mode = mode


class NotImplementedLayerRepresentationException(NotImplementedError, ValueError, metaclass=_AlsoPydvls):
    """A layer's curvature has no representation in a solver's approximation (e.g. no Kronecker
    factorization with an inverse)."""
