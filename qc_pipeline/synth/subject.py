"""Synthetic normal heads: contrasts, anatomy variation and scanner nuisance.

One subject is produced by :func:`make_subject` in four steps:

1. **Tissue image** on the working grid (MNI space, ``work_mm``): per-subject
   tissue intensities drawn from contrast-specific ranges, mixed by the tissue
   fractions (partial volume), times a mild multiplicative texture. The
   template's fractions first get a single brain's detail (sharper GM/WM
   boundary, sulci; :func:`cortical_detail`).
2. **Anatomy**: a smooth random displacement field (a few mm) warps the tissue
   image, so brains differ between subjects; a per-subject head size (scaling
   of +-8 % per axis) is part of the pose.
3. **Acquisition**: the head is posed in the scanner (rotation of a few degrees,
   translation) and sampled once with ``scipy.ndimage.map_coordinates`` onto
   the stored array: voxel size 0.8-1.5 mm (anisotropic allowed), field of
   view, array orientation (RAS, LAS, LPS, sagittal/coronal storage, oblique
   affines).
4. **Scanner**: a smooth bias field, Rician noise at a drawn SNR, intensity
   scale and on-disk datatype (``uint16``, ``int16`` with ``scl_slope``,
   ``float32``).

Random streams are split by purpose (anatomy, acquisition, intensities,
noise), so the same ``seed`` gives the same anatomy in every contrast.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from . import template as tpl
from .errors import SynthError

LOGGER = logging.getLogger(__name__)

CONTRASTS = ("T1w", "T2w", "FLAIR")
_CONTRAST_ID = {c: i for i, c in enumerate(CONTRASTS)}

#: Relative tissue intensities (uniform ranges). Brain orderings hold for every
#: draw because the ranges do not overlap: T1w WM > GM > CSF, T2w CSF > GM > WM,
#: FLAIR GM > WM > CSF (fluid suppressed).
TISSUE_RANGES = {
    "T1w": {
        "wm": (0.95, 1.05), "gm": (0.58, 0.70), "csf": (0.12, 0.24),
        "bone": (0.02, 0.06), "marrow": (0.60, 0.85), "muscle": (0.40, 0.52),
        "fat": (0.95, 1.25), "skin": (0.45, 0.60), "eye": (0.10, 0.20),
    },
    "T2w": {
        "wm": (0.38, 0.46), "gm": (0.55, 0.66), "csf": (0.92, 1.08),
        "bone": (0.02, 0.05), "marrow": (0.45, 0.65), "muscle": (0.22, 0.32),
        "fat": (0.55, 0.80), "skin": (0.30, 0.40), "eye": (0.90, 1.05),
    },
    "FLAIR": {
        "wm": (0.58, 0.68), "gm": (0.78, 0.90), "csf": (0.05, 0.14),
        "bone": (0.02, 0.05), "marrow": (0.45, 0.70), "muscle": (0.28, 0.40),
        "fat": (0.60, 0.90), "skin": (0.35, 0.48), "eye": (0.04, 0.12),
    },
}
_LABEL_TISSUE = {
    tpl.AIR: None, tpl.CSF_RIM: "csf", tpl.BONE: "bone", tpl.MARROW: "marrow",
    tpl.MUSCLE: "muscle", tpl.FAT: "fat", tpl.SKIN: "skin", tpl.EYE: "eye",
}

#: Sequence parameters written to the JSON sidecars (typical values).
SEQUENCE_META = {
    "T1w": {"PulseSequenceType": "MPRAGE", "RepetitionTime": 2.3, "EchoTime": 0.00298,
            "InversionTime": 0.9, "FlipAngle": 9},
    "T2w": {"PulseSequenceType": "TSE", "RepetitionTime": 3.2, "EchoTime": 0.408,
            "FlipAngle": 120},
    "FLAIR": {"PulseSequenceType": "FLAIR", "RepetitionTime": 5.0, "EchoTime": 0.387,
              "InversionTime": 1.8, "FlipAngle": 120},
}


@dataclass(frozen=True)
class SiteProfile:
    """Scanner settings of one synthetic site (drawn from per subject)."""

    name: str
    manufacturer: str
    field_strength: float
    planes: tuple = ("sagittal", "axial")
    orientations: dict = field(default_factory=dict)  # plane -> axcodes choices
    inplane_mm: tuple = (0.9, 1.1)
    slice_mm: tuple = (0.9, 1.3)
    snr: tuple = (18.0, 35.0)
    bias: tuple = (0.1, 0.3)  # peak-to-peak log amplitude of the bias field
    scale: tuple = (300.0, 1500.0)  # stored value of white matter (T1w)
    dtypes: tuple = ("int16",)
    oblique_p: float = 0.2  # probability of an oblique affine
    oblique_deg: float = 12.0


_DEFAULT_ORIENT = {
    "sagittal": ("ASL", "PIL", "ASR", "PSR"),
    "axial": ("RAS", "LAS", "LPS", "RPI", "LPI"),
    "coronal": ("LSA", "RSP", "LIP"),
}

SITES = {
    "A": SiteProfile(
        "A", "Siemens", 3.0, planes=("sagittal",),
        orientations={"sagittal": ("ASL", "PIL", "RAS", "LAS")},
        inplane_mm=(0.9, 1.05), slice_mm=(0.9, 1.1), snr=(25.0, 40.0),
        bias=(0.15, 0.35), scale=(400.0, 1200.0), dtypes=("int16", "uint16"),
    ),
    "B": SiteProfile(
        "B", "Philips", 3.0, planes=("axial", "sagittal"),
        orientations={"axial": ("LAS", "RAS", "LPS"), "sagittal": ("PSR", "ASR")},
        inplane_mm=(0.8, 1.0), slice_mm=(1.0, 1.5), snr=(20.0, 32.0),
        bias=(0.1, 0.25), scale=(0.5, 3.0), dtypes=("float32",), oblique_p=0.4,
    ),
    "C": SiteProfile(
        "C", "GE", 1.5, planes=("axial", "coronal", "sagittal"),
        orientations={"axial": ("LPS", "RPI", "LPI"), "coronal": ("LSA", "LIP"),
                      "sagittal": ("PIL", "ASL")},
        inplane_mm=(0.94, 1.3), slice_mm=(1.2, 1.5), snr=(14.0, 24.0),
        bias=(0.25, 0.5), scale=(800.0, 3000.0), dtypes=("int16",),
    ),
}

#: Union of the sites' ranges, used when no site is given.
ANY_SITE = SiteProfile(
    "any", "Synthetic", 3.0, planes=("sagittal", "axial", "coronal"),
    orientations=dict(_DEFAULT_ORIENT), inplane_mm=(0.8, 1.3), slice_mm=(0.8, 1.5),
    snr=(14.0, 40.0), bias=(0.1, 0.5), scale=(0.5, 3000.0),
    dtypes=("int16", "uint16", "float32"), oblique_p=0.3,
)


def _rng(seed, *stream):
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *stream])


def _rotation(deg_xyz):
    """Rotation about x, then y, then z (fixed axes), angles in degrees."""
    return Rotation.from_euler("xyz", deg_xyz, degrees=True).as_matrix()


def axcodes_matrix(codes: str) -> np.ndarray:
    """3x3 direction matrix whose columns point along the stored axes (RAS world)."""
    lut = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    m = np.zeros((3, 3))
    for j, c in enumerate(codes):
        a, s = lut[c]
        m[a, j] = s
    if abs(round(np.linalg.det(m))) != 1:
        raise SynthError(f"axcodes {codes!r} do not name three different axes")
    return m


def _sample_acquisition(rng, site: SiteProfile, max_voxels: float, voxel_size=None):
    """Draw stored-array geometry (orientation, voxel size, FOV, PE axis)."""
    plane = site.planes[rng.integers(len(site.planes))]
    choices = site.orientations.get(plane) or _DEFAULT_ORIENT[plane]
    codes = choices[rng.integers(len(choices))]
    normal_axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    direc = axcodes_matrix(codes)
    # which stored axis is the slice (through-plane) axis?
    slice_axis = int(np.argmax(np.abs(direc[normal_axis])))
    inplane_axes = [a for a in range(3) if a != slice_axis]
    ip = rng.uniform(*site.inplane_mm)  # always drawn: keeps the stream aligned
    sl = max(ip, rng.uniform(*site.slice_mm))
    vox = np.full(3, ip)
    vox[slice_axis] = sl
    if voxel_size is not None:
        vox = np.broadcast_to(np.asarray(voxel_size, float), (3,)).copy()
        if vox.size != 3 or np.any(vox <= 0) or not np.all(np.isfinite(vox)):
            raise SynthError(f"voxel_size must be positive mm (1 or 3 values); got {voxel_size!r}")
    # FOV in world axes (mm): x (L-R), y (A-P), z (S-I)
    fov_world = {
        "sagittal": (rng.uniform(165, 190), rng.uniform(236, 256), rng.uniform(236, 256)),
        "axial": (rng.uniform(200, 240), rng.uniform(230, 256), rng.uniform(160, 190)),
        "coronal": (rng.uniform(200, 240), rng.uniform(190, 230), rng.uniform(220, 250)),
    }[plane]
    world_axis = np.argmax(np.abs(direc), axis=0)  # stored axis -> world axis
    fov = np.array([fov_world[world_axis[j]] for j in range(3)])
    shape = np.maximum(np.round(fov / vox).astype(int), 8)
    n = float(np.prod(shape))
    if voxel_size is None and n > max_voxels:  # keep the cost bounded
        vox = vox * (n / max_voxels) ** (1 / 3)
        shape = np.maximum(np.round(fov / vox).astype(int), 8)
    oblique = np.zeros(3)
    if rng.uniform() < site.oblique_p:
        oblique = rng.uniform(-1, 1, 3) * site.oblique_deg * np.array([1.0, 0.5, 0.5])
    # phase encoding: an in-plane axis, A-P preferred as on most scanners
    pe_world = 1 if plane != "coronal" else 0
    pe_axis = int(np.argmax(np.abs(direc[pe_world])))
    if pe_axis == slice_axis:
        pe_axis = inplane_axes[0]
    freq_axis = [a for a in inplane_axes if a != pe_axis][0]
    return {
        "plane": plane, "axcodes": codes, "voxel_size": [float(v) for v in vox],
        "shape": [int(s) for s in shape], "fov_mm": [float(f) for f in shape * vox],
        "oblique_deg": [float(o) for o in oblique], "slice_axis": slice_axis,
        "phase_axis": pe_axis, "freq_axis": freq_axis,
        "phase_dir": ["i", "j", "k"][pe_axis] + rng.choice(["", "-"]),
    }


def _smooth_field(rng, shape, spacing_vox, amp):
    """Random smooth 3-vector field (voxels) sampled on a coarse grid, upsampled."""
    coarse = [max(3, int(np.ceil(s / spacing_vox)) + 2) for s in shape]
    out = []
    for _ in range(3):
        c = ndi.gaussian_filter(rng.standard_normal(coarse), 1.0)
        c = c / (np.abs(c).max() + 1e-9) * amp
        out.append(ndi.zoom(c, [s / cs for s, cs in zip(shape, coarse)], order=1,
                            grid_mode=True, mode="nearest").astype(np.float32))
    return out


def cortical_detail(model, rng, *, sulci: float, steepness: float,
                    wavelength_mm: float = 6.0, sheet_width: float = 0.25):
    """Per-subject GM/WM/CSF fractions with the detail an averaged template lacks.

    ICBM152 is an average of 152 brains: its GM/WM boundary is a wide partial-volume
    ramp and most sulci are filled in. A single real brain has a sharp GM/WM boundary
    and CSF-filled sulci cutting through the cortex, so at the model's 2 mm grid it
    has markedly more fine-scale gradient energy (the QC score's ``sharpness``: clean
    real heads 0.77-0.98 in log units, the plain template 0.56-0.60).

    Two changes, both inside the brain (the brain fraction is unchanged):

    * steeper tissue classes: the per-voxel fractions are raised to ``steepness``
      and renormalised (1 = template; larger = closer to a hard segmentation);
    * sulci: thin sheets where a band-passed random field (``wavelength_mm``)
      crosses zero (the zero level set of such a field is a labyrinth of sheets,
      which a slice shows as lines); there a share ``sulci`` of the grey matter
      becomes CSF, weighted by how cortical the voxel is (GM / (GM + WM)).

    Returns
    -------
    (gm, wm, csf) : float32 arrays on the model grid, summing to ``model.brain``.
    """
    if sulci < 0 or sulci > 1:
        raise SynthError(f"sulci must be in [0, 1]; got {sulci}")
    if steepness < 1:
        raise SynthError(f"steepness must be >= 1; got {steepness}")
    gm, wm, csf, brain = model.gm, model.wm, model.csf, model.brain
    if steepness > 1:
        tot = np.maximum(gm + wm + csf, 1e-6)
        p = [np.power(t / tot, steepness) for t in (gm, wm, csf)]
        scale = brain / np.maximum(p[0] + p[1] + p[2], 1e-12)
        gm, wm, csf = (t * scale for t in p)
    if sulci > 0:
        v = model.voxel_mm
        f = ndi.gaussian_filter(rng.standard_normal(model.shape, dtype=np.float32), 0.4 * wavelength_mm / v)
        f -= ndi.gaussian_filter(f, wavelength_mm / v)
        f /= f.std() + 1e-9
        moved = gm * (sulci * np.exp(-np.square(f / sheet_width)) * gm / np.maximum(gm + wm, 1e-6))
        gm = gm - moved
        csf = csf + moved
    return tuple(np.asarray(t, dtype=np.float32) for t in (gm, wm, csf))


def _tissue_image(model, labels, values, texture_rng, texture, tissue=None):
    lut = np.zeros(8, np.float32)
    for lab, name in _LABEL_TISSUE.items():
        lut[lab] = 0.0 if name is None else values[name]
    outside = ndi.gaussian_filter(lut[labels], 0.45)  # partial volume at label edges
    gm, wm, csf = tissue if tissue is not None else (model.gm, model.wm, model.csf)
    img = (
        gm * values["gm"] + wm * values["wm"] + csf * values["csf"]
        + (1.0 - model.brain) * outside
    )
    if texture > 0:
        noise = ndi.gaussian_filter(
            texture_rng.standard_normal(model.shape).astype(np.float32), 1.0
        )
        noise *= texture / (noise.std() + 1e-9)
        img *= 1.0 + noise
    return img.astype(np.float32)


def finalize_dtype(img: nib.Nifti1Image, dtype: str, seed: int = 0) -> nib.Nifti1Image:
    """Return ``img`` as it would be read back from disk with ``dtype``.

    ``uint16``: integer values stored as they are (no scaling).
    ``int16``: scaled into the int16 range by nibabel (``scl_slope`` != 1).
    ``float32``: unchanged. The image round-trips through bytes so what the
    caller holds is exactly what a file would contain.
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    hdr = img.header.copy()
    if dtype == "float32":
        hdr.set_data_dtype(np.float32)
        out = nib.Nifti1Image(data, img.affine, hdr)
        out.header.set_slope_inter(None, None)
        return out
    if dtype == "uint16":
        arr = np.clip(np.round(data), 0, 65535).astype(np.uint16)
        hdr.set_data_dtype(np.uint16)
        out = nib.Nifti1Image(arr, img.affine, hdr)
    elif dtype == "int16":
        # integers times a non-trivial scl_slope, as some scanners store them
        slope = float(max(data.max(), 1e-6) / 30000.0)
        arr = np.clip(np.round(data / slope), -32768, 32767).astype(np.int16)
        hdr.set_data_dtype(np.int16)
        out = nib.Nifti1Image(arr, img.affine, hdr)
        raw = bytearray(out.to_bytes())
        # nibabel recomputes scaling for in-memory arrays; set it in the header
        # bytes (scl_slope at offset 112, scl_inter at 116 of a NIfTI-1 header)
        endian = out.header.endianness
        raw[112:120] = np.array([slope, 0.0], dtype=endian + "f4").tobytes()
        return nib.Nifti1Image.from_bytes(bytes(raw))
    else:
        raise SynthError(f"dtype must be one of uint16, int16, float32; got {dtype!r}")
    return nib.Nifti1Image.from_bytes(out.to_bytes())


