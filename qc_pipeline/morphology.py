"""Binary morphology on 3D masks: the one home of the helpers that preprocessing, skull
stripping, the background statistic, the image-quality measurements and the reports share."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["ball", "fill_holes", "close", "largest_component"]


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


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component (``scipy.ndimage.label``'s default) of
    ``mask`` as a bool array; ``mask`` itself when it has at most one component."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))
