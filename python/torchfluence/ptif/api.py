"""``calc_img_wise`` and ``calc_all_grad_then_test``: influences of every training sample on chosen test samples."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..influence import InfluenceFunctionModel
from .compute import (
    check_model_device,
    collate,
    dataset_size,
    in_order,
    influence_rows,
    label_value,
    make_solver,
    ranking,
    scores_of_saved_gradients,
    seed_everything,
    select_test_indices,
)
from .config import Settings, get_default_config, read_config
from .files import jsonable, save_json, save_tensor

log = logging.getLogger("torchfluence.ptif")

Results = tuple[dict[str, dict[str, Any]], list[int], list[int]]


def calc_img_wise(config: dict[str, Any], model: nn.Module, train_loader: DataLoader,
                  test_loader: DataLoader) -> Results:
    """Influences of every training sample on each selected test sample.

    All selected test samples are solved together (``test_batch_size`` at a time) and
    the training gradients are computed once per group, in batches, then assembled
    with the influence kernel.

    Files written to ``config["outdir"]``: ``influences_results_meta_<start>-<num>.json``
    (the config and ``test_sample_index_list``) before the work, a temporary
    ``influence_results_tmp_<start>_<num>_last-i_<i>.json`` after each group, and
    ``influence_results_<start>_<num>.json`` at the end. An existing file is never
    overwritten: the new one gets the time appended to its name.

    Returns:
        (influences, harmful, helpful): ``influences[str(test index)]`` holds ``label``,
        ``num_in_dataset`` (position in the processing order), ``time_calc_influence_s``
        (this sample's share of the wall time), ``influence`` (n_train floats) and its
        ``harmful`` / ``helpful`` training indices; the top-level ``harmful`` and
        ``helpful`` order all training indices by the influence averaged over the test samples.
    """
    settings = read_config(config)
    check_model_device(model, settings.device)
    seed_everything(settings.seed)
    n_train = dataset_size(train_loader, "train_loader")
    indices = select_test_indices(test_loader, settings)
    start, num = _name_parts(config)
    log.info(f"Running on: {settings.test_sample_num or 'all'} images per class, {len(indices)} test samples.")
    log.info(f"Starting at img number: {settings.test_start_index} per class.")
    save_json({**copy.deepcopy(config), "test_sample_index_list": indices},
              settings.outdir / f"influences_results_meta_{start}-{num}.json")

    began = time.perf_counter()
    solver = make_solver(model, settings).fit(train_loader)
    fit_share = (time.perf_counter() - began) / len(indices)
    ordered = in_order(train_loader, settings.batch_size)

    results: dict[str, dict[str, Any]] = {}
    total = torch.zeros(n_train, dtype=torch.float64)
    temporary: Optional[Path] = None
    for group in _groups(indices, settings.test_batch_size):
        began = time.perf_counter()
        x, y = collate(test_loader, group)
        rows = influence_rows(solver.scores_from_factors(solver.influence_factors(x, y), ordered))
        share = (time.perf_counter() - began) / len(group) + fit_share
        _record(results, test_loader, group, indices, rows, share, settings)
        total += rows.sum(dim=0)
        previous, temporary = temporary, save_json(
            results, settings.outdir / f"influence_results_tmp_{start}_{num}_last-i_{group[-1]}.json")
        if previous is not None:
            previous.unlink(missing_ok=True)  # the newer file holds everything the older one did

    harmful, helpful = ranking(total / len(indices))
    final = save_json(results, settings.outdir / f"influence_results_{start}_{num}.json")
    if temporary is not None:
        temporary.unlink(missing_ok=True)
    _log_summary(results, harmful, helpful, final)
    return results, harmful, helpful


def calc_all_grad_then_test(config: dict[str, Any], model: nn.Module, train_loader: DataLoader,
                            test_loader: DataLoader) -> Results:
    """All training gradients and all ``s_test`` vectors to disk first, then the influences from the files.

    Files go to ``config["save_pth"]`` (default: ``outdir``): ``grad_z/<start>-<stop>.grad_z``
    (a (b, p) tensor per training block), ``s_test/<i>_recdep<depth>_r<r>.s_test`` (LiSSA) or
    ``s_test/<i>_<solver>.s_test`` (a list of parameter-shaped tensors per test sample), and
    ``torchfluence_manifest.json``. A rerun with the same model and settings reuses every
    finished file, so an interrupted job resumes where it stopped; a rerun with a different
    model or settings is refused rather than mixing results. Each file is written under a
    temporary name and renamed, so an interruption never leaves a truncated one.

    ``outdir/influence_results.json`` holds ``influences`` (n_train floats, averaged over
    the test samples), ``harmful``, ``helpful`` (ordered by that average) and ``per_test``
    (the per-test-sample dict of :func:`calc_img_wise`). The return value is as there.
    """
    settings = read_config(config)
    check_model_device(model, settings.device)
    seed_everything(settings.seed)
    n_train = dataset_size(train_loader, "train_loader")
    indices = select_test_indices(test_loader, settings)
    store = settings.save_pth or settings.outdir
    start, num = _name_parts(config)
    save_json({**copy.deepcopy(config), "test_sample_index_list": indices},
              settings.outdir / f"influences_results_meta_{start}-{num}.json")

    began = time.perf_counter()
    solver = make_solver(model, settings).fit(train_loader)
    manifest = _check_manifest(store, solver, settings, n_train, _items_digest(train_loader, range(n_train)))
    blocks = _save_grad_z(solver, train_loader, store / "grad_z", settings.batch_size, n_train)
    factor_files = _save_s_test(solver, test_loader, indices, store / "s_test", settings, manifest,
                                store / "torchfluence_manifest.json")
    share = (time.perf_counter() - began) / len(indices)

    results: dict[str, dict[str, Any]] = {}
    total = torch.zeros(n_train, dtype=torch.float64)
    for group in _groups(indices, settings.test_batch_size):
        began = time.perf_counter()
        factors = torch.stack([_load_flat(factor_files[i], solver) for i in group])
        scores = scores_of_saved_gradients(solver, factors, blocks, lambda entry: _load_block(entry, solver))
        rows = influence_rows(scores)
        _record(results, test_loader, group, indices, rows, share + (time.perf_counter() - began) / len(group),
                settings)
        total += rows.sum(dim=0)

    mean = total / len(indices)
    harmful, helpful = ranking(mean)
    final = save_json({"influences": mean.tolist(), "harmful": harmful, "helpful": helpful, "per_test": results},
                      settings.outdir / "influence_results.json")
    _log_summary(results, harmful, helpful, final)
    return results, harmful, helpful


# -- helpers ---------------------------------------------------------------------------------------------
def _name_parts(config: dict[str, Any]) -> tuple[Any, Any]:
    """The raw config values the original file names are built from."""
    merged = {**get_default_config(), **config}
    return merged["test_start_index"], merged["test_sample_num"]


def _groups(indices: list[int], size: Optional[int]) -> Iterator[list[int]]:
    size = size or len(indices)
    groups = [indices[i:i + size] for i in range(0, len(indices), size)]
    yield from tqdm(groups, desc="test samples", disable=len(groups) < 2)


def _record(results: dict, test_loader: DataLoader, group: list[int], indices: list[int], rows: Tensor,
            seconds: float, settings: Settings) -> None:
    position = {index: j for j, index in enumerate(indices)}
    keep = settings.num_harmful_helpful
    for index, row in zip(group, rows):
        harmful, helpful = ranking(row)
        results[str(index)] = {
            "label": jsonable(label_value(test_loader.dataset[index][1])),
            "num_in_dataset": position[index],
            "time_calc_influence_s": seconds,
            "influence": row.tolist(),
            "harmful": harmful[:keep],
            "helpful": helpful[:keep],
        }


def _log_summary(results: dict, harmful: list[int], helpful: list[int], path: Path) -> None:
    last = results[next(reversed(results))]
    log.info("Influences (last test sample, first 3): %s", last["influence"][:3])
    log.info("Most harmful img IDs (averaged over the test samples): %s", harmful[:3])
    log.info("Most helpful img IDs (averaged over the test samples): %s", helpful[:3])
    log.info("Results written to %s", path)


def _items_digest(loader: DataLoader, indices: Any) -> str:
    """A digest of the dataset items `indices` of `loader` (inputs and labels, bits, shapes and dtypes)."""
    digest = hashlib.blake2b(digest_size=16)
    for i in indices:
        for value in loader.dataset[i][:2]:
            t = torch.as_tensor(value).detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _check_manifest(store: Path, solver: InfluenceFunctionModel, settings: Settings, n_train: int,
                    train_digest: str) -> dict:
    """Refuses to mix saved files of another model, other training data or other settings with this
    run's; returns the manifest (with the digest of each saved s_test's test sample)."""
    manifest = {
        "model": solver.model_fingerprint(), "train_data": train_digest, "num_params": solver.num_params,
        "n_train": n_train,
        "batch_size": settings.batch_size, "dtype": str(solver.dtype), "solver": settings.solver,
        "damp": settings.damp, "scale": settings.scale, "recursion_depth": settings.recursion_depth,
        "r": settings.repetitions, "rank": settings.rank, "seed": settings.seed,
    }
    path = store / "torchfluence_manifest.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: unreadable manifest ({error}); delete it with the grad_z/ and s_test/ "
                             "folders beside it") from error
        differ = {k: (saved.get(k), v) for k, v in manifest.items() if saved.get(k) != v}
        if differ:
            raise ValueError(
                f"{store} holds gradient files of another run (saved vs now: {differ}); "
                "use another save_pth or delete its grad_z/ and s_test/ folders")
        log.info("Resuming with the files in %s", store)
        return {**manifest, "s_test": dict(saved.get("s_test", {}))}
    manifest["s_test"] = {}
    save_json(manifest, path, overwrite=True)
    return manifest


def _save_grad_z(solver: InfluenceFunctionModel, train_loader: DataLoader, folder: Path, size: int,
                 n_train: int) -> list[tuple[Path, int, int]]:
    """Writes each missing training-gradient block (b, p); returns (file, first index, count) in index order."""
    paths = []
    for begin in tqdm(range(0, n_train, size), desc="grad_z"):
        stop = min(begin + size, n_train)
        path = folder / f"{begin}-{stop}.grad_z"
        if not path.exists():
            x, y = collate(train_loader, range(begin, stop))
            save_tensor(solver.grads(x, y).cpu(), path)
        paths.append((path, begin, stop - begin))
    return paths


def _save_s_test(solver: InfluenceFunctionModel, test_loader: DataLoader, indices: list[int], folder: Path,
                 settings: Settings, manifest: dict, manifest_path: Path) -> dict[int, Path]:
    """Writes each test sample's (H + damp I)^-1 grad L(z_test) whose file is missing or was made from
    another test sample (the manifest keeps each file's sample digest); returns the file of each."""
    suffix = (f"_recdep{settings.recursion_depth}_r{settings.repetitions}" if settings.solver == "lissa"
              else f"_{settings.solver}")
    files = {i: folder / f"{i}{suffix}.s_test" for i in indices}
    digests = {i: _items_digest(test_loader, [i]) for i in indices}
    made = manifest["s_test"]
    missing = [i for i in indices if not files[i].exists() or made.get(files[i].name) != digests[i]]
    for group in _groups(missing, settings.test_batch_size) if missing else ():
        x, y = collate(test_loader, group)
        for i, factor in zip(group, solver.influence_factors(x, y)):
            save_tensor([t.cpu() for t in solver.functions.unflatten(factor).values()], files[i])
            made[files[i].name] = digests[i]
    if missing:
        save_json(manifest, manifest_path, overwrite=True)
    return files


def _load(path: Path) -> Any:
    """torch.load of a saved file (tensors only), with an error that names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, not a torch file, pickled objects: all name the file
        raise ValueError(f"{path}: cannot be read as a saved tensor file ({type(error).__name__}: {error}); "
                         "delete it and rerun to recompute it") from error


def _load_flat(path: Path, solver: InfluenceFunctionModel) -> Tensor:
    """One saved s_test (a list of parameter-shaped tensors) as a flat (p,) vector, checked."""
    parts = _load(path)
    shapes = [tuple(t.shape) for t in parts] if isinstance(parts, (list, tuple)) and all(
        isinstance(t, Tensor) for t in parts) else None
    expected = [tuple(s) for s in solver.functions.shapes]
    if shapes != expected:
        raise ValueError(f"{path}: expected an s_test of parameter shapes {expected}, got "
                         f"{shapes if shapes is not None else type(parts).__name__}")
    return torch.cat([t.reshape(-1) for t in parts]).to(solver.device, solver.dtype)


def _load_block(entry: tuple[Path, int, int], solver: InfluenceFunctionModel) -> Tensor:
    """One saved (b, p) training-gradient block, checked, on the solver's device."""
    path, _, count = entry
    grads = _load(path)
    if not isinstance(grads, Tensor) or grads.dim() != 2 or grads.shape != (count, solver.num_params):
        got = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
        raise ValueError(f"{path}: expected a ({count}, {solver.num_params}) gradient block, got {got}")
    return grads.to(solver.device, solver.dtype)