def make_subject(
    seed: int,
    contrast: str = "T1w",
    *,
    site: str | SiteProfile | None = None,
    work_mm: float = 1.5,
    voxel_size=None,
    max_voxels: float = 1.2e7,
    tissue_contrast: str | None = None,
    contrast_mix: float = 1.0,
    deform_mm: float | None = None,
    pose: bool = True,
    finalize: bool = True,
    return_brain_mask: bool = False,
    cortex_detail: bool = True,
):
    """Generate one synthetic head scan.

    Parameters
    ----------
    seed : int
        Subject seed. Same seed -> same anatomy and pose in every contrast.
    contrast : {"T1w", "T2w", "FLAIR"}
        Contrast the scan is labelled with (sets geometry, noise streams).
    site : str or SiteProfile or None
        A key of :data:`SITES` (``"A"``, ``"B"``, ``"C"``), a profile, or None
        for the union of all sites' ranges.
    work_mm : float
        Internal tissue-model resolution (1.5 default; tests use 3-4).
    voxel_size : float or 3 floats, optional
        Force the stored voxel size (otherwise drawn from the site).
    max_voxels : float
        Cap on the stored array size; voxels are enlarged to respect it.
    tissue_contrast : str, optional
        Draw tissue intensities of another contrast (the "different sequence"
        artifact); with ``contrast_mix`` < 1 the intensities are a blend
        ``(1 - w) * own + w * other``.
    deform_mm : float, optional
        Peak displacement of the random deformation (default: drawn 2-5 mm).
    pose : bool
        False keeps the head in MNI position and size (world mm = MNI mm up to
        the deformation); for tests that need the ground-truth anatomy.
    finalize : bool
        Convert to the drawn on-disk dtype (see :func:`finalize_dtype`).
    return_brain_mask : bool
        Add ``meta["brain_mask"]``: a uint8 image (same grid) of where brain is.
    cortex_detail : bool
        Give the brain a single subject's detail (sharp tissue classes, sulci; see
        :func:`cortical_detail`, strength drawn per subject). False gives the
        averaged template's smooth anatomy.

    Returns
    -------
    (nibabel.Nifti1Image, dict)
        The scan and JSON-safe metadata (everything drawn, for provenance).
    """
    profile = _check_subject_args(contrast, site, tissue_contrast, contrast_mix)
    cid = _CONTRAST_ID[contrast]
    model = tpl.load_head_model(work_mm)
    anat = _draw_anatomy(seed, model, deform_mm)
    labels = tpl.head_labels(model, anat["thickness"])
    tissue, values, detail = _draw_tissue(seed, contrast, model, labels, tissue_contrast=tissue_contrast,
                                          contrast_mix=contrast_mix, cortex_detail=cortex_detail)

    # ---- warp on the working grid (one pass, linear)
    grid = np.indices(model.shape, dtype=np.float32)
    coords = [grid[a] + anat["disp"][a] for a in range(3)]
    del grid
    warped = ndi.map_coordinates(tissue, coords, order=1, cval=0.0).astype(np.float32)
    brain_w = ndi.map_coordinates(model.brain, coords, order=1, cval=0.0) if return_brain_mask else None
    del coords, tissue

    if not pose:
        anat.update(pose_rot=np.zeros(3), pose_shift=np.zeros(3), head_scale=np.ones(3))
    acq, affine, m = _place_in_scanner(_rng(seed, 1, cid), profile, model, anat, max_voxels=max_voxels,
                                       voxel_size=voxel_size)
    shape = tuple(acq["shape"])
    img = _resample(warped, m, shape)
    mask = _resample(brain_w, m, shape) if return_brain_mask else None
    img, scanner = _scanner_nuisance(img, _rng(seed, 3, cid), profile, values)

    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    out = nib.Nifti1Image(img.astype(np.float32), affine, hdr)
    out.header.set_dim_info(freq=acq["freq_axis"], phase=acq["phase_axis"],
                            slice=acq["slice_axis"])
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    if finalize:
        out = finalize_dtype(out, scanner["dtype"])
    meta = {
        "seed": int(seed), "contrast": contrast,
        "tissue_contrast": tissue_contrast or contrast,
        "contrast_mix": float(contrast_mix) if tissue_contrast else 0.0,
        "site": profile.name, "manufacturer": profile.manufacturer,
        "field_strength": profile.field_strength, "work_mm": float(work_mm),
        "acquisition": acq, "dtype": scanner["dtype"], "snr": scanner["snr"],
        "noise_sigma": scanner["noise_sigma"], "intensity_scale": scanner["scale"],
        "bias_amplitude": scanner["bias_amplitude"],
        "tissue_values": values, "thickness_mm": anat["thickness"],
        "deform_mm": float(anat["amp"]), "cortex_detail": detail,
        "head_scale": [float(s) for s in anat["head_scale"]],
        "pose_rotation_deg": [float(r) for r in anat["pose_rot"]],
        "pose_translation_mm": [float(t) for t in anat["pose_shift"]],
    }
    if mask is not None:
        meta["brain_mask"] = nib.Nifti1Image((mask > 0.5).astype(np.uint8), affine)
    return out, meta


