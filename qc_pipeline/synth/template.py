"""ICBM152 2009 tissue maps and a synthetic head model around them.

The brain comes from nilearn's bundled ICBM152 2009 (sym, 1 mm) files:
the T1 template is skull-stripped (zero outside the brain), so the brain mask
is the template thresholded like ``nilearn.datasets.load_mni152_brain_mask``;
GM and WM are the probability maps and CSF = brain - GM - WM.  Nothing is
downloaded: the files ship inside the nilearn wheel.

Around the brain a head is built from geometric rules in MNI millimetres:
a hull of the brain (sulci filled), a CSF rim, the skull (inner table,
diploe/marrow, outer table), scalp (muscle, subcutaneous fat, skin), eyes
with orbital fat, sinuses and airway (air), a neck with a vertebral column,
and a spinal cord continuing the brainstem below the template's lower edge.
Everything is computed once per working resolution and cached.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

LOGGER = logging.getLogger(__name__)

#: non-brain tissue labels of the head model (0 = air)
AIR, CSF_RIM, BONE, MARROW, MUSCLE, FAT, SKIN, EYE = range(8)
LABEL_NAMES = ("air", "csf_rim", "bone", "marrow", "muscle", "fat", "skin", "eye")

#: MNI box of the working grid, millimetres (x: L-R, y: P-A, z: I-S)
BOX_MIN = np.array([-100.0, -140.0, -150.0])
BOX_MAX = np.array([100.0, 118.0, 112.0])

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def template_dir() -> Path:
    """Folder of nilearn's bundled ICBM152 2009 files (no download)."""
    import nilearn.datasets

    folder = Path(nilearn.datasets.__file__).parent / "data"
    missing = [f for f in _TEMPLATE_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"nilearn's bundled ICBM152 files are missing from {folder}: {missing}"
        )
    return folder


@dataclass(frozen=True)
class HeadModel:
    """Cached tissue model on the working grid (RAS, isotropic ``voxel_mm``).

    Attributes
    ----------
    voxel_mm : grid spacing in mm.
    affine : voxel -> MNI mm.
    gm, wm, csf : brain tissue fractions (float32, sum = brain fraction).
    brain : brain fraction (float32, 0..1).
    hull_dist : mm outside the filled brain hull (0 inside).
    ext_dist : mm inside the head envelope to its outer surface (0 outside).
    head : bool, head envelope.
    extras : int8 label volume of fixed structures (eyes, orbital fat,
        sinuses/airway as AIR inside the head, vertebral body as MARROW,
        -1 where the distance rules decide).
    """

    voxel_mm: float
    affine: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    hull_dist: np.ndarray
    ext_dist: np.ndarray
    head: np.ndarray
    extras: np.ndarray

    @property
    def shape(self):
        return self.gm.shape


def _grid(voxel_mm):
    shape = tuple(int(np.ceil(s)) + 1 for s in (BOX_MAX - BOX_MIN) / voxel_mm)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = BOX_MIN
    return shape, affine


def _mm_coords(shape, affine):
    """Open (broadcastable) x, y, z coordinate axes in mm."""
    return [
        (affine[a, a] * np.arange(shape[a]) + affine[a, 3]).reshape(
            [-1 if b == a else 1 for b in range(3)]
        ).astype(np.float32)
        for a in range(3)
    ]


def _ellipsoid(x, y, z, c, r):
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0


