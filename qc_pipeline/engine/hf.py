"""High-frequency image (IterMask3D paper, section 3.3).

The volume is Fourier transformed (3D DFT), the spectrum centred with
``fftshift``, the *amplitude* of every frequency inside a radius ``r`` of the
centre set to zero while the phase is kept everywhere, and the inverse DFT's
real part returned. Zeroing the amplitude while keeping the phase is the same
as multiplying the complex spectrum by a binary high-pass mask, which is how
it is computed here.

Radius and units
----------------
The paper uses ``r = 15`` frequency-index units on a 192-voxel, 1 mm grid, i.e. a
cut-off of ``15 / (192 * 1 mm) = 0.078 cycles/mm``. Frequency index ``k`` on an
axis of ``N`` voxels of size ``dx`` mm is ``k / (N * dx)`` cycles/mm, so the
same physical cut-off on another grid is ``r_i = 15 * (N_i * dx_i) / 192`` index
units on axis ``i``. On non-cubic grids the radii differ per axis: the zeroed
region is an ellipsoid in index units, i.e. a sphere in cycles/mm.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InvalidInputError

__all__ = ["high_frequency", "hf_radius", "REFERENCE_RADIUS", "REFERENCE_FOV_MM"]

#: paper value of r, in index units on the reference grid
REFERENCE_RADIUS = 15.0
#: field of view (mm) of the reference grid: 192 voxels of 1 mm
REFERENCE_FOV_MM = 192.0


def _triple(value, name: str) -> tuple[float, float, float]:
    if np.isscalar(value):
        out = (float(value),) * 3
    else:
        out = tuple(float(v) for v in value)
    if len(out) != 3 or not all(np.isfinite(v) and v > 0 for v in out):
        raise InvalidInputError(f"{name} must be three positive numbers, got {value!r}")
    return out  # type: ignore[return-value]


def hf_radius(
    shape: Sequence[int],
    voxel_size: Sequence[float] | float = (2.0, 2.0, 2.0),
    *,
    reference_radius: float = REFERENCE_RADIUS,
    reference_fov_mm: float = REFERENCE_FOV_MM,
) -> tuple[float, float, float]:
    """Per-axis radius (frequency-index units) of the zeroed low-frequency ellipsoid.

    Parameters
    ----------
    shape : sequence of 3 int
        Grid size in voxels.
    voxel_size : sequence of 3 float or float
        Voxel size in mm.
    reference_radius, reference_fov_mm : float
        The paper's radius (15) on its field of view (192 mm); the cut-off
        ``reference_radius / reference_fov_mm`` cycles/mm is kept on every grid.

    Returns
    -------
    tuple of 3 float
        ``r_i = reference_radius * shape_i * voxel_size_i / reference_fov_mm``.
        On the default 2 mm ``[80, 96, 80]`` grid: ``(12.5, 15.0, 12.5)``.
    """
    if len(tuple(shape)) != 3:
        raise InvalidInputError(f"shape must have 3 entries, got {tuple(shape)!r}")
    vs = _triple(voxel_size, "voxel_size")
    return tuple(reference_radius * int(n) * d / reference_fov_mm for n, d in zip(shape, vs))  # type: ignore[return-value]


def _lowpass_region(shape: Sequence[int], radius: Sequence[float]) -> np.ndarray:
    """Boolean mask (centred-spectrum layout) of the frequencies whose amplitude is removed."""
    grids = []
    for n, r in zip(shape, radius):
        k = np.arange(n) - n // 2  # fftshift puts frequency 0 at index n//2
        grids.append((k / r) ** 2)
    d2 = grids[0][:, None, None] + grids[1][None, :, None] + grids[2][None, None, :]
    # paper eq. 10: keep where distance > r, i.e. zero where distance <= r
    return d2 <= 1.0


def high_frequency(
    volume: np.ndarray,
    radius: float | Sequence[float] | None = None,
    *,
    voxel_size: Sequence[float] | float = (2.0, 2.0, 2.0),
) -> np.ndarray:
    """High-frequency image of a 3D volume (paper eq. 7-12).

    Parameters
    ----------
    volume : (X, Y, Z) array
        The (z-scored) image.
    radius : float or 3 floats, optional
        Radius of the removed low-frequency region in index units. A scalar is
        used on every axis (a sphere in index units, exactly the paper's
        filter); ``None`` (default) uses :func:`hf_radius` of the grid and
        voxel size (constant cut-off in cycles/mm).
    voxel_size : 3 floats or float
        Voxel size in mm, used only when ``radius`` is None.

    Returns
    -------
    (X, Y, Z) float32 array
        Real part of the inverse DFT of the high-passed spectrum.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise InvalidInputError(f"high_frequency expects a 3D volume, got shape {vol.shape}")
    if not np.all(np.isfinite(vol)):
        raise InvalidInputError("high_frequency: the volume contains NaN or Inf values")
    if radius is None:
        rad = hf_radius(vol.shape, voxel_size)
    else:
        rad = _triple(radius, "radius")
    spec = np.fft.fftshift(np.fft.fftn(vol.astype(np.float64)))
    spec[_lowpass_region(vol.shape, rad)] = 0.0  # amplitude 0, phase irrelevant there
    out = np.fft.ifftn(np.fft.ifftshift(spec))
    return np.real(out).astype(np.float32)
