"""Spectral peak: isolated spikes in the image's Fourier spectrum (k-space spikes).

A corrupted k-space sample (a "spike": an electrostatic discharge, a loose connector, a
gradient arcing) adds one plane wave to the whole image: herringbone stripes across head
and background. At the model's 2 mm grid the stripes are mostly gone (their period is
often 2-10 native voxels), and in the brain they look like noise, so the grid-based
measurements see them only weakly. In the spectrum of the *native* image they are what
they are: a point that stands far above its neighbourhood.

Definition (:func:`spectral_peak`)
----------------------------------
1. The native image, reoriented to RAS (:func:`spectral_peak_for_image`), non-finite
   voxels set to 0, centrally cropped to at most :data:`MAX_SIDE` voxels per axis (the
   frequencies stay the same, only the spectral resolution drops), mean removed, and
   apodised with a Hann window along each axis (so the field-of-view edges do not leak
   into lines along the k-space axes).
2. ``L = log |FFT|`` and its local level: the mean of ``L`` over the bins 2 to
   :data:`LINE_REACH` away on one side along one k-space axis, the largest of these six
   half-lines (k-space wraps around, so the lines do too). An isolated point (a spike:
   after the Hann window it spans +-1 bin) stands above all six; a step in the spectrum
   (a sharp k-space cut-off, at a face, an edge or a corner of the cut) has at least one
   half-line on its own side, and noise has no structure.
3. The peak contrast is the largest ``L - local level`` outside the centre (normalised
   radius below :data:`CENTRE_RADIUS` of Nyquist and at least :data:`CENTRE_BINS` bins,
   where the spectrum of any head falls steeply). Where the spectrum is noise-like,
   ``|FFT|`` is Rayleigh-distributed and the largest contrast among ``N`` bins is about
   ``log sqrt(2 ln N) - 0.058`` (the mean of ``log`` of a Rayleigh variable lies
   ``0.058`` above ``log sigma``); that expectation is subtracted (with
   :data:`_LINE_BIAS`, what the six-line maximum takes off on noise).

``spectral_peak`` is therefore the natural log of "how many times the strongest isolated
spectral point exceeds the largest one that noise alone would give": -0.08 to +0.25 on 28
clean copies of three real heads (voxel sizes 0.9-1.5 mm, oblique, 8 orientations) and
-0.05 to +0.20 on 40 synthetic normal heads; 1.65-3.24 with torchio's spike (one or two
spikes of 0.75-1.5 x the k-space maximum) on the same real and synthetic heads
(``docs/benchmarks.md``, fifth pass). A periodic-line comb raises it as well (1.0-2.0);
ghosting, motion, ringing, wrap-around, blur, bias field and k-space noise do not (at
most 0.31 on the real copies). Also reported: ``peak_cycles_per_mm`` (the peak's
frequency along the RAS axes) and ``shape`` (the cropped array size).

Limits: a scan reconstructed with a sharp k-space cut (zero filling followed by a
magnitude operation) has a step in its spectrum, which the half-lines do not mistake for
a spike (``tests/preproc/test_spectrum.py``). Spikes in the central 5 % of k-space (at
least 4 bins) are not looked for.

Pure NumPy/SciPy; no I/O beyond reading the nibabel image handed in.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

__all__ = ["SpectralPeak", "spectral_peak", "spectral_peak_for_image", "MAX_SIDE", "LINE_REACH",
           "CENTRE_RADIUS", "CENTRE_BINS"]

LOGGER = logging.getLogger(__name__)

#: largest array side used (voxels); larger images are cropped centrally
MAX_SIDE = 256
#: the local level of a bin is the mean log magnitude of the bins 2..LINE_REACH away from it
#: on one side along one k-space axis, the largest of these six half-lines
LINE_REACH = 5
#: centre of k-space left out, as a fraction of the Nyquist radius
CENTRE_RADIUS = 0.05
#: ... and at least this many bins (small arrays)
CENTRE_BINS = 4
_MIN_SIDE = 16
_MAX_NONFINITE = 0.01
#: mean of log R for a Rayleigh variable R, minus log sigma: (ln 2 - Euler gamma) / 2
_LOG_RAYLEIGH_MEAN = 0.5 * (math.log(2.0) - 0.5772156649)
#: what taking the largest of six half-line levels does to the peak contrast of pure
#: Rayleigh noise (mean over noise volumes of 32-192 voxels per side: -0.18 to -0.08, no
#: trend with size)
_LINE_BIAS = -0.13


@dataclass
class SpectralPeak:
    """Result of :func:`spectral_peak` (``available`` False with a ``reason`` when it
    cannot be measured; the numbers are then None)."""

    available: bool
    reason: Optional[str] = None
    spectral_peak: Optional[float] = None
    peak_cycles_per_mm: Optional[list] = None
    shape: Optional[list] = None

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        d = asdict(self)
        if d["spectral_peak"] is not None:
            d["spectral_peak"] = round(float(d["spectral_peak"]), 4)
        return d


def _unavailable(reason: str) -> SpectralPeak:
    LOGGER.debug("spectral peak unavailable: %s", reason)
    return SpectralPeak(available=False, reason=reason)


def spectral_peak(data, zooms: Sequence[float]) -> SpectralPeak:
    """The spectral-peak measurement of a 3D array with voxel sizes ``zooms`` (mm).

    Never raises on odd data: a non-3D, too small, constant or mostly non-finite array
    gives ``available=False`` with the reason.
    """
    arr = np.asarray(data)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        return _unavailable(f"needs a 3D image, got shape {tuple(arr.shape)}")
    if min(arr.shape) < _MIN_SIDE:
        return _unavailable(f"image too small ({'x'.join(map(str, arr.shape))} voxels; "
                            f"at least {_MIN_SIDE} per axis needed)")
    try:
        z = np.asarray(zooms, dtype=float).ravel()[:3]
    except (TypeError, ValueError):
        z = np.array([])
    if z.size != 3 or not np.all(np.isfinite(z)) or np.any(z <= 0):
        return _unavailable(f"voxel sizes must be 3 positive numbers, got {zooms!r}")
    # central crop (a view), then one float32 copy
    sl = tuple(slice((n - min(n, MAX_SIDE)) // 2, (n - min(n, MAX_SIDE)) // 2 + min(n, MAX_SIDE))
               for n in arr.shape)
    a = np.array(arr[sl], dtype=np.float32)
    finite = np.isfinite(a)
    if a.size - np.count_nonzero(finite) > _MAX_NONFINITE * a.size:
        return _unavailable(f"{1 - finite.mean():.1%} of the voxels are NaN/inf")
    a[~finite] = 0.0
    if not np.any(a != a.flat[0]):
        return _unavailable("image is constant" if a.flat[0] != 0 else "image is all zero")
    a -= a.mean(dtype=np.float64)
    for ax, n in enumerate(a.shape):
        shape = [1, 1, 1]
        shape[ax] = n
        a *= np.hanning(n).astype(np.float32).reshape(shape)
    mag = np.abs(sfft.fftn(a, workers=1))
    del a
    mag = sfft.fftshift(mag)
    top = float(mag.max())
    if not top > 0:
        return _unavailable("the windowed image has no signal")
    logm = np.log(mag + np.float32(1e-7 * top))
    del mag
    level = np.full(logm.shape, -np.inf, dtype=np.float32)
    size = LINE_REACH - 1  # bins 2..LINE_REACH on one side
    for ax in range(3):
        # uniform_filter1d of an even size averages bins j-size/2 .. j+size/2-1
        u = ndi.uniform_filter1d(logm, size, axis=ax, mode="wrap")
        np.maximum(level, np.roll(u, -(2 + size // 2), axis=ax), out=level)  # bins i+2 .. i+LINE_REACH
        np.maximum(level, np.roll(u, size // 2 + 1, axis=ax), out=level)     # bins i-LINE_REACH .. i-2
        del u
    contrast = logm - level
    del logm
    r2 = np.zeros(contrast.shape, dtype=np.float32)
    for ax, n in enumerate(contrast.shape):
        shape = [1, 1, 1]
        shape[ax] = n
        r2 += (((np.arange(n) - n // 2) / (n / 2.0)) ** 2).astype(np.float32).reshape(shape)
    centre = r2 < max(CENTRE_RADIUS, CENTRE_BINS / (min(contrast.shape) / 2.0)) ** 2
    contrast[centre] = -np.inf
    n_bins = contrast.size - int(np.count_nonzero(centre))
    idx = np.unravel_index(int(np.argmax(contrast)), contrast.shape)
    expected = math.log(math.sqrt(2.0 * math.log(n_bins))) - _LOG_RAYLEIGH_MEAN + _LINE_BIAS
    freq = [float((i - n // 2) / (n * zz)) for i, n, zz in zip(idx, contrast.shape, z)]
    return SpectralPeak(available=True, spectral_peak=float(contrast[idx]) - expected,
                        peak_cycles_per_mm=[round(f, 4) for f in freq], shape=list(contrast.shape))


def spectral_peak_for_image(img) -> SpectralPeak:
    """:func:`spectral_peak` of a nibabel image, reoriented to RAS first
    (``nibabel.as_closest_canonical``: an exact axis permutation). Never raises on odd
    images (anything unreadable gives ``available=False``)."""
    from .io import canonical_data

    try:
        data, zooms = canonical_data(img)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        return _unavailable(f"image could not be read ({type(exc).__name__}: {exc})")
    return spectral_peak(data, zooms)