@functools.lru_cache(maxsize=4)
def load_head_model(voxel_mm: float = 1.5) -> HeadModel:
    """Build (once per resolution) the head model on the working grid.

    Parameters
    ----------
    voxel_mm : float
        Working resolution in mm (1.0 - 4.0). 1.5 mm is the default for
        cohorts; tests use 3-4 mm.
    """
    import nibabel as nib

    voxel_mm = float(voxel_mm)
    if not 0.5 <= voxel_mm <= 6.0:
        raise ValueError(f"work voxel size must be in [0.5, 6] mm, got {voxel_mm}")
    folder = template_dir()
    imgs = {k: nib.load(str(folder / f)) for k, f in _TEMPLATE_FILES.items()}
    src_aff = imgs["t1"].affine
    t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32)
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0
    # brain: the T1 template is skull-stripped (0 outside); same rule as nilearn's
    # load_mni152_brain_mask, softened by half a voxel for partial volume.
    brain = ndi.gaussian_filter((t1 > 0.2).astype(np.float32), 0.6)
    brain = np.clip(brain * 1.02, 0, 1)
    tissue = gm + wm
    over = tissue > brain
    scale = np.ones_like(tissue)
    scale[over] = brain[over] / np.maximum(tissue[over], 1e-6)
    gm *= scale
    wm *= scale

    # ---- resample to the working grid (pre-smoothed against aliasing)
    shape, aff = _grid(voxel_mm)
    m = np.linalg.inv(src_aff) @ aff
    sig = max(0.0, 0.42 * (voxel_mm - 1.0))

    def to_grid(vol):
        if sig > 0:
            vol = ndi.gaussian_filter(vol, sig)
        return ndi.affine_transform(
            vol, m[:3, :3], m[:3, 3], output_shape=shape, order=1, cval=0.0
        ).astype(np.float32)

    gm, wm, brain = to_grid(gm), to_grid(wm), to_grid(brain)
    x, y, z = _mm_coords(shape, aff)

    # ---- spinal cord continuing the brainstem below the template's edge
    z_edge = src_aff[2, 3] + 2.0  # template's lower edge (-72 mm) + margin
    bottom = np.asarray(imgs["t1"].dataobj[:, :, 2]) > 0.2
    ii, jj = np.nonzero(bottom)
    if ii.size:
        cx = float(np.mean(src_aff[0, 0] * ii + src_aff[0, 3]))
        cy = float(np.mean(src_aff[1, 1] * jj + src_aff[1, 3]))
    else:  # pragma: no cover - template always has brainstem at the edge
        cx, cy = 0.0, -40.0
    below = z < z_edge
    r2 = (x - cx) ** 2 + (y - cy) ** 2
    taper = np.clip((z_edge - z) / 25.0, 0, 1)  # medulla narrows to the cord
    r_cord = 11.0 - 5.0 * taper
    cord = below & (r2 <= r_cord**2)
    canal = below & (r2 <= (r_cord + 2.5) ** 2)
    # blend with what the template already has at its edge
    wm = np.where(cord, np.maximum(wm, 0.9), wm)
    gm = np.where(cord, np.minimum(gm, 0.1), gm)
    brain = np.where(canal, 1.0, brain).astype(np.float32)
    gm = np.minimum(gm, brain)
    wm = np.minimum(wm, brain - gm)
    csf = np.clip(brain - gm - wm, 0, 1).astype(np.float32)

    # ---- hull: brain with sulci filled (closing by smoothing), distance outside
    hull = ndi.gaussian_filter(brain, 4.0 / voxel_mm) > 0.25
    hull |= brain > 0.5
    hull_dist = (ndi.distance_transform_edt(~hull) * voxel_mm).astype(np.float32)

    # ---- head envelope: skull + scalp around the hull, face, neck
    skull_scalp = 17.0
    head = hull_dist <= skull_scalp
    face = _ellipsoid(x, y, z, (0, 38, -50), (62, 62, 48))
    jaw = _ellipsoid(x, y, z, (0, 25, -95), (50, 55, 35))
    neck_r2 = ((x - 0) / 58.0) ** 2 + ((y + 12) / 62.0) ** 2
    neck = (neck_r2 <= 1.0) & (z < -40)
    head = head | face | jaw | neck
    head = ndi.gaussian_filter(head.astype(np.float32), 5.0 / voxel_mm) > 0.5
    head |= hull_dist <= 12.0  # never thinner than the skull
    ext_dist = (ndi.distance_transform_edt(head) * voxel_mm).astype(np.float32)

    # ---- fixed structures (-1: decided per subject by distance rules)
    extras = np.full(shape, -1, dtype=np.int8)
    outside_skull = hull_dist > 11.0
    for sx in (-1, 1):
        c = (sx * 32.0, 50.0, -40.0)
        orbit = _ellipsoid(x, y, z, (c[0], c[1] - 6, c[2]), (18, 22, 16))
        extras[orbit & outside_skull & head] = FAT
        extras[_ellipsoid(x, y, z, c, (12, 12, 12)) & head] = EYE
        extras[_ellipsoid(x, y, z, (sx * 30.0, 38.0, -68.0), (13, 16, 14)) & outside_skull] = AIR
    extras[_ellipsoid(x, y, z, (0, 46, -42), (9, 16, 12)) & outside_skull] = AIR  # ethmoid
    airway = (((x / 8.0) ** 2 + ((y - 18.0) / 10.0) ** 2) <= 1.0) & (z < -75)
    extras[airway & outside_skull & head] = AIR
    vb = (((x / 14.0) ** 2 + ((y - cy - 26.0) / 12.0) ** 2) <= 1.0) & (z < -80)
    extras[vb & outside_skull] = MARROW
    extras[~head] = AIR

    LOGGER.debug("head model at %.2f mm: shape %s", voxel_mm, shape)
    return HeadModel(
        voxel_mm=voxel_mm,
        affine=aff,
        gm=gm,
        wm=wm,
        csf=csf,
        brain=brain,
        hull_dist=hull_dist,
        ext_dist=ext_dist,
        head=head,
        extras=extras,
    )


def head_labels(model: HeadModel, thickness: dict) -> np.ndarray:
    """Non-brain tissue label volume for one subject's layer thicknesses (mm).

    ``thickness`` keys: ``csf`` (rim outside the hull), ``inner``, ``diploe``,
    ``outer`` (skull tables), ``skin``, ``fat``.
    """
    d = model.hull_dist
    e = model.ext_dist
    lab = np.full(model.shape, MUSCLE, dtype=np.int8)
    b1 = thickness["csf"]
    b2 = b1 + thickness["inner"]
    b3 = b2 + thickness["diploe"]
    b4 = b3 + thickness["outer"]
    lab[e <= thickness["skin"] + thickness["fat"]] = FAT
    lab[e <= thickness["skin"]] = SKIN
    fixed = model.extras >= 0
    lab[fixed] = model.extras[fixed]
    lab[d <= b4] = BONE
    lab[d <= b3] = MARROW
    lab[d <= b2] = BONE
    lab[d <= b1] = CSF_RIM
    lab[~model.head] = AIR
    return lab
