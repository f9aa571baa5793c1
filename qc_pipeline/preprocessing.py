"""Preprocessing for IterMask3D: pure NumPy/SciPy/nibabel functions.

Chain (``preprocess``)::

    validate -> RAS lattice at the model voxel size (one interpolation, anti-aliased;
    exact permutation when the scan is not oblique) -> skull strip (signal brain mask)
    -> expected brain mask (signal mask with holes filled and closed, UNION an MNI152
    brain-mask prior aligned to it with a robust 9-dof fit) -> crop/pad to the model grid
    centred on the expected brain -> iterative z-score inside the brain (paper 4.1.1)
    -> background 0.

World-aligned lattice
    Every resampled image lives on the lattice ``x = k * voxel_size`` (scanner mm, RAS
    axes). An LPS/LAS/oblique copy of a scan therefore lands on exactly the same voxel
    centres as the RAS original, and cropping to the model grid is an integer shift on
    that lattice (no second interpolation).

Brain masks
    ``signal_brain_mask``: where the skull-strip tool found brain-like signal.
    ``brain_mask`` (== ``expected_brain_mask``): where brain *should* be. A chunk of
    brain replaced by background, a cut-off top of the head or a metal void stays inside
    it (through the hole filling and the aligned template prior), so the engine sees the
    error there. See ``docs/preprocessing.md`` for the measurements.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy import optimize
from scipy.spatial.transform import Rotation

from .config import DEFAULT_GRID, DEFAULT_VOXEL_SIZE
from .errors import NoBrainError
from .io import to_jsonable, validate_image, voxel_sizes
from .morphology import close as close_mask
from .morphology import fill_holes, largest_component

__all__ = [
    "PrepInfo",
    "PreprocResult",
    "CropInfo",
    "is_oblique",
    "crop_pad_to_grid",
    "apply_crop_pad",
    "iterative_zscore",
    "align_template_prior",
    "mni_brain_mask",
    "air_in_mask",
    "thick_air_ml",
    "check_brain",
    "to_native",
    "preprocess",
    "DEFAULT_VOXEL_SIZE",
    "DEFAULT_GRID",
]

logger = logging.getLogger(__name__)


#: plausible brain volume (L) for the skull-strip (signal) mask
BRAIN_VOLUME_RANGE_L = (0.6, 2.8)  # skull-strip masks include CSF and over-segment on T2w
#: plausible per-axis scale of the MNI152 brain mask fitted to the subject
TEMPLATE_SCALE_RANGE = (0.72, 1.35)
#: minimum fraction of template surface points within 4 mm of the signal-mask surface
MIN_SURFACE_AGREEMENT = 0.5
#: minimum Dice between the signal mask (holes filled) and the aligned prior (inside the FOV)
MIN_PRIOR_DICE = 0.75
#: air inside the skull-strip mask (mL), in a body at least ``AIR_THICKNESS_MM`` thick, above
#: which the mask is not trusted as it is
AIR_IN_MASK_ML = 20.0
AIR_THICKNESS_MM = 8.0
#: how far (mm) beyond the aligned template an untrusted skull-strip mask may reach
UNTRUSTED_MASK_MARGIN_MM = 10.0


# --------------------------------------------------------------------------------------
# data containers
# --------------------------------------------------------------------------------------
@dataclass
class CropInfo:
    """Integer crop/pad of an array onto a grid: ``out[i] = in[i + start]`` (0 outside)."""

    start: tuple  # index in the input array of the grid's voxel (0, 0, 0); may be negative
    in_shape: tuple
    grid: tuple

    @property
    def pad_before(self):
        return tuple(max(0, -s) for s in self.start)

    @property
    def pad_after(self):
        return tuple(max(0, s + g - n) for s, g, n in zip(self.start, self.grid, self.in_shape))

    @property
    def crop_before(self):
        return tuple(max(0, s) for s in self.start)

    @property
    def crop_after(self):
        return tuple(max(0, n - s - g) for s, g, n in zip(self.start, self.grid, self.in_shape))

    def to_dict(self):
        return {
            "start": [int(s) for s in self.start],
            "in_shape": [int(s) for s in self.in_shape],
            "grid": [int(s) for s in self.grid],
            "pad_before": list(self.pad_before),
            "pad_after": list(self.pad_after),
            "crop_before": list(self.crop_before),
            "crop_after": list(self.crop_after),
        }


@dataclass
class PrepInfo:
    """Everything needed to map grid-space results back to the scan (see :func:`to_native`).

    ``grid_affine`` maps grid voxel indices to the scan's world (scanner mm) coordinates;
    it is all :func:`to_native` needs. The rest is bookkeeping for logs and reports.
    """

    voxel_size: tuple
    grid: tuple
    grid_affine: np.ndarray
    native_shape: tuple
    native_affine: np.ndarray
    native_voxel_size: tuple
    orientation: str
    oblique: bool
    lattice_shape: tuple
    lattice_affine: np.ndarray
    crop: CropInfo
    skull_strip: str
    zscore_mean: float
    zscore_sd: float
    signal_brain_ml: float
    expected_brain_ml: float
    brain_ml_outside_fov: float
    brain_outside_grid_fraction: float
    prior: dict = field(default_factory=dict)
    #: out-of-head background statistic (``qc_pipeline.background.BackgroundStats.to_dict()``),
    #: filled by the app's Preprocess interface; empty when not computed
    background: dict = field(default_factory=dict)
    #: spectral peak of the native image (``qc_pipeline.spectrum.SpectralPeak.to_dict()``),
    #: filled by the app's Preprocess interface; empty when not computed
    spectrum: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("grid_affine", "native_affine", "lattice_affine"):
            d[k] = np.asarray(getattr(self, k)).round(6).tolist()
        d["crop"] = self.crop.to_dict()
        for k in ("voxel_size", "grid", "native_shape", "native_voxel_size", "lattice_shape"):
            d[k] = [float(v) if isinstance(v, (float, np.floating)) else int(v) for v in getattr(self, k)]
        return to_jsonable(d)


@dataclass
class PreprocResult:
    """Output of :func:`preprocess`, everything on the model grid (RAS, ``voxel_size``).

    Attributes
    ----------
    image : np.ndarray, float32
        Iteratively z-scored volume, 0 outside ``brain_mask``.
    brain_mask : np.ndarray, bool
        Where brain should be (the engine's mask); same array as ``expected_brain_mask``.
    expected_brain_mask : np.ndarray, bool
    signal_brain_mask : np.ndarray, bool
        Skull-strip result (where brain-like signal is).
    info : PrepInfo
    warnings : list of str
    fov_mask : np.ndarray, bool
        Grid voxels that lie inside the scan's field of view.
    head_image : np.ndarray, float32
        The whole grid (skull, scalp, background) with the same z-score scaling as
        ``image`` but no brain masking; 0 outside the field of view. Used by the
        image-quality features of :mod:`qc_pipeline.qcscore`.
    """

    image: np.ndarray
    brain_mask: np.ndarray
    expected_brain_mask: np.ndarray
    signal_brain_mask: np.ndarray
    info: PrepInfo
    warnings: list
    fov_mask: np.ndarray = None
    head_image: np.ndarray = None

    @property
    def affine(self) -> np.ndarray:
        return self.info.grid_affine


# --------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------
def is_oblique(affine, tol_deg: float = 0.05) -> bool:
    """True when the voxel axes are rotated away from the world axes by more than ``tol_deg``."""
    ob = nib.affines.obliquity(np.asarray(affine, dtype=float))
    return bool(np.max(np.abs(np.degrees(ob))) > tol_deg)


def _as_vs3(voxel_size) -> np.ndarray:
    vs = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,)).copy()
    if np.any(vs <= 0):
        raise ValueError(f"voxel_size must be positive, got {voxel_size!r}")
    return vs


def _lattice_for(img_affine, img_shape, vs) -> tuple[np.ndarray, tuple]:
    """RAS lattice (x = k*vs) covering the image's field of view (voxel edges included)."""
    n = np.asarray(img_shape[:3], dtype=float)
    corners = np.array(np.meshgrid(*[[-0.5, m - 0.5] for m in n], indexing="ij")).reshape(3, -1)
    world = img_affine[:3, :3] @ corners + img_affine[:3, 3:4]
    lo = np.floor(world.min(axis=1) / vs + 1e-6) * vs
    hi = np.ceil(world.max(axis=1) / vs - 1e-6) * vs
    shape = tuple(int(v) for v in np.round((hi - lo) / vs) + 1)
    aff = np.diag(np.r_[vs, 1.0])
    aff[:3, 3] = lo
    return aff, shape


def _smooth_for_downsampling(data, in_zooms, out_vs):
    """Gaussian anti-aliasing along each input axis that is finer than the output."""
    in_zooms = np.asarray(in_zooms, dtype=float)
    target = float(np.min(out_vs)) if np.ndim(out_vs) else float(out_vs)
    sig_mm = np.sqrt(np.clip(target**2 - in_zooms**2, 0, None)) / 2.3548
    sigma = sig_mm / in_zooms
    if np.all(sigma < 0.2):
        return data
    return ndi.gaussian_filter(data, sigma=np.where(sigma < 0.2, 0, sigma), mode="nearest")


def _resample(data, in_affine, out_affine, out_shape, order=1, fill=0.0, edge="nearest"):
    """Sample ``data`` (voxel grid ``in_affine``) on ``out_affine``/``out_shape``.

    Points within half a voxel outside the input take the edge value; points further
    out get ``fill``. Returns (resampled, inside-FOV mask).
    """
    m = np.linalg.inv(in_affine) @ out_affine
    matrix, offset = m[:3, :3], m[:3, 3]
    out = ndi.affine_transform(
        np.asarray(data, dtype=np.float32), matrix, offset, output_shape=tuple(out_shape),
        order=order, mode=edge, prefilter=False,
    )
    fov = _fov_mask(data.shape[:3], m, out_shape)
    out[~fov] = fill
    return out, fov


def _fov_mask(in_shape, vox_to_vox, out_shape):
    """Output voxels whose centre maps inside the input's voxel extent [-0.5, n-0.5]."""
    inside = np.ones(tuple(out_shape), dtype=bool)
    idx = np.indices(out_shape, dtype=np.float32).reshape(3, -1)
    coords = vox_to_vox[:3, :3].astype(np.float32) @ idx + vox_to_vox[:3, 3:4].astype(np.float32)
    for ax in range(3):
        c = coords[ax].reshape(out_shape)
        inside &= (c >= -0.5 - 1e-4) & (c <= in_shape[ax] - 0.5 + 1e-4)
    return inside


def _to_lattice(img, voxel_size, order=1, antialias=True):
    img = _as_3d_nifti(img)
    vs = _as_vs3(voxel_size)
    data = np.asarray(img.dataobj, dtype=np.float32)
    in_aff = np.asarray(img.affine, dtype=float)
    if antialias and order > 0:
        data = _smooth_for_downsampling(data, voxel_sizes(in_aff), vs)
    aff, shape = _lattice_for(in_aff, img.shape, vs)
    out, fov = _resample(data, in_aff, aff, shape, order=order)
    return out, fov, aff


def _as_3d_nifti(img) -> nib.Nifti1Image:
    if len(img.shape) > 3:
        if int(np.prod(img.shape[3:])) != 1:
            raise ValueError(f"expected a 3D image, got shape {img.shape}")
        data = np.asarray(img.dataobj).reshape(img.shape[:3])
        out = nib.Nifti1Image(data, img.affine)
        out.extra.update(getattr(img, "extra", {}) or {})
        return out
    return img


def crop_pad_to_grid(volume: np.ndarray, mask: np.ndarray | None, grid: Sequence[int], *,
                     center=None, fill=0) -> tuple[np.ndarray, CropInfo]:
    """Crop/pad ``volume`` to ``grid`` with the brain centred.

    Parameters
    ----------
    volume : array (3D)
    mask : bool array or None
        Its bounding-box centre is put at the grid centre (ignored if ``center`` given;
        if both are None the array centre is used).
    grid : 3 ints
    center : 3 floats, optional
        Voxel coordinates (in ``volume``) to put at the grid centre.

    Returns
    -------
    out : array of shape ``grid``
    crop : CropInfo
        ``out[i] = volume[i + crop.start]``; use :func:`apply_crop_pad` for other arrays.
    """
    grid = tuple(int(g) for g in grid)
    shape = volume.shape[:3]
    if center is None:
        if mask is not None and np.any(mask):
            idx = np.nonzero(mask)
            center = [(i.min() + i.max()) / 2.0 for i in idx]
        else:
            center = [(n - 1) / 2.0 for n in shape]
    start = tuple(int(np.floor(c - (g - 1) / 2.0 + 0.5)) for c, g in zip(center, grid))
    crop = CropInfo(start=start, in_shape=tuple(shape), grid=grid)
    return apply_crop_pad(volume, crop, fill=fill), crop


def apply_crop_pad(volume: np.ndarray, crop: CropInfo, fill=0) -> np.ndarray:
    """Apply a :class:`CropInfo` (from :func:`crop_pad_to_grid`) to another array."""
    out = np.full(crop.grid, fill, dtype=volume.dtype)
    src, dst = [], []
    for s, g, n in zip(crop.start, crop.grid, volume.shape[:3]):
        a, b = max(s, 0), min(s + g, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = volume[tuple(src)]
    return out


# --------------------------------------------------------------------------------------
# intensity normalisation (paper 4.1.1)
# --------------------------------------------------------------------------------------
def iterative_zscore(volume: np.ndarray, mask: np.ndarray, n_extra: int = 3, clip: float = 2.0, *,
                     out_mask: np.ndarray | None = None, return_stats: bool = False):
    """Iterative z-score inside the brain (IterMask3D paper, section 4.1.1).

    z-score with the mean/sd of the voxels in ``mask``; then ``n_extra`` times:
    re-estimate mean/sd from the brain voxels whose current value lies within ``clip``
    SD (|z| <= clip) and re-normalise. Voxels outside ``out_mask`` (default ``mask``)
    are set to 0.

    Because each pass normalises by the sd of the *clipped* core, the core (|z| <= clip)
    ends with mean 0 and sd 1 while the full in-brain sd is somewhat above 1 (about
    1.2 for Gaussian data); bright outliers do not affect the statistics.

    Returns the float32 volume, or ``(volume, mean, sd)`` with ``return_stats`` where
    ``volume_out = (volume - mean) / sd`` inside ``out_mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    vals = np.asarray(volume, dtype=np.float64)[mask]
    if vals.size < 2:
        raise ValueError("iterative_zscore: mask selects fewer than 2 voxels")
    mean, sd = vals.mean(), vals.std()
    if not np.isfinite(sd) or sd <= 0:
        raise ValueError("iterative_zscore: zero variance inside the mask")
    for _ in range(int(n_extra)):
        z = (vals - mean) / sd
        core = vals[np.abs(z) <= clip]
        if core.size < 2 or core.std() <= 0:
            break
        # re-normalising z by (m, s) of the core == using the core's raw mean/sd
        mean, sd = core.mean(), core.std()
    om = mask if out_mask is None else np.asarray(out_mask, dtype=bool)
    out = np.zeros(volume.shape, dtype=np.float32)
    out[om] = ((np.asarray(volume, dtype=np.float64)[om] - mean) / sd).astype(np.float32)
    if return_stats:
        return out, float(mean), float(sd)
    return out


# --------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def mni_brain_mask():
    """nilearn's bundled MNI152 brain mask (2 mm): (bool array, affine)."""
    from nilearn.datasets import load_mni152_brain_mask  # lazy: nilearn import is slow

    img = load_mni152_brain_mask(resolution=2)
    data = np.asarray(img.dataobj) > 0.5
    data = ndi.binary_fill_holes(data)
    return data, np.asarray(img.affine, dtype=float)


@functools.lru_cache(maxsize=1)
def _mni_surface_points(n_points: int = 2500):
    m, aff = mni_brain_mask()
    surf = m & ~ndi.binary_erosion(m)
    idx = np.argwhere(surf).astype(float)
    rng = np.random.default_rng(0)
    if len(idx) > n_points:
        idx = idx[rng.choice(len(idx), n_points, replace=False)]
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    vox_all = np.argwhere(m).astype(float)
    centre = (vox_all @ aff[:3, :3].T + aff[:3, 3]).mean(axis=0)
    cov = np.cov((vox_all @ aff[:3, :3].T).T)
    return world, centre, cov, float(m.sum() * abs(np.linalg.det(aff[:3, :3])))


def air_in_mask(image: np.ndarray, mask: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` at the air's intensity that are connected to the air around the head.

    A skull-strip network shown a head whose top was cut away or blanked (a missing chunk)
    can label the empty space as brain. Brain tissue, CSF included, is brighter than air in
    T1w, T2w and FLAIR, and the air around the head reaches the edge of the array. The air's
    level and spread are the median and scaled MAD of the field of view's outer two-voxel
    shell (mostly air in a head scan); a voxel is air-like at or below that level plus the
    larger of 3 spreads and 5 % of the way to the brain's level. Air-like voxels connected
    (6-neighbourhood) to the array's faces through air-like voxels or through voxels outside
    the field of view are the air around the head; their overlap with ``mask`` is returned.
    """
    from scipy.stats import median_abs_deviation

    fov = np.asarray(fov, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    shell = fov & ~ndi.binary_erosion(fov, iterations=2, border_value=0)
    if not shell.any() or not mask.any():
        return np.zeros_like(mask)
    air = image[shell]
    level = float(np.median(air))
    spread = float(median_abs_deviation(air, scale="normal"))
    above = image[mask & (image > level + 3.0 * spread)]
    if above.size == 0:
        return np.zeros_like(mask)
    threshold = level + max(3.0 * spread, 0.05 * (float(np.median(above)) - level))
    dark = (image <= threshold) | ~fov
    labels, _ = ndi.label(dark)
    faces = np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()])
    outside = np.unique(faces[faces > 0])
    return mask & np.isin(labels, outside)


def thick_air_ml(air: np.ndarray, voxel_size) -> float:
    """mL of ``air`` (:func:`air_in_mask`) in bodies at least ``AIR_THICKNESS_MM`` thick.

    Only a thick body of air says a skull-strip mask is wrong: in a noisy scan the CSF and
    skull at the brain's surface reach the air's level too, in a layer a few mm thin, which
    a morphological opening removes.
    """
    vs = np.asarray(voxel_size, dtype=float)
    voxel_ml = float(np.prod(vs)) / 1e3
    if np.count_nonzero(air) * voxel_ml <= AIR_IN_MASK_ML:  # the common case: nothing to open
        return float(np.count_nonzero(air)) * voxel_ml
    radius = max(1, int(round(AIR_THICKNESS_MM / 2.0 / float(vs.mean()))))
    return float(np.count_nonzero(ndi.binary_opening(air, iterations=radius))) * voxel_ml


def _params_to_affine(p, c_tmpl, c_subj):
    """4x4 template-world -> subject-world affine from 9 parameters."""
    t, r, s = p[:3], p[3:6], p[6:9]
    a = Rotation.from_euler("xyz", r).as_matrix() @ np.diag(np.exp(s))
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = c_subj + t - a @ c_tmpl
    return out


def align_template_prior(signal_mask: np.ndarray, affine: np.ndarray, fov: np.ndarray | None = None, *,
                         extra_tissue: bool = False) -> dict:
    """Fit the MNI152 brain mask to a (hole-filled) subject brain mask, robustly.

    9-dof (translation, rotation, per-axis scale) fit of the template's surface points to
    the subject mask's surface. The cost is asymmetric on purpose: a template point
    *inside* the subject mask (brain signal beyond the template surface) pays the full
    squared distance (truncated at 12 mm, then 8 mm), a template point *outside* it (the
    template claims brain where there is no signal: a missing chunk, a blanked top, a
    void) pays at most (3 mm)^2, so missing brain cannot drag the template in. Template
    points outside the field of view pay a small constant. Weak priors keep the scales
    near 0.95 (MNI152 is larger than most brains) and rotations small.

    With ``extra_tissue`` the mask is also expected to hold non-brain (a skull-strip mask
    that spilled into the face or neck): a template point inside the mask then pays no
    more than one outside it, so neither missing brain nor extra tissue drags the fit.

    Returns a dict with ``affine`` (template world -> subject world, 4x4), ``scales``,
    ``rotation_deg``, ``surface_agreement`` (fraction of in-FOV template surface points
    within 4 mm of the subject surface), ``cost``.
    """
    vs = voxel_sizes(affine)
    m = np.asarray(signal_mask, dtype=bool)
    fov = np.ones_like(m) if fov is None else np.asarray(fov, dtype=bool)
    # surface of the subject mask, not counting faces created by the FOV/array edge
    ero = ndi.binary_erosion(m | ~fov, border_value=1)
    surf = m & ~ero
    if not surf.any():
        surf = m & ~ndi.binary_erosion(m)
    dist = ndi.distance_transform_edt(~surf, sampling=vs).astype(np.float32)
    inside_f = m.astype(np.float32)

    pts, c_t, cov_t, vol_t = _mni_surface_points()
    idx = np.argwhere(m).astype(float)
    world_idx = idx @ affine[:3, :3].T + affine[:3, 3]
    c_s = world_idx.mean(axis=0)
    vol_s = float(m.sum() * np.prod(vs))
    s_prior = np.log(0.95)
    s0 = float(np.clip(np.log(max(vol_s / vol_t, 1e-3)) / 3.0, np.log(0.8), np.log(1.1)))
    inv_aff = np.linalg.inv(affine)
    shape = np.array(m.shape)

    def lookup(p):
        a = _params_to_affine(p, c_t, c_s)
        w = pts @ a[:3, :3].T + a[:3, 3]
        v = w @ inv_aff[:3, :3].T + inv_aff[:3, 3]
        in_fov = np.all((v >= -0.5) & (v <= shape - 0.5), axis=1)
        vi = np.clip(np.round(v).astype(int), 0, shape - 1)
        in_fov &= fov[vi[:, 0], vi[:, 1], vi[:, 2]]
        d = ndi.map_coordinates(dist, v.T, order=1, mode="nearest")
        ins = ndi.map_coordinates(inside_f, v.T, order=1, mode="constant") >= 0.5
        return d, in_fov, ins

    def cost(p, cap_in, cap_out):
        d, in_fov, ins = lookup(p)
        c = np.where(ins, np.minimum(d, cap_in) ** 2, np.minimum(d, cap_out) ** 2)
        c = np.where(in_fov, c, (0.5 * cap_out) ** 2)
        reg = 0.5 * np.sum((p[6:9] - s_prior) ** 2) / 0.12**2 + 0.5 * np.sum(p[3:6] ** 2) / 0.35**2
        return float(c.mean()) + 0.3 * reg

    p = np.r_[np.zeros(6), np.full(3, s0)]
    stages = ((6.0, 6.0), (3.0, 3.0)) if extra_tissue else ((12.0, 6.0), (8.0, 3.0))
    for cap_in, cap_out in stages:
        res = optimize.minimize(cost, p, args=(cap_in, cap_out), method="Powell",
                                options={"xtol": 1e-3, "ftol": 1e-4, "maxfev": 4000})
        p = res.x
    d, in_fov, _ = lookup(p)
    agree = float(np.mean(d[in_fov] <= 4.0)) if in_fov.any() else 0.0
    return {
        "affine": _params_to_affine(p, c_t, c_s),
        "params": p,
        "scales": np.exp(p[6:9]),
        "rotation_deg": np.degrees(p[3:6]),
        "surface_agreement": agree,
        "in_fov_fraction": float(in_fov.mean()),
        "cost": float(cost(p, *stages[-1])),
    }


def _warp_template(t2s: np.ndarray, out_affine: np.ndarray, out_shape) -> np.ndarray:
    """MNI brain mask warped by ``t2s`` (template->subject world) onto a subject grid."""
    m, aff_t = mni_brain_mask()
    vox = np.linalg.inv(aff_t) @ np.linalg.inv(t2s) @ out_affine
    w = ndi.affine_transform(m.astype(np.float32), vox[:3, :3], vox[:3, 3], output_shape=tuple(out_shape),
                             order=1, mode="constant", cval=0.0, prefilter=False)
    return w >= 0.5


def check_brain(signal_mask: np.ndarray, affine: np.ndarray, prior_fit: dict | None, fov=None,
                source=None, prior_on_input: np.ndarray | None = None) -> dict:
    """Raise :class:`NoBrainError` unless the signal mask looks like a brain.

    Criteria (all must hold): signal-mask volume within ``BRAIN_VOLUME_RANGE_L``; the
    fitted template scales within ``TEMPLATE_SCALE_RANGE``; at least
    ``MIN_SURFACE_AGREEMENT`` of the template surface within 4 mm of the mask surface;
    Dice(filled mask, aligned prior) inside the FOV >= ``MIN_PRIOR_DICE``.
    Returns the measured values.
    """
    vs = voxel_sizes(affine)
    vol_l = float(np.count_nonzero(signal_mask) * np.prod(vs) / 1e6)
    out = {"signal_volume_l": vol_l}
    lo, hi = BRAIN_VOLUME_RANGE_L
    if not (lo <= vol_l <= hi):
        why = ("not a brain, or not skull-stripped with --skull-strip none?" if vol_l > hi else
               "not a brain, or an artifact that hides the brain from the skull strip?")
        raise NoBrainError(source, f"no brain found: brain-mask volume {vol_l:.2f} L is outside the "
                                   f"plausible {lo}-{hi} L ({why})")
    if prior_fit is None:
        return out
    sc = np.asarray(prior_fit["scales"])
    out.update(template_scales=sc.round(3).tolist(), surface_agreement=prior_fit["surface_agreement"])
    if np.any(sc < TEMPLATE_SCALE_RANGE[0]) or np.any(sc > TEMPLATE_SCALE_RANGE[1]):
        raise NoBrainError(source, f"no brain found: brain template fits only with implausible scales "
                                   f"{', '.join(f'{v:.2f}' for v in sc)}")
    if prior_fit["surface_agreement"] < MIN_SURFACE_AGREEMENT:
        raise NoBrainError(source, f"no brain found: shape does not match a brain (only "
                                   f"{prior_fit['surface_agreement']:.0%} of the template surface fits)")
    if prior_on_input is not None:
        f = np.ones_like(signal_mask, dtype=bool) if fov is None else fov
        a, b = signal_mask & f, prior_on_input & f
        dice = 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))
        out["prior_dice"] = dice
        if dice < MIN_PRIOR_DICE:
            raise NoBrainError(source, f"no brain found: shape does not match a brain (Dice with the "
                                       f"aligned template {dice:.2f} < {MIN_PRIOR_DICE})")
    return out


# --------------------------------------------------------------------------------------
# back to native space
# --------------------------------------------------------------------------------------
def to_native(volume_on_grid: np.ndarray, prep_info: PrepInfo, reference_img: nib.spatialimages.SpatialImage,
              order: int | None = None) -> nib.Nifti1Image:
    """Map a grid-space mask or map back onto the scan's native voxel grid and affine.

    Parameters
    ----------
    volume_on_grid : array of shape ``prep_info.grid``
    prep_info : PrepInfo
    reference_img : the native scan (as loaded; 4D single-volume is fine)
    order : 0 (nearest, default for bool/integer input) or 1 (linear, default for float)

    Returns
    -------
    nibabel.Nifti1Image
        uint8 for masks (order 0 of a bool array), float32 otherwise, with the reference's
        affine (qform/sform codes copied). Voxels outside the grid are 0.
    """
    vol = np.asarray(volume_on_grid)
    if tuple(vol.shape) != tuple(prep_info.grid):
        raise ValueError(f"volume shape {vol.shape} != grid {tuple(prep_info.grid)}")
    is_mask = vol.dtype == bool or np.issubdtype(vol.dtype, np.integer)
    if order is None:
        order = 0 if is_mask else 1
    ref_aff = np.asarray(reference_img.affine, dtype=float)
    shape = tuple(reference_img.shape[:3])
    m = np.linalg.inv(np.asarray(prep_info.grid_affine, dtype=float)) @ ref_aff
    out = ndi.affine_transform(vol.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape, order=order,
                               mode="constant", cval=0.0, prefilter=False)
    if vol.dtype == bool:
        data = (out >= 0.5).astype(np.uint8)
    elif is_mask and order == 0:
        data = np.rint(out).astype(vol.dtype if vol.dtype.itemsize <= 2 else np.int32)
    else:
        data = out.astype(np.float32)
    hdr = None
    if isinstance(reference_img, nib.Nifti1Image):
        hdr = reference_img.header.copy()
        hdr.set_data_shape(shape)
    img = nib.Nifti1Image(data, ref_aff, hdr)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if hdr is not None:
        img.header["dim"][0] = 3
        img.header["pixdim"][4:] = 1.0
    return img


# --------------------------------------------------------------------------------------
# the chain
# --------------------------------------------------------------------------------------
def preprocess(img: nib.spatialimages.SpatialImage, *, voxel_size=DEFAULT_VOXEL_SIZE, grid=DEFAULT_GRID,
               skull_strip: str = "deepbet", use_prior: bool = True, check: bool = True,
               name: str | None = None, contrast: str | None = None,
               strip_kwargs: dict | None = None) -> PreprocResult:
    """Run the whole preprocessing chain on one (loaded) scan.

    Parameters
    ----------
    img : nibabel image (e.g. from :func:`qc_pipeline.io.load_image`)
    voxel_size : float, model voxel size (mm, isotropic)
    grid : 3 ints, model grid
    skull_strip : {"deepbet", "robex", "none", "auto"}
        ``"none"`` for already skull-stripped data (mask = non-background, holes filled).
    use_prior : add the aligned MNI152 prior to the expected brain mask (default True)
    check : raise :class:`NoBrainError` if no plausible brain is found
    name : label for error messages (default ``img.extra["source"]``)
    contrast : "T1w" / "T2w" / "FLAIR", used by ``skull_strip="auto"``

    Raises
    ------
    InputError subclasses (validation), NoBrainError, SkullStripError,
    MissingDependencyError (the chosen tool is not installed).
    """
    from .skullstrip import skull_strip as _strip  # local import: no cycle at import time

    src = name or (getattr(img, "extra", {}) or {}).get("source") or "<in-memory image>"
    img = validate_image(img, name=src)
    warns = list(img.extra.get("qc_warnings", []))
    vs = _as_vs3(voxel_size)
    grid = tuple(int(g) for g in grid)
    native_aff = np.asarray(img.affine, dtype=float)
    oblique = is_oblique(native_aff)
    orient = "".join(nib.aff2axcodes(native_aff))

    # 1. RAS lattice at the model voxel size (one interpolation; exact permutation first)
    src_img = img if oblique else nib.as_closest_canonical(img)
    lat, fov, lat_aff = _to_lattice(src_img, vs, order=1)
    lat_img = nib.Nifti1Image(lat, lat_aff)

    # 2. skull strip -> signal mask on the lattice
    mask_img = _strip(lat_img, method=skull_strip, source=src, contrast=contrast, **(strip_kwargs or {}))
    sig = np.asarray(mask_img.dataobj) > 0
    if tuple(sig.shape) != tuple(lat.shape):
        raise RuntimeError("skull-strip returned a mask on a different grid")
    sig &= fov
    if not sig.any():
        raise NoBrainError(src, "no brain found: the skull-strip mask is empty")
    sig = largest_component(sig)
    air = air_in_mask(lat, sig, fov)
    air_ml = float(np.count_nonzero(air) * np.prod(vs) / 1e3)
    untrusted = thick_air_ml(air, vs) > AIR_IN_MASK_ML
    if untrusted:
        sig = sig & ~air
        if not sig.any():
            raise NoBrainError(src, "no brain found: the skull-strip mask holds only air")
        sig = largest_component(sig)
        warns.append(f"the skull-strip mask held {air_ml:.0f} mL of the air around the head (a missing "
                     f"part of the head?); the air was left out")

    if check:  # the volume first: no template fit for a mask that cannot be a brain
        check_brain(sig, lat_aff, None, source=src)

    # 3. expected brain (where brain should be) on the lattice, prior fitted in world space
    close_vox = int(round(6.0 / float(vs.mean())))
    filled = fill_holes(close_mask(fill_holes(sig), close_vox))
    prior_fit = align_template_prior(filled, lat_aff, fov, extra_tissue=untrusted) if use_prior else None
    prior_lat = _warp_template(prior_fit["affine"], lat_aff, lat.shape) if use_prior else None
    if untrusted and use_prior:
        # a mask that took in air may also have taken in the face or neck: it is kept near
        # the brain template fitted to it (robust to missing brain), then the fit is redone
        near = ndi.distance_transform_edt(~prior_lat, sampling=vs) <= UNTRUSTED_MASK_MARGIN_MM
        sig = largest_component(sig & near)
        filled = fill_holes(close_mask(fill_holes(sig), close_vox))
        prior_fit = align_template_prior(filled, lat_aff, fov, extra_tissue=True)
        prior_lat = _warp_template(prior_fit["affine"], lat_aff, lat.shape)
    if check:
        check_brain(sig, lat_aff, prior_fit, fov=fov, source=src,
                    prior_on_input=None if prior_lat is None else prior_lat)
    elif prior_fit is not None and prior_fit["surface_agreement"] < MIN_SURFACE_AGREEMENT:
        warns.append("brain template fits the brain mask poorly")

    # 4. grid placement: centre of the expected brain's bounding box (prior beyond the FOV)
    lo = np.array(np.nonzero(filled)).min(axis=1).astype(float)
    hi = np.array(np.nonzero(filled)).max(axis=1).astype(float)
    if use_prior:
        m_t, aff_t = mni_brain_mask()
        corners_t = np.argwhere(m_t)
        # template bbox -> lattice voxel coordinates
        tv = np.linalg.inv(lat_aff) @ prior_fit["affine"] @ aff_t
        pts = corners_t @ tv[:3, :3].T + tv[:3, 3]
        lo = np.minimum(lo, pts.min(axis=0))
        hi = np.maximum(hi, pts.max(axis=0))
    center = (lo + hi) / 2.0
    image_g, crop = crop_pad_to_grid(lat, None, grid, center=center)
    grid_aff = lat_aff.copy()
    grid_aff[:3, 3] = lat_aff[:3, :3] @ np.asarray(crop.start, dtype=float) + lat_aff[:3, 3]
    sig_g = apply_crop_pad(sig, crop, fill=False)
    filled_g = apply_crop_pad(filled, crop, fill=False)
    fov_g = apply_crop_pad(fov, crop, fill=False)
    if use_prior:
        prior_g = _warp_template(prior_fit["affine"], grid_aff, grid)
        expected_g = filled_g | prior_g
    else:
        expected_g = filled_g
    # fraction of the expected brain that falls outside the grid (prior counted analytically
    # beyond the lattice, e.g. above a cut-off FOV)
    if use_prior:
        m_t, aff_t = mni_brain_mask()
        prior_total = (np.count_nonzero(m_t) * abs(np.linalg.det(prior_fit["affine"][:3, :3] @ aff_t[:3, :3]))
                       / float(np.prod(vs)))
        total = float(np.count_nonzero(filled | prior_lat)) + max(0.0, prior_total - np.count_nonzero(prior_lat))
    else:
        total = float(np.count_nonzero(filled))
    out_of_grid = max(0.0, 1.0 - np.count_nonzero(expected_g) / max(total, 1.0))
    if out_of_grid > 0.01:
        warns.append(f"{out_of_grid:.1%} of the brain lies outside the model grid {grid}")
    outside_fov_ml = float(np.count_nonzero(expected_g & ~fov_g) * np.prod(vs) / 1e3)
    if outside_fov_ml > 20:
        warns.append(f"about {outside_fov_ml:.0f} mL of the expected brain lies outside the field of view")

    # 5. iterative z-score: statistics from the signal brain, applied inside the expected brain
    stats_mask = sig_g & expected_g
    image, mean, sd = iterative_zscore(image_g, stats_mask, n_extra=3, clip=2.0, out_mask=expected_g,
                                       return_stats=True)

    info = PrepInfo(
        voxel_size=tuple(float(v) for v in vs),
        grid=grid,
        grid_affine=grid_aff,
        native_shape=tuple(int(s) for s in img.shape[:3]),
        native_affine=native_aff,
        native_voxel_size=tuple(float(v) for v in voxel_sizes(native_aff)),
        orientation=orient,
        oblique=oblique,
        lattice_shape=tuple(int(s) for s in lat.shape),
        lattice_affine=lat_aff,
        crop=crop,
        skull_strip=str(mask_img.extra.get("method", skull_strip)),
        zscore_mean=mean,
        zscore_sd=sd,
        signal_brain_ml=float(np.count_nonzero(sig) * np.prod(vs) / 1e3),
        expected_brain_ml=float(np.count_nonzero(expected_g) * np.prod(vs) / 1e3),
        brain_ml_outside_fov=outside_fov_ml,
        brain_outside_grid_fraction=out_of_grid,
        prior={} if prior_fit is None else {
            "scales": np.round(prior_fit["scales"], 4).tolist(),
            "rotation_deg": np.round(prior_fit["rotation_deg"], 3).tolist(),
            "surface_agreement": round(prior_fit["surface_agreement"], 4),
            "affine": np.round(prior_fit["affine"], 5).tolist(),  # MNI mm -> scanner mm
        },
    )
    warns.extend(mask_img.extra.get("qc_warnings", []))
    return PreprocResult(image=image.astype(np.float32), brain_mask=expected_g, expected_brain_mask=expected_g,
                         signal_brain_mask=sig_g, info=info, warnings=warns, fov_mask=fov_g,
                         head_image=(np.where(fov_g, (image_g - mean) / sd, 0.0)).astype(np.float32))