def _check_subject_args(contrast, site, tissue_contrast, contrast_mix) -> SiteProfile:
    """The site profile :func:`make_subject` draws from, after checking its arguments."""
    if contrast not in TISSUE_RANGES:
        raise SynthError(f"contrast must be one of {CONTRASTS}; got {contrast!r}")
    if tissue_contrast is not None and tissue_contrast not in TISSUE_RANGES:
        raise SynthError(f"tissue_contrast must be one of {CONTRASTS}; got {tissue_contrast!r}")
    if not 0.0 <= contrast_mix <= 1.0:
        raise SynthError(f"contrast_mix must be in [0, 1]; got {contrast_mix}")
    if isinstance(site, str):
        if site not in SITES:
            raise SynthError(f"site must be one of {sorted(SITES)} or None; got {site!r}")
        return SITES[site]
    return ANY_SITE if site is None else site


def _draw_anatomy(seed, model, deform_mm) -> dict:
    """The subject's anatomy, shared by all its contrasts (one stream, drawn in a fixed order):
    layer thicknesses, the deformation field, head size and pose."""
    r_anat = _rng(seed, 0)
    thickness = {
        "csf": r_anat.uniform(1.5, 3.5), "inner": r_anat.uniform(1.2, 2.2),
        "diploe": r_anat.uniform(2.0, 4.5), "outer": r_anat.uniform(1.2, 2.2),
        "skin": r_anat.uniform(1.2, 2.0), "fat": r_anat.uniform(2.0, 5.0),
    }
    amp = r_anat.uniform(2.0, 5.0) if deform_mm is None else float(deform_mm)
    disp = _smooth_field(r_anat, model.shape, 14.0 / model.voxel_mm, amp / model.voxel_mm)
    head_scale = r_anat.uniform(0.92, 1.08, 3)
    pose_rot = r_anat.uniform(-1, 1, 3) * np.array([8.0, 4.0, 5.0])  # pitch, roll, yaw
    pose_shift = r_anat.uniform(-1, 1, 3) * np.array([6.0, 8.0, 8.0])
    return {"thickness": thickness, "amp": amp, "disp": disp, "head_scale": head_scale,
            "pose_rot": pose_rot, "pose_shift": pose_shift}


