"""Masks: binary morphology on 3D masks (the one home of the helpers that preprocessing,
skull stripping, the background statistic, the image-quality measurements and the reports
share), the air that a skull-strip mask may take in, and the checks that a mask is a brain.

The two brain masks of a preprocessed scan are described in :mod:`~qc_pipeline.preproc.chain`.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..errors import NoBrainError
from ..io import voxel_sizes

__all__ = ["ball", "fill_holes", "close", "largest_component", "air_in_mask", "thick_air_ml",
           "check_brain"]

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


def ball(radius: int) -> np.ndarray:
    """A solid 3D ball of ``radius`` voxels (a ``2r+1`` cube), for closings and openings."""
    r = int(radius)
    g = np.indices((2 * r + 1,) * 3) - r
    return (g**2).sum(0) <= r * r + 1e-9


def fill_holes(mask: np.ndarray, per_slice: bool = True) -> np.ndarray:
    """Fill holes in 3D and (optionally) in every slice along each of the three axes."""
    m = ndi.binary_fill_holes(np.asarray(mask, dtype=bool))
    if not per_slice:
        return m
    for ax in range(3):
        # label background with in-slice connectivity only; components that do not touch
        # the slice border are holes of that slice
        st = np.zeros((3, 3, 3), dtype=bool)
        sl = [slice(None)] * 3
        sl[ax] = 1
        st[tuple(sl)] = ndi.generate_binary_structure(2, 1)
        lab, n = ndi.label(~m, structure=st)
        if n == 0:
            continue
        border = np.zeros(n + 1, dtype=bool)
        for other in range(3):
            if other == ax:
                continue
            for edge in (0, -1):
                e = [slice(None)] * 3
                e[other] = edge
                border[np.unique(lab[tuple(e)])] = True
        border[0] = True
        m = m | ~border[lab]
    return m


def close(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with a ball of ``radius`` voxels, padded so that the volume's edges do
    not erode; never removes a voxel of ``mask``."""
    if radius <= 0:
        return mask
    pad = radius + 1
    p = np.pad(mask, pad)
    p = ndi.binary_closing(p, structure=ball(radius))
    return p[pad:-pad, pad:-pad, pad:-pad] | mask


def open_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening with a ball of ``radius`` voxels: what is thinner than the ball
    (specks, one- and two-voxel threads) goes, what holds the ball stays at its full
    extent; ``radius`` 0 returns a copy of ``mask``."""
    m = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return m.copy()
    return ndi.binary_opening(m, structure=ball(radius))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component (``scipy.ndimage.label``'s default) of
    ``mask`` as a bool array; ``mask`` itself when it has at most one component."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


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
