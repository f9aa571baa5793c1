"""The preprocessing chain for IterMask3D and its results: pure NumPy/SciPy/nibabel functions.

Chain (``preprocess``)::

    validate -> RAS lattice at the model voxel size (one interpolation, anti-aliased;
    exact permutation when the scan is not oblique) -> skull strip (signal brain mask)
    -> expected brain mask (signal mask with holes filled and closed, UNION an MNI152
    brain-mask prior aligned to it with a robust 9-dof fit) -> crop/pad to the model grid
    centred on the expected brain -> iterative z-score inside the brain (paper 4.1.1)
    -> background 0.

The lattice, the crop/pad and the way back to native space live in
:mod:`~qc_pipeline.preproc.geometry`; the masks' morphology and checks in
:mod:`~qc_pipeline.preproc.masks`; the template prior in :mod:`~qc_pipeline.preproc.prior`.

Brain masks
    ``signal_brain_mask``: where the skull-strip tool found brain-like signal.
    ``brain_mask`` (== ``expected_brain_mask``): where brain *should* be. A chunk of
    brain replaced by background, a cut-off top of the head or a metal void stays inside
    it (through the hole filling and the aligned template prior), so the engine sees the
    error there. See ``docs/preprocessing.md`` for the measurements.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..config import DEFAULT_GRID, DEFAULT_VOXEL_SIZE
from ..errors import NoBrainError
from ..io import to_jsonable, validate_image, voxel_sizes
from .geometry import CropInfo, as_vs3, to_lattice, apply_crop_pad, crop_pad_to_grid, is_oblique
from .masks import AIR_IN_MASK_ML, MIN_SURFACE_AGREEMENT, check_brain, fill_holes, largest_component
from .masks import air_in_mask, thick_air_ml
from .masks import close as close_mask
from .prior import warp_template, align_template_prior, mni_brain_mask

__all__ = [
    "PrepInfo",
    "PreprocResult",
    "iterative_zscore",
    "preprocess",
    "DEFAULT_VOXEL_SIZE",
    "DEFAULT_GRID",
]

#: how far (mm) beyond the aligned template an untrusted skull-strip mask may reach
UNTRUSTED_MASK_MARGIN_MM = 10.0


# --------------------------------------------------------------------------------------
# data containers
# --------------------------------------------------------------------------------------
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
    #: out-of-head background statistic (``qc_pipeline.qc.background.BackgroundStats.to_dict()``),
    #: filled by the app's Preprocess interface; empty when not computed
    background: dict = field(default_factory=dict)
    #: spectral peak of the native image (``qc_pipeline.qc.spectrum.SpectralPeak.to_dict()``),
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
        image-quality features of :mod:`qc_pipeline.qc.score`.
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
    vs = as_vs3(voxel_size)
    grid = tuple(int(g) for g in grid)
    native_aff = np.asarray(img.affine, dtype=float)
    oblique = is_oblique(native_aff)
    orient = "".join(nib.aff2axcodes(native_aff))

    # 1. RAS lattice at the model voxel size (one interpolation; exact permutation first)
    src_img = img if oblique else nib.as_closest_canonical(img)
    lat, fov, lat_aff = to_lattice(src_img, vs, order=1)
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
    # tissue outside the mask at least as bright as the brain's median (scalp fat, marrow) is
    # not missing brain: the template may not be fitted over it
    tissue = fov & ~filled & (lat > np.median(lat[sig])) if use_prior else None
    prior_fit = (align_template_prior(filled, lat_aff, fov, extra_tissue=untrusted, tissue=tissue)
                 if use_prior else None)
    prior_lat = warp_template(prior_fit["affine"], lat_aff, lat.shape) if use_prior else None
    if untrusted and use_prior:
        # a mask that took in air may also have taken in the face or neck: it is kept near
        # the brain template fitted to it (robust to missing brain), then the fit is redone
        near = ndi.distance_transform_edt(~prior_lat, sampling=vs) <= UNTRUSTED_MASK_MARGIN_MM
        sig = largest_component(sig & near)
        filled = fill_holes(close_mask(fill_holes(sig), close_vox))
        prior_fit = align_template_prior(filled, lat_aff, fov, extra_tissue=True, tissue=tissue)  # the mask only shrank
        prior_lat = warp_template(prior_fit["affine"], lat_aff, lat.shape)
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
        prior_g = warp_template(prior_fit["affine"], grid_aff, grid)
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