def _draw_tissue(seed, contrast, model, labels, *, tissue_contrast, contrast_mix, cortex_detail):
    """The tissue image on the working grid, its tissue intensities and the cortex detail drawn."""
    def draw(c):
        r = _rng(seed, 2, _CONTRAST_ID[c])
        return {k: float(r.uniform(*v)) for k, v in TISSUE_RANGES[c].items()}

    values = draw(contrast)
    if tissue_contrast is not None and tissue_contrast != contrast:
        other = draw(tissue_contrast)
        values = {k: (1 - contrast_mix) * values[k] + contrast_mix * other[k] for k in values}
    r_detail = _rng(seed, 5)  # anatomy: same sulci in every contrast
    detail = {"sulci": float(r_detail.uniform(0.6, 1.0)), "steepness": float(r_detail.uniform(3.0, 6.0))}
    if cortex_detail:
        fractions = cortical_detail(model, r_detail, **detail)
    else:
        fractions, detail = None, {"sulci": 0.0, "steepness": 1.0}
    r_tex = _rng(seed, 4, _CONTRAST_ID[contrast])
    tissue = _tissue_image(model, labels, values, r_tex, texture=r_tex.uniform(0.02, 0.04),
                           tissue=fractions)
    return tissue, values, detail


def _place_in_scanner(r_acq, profile, model, anat, *, max_voxels, voxel_size):
    """The acquisition drawn for the posed head: ``(acq, affine, m)``, ``m`` mapping a stored
    voxel to a working-grid voxel."""
    acq = _sample_acquisition(r_acq, profile, max_voxels, voxel_size)
    direc = axcodes_matrix(acq["axcodes"])
    obl = _rotation(acq["oblique_deg"])
    vox = np.array(acq["voxel_size"])
    shape = tuple(acq["shape"])
    # pose: MNI -> scanner (scale about the brain centre, rotate, shift)
    centre = np.array([0.0, -18.0, 10.0])
    pose = np.eye(4)
    pose[:3, :3] = _rotation(anat["pose_rot"]) @ np.diag(anat["head_scale"])
    pose[:3, 3] = centre - pose[:3, :3] @ centre + anat["pose_shift"]
    # FOV centre in scanner coordinates (isocentre near the head centre)
    head_c = pose[:3, :3] @ np.array([0.0, -15.0, 5.0]) + pose[:3, 3]
    fov_c = head_c + r_acq.uniform(-1, 1, 3) * np.array([3.0, 6.0, 6.0])
    if acq["plane"] == "axial":  # slab covers the vertex with a margin
        vertex = (pose[:3, :3] @ np.array([0.0, -20.0, 98.0]) + pose[:3, 3])[2]
        top_margin = r_acq.uniform(4.0, 15.0)
        fov_c[2] = vertex + top_margin - acq["fov_mm"][acq["slice_axis"]] / 2
    rot = obl @ direc
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(vox)
    affine[:3, 3] = fov_c - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    m = np.linalg.inv(model.affine) @ np.linalg.inv(pose) @ affine
    return acq, affine, m


