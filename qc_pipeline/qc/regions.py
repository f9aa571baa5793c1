"""Where the engine's anomaly mask lies: its connected regions, largest first.

A voxel count says how much of the brain the network could not reconstruct; a rater also
needs to know where, and whether it is one compact region (a missing chunk, a void, a
lesion) or many small ones scattered over the brain (the texture of a whole-image artifact,
or a person's anatomy the model's normal heads did not cover). Each region is one
26-connected component of the mask on the model grid, with its volume, its share of the
brain, its centre in the scanner's coordinates (the ones a viewer shows for the input file)
and, where the preprocessing fitted the MNI152 template, in MNI coordinates with the
hemisphere, and the network's mean and peak squared error inside it.

Pure NumPy/SciPy: no I/O, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..errors import QCPipelineError

__all__ = ["AnomalyRegion", "RegionsError", "anomaly_regions", "MIDLINE_MM", "REGIONS_LISTED"]

#: how many regions a record lists (the count covers all of them)
REGIONS_LISTED = 5
#: a region whose centre lies within this many mm of the MNI midline is called "midline"
MIDLINE_MM = 5.0


class RegionsError(QCPipelineError, ValueError):
    """Arrays or affines that do not describe one model grid."""


@dataclass(frozen=True)
class AnomalyRegion:
    """One connected region of the anomaly mask.

    rank : 1 for the largest region
    voxels : model-grid voxels in the region
    volume_ml : its volume in millilitres
    fraction_of_brain : its voxels over the brain mask's (None for an empty brain mask)
    fraction_of_mask : its voxels over the whole anomaly mask's
    centre_scanner_mm : centre of mass in the input scan's world coordinates (x, y, z mm)
    centre_mni_mm : the same in MNI152 space through the template fit (None without one)
    hemisphere : "left", "right" or "midline" from the MNI x coordinate (None without a fit)
    mean_error, peak_error : the network's squared error inside the region (z-units^2)
    """

    rank: int
    voxels: int
    volume_ml: float
    fraction_of_brain: float | None
    fraction_of_mask: float
    centre_scanner_mm: list
    centre_mni_mm: list | None
    hemisphere: str | None
    mean_error: float | None
    peak_error: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _affine(a, name: str) -> np.ndarray:
    m = np.asarray(a, dtype=float)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise RegionsError(f"{name}: expected a finite 4 x 4 affine, got shape {m.shape}")
    return m


def _rounded(v: Sequence[float], nd: int = 1) -> list:
    return [round(float(x), nd) for x in v]


def anomaly_regions(mask: np.ndarray, *, brain_mask: np.ndarray, grid_affine,
                    error_map: np.ndarray | None = None, template_to_world=None,
                    listed: int = REGIONS_LISTED) -> tuple[int, list[AnomalyRegion]]:
    """The connected regions of ``mask``, largest first.

    Parameters
    ----------
    mask : bool array
        The engine's anomaly mask on the model grid.
    brain_mask : bool array
        The expected brain on the same grid (the denominator of the shares).
    grid_affine : 4 x 4 array
        Model-grid voxel -> scanner mm.
    error_map : float array, optional
        The network's squared error on the same grid (regions then carry its mean and peak).
    template_to_world : 4 x 4 array, optional
        The preprocessing's template fit (MNI mm -> scanner mm); without it the regions have
        no MNI centre and no hemisphere.
    listed : int
        How many regions to describe (the largest).

    Returns
    -------
    (int, list of AnomalyRegion)
        The number of regions and the ``listed`` largest (ties: the lower label first).

    Raises
    ------
    RegionsError
        Arrays of different shapes or an affine that is not a finite 4 x 4 matrix.
    """
    mask = np.asarray(mask, dtype=bool)
    brain = np.asarray(brain_mask, dtype=bool)
    if mask.shape != brain.shape or mask.ndim != 3:
        raise RegionsError(f"mask {mask.shape} and brain mask {brain.shape}: expected one 3D grid")
    if error_map is not None and np.shape(error_map) != mask.shape:
        raise RegionsError(f"error map {np.shape(error_map)}: expected the mask's grid {mask.shape}")
    g2w = _affine(grid_affine, "grid_affine")
    w2mni = None if template_to_world is None else np.linalg.inv(_affine(template_to_world, "template_to_world"))
    if not mask.any():
        return 0, []
    lab, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")[:max(int(listed), 0)]
    labels = [int(i) + 1 for i in order]
    centres = ndi.center_of_mass(mask, lab, labels)
    err = None if error_map is None else np.asarray(error_map, dtype=float)
    vox_ml = abs(float(np.linalg.det(g2w[:3, :3]))) / 1000.0
    n_brain, n_mask = int(brain.sum()), int(mask.sum())
    out = []
    for rank, (lbl, c) in enumerate(zip(labels, centres), start=1):
        k = int(sizes[lbl - 1])
        world = g2w @ np.r_[np.asarray(c, dtype=float), 1.0]
        mni = None if w2mni is None else w2mni @ world
        hemi = None if mni is None else ("midline" if abs(mni[0]) < MIDLINE_MM else
                                         "left" if mni[0] < 0 else "right")
        mean = peak = None
        if err is not None:
            e = err[lab == lbl]
            e = e[np.isfinite(e)]
            if e.size:
                mean, peak = round(float(e.mean()), 4), round(float(e.max()), 4)
        out.append(AnomalyRegion(
            rank=rank, voxels=k, volume_ml=round(k * vox_ml, 3),
            fraction_of_brain=round(k / n_brain, 6) if n_brain else None,
            fraction_of_mask=round(k / n_mask, 6),
            centre_scanner_mm=_rounded(world[:3]), centre_mni_mm=None if mni is None else _rounded(mni[:3]),
            hemisphere=hemi, mean_error=mean, peak_error=peak))
    return int(n), out
