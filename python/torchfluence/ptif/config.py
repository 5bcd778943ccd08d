"""The pytorch-influence-functions config dict: defaults, and its checked, typed reading."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

SOLVERS = ("lissa", "cg", "direct", "arnoldi", "nystroem", "kfac", "ekfac")
DEFAULT_DAMP = 0.01
DEFAULT_SCALE = 25.0

# Keys the original library reads or documents, then the ones added here.
_KNOWN_KEYS = {
    "outdir", "seed", "gpu", "dataset", "num_classes", "test_sample_start_per_class", "test_sample_num",
    "test_start_index", "recursion_depth", "r_averaging", "r", "scale", "damp", "calc_method",
    "log_filename", "save_pth",
    "solver", "rank", "batch_size", "test_batch_size", "dtype", "num_harmful_helpful",
}


def get_default_config() -> dict[str, Any]:
    """The default config: every key of pytorch-influence-functions' config, plus torchfluence's.

    Keys of the original library:
        outdir: folder for the result JSON files (created when missing).
        seed: seeds ``random``, NumPy and torch before the computation.
        gpu: CUDA device index, or -1 for the CPU. The model must already be on that device.
        dataset: a name, recorded in the meta file only.
        num_classes: classes to draw test samples from (None: inferred from the labels).
        test_sample_num: test samples per class (False/None/0: every test sample).
        test_start_index: per class, how many samples to skip before taking them.
        test_sample_start_per_class: the documented name of ``test_start_index``.
        recursion_depth: LiSSA steps.
        r_averaging (or ``r``): independent LiSSA runs averaged.
        damp: lambda in (H + damp I)^-1; None means 0.01.
        scale: LiSSA's scale, which must exceed the largest eigenvalue of H + damp I; None means 25.
        calc_method: ``"img_wise"`` or ``"all_grad_then_test"``, recorded only.
        log_filename: also log to this file.
        save_pth: folder for the gradient files of ``calc_all_grad_then_test`` (default: ``outdir``).

    Keys added here:
        solver: ``"lissa"`` (default), ``"cg"``, ``"direct"``, ``"arnoldi"``, ``"nystroem"``,
            ``"kfac"`` or ``"ekfac"``.
        rank: rank of the Arnoldi and Nystroem solvers.
        batch_size: training samples per per-sample-gradient block (bounds memory).
        test_batch_size: test samples solved together (None: all selected at once).
        dtype: ``"float32"`` or ``"float64"`` (None: the model's, float32 for half-precision models).
        num_harmful_helpful: length of each test sample's harmful/helpful lists (None: all).
    """
    return {
        "outdir": "outdir",
        "seed": 42,
        "gpu": -1,
        "dataset": "CIFAR10",
        "num_classes": 10,
        "test_sample_start_per_class": False,
        "test_sample_num": 1,
        "test_start_index": 0,
        "recursion_depth": 5000,
        "r_averaging": 1,
        "scale": DEFAULT_SCALE,
        "damp": DEFAULT_DAMP,
        "calc_method": "img_wise",
        "log_filename": None,
        "save_pth": None,
        "solver": "lissa",
        "rank": 10,
        "batch_size": 256,
        "test_batch_size": None,
        "dtype": None,
        "num_harmful_helpful": 500,
    }


@dataclass(frozen=True)
class Settings:
    """A config dict after checking, with the defaults filled in."""

    outdir: Path
    seed: int
    device: torch.device
    num_classes: Optional[int]
    test_sample_num: Optional[int]
    test_start_index: int
    recursion_depth: int
    repetitions: int
    damp: float
    scale: float
    solver: str
    rank: int
    batch_size: int
    test_batch_size: Optional[int]
    dtype: Optional[torch.dtype]
    num_harmful_helpful: Optional[int]
    save_pth: Optional[Path]


def read_config(config: dict[str, Any]) -> Settings:
    """Checks `config` and returns its settings; each error names the key, expected and actual value."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (see get_default_config()), got {type(config).__name__}")
    unknown = sorted(set(config) - _KNOWN_KEYS)
    if unknown:
        warnings.warn(f"config: unknown keys {unknown} are ignored; the known keys are {sorted(_KNOWN_KEYS)}",
                      stacklevel=3)
    merged = {**get_default_config(), **config}
    return Settings(
        outdir=Path(_string(merged, "outdir")),
        seed=_int(merged, "seed"),
        device=_device(merged["gpu"]),
        num_classes=_optional_positive_int(merged, "num_classes"),
        test_sample_num=_optional_positive_int(merged, "test_sample_num"),
        test_start_index=_start_index(config),
        recursion_depth=_positive_int(merged, "recursion_depth"),
        repetitions=_repetitions(config),
        damp=_nonnegative_float(merged, "damp", DEFAULT_DAMP),
        scale=_positive_float(merged, "scale", DEFAULT_SCALE),
        solver=_choice(merged, "solver", SOLVERS),
        rank=_positive_int(merged, "rank"),
        batch_size=_positive_int(merged, "batch_size"),
        test_batch_size=_optional_positive_int(merged, "test_batch_size"),
        dtype=_dtype(merged["dtype"]),
        num_harmful_helpful=_optional_positive_int(merged, "num_harmful_helpful"),
        save_pth=None if merged["save_pth"] in (None, False, "") else Path(merged["save_pth"]),
    )


