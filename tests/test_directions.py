"""Direction file loaders: InterFaceGAN .npy, e4e .pt (incl. CUDA-saved), GANSpace .npz,
e4e ffhq_pca.pt, and DirectionSet validation. Files are written in the published layouts."""
from __future__ import annotations

import pickletools
import struct
import zipfile

import numpy as np
import pytest
import torch

from faceedit.checkpoint import CheckpointError
from faceedit.edits import DirectionSet, PCADirections
from faceedit.loaders.directions import (
    DirectionError,
    load_direction,
    load_direction_set,
    load_e4e_direction,
    load_e4e_pca,
    load_ganspace_npz,
    load_interfacegan_boundary,
    load_pca,
)

D = 512


def _unit(seed: int, *shape: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(shape)
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------- InterFaceGAN .npy


def test_boundary_kept_exactly(tmp_path):
    boundary = _unit(0, 1, D)  # float64 [1, 512] as InterFaceGAN saves it
    np.save(tmp_path / "age.npy", boundary)
    got = load_interfacegan_boundary(tmp_path / "age.npy")
    assert got.shape == (D,) and got.dtype == np.float64
    np.testing.assert_array_equal(got, boundary[0])  # bit-exact, not renormalised


def test_boundary_accepts_flat_vector(tmp_path):
    np.save(tmp_path / "b.npy", _unit(1, D))
    assert load_interfacegan_boundary(tmp_path / "b.npy").shape == (D,)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((2, D)), r"must be \[1, D\] or \[D\], got shape \[2, 512\]"),
        (np.zeros((1, 18, D)), r"got shape \[1, 18, 512\]"),
        (np.full((1, D), np.nan), "non-finite"),
        (np.ones((1, D), dtype=np.int64), "floating point"),
    ],
)
def test_boundary_rejects_bad_arrays(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DirectionError, match=match):
        load_interfacegan_boundary(tmp_path / "bad.npy")


def test_boundary_names_the_wrong_file_type(tmp_path):
    torch.save(torch.zeros(1, D), tmp_path / "age.npy")  # a torch file with a .npy name
    with pytest.raises(DirectionError, match="not a numpy .npy array; the file is a torch zip checkpoint"):
        load_interfacegan_boundary(tmp_path / "age.npy")
    with pytest.raises(DirectionError, match="no such file"):
        load_interfacegan_boundary(tmp_path / "missing.npy")


# --------------------------------------------------------------------------- e4e .pt


def _retag_storage_location(path, old: str, new: str) -> None:
    """Rewrite the storage location recorded in a torch zip's data.pkl (what torch.save
    writes for a tensor living on `new`), so a CUDA-saved file can be made without a GPU.
    The pickle is edited opcode by opcode (never a blind byte replace)."""
    with zipfile.ZipFile(path) as zf:
        entries = [(info, zf.read(info.filename)) for info in zf.infolist()]
    out_entries = []
    hits = 0
    for info, data in entries:
        if info.filename.endswith("/data.pkl"):
            ops = list(pickletools.genops(data))
            pieces, last = [], 0
            for i, (op, arg, pos) in enumerate(ops):
                if arg == old and op.name in ("BINUNICODE", "SHORT_BINUNICODE"):
                    end = ops[i + 1][2]
                    raw = new.encode()
                    if op.name == "BINUNICODE":
                        repl = b"X" + struct.pack("<I", len(raw)) + raw
                    else:
                        repl = b"\x8c" + bytes([len(raw)]) + raw
                    pieces += [data[last:pos], repl]
                    last = end
                    hits += 1
            data = b"".join(pieces) + data[last:]
        out_entries.append((info, data))
    assert hits == 1, f"expected one storage location tag, found {hits}"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for info, data in out_entries:
            zf.writestr(info, data)