def _scanner_nuisance(img, r_scan, profile, values):
    """Bias field, intensity scale and Rician noise on the stored grid (in place where it can)."""
    shape = img.shape
    bias_amp = r_scan.uniform(*profile.bias)
    logb = _bias_log(r_scan, shape, bias_amp)
    img *= np.exp(logb)
    scale = float(np.exp(r_scan.uniform(np.log(profile.scale[0]), np.log(profile.scale[1]))))
    dtype = profile.dtypes[r_scan.integers(len(profile.dtypes))]
    if dtype != "float32" and scale < 100.0:  # integers need a usable range
        scale *= 1000.0
    snr = float(r_scan.uniform(*profile.snr))
    ref = max(values["wm"], values["gm"], values["csf"])  # brightest brain tissue
    sigma = ref / snr
    n1 = r_scan.standard_normal(shape, dtype=np.float32)
    n1 *= sigma
    img += n1
    del n1
    n2 = r_scan.standard_normal(shape, dtype=np.float32)
    n2 *= sigma
    img = np.sqrt(img * img + n2 * n2)
    del n2
    img *= scale
    if dtype == "uint16" and img.max() > 60000:
        img *= 60000.0 / img.max()
    return img, {"dtype": dtype, "snr": snr, "noise_sigma": float(sigma * scale), "scale": scale,
                 "bias_amplitude": float(bias_amp)}


