"""Out-of-head background statistic: artifacts that live outside the brain.

IterMask3D scores only inside the expected-brain mask, so phase-encode ghosts, wrap-around
(aliasing), motion ringing and spike stripes are seen by the engine only where they overlap
the brain. This module measures them where they are most visible: in the air around the
head. The idea follows MRIQC's QI1, the "fraction of artifactual background voxels"
(Mortamet et al., MRM 2009); the definition below is this project's own.

Definition (:func:`background_stats`, all sizes in mm through the voxel zooms)
-------------------------------------------------------------------------------
1. **Padding.** Voxels lying in a constant 3x3x3 neighbourhood (exactly equal values:
   zero-filled, defaced or constant-padded regions) and non-finite voxels are *padding*;
   they count neither as clean background nor as artifact.
2. **Blocks.** The image is reduced to blocks of about ``block_mm`` (3 mm; an integer
   number of voxels per axis, at least 1): each block holds the mean of its non-padding
   voxels and is *valid* when at least half of its voxels are. Everything below works on
   blocks (speed, and the block mean is the smoothing that keeps isolated noise voxels
   from counting).
3. **Head mask.** Otsu threshold of the log block means (clipped to the 0.5-99.5th
   percentiles), opening (1 block), largest connected component, closing by
   ``close_mm`` (6 mm), hole filling; then dilated by ``margin_mm`` (8 mm) so partial
   volume and Gibbs ringing at the scalp are not counted.
4. **Background** = valid blocks outside the dilated head. The statistic is *unavailable*
   (``available=False`` with a ``reason``) when the image is too small, constant, more
   than 1 % non-finite, shows no head/air contrast, when the head fills the field of view
   (background < ``min_background_ml``), when more than ``max_padding_fraction`` (90 %) of
   the outside-head volume is padding, or when the background carries no measurable
   noise.
5. **Noise model.** ``noise_sigma``: Rayleigh sigma of the background from its lower
   quartile of raw (non-padding) voxel values, ``sigma = q25 / 0.7585`` (a magnitude
   image of pure noise is Rayleigh; the lower quartile is barely moved by artifacts,
   which only add signal). The block-mean noise distribution is located and scaled from
   its *lower* quantiles (``L = q25 + 0.6745 S``, ``S = (q25 - q05) / 0.9704``, Gaussian
   quantiles), so that up to about half of the background may be artifact; ``S`` is at
   least the value expected for uncorrelated Rayleigh noise, ``0.6551 sigma / sqrt(n)``
   for ``n`` voxels per block.
6. **Artifact blocks**: background blocks whose mean exceeds ``L + z S`` (``z = 5``) *and*
   ``L + min_excess x sigma`` (``min_excess = 0.5``), in connected clusters (26-
   neighbourhood) of at least ``min_cluster_ml`` (0.5 mL).

``background_artifact_fraction`` = artifact volume / background volume, in [0, 1] (0 on a
clean scan). Also reported: ``noise_sigma`` (image units), ``snr`` (median head-tissue
block mean / ``noise_sigma``), ``ghost_ratio`` (MRIQC-style ghost-to-signal ratio of the
N/2 ghost band: mean background in the head mask shifted by half the field of view along
the phase axis minus the mean of the rest of the background, divided by the median tissue
signal; along ``phase_axis`` when known, else the largest of the three axes, named in
``ghost_axis``), ``background_ml``, ``artifact_ml``, ``padding_fraction`` (share of the
outside-head volume that is padding) and the parameters used.

Known limits (measured in ``benchmarks/background_stat.py``): a uniform rise of the
background level (a single k-space spike, k-space noise) is not "structured" and does not
raise the fraction; artifacts that stay inside the dilated head (wrap-around folding onto
the head itself) are invisible here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

__all__ = ["BackgroundStats", "BackgroundParameterError", "background_stats", "DEFAULTS"]

LOGGER = logging.getLogger(__name__)

#: default parameters of :func:`background_stats` (also written into every result)
DEFAULTS = {
    "block_mm": 3.0,
    "margin_mm": 8.0,
    "close_mm": 6.0,
    "z": 5.0,
    "min_excess": 0.5,
    "min_cluster_ml": 0.5,
    "min_background_ml": 100.0,
    "max_padding_fraction": 0.9,
}

_MIN_SHAPE = 16          # voxels per axis
_MAX_NONFINITE = 0.01    # share of voxels
_MIN_CONTRAST = 3.0      # median head block / median background block
_RAYLEIGH_Q25 = math.sqrt(-2.0 * math.log(0.75))   # 0.7585: q25 of Rayleigh(1)
_RAYLEIGH_SD = math.sqrt((4.0 - math.pi) / 2.0)    # 0.6551: sd of Rayleigh(1)
_Z25, _Z05 = 0.6745, 1.6449                         # standard normal quantile magnitudes


class BackgroundParameterError(ValueError):
    """A parameter of :func:`background_stats` is out of range (a caller bug, not bad data)."""


@dataclass
class BackgroundStats:
    """Result of :func:`background_stats`.

    ``available`` is False (with a one-line ``reason``) when the statistic cannot be
    measured on this image; the numbers are then None (``padding_fraction`` and the others
    may still be filled when they were measured before the reason arose).
    """

    available: bool
    reason: Optional[str] = None
    background_artifact_fraction: Optional[float] = None
    noise_sigma: Optional[float] = None
    snr: Optional[float] = None
    ghost_ratio: Optional[float] = None
    ghost_axis: Optional[int] = None
    background_ml: Optional[float] = None
    artifact_ml: Optional[float] = None
    padding_fraction: Optional[float] = None
    parameters: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-safe dict (floats rounded, non-finite values as None)."""
        out = {}
        for k, v in asdict(self).items():
            if isinstance(v, (float, np.floating)):
                v = float(v)
                v = round(v, 6 if abs(v) < 1e3 else 3) if math.isfinite(v) else None
            elif isinstance(v, np.integer):
                v = int(v)
            out[k] = v
        return out


