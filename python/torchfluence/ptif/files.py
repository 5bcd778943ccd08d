"""Logging, the text progress bar, and JSON / tensor files written so that nothing is half-written."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


def init_logging(filename: Optional[str] = None) -> None:
    """Logs INFO messages to stdout and, when `filename` is given, to that file as well."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if filename:
        handlers.insert(0, logging.FileHandler(filename))
    logging.basicConfig(handlers=handlers, level=logging.INFO, format="%(asctime)s: %(message)s")


def display_progress(text: str, current_step: int, last_step: int, enabled: bool = True,
                     fix_zero_start: bool = True) -> None:
    """Draws a one-line progress bar, ``text [====....] current / last``, on stdout.

    Args:
        text: what is being done.
        current_step: the step just finished (counted from 0 when `fix_zero_start`).
        last_step: the number of steps.
        enabled: draw nothing when False.
        fix_zero_start: add 1 to `current_step`, for loops that count from 0.
    """
    if not enabled or last_step <= 0:
        return
    current = current_step + 1 if fix_zero_start else current_step
    if text[-1:] not in (":", ";", " ", ".", ","):
        text += " "
    width = max(80 - len(text) - len(str(current)) - len(str(last_step)) - 4, 10)
    filled = min(width, int(round(width * current / last_step)))
    line = f"{text}[{'=' * filled}{'.' * (width - filled)}] {current} / {last_step}"
    sys.stdout.write(line + "\n" if current >= last_step else "\033[K" + line + "\r")
    sys.stdout.flush()


def jsonable(value: Any) -> Any:
    """A JSON-serialisable version of a label or value: tensors and NumPy values become Python ones."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def unique_path(path: Path) -> Path:
    """`path`, or, when it exists already, the same name with the current time appended (never overwrites)."""
    if not path.exists():
        return path
    stamp = datetime.now().strftime("%Y-%m-%d-%H-%M-%S-%f")
    return path.with_name(f"{path.stem}_{stamp}{path.suffix}")


def save_json(obj: Any, path: Path, *, overwrite: bool = False) -> Path:
    """Writes `obj` as indented JSON atomically; returns the path written (see :func:`unique_path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path if overwrite else unique_path(path)
    temporary = target.with_name(target.name + ".partial")
    with open(temporary, "w") as out:
        json.dump(jsonable(obj), out, indent=2)
    os.replace(temporary, target)
    return target


def save_tensor(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename: an interrupted run leaves no truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    torch.save(obj, temporary)
    os.replace(temporary, path)