def _resample(vol, m, shape, slab=32):
    """``vol`` sampled at ``m @ ijk`` for every stored voxel, in slabs (memory)."""
    out = np.empty(shape, np.float32)
    i = np.arange(shape[0], dtype=np.float32)[:, None, None]
    j = np.arange(shape[1], dtype=np.float32)[None, :, None]
    for k0 in range(0, shape[2], slab):
        k = np.arange(k0, min(shape[2], k0 + slab), dtype=np.float32)[None, None, :]
        c = [m[a, 0] * i + m[a, 1] * j + m[a, 2] * k + m[a, 3] for a in range(3)]
        c = np.stack(np.broadcast_arrays(*c))
        out[:, :, k0:k0 + k.shape[2]] = ndi.map_coordinates(vol, c, order=1, cval=0.0)
    return out


def _bias_log(rng, shape, amp):
    """Separable smooth log-bias (cubic per axis), peak-to-peak about ``amp``."""
    logb = np.zeros(shape, np.float32)
    for a, n in enumerate(shape):
        t = np.linspace(-1, 1, n, dtype=np.float32)
        c = rng.uniform(-1, 1, 3)
        f = c[0] * t + c[1] * (t * t - 1 / 3) + c[2] * (t**3 - 0.6 * t)
        f = f / (np.ptp(f) + 1e-6) * amp / np.sqrt(3)
        logb += f.reshape([-1 if b == a else 1 for b in range(3)])
    return logb


def meta_for_json(meta: dict) -> dict:
    """JSON-safe copy of ``meta`` (drops images)."""
    return {k: v for k, v in meta.items() if not isinstance(v, nib.spatialimages.SpatialImage)}


__all__ = [
    "CONTRASTS", "SITES", "SiteProfile", "TISSUE_RANGES", "make_subject",
    "finalize_dtype", "axcodes_matrix", "meta_for_json",
]