def test_e4e_direction_saved_on_cuda_loads_on_cpu(tmp_path):
    pose = torch.from_numpy(_unit(2, 1, 18, D).astype(np.float32))
    path = tmp_path / "pose.pt"
    torch.save(pose, path)
    _retag_storage_location(path, "cpu", "cuda:0")
    if not torch.cuda.is_available():
        # proof the file really says cuda:0: a plain load without map_location refuses it
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    got = load_e4e_direction(path)
    assert got.shape == (18, D) and got.dtype == np.float32
    np.testing.assert_array_equal(got, pose[0].numpy())


def test_e4e_direction_flat(tmp_path):
    age = torch.from_numpy(_unit(3, 1, D).astype(np.float32))
    torch.save(age, tmp_path / "age.pt")
    got = load_e4e_direction(tmp_path / "age.pt")
    assert got.shape == (D,)
    np.testing.assert_array_equal(got, age[0].numpy())


def test_e4e_direction_rejects(tmp_path):
    torch.save(torch.zeros(2, D), tmp_path / "two.pt")
    with pytest.raises(DirectionError, match=r"\[1, D\] or \[1, L, D\], got shape \[2, 512\]"):
        load_e4e_direction(tmp_path / "two.pt")
    torch.save({"w": torch.zeros(1, D)}, tmp_path / "dict.pt")
    with pytest.raises(DirectionError, match="must be a tensor, got dict"):
        load_e4e_direction(tmp_path / "dict.pt")
    with open(tmp_path / "npy.pt", "wb") as fh:  # np.save(path) would append ".npy"
        np.save(fh, np.zeros(D))
    with pytest.raises(CheckpointError, match="the file is a numpy .npy array"):
        load_e4e_direction(tmp_path / "npy.pt")


# --------------------------------------------------------------------------- PCA files


def _pca_arrays(k: int = 5, dim: int = 16):
    rng = np.random.default_rng(4)
    comp, _ = np.linalg.qr(rng.standard_normal((dim, k)))
    mean = rng.standard_normal((1, dim)).astype(np.float32)
    return mean, comp.T[:, None, :].astype(np.float32), np.linspace(3.0, 1.0, k).astype(np.float32)


def test_ganspace_npz(tmp_path):
    mean, comp, std = _pca_arrays()
    # GANSpace stores activation-space results and the variance ratio too; they are ignored
    np.savez(tmp_path / "g.npz", lat_comp=comp, lat_mean=mean, lat_stdev=std,
             act_comp=comp, act_mean=mean, act_stdev=std, var_ratio=std / std.sum())
    pca = load_ganspace_npz(tmp_path / "g.npz")
    assert isinstance(pca, PCADirections)
    assert pca.mean.shape == (16,) and pca.comp.shape == (5, 16) and pca.std.shape == (5,)
    np.testing.assert_array_equal(pca.comp, comp[:, 0])
    np.testing.assert_array_equal(pca.mean, mean[0])
    assert load_pca(tmp_path / "g.npz").n_components == 5


def test_e4e_pca_pt(tmp_path):
    mean, comp, std = _pca_arrays(k=80, dim=96)
    torch.save({"mean": torch.from_numpy(mean), "comp": torch.from_numpy(comp), "std": torch.from_numpy(std)},
               tmp_path / "ffhq_pca.pt")
    pca = load_e4e_pca(tmp_path / "ffhq_pca.pt")
    assert pca.comp.shape == (80, 96) and pca.std.shape == (80,)
    np.testing.assert_array_equal(pca.std, std)
    assert load_pca(tmp_path / "ffhq_pca.pt").n_components == 80