def _unavailable(reason: str, params: dict, **known) -> BackgroundStats:
    LOGGER.debug("background statistic unavailable: %s", reason)
    return BackgroundStats(available=False, reason=reason, parameters=dict(params), **known)


def _check_params(params: dict) -> dict:
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise BackgroundParameterError(f"unknown background_stats parameter(s): {', '.join(sorted(unknown))}; "
                                       f"expected some of {', '.join(DEFAULTS)}")
    out = dict(DEFAULTS)
    for k, v in params.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise BackgroundParameterError(f"{k} must be a number, got {v!r}") from None
        if not math.isfinite(f) or f < 0 or (f == 0 and k in ("block_mm", "z", "min_background_ml")):
            raise BackgroundParameterError(f"{k} must be a positive finite number, got {v!r}")
        if k == "max_padding_fraction" and f > 1:
            raise BackgroundParameterError(f"max_padding_fraction must be in [0, 1], got {v!r}")
        out[k] = f
    return out


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu threshold of a 1D sample (maximum between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _padding(arr: np.ndarray) -> np.ndarray:
    """Voxels in a constant 3x3x3 neighbourhood (exactly equal values), dilated back."""
    const = ndi.maximum_filter(arr, size=3, mode="nearest") == ndi.minimum_filter(arr, size=3, mode="nearest")
    if not const.any():
        return const
    return ndi.maximum_filter(const.view(np.uint8), size=3, mode="constant").astype(bool)


def _blocks(arr: np.ndarray, valid: np.ndarray, f: Sequence[int]):
    """Block means of the valid voxels and the valid-voxel count of each block."""
    shape = arr.shape
    nb = [-(-n // k) for n, k in zip(shape, f)]
    pad = [(0, b * k - n) for n, k, b in zip(shape, f, nb)]
    a = np.where(valid, arr, 0.0).astype(np.float64)
    v = valid.astype(np.float32)
    if any(p[1] for p in pad):
        a = np.pad(a, pad)
        v = np.pad(v, pad)
    rs = (nb[0], f[0], nb[1], f[1], nb[2], f[2])
    s = a.reshape(rs).sum(axis=(1, 3, 5))
    c = v.reshape(rs).sum(axis=(1, 3, 5))
    return s / np.maximum(c, 1.0), c


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _dilate_mm(mask: np.ndarray, mm: float, sampling) -> np.ndarray:
    if mm <= 0 or not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask, sampling=sampling) <= mm


def _erode_mm(mask: np.ndarray, mm: float, sampling) -> np.ndarray:
    if mm <= 0:
        return mask.copy()
    padded = np.pad(mask, 1, constant_values=True)  # the FOV edge does not erode
    return (ndi.distance_transform_edt(padded, sampling=sampling) > mm)[1:-1, 1:-1, 1:-1]


def background_stats(data, zooms, *, phase_axis: Optional[int] = None, **params) -> BackgroundStats:
    """Measure structured signal in the background (outside the head) of one scan.

    Parameters
    ----------
    data : array-like, 3D
        The native image (float; a trailing singleton 4th axis is accepted), ideally after
        reorientation to RAS (a pure axis permutation: the statistic does not depend on it
        except through ``phase_axis``).
    zooms : 3 floats
        Voxel sizes in mm (morphology radii and volumes are in mm).
    phase_axis : int, optional
        Phase-encode axis of ``data`` (from the NIfTI ``dim_info``); picks the axis of
        ``ghost_ratio``. None: the largest of the three axes' ratios is reported.
    **params
        Override :data:`DEFAULTS`: ``block_mm``, ``margin_mm``, ``close_mm``, ``z``,
        ``min_excess``, ``min_cluster_ml``, ``min_background_ml``,
        ``max_padding_fraction`` (see the module docstring).

    Returns
    -------
    BackgroundStats
        Never raises on odd data (tiny, constant, all-zero, NaN-filled, head-filling,
        zero-filled background): those give ``available=False`` and a ``reason``.

    Raises
    ------
    BackgroundParameterError
        An unknown or out-of-range parameter in ``params``.
    """
    p = _check_params(params)
    try:
        return _background_stats(data, zooms, phase_axis, p)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - odd data must not sink a scan
        LOGGER.warning("background statistic failed: %s: %s", type(exc).__name__, exc)
        return _unavailable(f"could not be computed ({type(exc).__name__}: {exc})", p)


def _background_stats(data, zooms, phase_axis, p) -> BackgroundStats:
    arr = np.asarray(data)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        return _unavailable(f"needs a 3D image, got shape {tuple(arr.shape)}", p)
    if min(arr.shape) < _MIN_SHAPE:
        return _unavailable(f"image too small ({'x'.join(map(str, arr.shape))} voxels; "
                            f"at least {_MIN_SHAPE} per axis needed)", p)
    try:
        z = np.asarray(zooms, dtype=float).ravel()[:3]
    except (TypeError, ValueError):
        z = np.array([])
    if z.size != 3 or not np.all(np.isfinite(z)) or np.any(z <= 0):
        return _unavailable(f"voxel sizes must be 3 positive numbers, got {zooms!r}", p)
    arr = arr.astype(np.float32, copy=True)
    finite = np.isfinite(arr)
    n_bad = arr.size - int(np.count_nonzero(finite))
    if n_bad > _MAX_NONFINITE * arr.size:
        return _unavailable(f"{n_bad / arr.size:.1%} of the voxels are NaN/inf", p)
    if n_bad:
        arr[~finite] = 0.0
    if not np.any(arr != arr.flat[0]):
        return _unavailable("image is constant" if arr.flat[0] != 0 else "image is all zero", p)

    # 1. padding: constant neighbourhoods and non-finite voxels
    pad = _padding(arr)
    if n_bad:
        pad |= ~finite
    valid = ~pad
    if valid.mean() < 0.05:
        return _unavailable(f"{1 - valid.mean():.0%} of the image is constant padding", p)

    # 2. blocks of about block_mm
    f = [max(1, int(round(p["block_mm"] / zz))) for zz in z]
    bz = z * np.array(f)
    bvol = float(np.prod(z))  # mm3 per voxel
    bmean, bcnt = _blocks(arr, valid, f)
    bvalid = bcnt >= 0.5 * np.prod(f)
    if np.count_nonzero(bvalid) < 64:
        return _unavailable("too few blocks with real (non-padding) signal", p)

    # 3. head mask: Otsu on log block means
    vals = bmean[bvalid]
    lo, hi = np.percentile(vals, [0.5, 99.5])
    if not hi > lo or hi <= 0:
        return _unavailable("no intensity range to separate head from air", p)
    floor = max(lo, hi * 1e-4, np.finfo(np.float32).tiny)
    logv = np.log(np.clip(vals, floor, hi))
    thr = float(np.exp(_otsu(logv)))
    head = (bmean > thr) & bvalid
    head = ndi.binary_opening(head, structure=np.ones((3, 3, 3), bool))
    if not head.any():
        return _unavailable("no head found (nothing above the Otsu threshold after opening)", p)
    head = _largest_component(head)
    closed = _erode_mm(_dilate_mm(head, p["close_mm"], bz), p["close_mm"], bz)
    head = ndi.binary_fill_holes(closed | head)
    outside = ~_dilate_mm(head, p["margin_mm"], bz)

    # padding share of the outside-head volume (voxel counts)
    n_block_vox = float(np.prod(f))
    out_vox = float(np.count_nonzero(outside)) * n_block_vox
    out_valid_vox = float(bcnt[outside].sum())
    padding_fraction = 1.0 - out_valid_vox / out_vox if out_vox > 0 else 0.0
    bg = outside & bvalid
    bg_ml = float(bcnt[bg].sum()) * bvol / 1e3
    known = {"padding_fraction": padding_fraction, "background_ml": bg_ml}
    if out_vox * bvol / 1e3 < p["min_background_ml"]:
        return _unavailable(f"the head fills the field of view ({out_vox * bvol / 1e3:.0f} mL outside the "
                            f"head + {p['margin_mm']:g} mm; {p['min_background_ml']:g} mL needed)", p, **known)
    if padding_fraction > p["max_padding_fraction"]:
        return _unavailable(f"{padding_fraction:.0%} of the background is constant padding (zero-filled or "
                            f"defaced); no noise to measure", p, **known)
    if bg_ml < p["min_background_ml"] or np.count_nonzero(bg) < 32:
        return _unavailable(f"too little non-padding background ({bg_ml:.0f} mL; "
                            f"{p['min_background_ml']:g} mL needed)", p, **known)
    tissue = head & bvalid & (bmean > thr)
    med_bg = float(np.median(bmean[bg]))
    med_tissue = float(np.median(bmean[tissue])) if tissue.any() else float("nan")
    if not (med_tissue > _MIN_CONTRAST * max(med_bg, 0.0)) or med_tissue <= 0:
        return _unavailable(f"no head/air contrast (median tissue {med_tissue:.3g} vs background {med_bg:.3g})",
                            p, **known)

    # 4. noise model from raw background voxels (lower quartile, Rayleigh)
    vox_bg = np.repeat(np.repeat(np.repeat(bg, f[0], 0), f[1], 1), f[2], 2)
    vox_bg = vox_bg[: arr.shape[0], : arr.shape[1], : arr.shape[2]] & valid
    raw = arr[vox_bg]
    if raw.size > 2_000_000:
        raw = raw[:: raw.size // 1_000_000]
    q25 = float(np.percentile(raw, 25))
    sigma = q25 / _RAYLEIGH_Q25
    if not sigma > 0:
        return _unavailable("the background carries no measurable noise (lower quartile is 0: noise "
                            "suppressed or masked by the scanner)", p, **known)

    # 5. block-mean noise distribution from its lower quantiles
    m = bmean[bg]
    b05, b25 = np.percentile(m, [5, 25])
    s_emp = (b25 - b05) / (_Z05 - _Z25)
    s_min = _RAYLEIGH_SD * sigma / math.sqrt(n_block_vox)
    scale = max(s_emp, s_min)
    loc = b25 + _Z25 * scale
    cut = max(loc + p["z"] * scale, loc + p["min_excess"] * sigma)
    art = bg & (bmean > cut)
    if art.any():
        lab, n = ndi.label(art, structure=np.ones((3, 3, 3), bool))
        vol = ndi.sum(bcnt, lab, index=np.arange(1, n + 1)) * bvol / 1e3
        keep = np.zeros(n + 1, bool)
        keep[1:] = vol >= p["min_cluster_ml"]
        art = keep[lab]
    art_ml = float(bcnt[art].sum()) * bvol / 1e3
    fraction = art_ml / bg_ml

    # 6. N/2 ghost-to-signal ratio
    ratios = {}
    for ax in range(3):
        band = np.roll(head, bmean.shape[ax] // 2, axis=ax) & bg
        rest = bg & ~band
        if np.count_nonzero(band) >= 8 and np.count_nonzero(rest) >= 8:
            ratios[ax] = (float(bmean[band].mean()) - float(bmean[rest].mean())) / med_tissue
    if phase_axis is not None and int(phase_axis) in ratios:
        g_ax = int(phase_axis)
    elif ratios:
        g_ax = max(ratios, key=ratios.get)
    else:
        g_ax = None
    return BackgroundStats(
        available=True,
        background_artifact_fraction=float(np.clip(fraction, 0.0, 1.0)),
        noise_sigma=sigma,
        snr=med_tissue / sigma,
        ghost_ratio=None if g_ax is None else ratios[g_ax],
        ghost_axis=g_ax,
        background_ml=bg_ml,
        artifact_ml=art_ml,
        padding_fraction=padding_fraction,
        parameters=dict(p),
    )