def _device(gpu: Any) -> torch.device:
    if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < -1:
        raise ValueError(f"config['gpu'] must be -1 (CPU) or a CUDA device index >= 0, got {gpu!r}")
    if gpu == -1:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"config['gpu'] is {gpu}, but CUDA is not available here; use -1 for the CPU")
    if gpu >= torch.cuda.device_count():
        raise ValueError(f"config['gpu'] is {gpu}, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device("cuda", gpu)


def _dtype(value: Any) -> Optional[torch.dtype]:
    names = {"float32": torch.float32, "float64": torch.float64}
    if value is None:
        return None
    if value in names.values():
        return value
    if value not in names:
        raise ValueError(f"config['dtype'] must be 'float32', 'float64' or None, got {value!r}")
    return names[value]


def _start_index(config: dict[str, Any]) -> int:
    # The code of the original reads `test_start_index`; its documentation calls the
    # same setting `test_sample_start_per_class`. Either works; conflicting values fail.
    values = {key: config[key] for key in ("test_start_index", "test_sample_start_per_class")
              if config.get(key) not in (None, False)}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config[{key!r}] must be an int >= 0 (or False), got {value!r}")
    if len(set(values.values())) > 1:
        raise ValueError(f"config: test_start_index and test_sample_start_per_class disagree: {values}")
    return next(iter(values.values()), 0)


def _repetitions(config: dict[str, Any]) -> int:
    values = {key: config[key] for key in ("r_averaging", "r") if key in config}
    for key in values:
        _positive_int(values, key)
    if len(set(values.values())) > 1:
        raise ValueError(f"config: r_averaging and r are the same setting but disagree: {values}")
    return next(iter(values.values()), 1)


def _string(config: dict[str, Any], key: str) -> str:
    value = config[key]
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"config[{key!r}] must be a non-empty path, got {value!r}")
    return str(value)


def _int(config: dict[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config[{key!r}] must be an int, got {value!r}")
    return value


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config[{key!r}] must be an int >= 1, got {value!r}")
    return value


def _optional_positive_int(config: dict[str, Any], key: str) -> Optional[int]:
    if config[key] in (None, False, 0):
        return None
    return _positive_int(config, key)


def _nonnegative_float(config: dict[str, Any], key: str, default: float) -> float:
    value = default if config[key] is None else config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"config[{key!r}] must be a finite number >= 0, got {value!r}")
    return float(value)


def _positive_float(config: dict[str, Any], key: str, default: float) -> float:
    value = _nonnegative_float(config, key, default)
    if value == 0:
        raise ValueError(f"config[{key!r}] must be > 0, got {value!r}")
    return value


def _choice(config: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = config[key]
    if value not in choices:
        raise ValueError(f"config[{key!r}] must be one of {list(choices)}, got {value!r}")
    return value