def test_pca_files_rejected_clearly(tmp_path):
    mean, comp, std = _pca_arrays()
    np.savez(tmp_path / "nokeys.npz", comp=comp)
    with pytest.raises(DirectionError, match=r"missing \['lat_comp', 'lat_mean', 'lat_stdev'\]; it holds \['comp'\]"):
        load_ganspace_npz(tmp_path / "nokeys.npz")
    np.savez(tmp_path / "flat.npz", lat_comp=comp[:, 0], lat_mean=mean, lat_stdev=std)
    with pytest.raises(DirectionError, match=r"lat_comp must be \[K, 1, 16\], got shape \[5, 16\]"):
        load_ganspace_npz(tmp_path / "flat.npz")
    np.savez(tmp_path / "std.npz", lat_comp=comp, lat_mean=mean, lat_stdev=std[:3])
    with pytest.raises(DirectionError, match=r"lat_stdev must be \[5\]"):
        load_ganspace_npz(tmp_path / "std.npz")
    torch.save({"mean": torch.from_numpy(mean)}, tmp_path / "pca.pt")
    with pytest.raises(DirectionError, match=r"missing \['comp', 'std'\]"):
        load_e4e_pca(tmp_path / "pca.pt")
    np.save(tmp_path / "x.npy", mean)
    with pytest.raises(DirectionError, match="the file is a numpy .npy array"):
        load_pca(tmp_path / "x.npy")
    with pytest.raises(DirectionError, match="not a GANSpace .npz archive; the file is a numpy .npy array"):
        load_ganspace_npz(tmp_path / "x.npy")


# --------------------------------------------------------------------------- DirectionSet


def test_direction_set_from_files(tmp_path):
    np.save(tmp_path / "age.npy", _unit(5, 1, D))
    torch.save(torch.from_numpy(_unit(6, 1, 18, D).astype(np.float32)), tmp_path / "pose.pt")
    torch.save(torch.from_numpy(_unit(7, 1, D).astype(np.float32)), tmp_path / "smile.pt")
    files = {"age": tmp_path / "age.npy", "pose": tmp_path / "pose.pt", "smile": tmp_path / "smile.pt"}
    ds = load_direction_set(files, n_latent=18, style_dim=D)
    assert ds.names() == ("age", "pose", "smile")
    assert ds["pose"].shape == (18, D) and ds["age"].shape == (D,) and ds["age"].dtype == np.float32
    with pytest.raises(ValueError, match=r"a per-layer direction needs n_latent 14 rows"):
        load_direction_set(files, n_latent=14, style_dim=D)
    assert load_direction(tmp_path / "age.npy").dtype == np.float64


def test_direction_set_validation():
    ds = DirectionSet({"a": np.ones(8), "b": np.ones((4, 8))})
    ds.validate(n_latent=4, style_dim=8)
    with pytest.raises(ValueError, match=r"direction 'a': shape \[8\], last dim must be style_dim 16"):
        ds.validate(n_latent=4, style_dim=16)
    with pytest.raises(KeyError, match=r"'c' is not in this set; known: \['a', 'b'\]"):
        ds["c"]
    with pytest.raises(ValueError, match="non-finite"):
        DirectionSet({"bad": np.array([1.0, np.inf])})
    with pytest.raises(ValueError, match="must be 1-D or 2-D"):
        DirectionSet({"bad": np.ones((1, 2, 3))})
    bigger = ds.with_direction("c", np.zeros(8))
    assert bigger.names() == ("a", "b", "c") and ds.names() == ("a", "b")
    with pytest.raises(ValueError, match="read-only"):
        ds["a"][0] = 5.0


def test_calibrated_scale_is_capped_at_the_codes_spread():
    from faceedit.world.trainers.directions import MAX_RANGE_SIGMAS, capped_scale

    assert capped_scale(0.3, 0.5, 1.0) == 0.3                           # within the cap over the range
    assert capped_scale(685.0, 0.5, 1.0) == MAX_RANGE_SIGMAS * 0.5        # a direction the generator ignores
    assert capped_scale(-685.0, 0.5, 60.0) == -MAX_RANGE_SIGMAS * 0.5 / 60.0
    with pytest.raises(ValueError, match="sigma and span"):
        capped_scale(1.0, 0.0, 1.0)
