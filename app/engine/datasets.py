"""Data for the learned paradigms: preprocessing (shared by training and inference), the IXI split,
preloaded subjects, pair sampling, augmentation and synthetic deformations.

Preprocessing puts any 3D image on a *working grid*: the checkpoint's shape, spacing and
orientation, centred on the image's own physical centre, with intensities clipped to a percentile
and scaled to [0, 1] (:func:`preprocess`). Training preloads every subject once through exactly
that function, so inference sees what training saw.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .types import LabelMap, Volume

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SPLIT = REPO_ROOT / "resources" / "splits" / "ixi_split.json"
DEFAULT_IXI_ROOT = Path(os.environ.get("REGSTATION_IXI", "/work/shared/data/ixi"))
IXI_DIRECTION = ((0.0, 0.0, -1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))   # sagittal IXI (HH) scans, LPS


@dataclass
class Preprocessing:
    """What a learned model expects of its inputs (stored in every checkpoint).

    grid_shape : working grid (z, y, x).
    spacing_mm : isotropic working spacing.
    direction : 3x3 orientation of the working grid (columns = index axes x, y, z in LPS).
    percentile : intensities are clipped to [min, this percentile] and scaled to [0, 1].
    prealignment : 'center_of_mass' (moving translated so that intensity centroids coincide,
        computed inside the pipeline) or 'none' (physical coordinates as they are).
    """

    grid_shape: tuple = (45, 60, 60)
    spacing_mm: float = 4.0
    direction: tuple = IXI_DIRECTION
    percentile: float = 99.0
    prealignment: str = "center_of_mass"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid_shape"] = [int(s) for s in self.grid_shape]
        d["direction"] = [[float(v) for v in row] for row in np.asarray(self.direction, float)]
        d["intensity"] = f"clip to [min, p{self.percentile:g}] then scale to [0, 1]"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "grid_shape" in kw:
            kw["grid_shape"] = tuple(int(s) for s in kw["grid_shape"])
        if "direction" in kw:
            kw["direction"] = tuple(tuple(float(v) for v in row) for row in kw["direction"])
        return cls(**kw)


def fine_preprocessing(prep: Preprocessing, factor: int = 2) -> Preprocessing:
    """The refinement grid of ``prep``: same centre, orientation and extent, ``factor`` times finer
    (shape x factor, spacing / factor); coarse index ``i`` is fine index ``factor * i + (factor - 1) / 2``."""
    return dataclasses.replace(prep, grid_shape=tuple(int(s) * factor for s in prep.grid_shape),
                               spacing_mm=float(prep.spacing_mm) / factor)


# --------------------------------------------------------------------------- preprocessing
def normalize_intensity(array: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Clip to ``[min, percentile]`` and scale to [0, 1]; float32, same shape (z, y, x)."""
    a = np.asarray(array, np.float32)
    lo = float(a.min())
    hi = float(np.percentile(a, percentile))
    if not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(a)
    return ((np.clip(a, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def working_grid(volume: Volume, prep: Preprocessing) -> Volume:
    """The working grid (zeros) for ``volume``: ``prep``'s shape/spacing/orientation, centred on it.

    Raises ValueError when the volume cannot be brought onto that grid (see :func:`check_compatible`).
    """
    check_compatible(volume, prep)
    d = np.asarray(prep.direction, float)
    z, y, x = prep.grid_shape
    s = float(prep.spacing_mm)
    lo, hi = volume.physical_bounds()
    centre = (np.asarray(lo) + np.asarray(hi)) / 2
    half = np.array([(x - 1) / 2, (y - 1) / 2, (z - 1) / 2]) * s
    origin = centre - d @ half
    return Volume(np.zeros(prep.grid_shape, np.float32), (s, s, s), origin, d, volume.name)


def check_compatible(volume: Volume, prep: Preprocessing, max_ratio: float = 3.0) -> None:
    """Refuse images a model trained with ``prep`` cannot work on (ValueError with the reason).

    A 2D image (or a stack thinner than 4 voxels) is refused, and so is a field of view whose
    extent along any working axis is more than ``max_ratio`` times smaller or larger than the
    working grid's (the network never saw anything at that scale).
    """
    if volume.is_vector:
        raise ValueError(f"'{volume.name}' is a vector image {volume.array.shape}; a scalar 3D image is expected")
    if min(volume.shape) < 4:
        raise ValueError(f"'{volume.name}' has shape {volume.shape} (z, y, x): a 3D volume is expected, "
                         f"this model does not register 2D images or thin slabs")
    d = np.asarray(prep.direction, float)
    lo, hi = volume.physical_bounds()
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    along = corners @ d                         # coordinates along the working axes x, y, z
    extent = along.max(0) - along.min(0) + min(volume.spacing)
    z, y, x = prep.grid_shape
    grid_extent = np.array([x, y, z], float) * prep.spacing_mm
    ratio = extent / grid_extent
    if np.any(ratio < 1 / max_ratio) or np.any(ratio > max_ratio):
        raise ValueError(f"'{volume.name}' covers {np.round(extent, 1).tolist()} mm along the model's axes but the "
                         f"model works on {grid_extent.tolist()} mm; it cannot be resampled to this model's grid")


def _smooth_for(volume_sitk: sitk.Image, target_spacing: float) -> sitk.Image:
    """Anti-alias before downsampling: Gaussian with sigma^2 = (t^2 - s^2) / (2.355^2) per axis (mm)."""
    sp = np.asarray(volume_sitk.GetSpacing(), float)
    var = np.maximum(target_spacing ** 2 - sp ** 2, 0.0) / 2.355 ** 2
    if np.all(var < 1e-6):
        return volume_sitk
    return sitk.SmoothingRecursiveGaussian(volume_sitk, [float(np.sqrt(max(v, 1e-6))) for v in var])


def preprocess(volume: Volume, prep: Preprocessing) -> Volume:
    """Normalise intensities, anti-alias and resample ``volume`` onto its working grid.

    Returns a float32 Volume of shape ``prep.grid_shape`` (z, y, x), values in [0, 1].
    """
    grid = working_grid(volume, prep)
    img = volume.with_array(normalize_intensity(volume.array, prep.percentile)).to_sitk(sitk.sitkFloat32)
    img = _smooth_for(img, prep.spacing_mm)
    ref = grid.to_sitk()
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return grid.with_array(sitk.GetArrayFromImage(out).astype(np.float32))


def preprocess_labels(labels: LabelMap, grid: Volume) -> np.ndarray:
    """Nearest-neighbour labels on a working grid -> int16 array (z, y, x)."""
    ref = grid.to_sitk()
    out = sitk.Resample(labels.to_sitk(), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out).astype(np.int16)


def center_of_mass(image: Volume) -> np.ndarray:
    """Intensity centroid (LPS mm, xyz) of a non-negative image."""
    a = np.clip(np.asarray(image.array, np.float64), 0, None)
    total = a.sum()
    if total <= 0:
        lo, hi = image.physical_bounds()
        return (np.asarray(lo) + np.asarray(hi)) / 2
    idx = [np.arange(n) for n in a.shape]
    cz = (a.sum((1, 2)) * idx[0]).sum() / total
    cy = (a.sum((0, 2)) * idx[1]).sum() / total
    cx = (a.sum((0, 1)) * idx[2]).sum() / total
    return image.index_to_physical([[cx, cy, cz]])[0]


def prealign_offset(fixed_w: Volume, moving_w: Volume, prep: Preprocessing) -> np.ndarray:
    """Initial translation (mm, xyz) mapping fixed points to moving points, per ``prep.prealignment``."""
    if prep.prealignment == "none":
        return np.zeros(3)
    if prep.prealignment == "center_of_mass":
        return center_of_mass(moving_w) - center_of_mass(fixed_w)
    raise ValueError(f"unknown prealignment '{prep.prealignment}' (use 'center_of_mass' or 'none')")


# --------------------------------------------------------------------------- IXI subjects
def load_split(path: str | os.PathLike = DEFAULT_SPLIT) -> dict:
    """The fixed IXI split: {'train', 'val', 'test': [subject], 'val_pairs', 'test_pairs': [[fixed, moving]]}."""
    with open(path) as fh:
        return json.load(fh)


def ixi_paths(subject: str, root: str | os.PathLike = DEFAULT_IXI_ROOT) -> tuple[Path, Path]:
    """(T1 image, DLMUSE label map) paths of one IXI subject."""
    root = Path(root)
    return root / "t1" / f"{subject}_T1.nii.gz", root / "seg" / f"{subject}_T1_DLMUSE.nii.gz"


def _read(path: Path) -> Volume:
    try:
        from . import io
        return io.read_volume(path)
    except ImportError:   # io.py is written by another engineer; SimpleITK meanwhile
        return Volume.from_sitk(sitk.ReadImage(str(path)), name=path.name)


@dataclass
class Subject:
    """One preloaded subject on its working grid.

    image : float32 (z, y, x) in [0, 1]; labels : int16 (z, y, x) or None;
    grid : the working grid (geometry; its array is the image); com : intensity centroid, LPS mm.
    """

    name: str
    image: np.ndarray
    labels: Optional[np.ndarray]
    grid: Volume
    com: np.ndarray


def load_subject(subject: str, prep: Preprocessing, root=DEFAULT_IXI_ROOT, with_labels: bool = True) -> Subject:
    img_path, seg_path = ixi_paths(subject, root)
    vol = _read(img_path)
    w = preprocess(vol, prep)
    labels = None
    if with_labels and seg_path.exists():
        lab = _read(seg_path)
        labels = preprocess_labels(LabelMap.from_volume(lab), w)
    return Subject(subject, w.array, labels, w, center_of_mass(w))


def load_subjects(names: list[str], prep: Preprocessing, root=DEFAULT_IXI_ROOT, with_labels: bool = True,
                  cache_dir: str | os.PathLike | None = None, progress=None) -> list[Subject]:
    """Preload subjects (preprocessed once); cached as .npz under ``cache_dir`` when given."""
    out = []
    key = hashlib.sha1(json.dumps([prep.to_dict(), str(root)], sort_keys=True).encode()).hexdigest()[:12]
    for i, name in enumerate(names):
        cache = Path(cache_dir) / f"{name}_{key}.npz" if cache_dir else None
        z = np.load(cache) if cache is not None and cache.exists() else None
        if z is not None and with_labels and "labels" not in z.files and ixi_paths(name, root)[1].exists():
            z = None          # cached without labels: preprocess again (and cache the labels too)
        if z is not None:
            grid = Volume(np.zeros(prep.grid_shape, np.float32), tuple(z["spacing"]), tuple(z["origin"]),
                          z["direction"], name)
            labels = z["labels"] if "labels" in z.files and with_labels else None
            s = Subject(name, z["image"], labels, grid.with_array(z["image"]), z["com"])
        else:
            s = load_subject(name, prep, root, with_labels)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                extra = {"labels": s.labels} if s.labels is not None else {}
                tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")  # ranks may write at once
                np.savez(tmp, image=s.image, spacing=np.asarray(s.grid.spacing), origin=np.asarray(s.grid.origin),
                         direction=s.grid.direction, com=s.com, **extra)
                os.replace(tmp, cache)
        out.append(s)
        if progress:
            progress(i + 1, len(names))
    return out


# --------------------------------------------------------------------------- pairs and augmentation
def sample_pairs(n_subjects: int, batch: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``batch`` random (fixed, moving) index pairs of distinct subjects."""
    if n_subjects < 2:
        raise ValueError(f"pair sampling needs at least 2 subjects, got {n_subjects}")
    out = []
    for _ in range(batch):
        f, m = rng.choice(n_subjects, 2, replace=False)
        out.append((int(f), int(m)))
    return out


def random_affine(rng: np.random.Generator, centre_xyz, rot_deg: float = 10.0, scale: float = 0.1,
                  shear: float = 0.03, trans_mm: float = 10.0) -> np.ndarray:
    """A random physical affine (4x4, xyz mm) about ``centre_xyz``: rotations up to ``rot_deg``
    per axis, scales in ``1 +- scale``, shears up to ``shear``, translations up to ``trans_mm``."""
    a = np.deg2rad(rng.uniform(-rot_deg, rot_deg, 3))
    c, s = np.cos(a), np.sin(a)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    sh = np.eye(3) + np.triu(rng.uniform(-shear, shear, (3, 3)), 1)
    lin = rz @ ry @ rx @ sh @ np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    m = np.eye(4)
    m[:3, :3] = lin
    centre = np.asarray(centre_xyz, float)
    m[:3, 3] = centre - lin @ centre + rng.uniform(-trans_mm, trans_mm, 3)
    return m


def augment_intensity(image: np.ndarray, rng: np.random.Generator, gamma: float = 0.3,
                      scale: float = 0.1, noise: float = 0.01) -> np.ndarray:
    """Random gamma (``exp(U(-gamma, gamma))``), global scale and Gaussian noise; clipped to [0, 1]."""
    g = float(np.exp(rng.uniform(-gamma, gamma)))
    out = np.power(np.clip(image, 0, 1), g) * rng.uniform(1 - scale, 1 + scale)
    if noise > 0:
        out = out + rng.normal(0, noise, image.shape).astype(np.float32)
    return np.clip(out, 0, 1).astype(np.float32)


def synthetic_deformation(grid: Volume, max_mm: float = 4.0, control_points: int = 5,
                          rng: np.random.Generator | None = None) -> Volume:
    """A random smooth displacement field on ``grid``: (z, y, x, 3), xyz LPS mm.

    Random vectors on a coarse ``control_points``^3 lattice (uniform in ``+-max_mm`` per
    component) interpolated with cubic B-splines; zero displacement on the lattice's outer
    layer so that the image borders stay put. Use with :func:`app.engine.spatial.field_to_transform`
    (``T(x) = x + field(x)``) to make known-deformation training pairs.
    """
    from scipy.ndimage import zoom
    rng = rng or np.random.default_rng()
    if control_points < 3:
        raise ValueError(f"control_points must be >= 3, got {control_points}")
    coarse = rng.uniform(-max_mm, max_mm, (3, control_points, control_points, control_points))
    coarse[:, [0, -1], :, :] = 0
    coarse[:, :, [0, -1], :] = 0
    coarse[:, :, :, [0, -1]] = 0
    shape = grid.shape
    comps = [zoom(c, [s / control_points for s in shape], order=3, grid_mode=True, mode="grid-constant")[
        :shape[0], :shape[1], :shape[2]] for c in coarse]
    f = np.stack(comps, -1).astype(np.float32)
    f = np.clip(f, -max_mm, max_mm)
    return Volume(f, grid.spacing, grid.origin, grid.direction.copy(), "synthetic_field")
