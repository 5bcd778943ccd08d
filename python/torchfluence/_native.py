"""Loads the compiled module `torchfluence._C` with an actionable error."""

from __future__ import annotations

import importlib

try:
    # By its full name: the extension is a sibling module, not something the package's
    # __init__ (which imports this module) provides.
    _C = importlib.import_module(f"{__package__}._C")
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "torchfluence's compiled module torchfluence._C could not be loaded "
        f"({error}). Build it from the source tree with `make install`, or with "
        "`pip install scikit-build-core pybind11 ninja && pip install --no-build-isolation -e .` "
        "next to an installed torch (needs a C++17 compiler and CMake >= 3.24; "
        "set TORCHFLUENCE_CUDA=ON to require the CUDA kernels)."
    ) from error

__all__ = ["_C"]
