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
(measured 2026-11-30, ``benchmarks/spectral_peak.py``). A periodic-line comb raises it as well (1.0-2.0);
ghosting, motion, ringing, wrap-around, blur, bias field and k-space noise do not (at
most 0.31 on the real copies). Also reported: ``peak_cycles_per_mm`` (the peak's
frequency along the RAS axes) and ``shape`` (the cropped array size).

Line comb (:func:`line_comb`)
-----------------------------
Phase-encode ghosting of the kind torchio's ``Ghosting`` simulates (and interleaved or
multi-shot acquisitions whose shots disagree) scales every ``p``-th k-space line along one
axis: the image gets ``p - 1`` ghosts at ``1/p`` of the field of view. The mean energy of
the k-space planes along that axis, ``E(j)`` (the sum of ``|FFT|^2`` over the plane at
index ``j``), then has a comb: one class of lines, ``j = c (mod p)``, lies above or below
its neighbours. A clean head's ``E(j)`` falls smoothly from the centre.

1. The *whole* native array (no crop, no window: both would smear the comb over
   neighbouring lines), non-finite voxels 0, mean removed; ``E(j)`` along each axis from
   one real FFT (:func:`line_energy_profiles`).
2. ``d(j) = log E(j) - (log E(j - 1) + log E(j + 1)) / 2`` for the lines from
   :data:`COMB_CENTRE` of the axis (and at least :data:`CENTRE_BINS` lines) out to
   Nyquist; the median of ``d`` is removed (the spectrum's curvature).
3. For every period ``p`` in :data:`COMB_PERIODS` (with at least :data:`COMB_MIN_LINES`
   lines per class) and every class ``c``, the *median* of ``d`` over that class: a comb moves every line
   of its class, a step in the spectrum (a sharp k-space cut from zero filling or partial
   Fourier) or a spike moves one or two lines, which a median ignores.
   ``line_comb`` is the largest absolute class median over the three axes (log units:
   0.7 means one class of lines carries about half or twice the energy of its
   neighbours).

A smooth spectrum gives only the noise of the class medians: 0.011-0.034 on 28 clean
copies of three real heads, 0.009-0.034 on 40 synthetic normal heads, 0.34-2.2 with
torchio's ghosting at intensity 0.5-1 (measured 2026-11-30, ``benchmarks/spectral_peak.py``).
Also reported: ``line_comb_axis`` (RAS axis) and ``line_comb_period``.

Limits: a scan reconstructed with a sharp k-space cut (zero filling followed by a
magnitude operation) has a step in its spectrum, which the half-lines do not mistake for
a spike (``tests/qc/test_spectrum.py``). Spikes in the central 5 % of k-space (at
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

__all__ = ["SpectralPeak", "spectral_peak", "spectral_peak_for_image", "line_energy_profiles", "line_comb",
           "MAX_SIDE", "LINE_REACH", "CENTRE_RADIUS", "CENTRE_BINS", "COMB_PERIODS", "COMB_CENTRE",
           "COMB_MIN_LINES", "COMB_MAX_SIDE"]

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
#: periods (in k-space lines) of the line comb looked for (torchio's ghosting: 2-10 ghosts)
COMB_PERIODS = tuple(range(2, 13))
#: lines near the k-space centre left out of the comb, as a fraction of the axis (ghosting
#: simulators restore the centre; the spectrum is steep there)
COMB_CENTRE = 0.03
#: fewest k-space lines per class of the comb (a median of fewer is moved by a step)
COMB_MIN_LINES = 5
#: largest array (voxels) whose full FFT is taken for the comb; larger arrays are cropped
#: centrally to this many voxels per axis first (the comb then blurs a little)
COMB_MAX_SIDE = 384
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
    line_comb: Optional[float] = None
    line_comb_axis: Optional[int] = None
    line_comb_period: Optional[int] = None

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        d = asdict(self)
        for k in ("spectral_peak", "line_comb"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 4)
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
    comb = line_comb(line_energy_profiles(arr))  # the whole array, before the crop and window
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
                        peak_cycles_per_mm=[round(f, 4) for f in freq], shape=list(contrast.shape),
                        line_comb=comb[0], line_comb_axis=comb[1], line_comb_period=comb[2])


def line_energy_profiles(data) -> list[np.ndarray]:
    """Energy of the k-space planes along each axis of a 3D array: for axis ``a``, ``E[j]`` is
    the sum of ``|FFT|^2`` over the plane at index ``j`` along ``a``, ``j = 0 .. n_a // 2``
    (the other half mirrors it for a real image). The whole array (central crop to
    :data:`COMB_MAX_SIDE` per axis beyond that), non-finite voxels 0, mean removed, no
    window; one real FFT (float32)."""
    arr = np.asarray(data)
    sl = tuple(slice((n - min(n, COMB_MAX_SIDE)) // 2, (n - min(n, COMB_MAX_SIDE)) // 2 + min(n, COMB_MAX_SIDE))
               for n in arr.shape)
    a = np.array(arr[sl], dtype=np.float32)
    a[~np.isfinite(a)] = 0.0
    a -= a.mean(dtype=np.float64)
    n2 = a.shape[2]
    spec = sfft.rfftn(a, workers=1)
    del a
    power = spec.real ** 2 + spec.imag ** 2
    del spec
    # the half spectrum holds planes k2 = 0 .. n2 // 2; the missing half is the mirror
    # (k0, k1, k2) -> (-k0, -k1, n2 - k2) of the interior planes
    interior = np.ones(power.shape[2], bool)
    interior[0] = False
    if n2 % 2 == 0:
        interior[-1] = False
    edge = power[:, :, ~interior]  # the k2 = 0 (and Nyquist) planes: a small copy
    out = []
    for ax in (0, 1):
        other = 1 - ax
        full = power.sum(axis=(other, 2), dtype=np.float64)
        inner = full - edge.sum(axis=(other, 2), dtype=np.float64)
        n = power.shape[ax]
        mirror = inner[(-np.arange(n)) % n]
        out.append((full + mirror)[: n // 2 + 1])
    out.append(power.sum(axis=(0, 1), dtype=np.float64))
    return out


def line_comb(profiles) -> tuple[float, int, int]:
    """The line comb of :func:`line_energy_profiles`: ``(value, axis, period)``, value the
    largest absolute median, over one class ``j = c (mod p)`` of k-space lines, of the
    log energy's excess over the mean of its two neighbours (module docstring). The
    classes of a multiple of the comb's period are subsets of its classes and read alike
    (plus noise), so the period reported is the smallest one that reaches 80 % of the
    value on that axis."""
    best = (0.0, 0, COMB_PERIODS[0])
    for ax, e in enumerate(profiles):
        e = np.asarray(e, dtype=np.float64)
        top = float(e.max()) if e.size else 0.0
        if not top > 0:
            continue
        log_e = np.log(e + 1e-12 * top)
        n_full = 2 * (len(e) - 1)  # the axis length (to within one line)
        j = np.arange(max(CENTRE_BINS, int(math.ceil(COMB_CENTRE * n_full))), len(e) - 1)
        d = log_e[j] - 0.5 * (log_e[j - 1] + log_e[j + 1])
        if d.size:
            d -= np.median(d)
        per_period = {}
        for p in COMB_PERIODS:
            if j.size < COMB_MIN_LINES * p:
                break
            per_period[p] = max(abs(float(np.median(d[j % p == c]))) for c in range(p))
        if per_period and max(per_period.values()) > best[0]:
            v = max(per_period.values())
            best = (v, ax, min(p for p, x in per_period.items() if x >= 0.8 * v))
    return best


def spectral_peak_for_image(img) -> SpectralPeak:
    """:func:`spectral_peak` of a nibabel image, reoriented to RAS first
    (``nibabel.as_closest_canonical``: an exact axis permutation). Never raises on odd
    images (anything unreadable gives ``available=False``)."""
    from ..io import canonical_data

    try:
        data, zooms = canonical_data(img)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        return _unavailable(f"image could not be read ({type(exc).__name__}: {exc})")
    return spectral_peak(data, zooms)
