"""Random training masks (IterMask3D paper, section 3.5).

A mask is an anisotropic 3D Gaussian point cloud:

1. centre: a voxel drawn uniformly from the brain mask;
2. covariance ``Sigma = O diag(l1, l2, l3) O^T`` with ``l_i ~ U[0.3, 10]`` and
   ``O`` a uniformly random rotation (``scipy.stats.special_ortho_group``);
3. 100,000 points ``p ~ N(0, Sigma)``;
4. *upsampling* by a factor ``f`` drawn from {2, 4, 8} with probabilities
   {1/4, 1/2, 1/4} (the reference code's mixture: it draws the cloud on a grid
   down-sampled by ``f`` and repeats every coarse voxel ``f`` times per axis).
   Here "upsampled" means precisely: the point coordinates are scaled by ``f``
   around the centre (``q = c + f * p``, in mm of the paper's 1 mm reference
   grid, converted to voxels of the model grid), rasterised to the nearest
   voxel, dilated with a cube of side ``f * 1 mm / voxel_size`` voxels (the
   block one coarse voxel becomes; this makes the cloud a solid region
   instead of isolated dots) and hole-filled;
5. clipped to the brain mask.

Masks are drawn from a ``numpy.random.Generator`` that the caller keeps for
the whole training run, so every step sees fresh masks (the reference code
re-seeds its loader workers each epoch, so every subject sees the same masks
forever; that is not reproduced).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import special_ortho_group

from .errors import InvalidInputError

__all__ = ["random_training_mask", "noise_fill", "UPSAMPLE_FACTORS", "UPSAMPLE_PROBS"]

UPSAMPLE_FACTORS = (2, 4, 8)
UPSAMPLE_PROBS = (0.25, 0.5, 0.25)


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def random_training_mask(
    brain_mask: np.ndarray,
    rng: np.random.Generator | int | None,
    *,
    voxel_size: Sequence[float] | float = (2.0, 2.0, 2.0),
    factors: Sequence[int] = UPSAMPLE_FACTORS,
    factor_probs: Sequence[float] = UPSAMPLE_PROBS,
    n_points: int = 100_000,
    eig_range: tuple[float, float] = (0.3, 10.0),
    reference_voxel_mm: float = 1.0,
    return_info: bool = False,
):
    """Draw one random anomaly-shaped mask inside the brain.

    Parameters
    ----------
    brain_mask : (X, Y, Z) bool array
    rng : numpy Generator (kept by the caller across steps) or seed
    voxel_size : voxel size of the grid in mm (sets the physical mask size)
    factors, factor_probs : upsampling factors and their probabilities
    n_points : points in the cloud (paper: 100,000)
    eig_range : covariance eigenvalue range in coarse-voxel units (paper: [0.3, 10])
    reference_voxel_mm : voxel size of the grid the paper's units refer to (1 mm)
    return_info : also return a dict (centre, eigenvalues, factor)

    Returns
    -------
    mask : (X, Y, Z) bool array (subset of ``brain_mask``), or ``(mask, info)``.
    """
    brain = np.asarray(brain_mask).astype(bool)
    if brain.ndim != 3:
        raise InvalidInputError(f"brain_mask must be 3D, got shape {brain.shape}")
    if not brain.any():
        raise InvalidInputError("brain_mask is empty: a training mask needs brain voxels")
    vs = np.asarray([float(voxel_size)] * 3 if np.isscalar(voxel_size) else voxel_size, dtype=float)
    g = _rng(rng)
    idx = np.flatnonzero(brain)
    centre = np.asarray(np.unravel_index(idx[g.integers(idx.size)], brain.shape), dtype=float)
    lam = g.uniform(eig_range[0], eig_range[1], size=3)
    rot = special_ortho_group.rvs(3, random_state=g)
    cov = rot @ np.diag(lam) @ rot.T
    f = int(g.choice(np.asarray(factors), p=np.asarray(factor_probs, dtype=float)))
    pts = g.multivariate_normal(np.zeros(3), cov, size=int(n_points))
    cell_vox = f * reference_voxel_mm / vs  # one coarse voxel, in voxels of this grid, per axis
    q = np.rint(centre + pts * cell_vox).astype(np.int64)
    inside = np.all((q >= 0) & (q < np.asarray(brain.shape)), axis=1)
    q = q[inside]
    mask = np.zeros(brain.shape, dtype=bool)
    mask[q[:, 0], q[:, 1], q[:, 2]] = True
    side = tuple(max(1, int(round(c))) for c in cell_vox)
    if any(s > 1 for s in side):
        mask = ndimage.maximum_filter(mask.view(np.uint8), size=side).astype(bool)
    mask = ndimage.binary_fill_holes(mask)
    mask &= brain
    if return_info:
        return mask, {"centre": centre.tolist(), "eigenvalues": lam.tolist(), "factor": f}
    return mask


def noise_fill(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | int | None) -> np.ndarray:
    """Masked voxels replaced by N(0, 1) noise (paper eq. 17)."""
    g = _rng(rng)
    img = np.asarray(image, dtype=np.float32)
    noise = g.standard_normal(img.shape, dtype=np.float32)
    return np.where(np.asarray(mask, dtype=bool), noise, img)
