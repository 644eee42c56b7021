"""Loaders for published editing directions, strict, with errors that say what a file is.

* InterFaceGAN boundary `.npy` (e.g. `stylegan_ffhq_age_w_boundary.npy`): float64 [1, 512]
  (a bare [512] is accepted). The vector is returned exactly as stored: InterFaceGAN
  boundaries are already unit normals of the separating hyperplane, and renormalising would
  silently change what a calibrated strength means.
* e4e `editings/interfacegan_directions/*.pt`: a tensor [1, 512] (age.pt, smile.pt) or
  [1, 18, 512] (pose.pt), some saved from a CUDA device; `read_torch_file` maps them to CPU.
* GANSpace native `.npz` (lat_comp [K, 1, 512], lat_mean [1, 512], lat_stdev [K], other keys
  ignored) and e4e's `ffhq_pca.pt` (dict: mean [1, 512], comp [K, 1, 512], std [K]): both
  become one `PCADirections` (mean [D], comp [K, D], std [K]).

The returned containers (`DirectionSet`, `PCADirections`) live in faceedit.edits (numpy only)
so the gateway can use them without PyTorch.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from faceedit.checkpoint import CheckpointError, describe_file, read_torch_file
from faceedit.edits import DirectionSet, PCADirections

__all__ = [
    "DirectionError", "DirectionSet", "PCADirections", "load_interfacegan_boundary", "load_e4e_direction",
    "load_ganspace_npz", "load_e4e_pca", "load_pca", "load_direction", "load_direction_set",
]

log = logging.getLogger(__name__)

# InterFaceGAN boundaries are unit normals; a norm far from 1 means some other file.
_UNIT_TOLERANCE = 1e-3


class DirectionError(CheckpointError):
    """A direction file does not hold what its loader expects (message says how)."""


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DirectionError(f"{path}: no such file")


def _finite(path: Path, what: str, arr: np.ndarray) -> None:
    if arr.dtype.kind != "f":
        raise DirectionError(f"{path}: {what} must be floating point, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise DirectionError(f"{path}: {what} has non-finite values (NaN/inf)")


def load_interfacegan_boundary(path: str | Path) -> np.ndarray:
    """An InterFaceGAN boundary `.npy` -> [D] in its stored dtype and values (float64 as published)."""
    path = Path(path)
    _require_file(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DirectionError(f"{path}: not a numpy .npy array; the file is {describe_file(path)} ({exc})") from exc
    if not isinstance(arr, np.ndarray):
        # np.load returns an NpzFile for .npz archives
        arr.close()
        raise DirectionError(f"{path}: not a numpy .npy array; the file is {describe_file(path)}")
    if not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[0] == 1)) or arr.shape[-1] < 1:
        raise DirectionError(f"{path}: an InterFaceGAN boundary must be [1, D] or [D], got shape {list(arr.shape)}")
    _finite(path, "boundary", arr)
    vector = arr.reshape(-1)
    norm = float(np.linalg.norm(vector))
    if abs(norm - 1.0) > _UNIT_TOLERANCE:
        log.warning("%s: boundary norm is %.6f, InterFaceGAN boundaries are unit normals", path, norm)
    return vector


def _tensor_to_numpy(path: Path, obj, what: str) -> np.ndarray:
    if not isinstance(obj, torch.Tensor):
        raise DirectionError(f"{path}: {what} must be a tensor, got {type(obj).__name__}")
    arr = obj.detach().cpu().numpy()
    _finite(path, what, arr)
    return arr


def load_e4e_direction(path: str | Path) -> np.ndarray:
    """An e4e InterFaceGAN direction `.pt`: [1, D] -> [D]; [1, L, D] -> [L, D] (float32)."""
    path = Path(path)
    obj = read_torch_file(path)  # map_location=cpu: pose.pt was saved from cuda:0
    arr = _tensor_to_numpy(path, obj, "direction")
    if arr.ndim not in (2, 3) or arr.shape[0] != 1:
        raise DirectionError(f"{path}: an e4e direction must be [1, D] or [1, L, D], got shape {list(arr.shape)}")
    return arr[0].astype(np.float32)


def _pca_from(path: Path, mean: np.ndarray, comp: np.ndarray, std: np.ndarray, names: tuple[str, str, str]) -> PCADirections:
    """Shared shape checks: mean [1, D], comp [K, 1, D], std [K]."""
    mean_name, comp_name, std_name = names
    if mean.ndim != 2 or mean.shape[0] != 1:
        raise DirectionError(f"{path}: {mean_name} must be [1, D], got shape {list(mean.shape)}")
    dim = mean.shape[1]
    if comp.ndim != 3 or comp.shape[1] != 1 or comp.shape[2] != dim:
        raise DirectionError(f"{path}: {comp_name} must be [K, 1, {dim}], got shape {list(comp.shape)}")
    k = comp.shape[0]
    if std.shape != (k,):
        raise DirectionError(f"{path}: {std_name} must be [{k}] (one per component), got shape {list(std.shape)}")
    for name, arr in ((mean_name, mean), (comp_name, comp), (std_name, std)):
        _finite(path, name, arr)
    if np.any(std <= 0):
        raise DirectionError(f"{path}: {std_name} must be > 0 everywhere")
    return PCADirections(mean=mean[0], comp=comp[:, 0, :], std=std)


def load_ganspace_npz(path: str | Path) -> PCADirections:
    """GANSpace's native `.npz` (lat_comp, lat_mean, lat_stdev; act_* and var_ratio ignored)."""
    path = Path(path)
    _require_file(path)
    if not zipfile.is_zipfile(path):
        raise DirectionError(f"{path}: not a GANSpace .npz archive; the file is {describe_file(path)}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DirectionError(f"{path}: not a GANSpace .npz archive; the file is {describe_file(path)} ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DirectionError(f"{path}: expected a .npz archive, the file is {describe_file(path)}")
    with archive:
        keys = set(archive.files)
        missing = [k for k in ("lat_comp", "lat_mean", "lat_stdev") if k not in keys]
        if missing:
            raise DirectionError(f"{path}: GANSpace .npz is missing {missing}; it holds {sorted(keys)}")
        try:
            comp, mean, std = (np.asarray(archive[k]) for k in ("lat_comp", "lat_mean", "lat_stdev"))
        except ValueError as exc:  # object arrays need pickle, which we never allow
            raise DirectionError(f"{path}: cannot read lat_* arrays without pickle ({exc})") from exc
    return _pca_from(path, mean, comp, std, ("lat_mean", "lat_comp", "lat_stdev"))


def load_e4e_pca(path: str | Path) -> PCADirections:
    """e4e's `ffhq_pca.pt`: a dict with mean [1, D], comp [K, 1, D], std [K]."""
    path = Path(path)
    obj = read_torch_file(path)
    if not isinstance(obj, dict):
        raise DirectionError(f"{path}: e4e PCA must be a dict with mean/comp/std, got {type(obj).__name__}")
    missing = [k for k in ("mean", "comp", "std") if k not in obj]
    if missing:
        raise DirectionError(f"{path}: e4e PCA dict is missing {missing}; it holds {sorted(map(str, obj))}")
    mean, comp, std = (_tensor_to_numpy(path, obj[k], k) for k in ("mean", "comp", "std"))
    return _pca_from(path, mean, comp, std, ("mean", "comp", "std"))


def load_pca(path: str | Path) -> PCADirections:
    """Either PCA format, told apart by content (a torch zip vs a numpy archive)."""
    path = Path(path)
    _require_file(path)
    what = describe_file(path)
    if what == "a torch zip checkpoint":
        return load_e4e_pca(path)
    if what == "a numpy .npz archive":
        return load_ganspace_npz(path)
    raise DirectionError(f"{path}: expected a GANSpace .npz or e4e ffhq_pca.pt; the file is {what}")


def load_direction(path: str | Path) -> np.ndarray:
    """One direction file by content: `.npy` boundary -> [D]; e4e `.pt` -> [D] or [L, D]."""
    path = Path(path)
    _require_file(path)
    what = describe_file(path)
    if what == "a numpy .npy array":
        return load_interfacegan_boundary(path)
    if what == "a torch zip checkpoint":
        return load_e4e_direction(path)
    raise DirectionError(f"{path}: expected an InterFaceGAN .npy or an e4e direction .pt; the file is {what}")


def load_direction_set(files: Mapping[str, str | Path], n_latent: int, style_dim: int) -> DirectionSet:
    """name -> file; every direction is loaded and checked against the generator's W+."""
    directions = DirectionSet({name: load_direction(p) for name, p in files.items()})
    directions.validate(n_latent, style_dim)
    return directions
