"""Out-of-head background statistic: artifacts that live outside the brain.

IterMask3D scores only inside the expected-brain mask, so phase-encode ghosts, wrap-around
(aliasing), motion ringing and spike stripes are seen by the engine only where they overlap
the brain. This module measures them where they are most visible: in the air around the
head. The idea follows MRIQC's QI1, the "fraction of artifactual background voxels"
(Mortamet et al., MRM 2009); the definition below is this project's own.

Definition (:func:`background_stats`, all sizes in mm through the voxel zooms)
-------------------------------------------------------------------------------
1. **Padding.** Voxels exactly equal to their 6 face neighbours, and those neighbours
   (zero-filled, defaced or constant-padded regions; noise never repeats exactly), and
   non-finite voxels are *padding*: they count neither as clean background nor as
   artifact.
2. **Blocks.** The image is reduced to blocks of about ``block_mm`` (3 mm; an integer
   number of voxels per axis, at least 1): each block holds the mean of its non-padding
   voxels and is *valid* when at least half of its voxels are. Everything below works on
   blocks (speed, and the block mean is the smoothing that keeps isolated noise voxels
   from counting).
3. **Head mask.** Otsu threshold of the log block means (clipped to the 0.5-99.5th
   percentiles), opening (3x3x3 blocks), largest connected component plus the opened
   pieces within two blocks of it that are as bright as tissue (median at least half the
   head's) and lie within 40 mm of it (90th percentile of their distance): jaw, neck and
   shoulders that the opening cut off at a thin bridge, often running out of the field of
   view, are body, not background (ghosts stay darker, spike stripes cross the field of
   view); closing by ``close_mm`` (6 mm), hole filling (3D, then 2D in the slices along
   each axis, so a face cavity cut open by the field of view is closed). Otsu misses dim scalp and neck
   tissue (T2w skin and fat beyond a dark skull), so the blocks within 20 mm of that head
   that stand above the noise level of a first background estimate by more than
   ``head_excess`` (0.5) noise sigmas and 2 ``z`` block-noise scales (see 5.) are added
   (the connected pieces that reach the head's margin; no opening, which would erase a
   thin scalp), and the union is closed and filled again. The head is then dilated by
   ``margin_mm`` (8 mm) so partial volume and Gibbs ringing at the scalp are not counted.
4. **Background** = valid blocks outside the dilated head. The statistic is *unavailable*
   (``available=False`` with a one-line ``reason``) when the image is not 3D, smaller
   than 16 voxels along an axis, constant or all zero, more than 1 % NaN/inf (fewer
   non-finite voxels are treated as padding), when it shows no head/air contrast (median
   tissue block < 1.5 x median background block), when the head fills the field of view
   (less than ``min_background_ml``, 100 mL, outside the dilated head), when more than
   ``max_padding_fraction`` (90 %) of the outside-head volume is padding, or when the
   background carries no measurable noise (lower quartile 0).
5. **Noise model.** ``noise_sigma``: Rayleigh sigma of the background from the lower
   quartile of its raw (non-padding) voxel values, ``sigma = q25 / 0.7585`` (pure noise
   in a magnitude image is Rayleigh; artifacts only add signal, so the lower quartile is
   barely moved by them). The noise distribution of the block means is located and
   scaled from its *lower* quantiles, ``S = (q25 - q05) / 0.9704`` and
   ``L = q25 + 0.6745 S`` (Gaussian quantiles), so up to about half of the background may
   be artifact; ``S`` is at least ``0.6551 sigma / sqrt(n)``, the value for uncorrelated
   Rayleigh noise averaged over ``n`` voxels per block.
6. **Noise floor.** The noise level of a real background is not flat: coil sensitivity,
   the parallel-imaging g-factor and intensity normalisation (prescan normalise, bias
   correction) make it vary smoothly across the field of view, by 20 % and more on a real
   head (ROBEX's). A plane (``trend_order`` 1; 0: none) in the block coordinates is
   fitted to the lower half of the background block means (least squares weighted by the
   voxel counts; artifacts only add signal), refitted twice to the blocks up to 2 robust
   SDs above the last fit, and subtracted; what follows works on these residuals. A
   quadratic (``trend_order`` 2) is not the default: it also fits wrap-around and
   ghosts, which raise both ends of the field of view along the phase-encode axis (a
   synthetic wrap-around's fraction fell from 0.27 to 0.01 with it).
7. **Artifact blocks**: the background block residuals are smoothed with a 3x3x3-block box
   over background blocks only (weighted by their voxel counts; head signal never leaks
   in), and the noise distribution of 5. is taken from these smoothed values (``n`` = the
   voxels averaged per smoothed block). A background block is artifact when its smoothed
   mean (faint, broad ghosts) or its own mean (thin structures such as spike stripes,
   which the box averages away; ``L`` and ``S`` then from the unsmoothed blocks) exceeds
   both ``L + z S`` (``z = 3.5``) and ``L + min_excess x sigma`` (``min_excess = 0.3``);
   artifact blocks are kept when their connected cluster (26-neighbourhood) is at least
   ``min_cluster_ml`` (0.25 mL).

``background_artifact_fraction`` = artifact volume / background volume, in [0, 1] (0 or
nearly 0 on the clean synthetic heads). Also reported: ``noise_sigma`` (image units),
``snr`` (median head-tissue block mean / ``noise_sigma``), ``ghost_ratio`` and ``ghost_axis``
(for each array axis, the mean background in the head's "shadow" along that axis --
background blocks whose line along the axis crosses the head, where phase-encode ghosts,
motion ringing and wrap-around land -- minus the mean of the other background blocks,
divided by the median tissue signal, in the manner of MRIQC's ghost-to-signal ratio; the
largest of the three and its axis: 0/1/2 = left-right/posterior-anterior/inferior-superior
for a RAS-reoriented array as :func:`background_stats_for_image` gives),
``background_ml``, ``artifact_ml``, ``padding_fraction`` (share of the outside-head volume
that is padding) and the parameters used.

``fov_contact`` and ``fov_contact_axis``: for each array axis, the share of the valid blocks
of each of the two end faces of the field of view that belong to the head (step 3's mask,
before the margin), the smaller of the two ends, and the largest of the three axes with its
axis. Wrap-around needs an object longer than the field of view along the phase-encode
axis, so the head runs off one end and its folded part touches the other: both ends of
that axis show head. When the header names the phase-encoding axis (NIfTI ``dim_info``),
only that axis counts: the readout is oversampled on every scanner, and a 3D slab's
partition axis is often planned tight to the head (its ends then graze the ears) without
folding. Without it, the slice axis of a 2D stack (an axis of at least 3 mm and twice the
other two's voxel size) does not count: slices are excited one at a time, not
phase-encoded, and a clinical stack runs from the skull base to the vertex with head in
both end slices (two real clinical scans of the benchmarks had contact 0.18-0.24 there).
A head cut off at one end only (the neck below the field of view, a nose cut by a tight
field of view) keeps the smaller end at 0. The array is taken as RAS
(axis 2 inferior -> superior, as :func:`background_stats_for_image` gives it): the
left/right and anterior/posterior faces count only the 100 mm below the top of the head,
since the neck, shoulders and chest below it span the field of view in any scan that
reaches them. The fold can land on tissue
(a vertex folded onto the neck) where the background statistic cannot see it; this
measure sees the field of view itself. It is taken whenever a head is found, also when
the background statistic is unavailable because the head fills the field of view.

Measured separation and limits: ``benchmarks/background_stat.py`` and ``docs/outputs.md``.
A uniform rise of the background (a weak single k-space spike, k-space noise) is not
"structured" and barely counts (k-space noise shows in ``noise_sigma``/``snr``); motion
ringing is faint outside the 8 mm margin and gives small fractions; artifacts that stay
inside the dilated head (a ghost overlapping the head) are invisible here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.stats import median_abs_deviation

from ..errors import QCPipelineError
from ..preproc import fill_holes, largest_component

__all__ = ["BackgroundStats", "BackgroundParameterError", "background_stats", "background_stats_for_image",
           "fov_contact", "lower_side_location_scale",
           "DEFAULTS"]

LOGGER = logging.getLogger(__name__)

#: default parameters of :func:`background_stats` (also written into every result)
DEFAULTS = {
    "block_mm": 3.0,
    "margin_mm": 8.0,
    "close_mm": 6.0,
    "head_excess": 0.5,
    "z": 3.5,
    "min_excess": 0.3,
    "min_cluster_ml": 0.25,
    "min_background_ml": 100.0,
    "max_padding_fraction": 0.9,
    "trend_order": 1,
}

_MIN_SHAPE = 16          # voxels per axis
_MAX_NONFINITE = 0.01    # share of voxels
_MIN_CONTRAST = 1.5      # median head block / median background block
_MIN_HEAD_ML = 50.0      # smallest head component accepted
_HEAD_REACH_MM = 20.0    # how far beyond the Otsu head dim tissue is looked for
_BODY_LEVEL = 0.5        # a piece next to the head this bright (x the head's median) is body
_BODY_REACH_MM = 40.0    # ... when 90 % of it lies this close to the head (spike stripes cross the FOV)
_SKULL_SPAN_MM = 150.0   # vertex to below the nose: the head, above the chin, neck and shoulders
_SLICE_MIN_MM = 3.0      # an axis this coarse and ...
_SLICE_RATIO = 2.0       # ... this many times the other two's voxel size is a 2D acquisition's slice axis
_RAYLEIGH_Q25 = math.sqrt(-2.0 * math.log(0.75))   # 0.7585: q25 of Rayleigh(1)
_RAYLEIGH_SD = math.sqrt((4.0 - math.pi) / 2.0)    # 0.6551: sd of Rayleigh(1)
_Z25, _Z05 = 0.6745, 1.6449                         # standard normal quantile magnitudes
_TREND_ITER = 3          # fits of the noise-floor trend
_TREND_CUT = 2.0         # ... each without the blocks this many robust SDs above the last


class BackgroundParameterError(QCPipelineError, ValueError):
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
    fov_contact: Optional[float] = None
    fov_contact_axis: Optional[int] = None
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
        if k == "trend_order":
            if f not in (0, 1, 2):
                raise BackgroundParameterError(f"trend_order must be 0, 1 or 2, got {v!r}")
            f = int(f)
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
    """Padding voxels: equal to all 6 face neighbours (exactly), plus those neighbours.

    Noise never repeats exactly over 7 voxels; zero-filled, defaced or constant-padded
    regions do. Shifts and comparisons only (fast on 256^3).
    """
    const = np.ones(arr.shape, bool)
    for ax in range(3):
        n = arr.shape[ax]
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, n - 1), slice(1, n)
        eq = arr[tuple(lo)] == arr[tuple(hi)]
        const[tuple(lo)] &= eq  # equal to the next voxel
        const[tuple(hi)] &= eq  # equal to the previous voxel
    if not const.any():
        return const
    out = const.copy()
    for ax in range(3):
        n = arr.shape[ax]
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, n - 1), slice(1, n)
        out[tuple(lo)] |= const[tuple(hi)]
        out[tuple(hi)] |= const[tuple(lo)]
    return out


def _blocks(arr: np.ndarray, valid: np.ndarray, f: Sequence[int]):
    """Block means of the valid voxels and the valid-voxel count of each block."""
    shape = arr.shape
    nb = [-(-n // k) for n, k in zip(shape, f)]
    full = tuple(b * k for b, k in zip(nb, f))
    a = np.zeros(full, np.float32)
    v = np.zeros(full, np.float32)
    core = tuple(slice(0, n) for n in shape)
    np.multiply(arr, valid, out=a[core])
    v[core] = valid

    def reduce(x):  # float32 over the first two axes (few terms), float64 for the last
        if f[2] > 1:
            x = x.reshape(full[0], full[1], nb[2], f[2]).sum(axis=3)
        if f[1] > 1:
            x = x.reshape(full[0], nb[1], f[1], nb[2]).sum(axis=2)
        return x.reshape(nb[0], f[0], nb[1], nb[2]).sum(axis=1, dtype=np.float64)

    s = reduce(a)
    if valid.all() and full == tuple(shape):
        c = np.full(s.shape, float(np.prod(f)))
    else:
        c = reduce(v)
    return s / np.maximum(c, 1.0), c


def _noise_floor_trend(bmean: np.ndarray, bg: np.ndarray, weight: np.ndarray, order: int) -> np.ndarray:
    """The background's smooth noise floor on the block grid (0 outside ``bg``).

    A polynomial of ``order`` (1: linear, 2: quadratic with cross terms) in the block
    coordinates, fitted by least squares weighted by their voxel counts to the lower half
    of the background block means (artifacts only add signal, and cover less than half of
    the background), then again to the blocks up to :data:`_TREND_CUT` robust SDs above
    the last fit, :data:`_TREND_ITER` fits in all.
    ``order`` 0 gives the median.
    """
    idx = np.nonzero(bg)
    y = bmean[idx].astype(np.float64)
    out = np.zeros(bmean.shape, np.float64)
    x = [i / max(n - 1, 1) * 2.0 - 1.0 for i, n in zip(idx, bg.shape)]
    cols = [np.ones_like(y)]
    if order >= 1:
        cols += x
    if order >= 2:
        cols += [x[0] ** 2, x[1] ** 2, x[2] ** 2, x[0] * x[1], x[0] * x[2], x[1] * x[2]]
    a = np.stack(cols, axis=1)
    w = np.sqrt(weight[idx].astype(np.float64))
    keep = y <= np.median(y)  # artifacts only add signal: start from the lower half
    fit = np.full(y.size, float(np.median(y)))
    for _ in range(_TREND_ITER if order > 0 else 0):
        if np.count_nonzero(keep) < 3 * a.shape[1]:
            break
        coef = np.linalg.lstsq(a[keep] * w[keep, None], y[keep] * w[keep], rcond=None)[0]
        fit = a @ coef
        r = y - fit
        rk = r[keep]
        s = float(median_abs_deviation(rk, scale="normal"))
        if not s > 0:
            break
        keep = r < _TREND_CUT * s
    out[idx] = fit
    return out


def fov_contact(head: np.ndarray, valid: np.ndarray, top_blocks: Optional[int] = None,
                axes: Optional[Sequence[int]] = None) -> tuple[float, Optional[int]]:
    """``(contact, axis)``: per axis (of ``axes``, default all three), the smaller of the
    shares of the two end faces' valid blocks that are ``head``; the largest over the axes
    and its axis (``(0.0, None)`` when the head touches no axis at both ends).

    With ``top_blocks`` (axis 2 runs inferior -> superior), the faces of axes 0 and 1 count
    only the ``top_blocks`` slices below the head's top: below the skull the neck, shoulders
    and chest span the field of view in a correctly planned scan.
    """
    if top_blocks is not None:
        rows = np.flatnonzero(head.any(axis=(0, 1)))
        lo = (int(rows[-1]) - int(top_blocks) + 1) if rows.size else head.shape[2]
        part = np.zeros(head.shape[2], bool)
        part[max(lo, 0):] = True
    best, best_ax = 0.0, None
    for ax in (range(head.ndim) if axes is None else axes):
        ends = []
        last = head.shape[ax] - 1
        for layers in ((0, 1), (last, last - 1)):  # the outer block layer; the next one when the
            for idx in layers:                     # outer holds only a partial (invalid) block row
                h, v = np.take(head, idx, axis=ax), np.take(valid, idx, axis=ax)
                if top_blocks is not None and ax < 2:
                    v = v & part[None, :]
                n = int(np.count_nonzero(v))
                if n:
                    break
            ends.append(float(np.count_nonzero(h & v)) / n if n else 0.0)
        if min(ends) > best:
            best, best_ax = min(ends), ax
    return best, best_ax


def _multislice_axis(zooms: Sequence[float]) -> Optional[int]:
    """The slice axis of a 2D (multi-slice) acquisition, read off its voxel sizes: the axis at
    least ``_SLICE_MIN_MM`` thick and ``_SLICE_RATIO`` times the other two (clinical stacks of
    3-7 mm slices over 0.4-1 mm pixels); None for a 3D-like grid."""
    z = [float(v) for v in zooms[:3]]
    ax = int(np.argmax(z))
    others = [v for i, v in enumerate(z) if i != ax]
    if z[ax] >= _SLICE_MIN_MM and z[ax] >= _SLICE_RATIO * max(others):
        return ax
    return None


def _contact_axes(zooms, phase_axis: Optional[int]) -> Optional[tuple[int, ...]]:
    """The axes ``fov_contact`` looks at: the phase-encoding axis when the header names it;
    otherwise every axis but a 2D acquisition's slice axis. Slices are excited one at a time,
    not phase-encoded, so nothing folds along them, and a clinical stack is planned from the
    skull base to the vertex with the head at both ends."""
    if phase_axis is not None:
        return (int(phase_axis),)
    ax = _multislice_axis(zooms)
    return None if ax is None else tuple(i for i in range(3) if i != ax)


def _dilate_mm(mask: np.ndarray, mm: float, sampling) -> np.ndarray:
    if mm <= 0 or not mask.any():
        return mask.copy()
    return ndi.distance_transform_edt(~mask, sampling=sampling) <= mm


def _erode_mm(mask: np.ndarray, mm: float, sampling) -> np.ndarray:
    if mm <= 0:
        return mask.copy()
    padded = np.pad(mask, 1, constant_values=True)  # the FOV edge does not erode
    return (ndi.distance_transform_edt(padded, sampling=sampling) > mm)[1:-1, 1:-1, 1:-1]


def _head_mask(cand: np.ndarray, bz, close_mm: float, bmean: Optional[np.ndarray] = None) -> np.ndarray:
    """Opening (3x3x3), largest component + the body parts the opening cut off from it,
    closing by ``close_mm``, hole filling."""
    opened = ndi.binary_opening(cand, structure=np.ones((3, 3, 3), bool))
    if not opened.any():
        return opened
    head = largest_component(opened)
    if bmean is not None:
        # jaw, neck and shoulders joined to the head by thin bridges (cut by the opening)
        # are tissue, not background: opened pieces next to the head as bright as its
        # tissue (median >= _BODY_LEVEL of the head's) that stay near it. Ghosts are darker
        # (<= 0.4 of the head's median on the validation scans); spike stripes that survive
        # the opening run across the field of view, beyond _BODY_REACH_MM.
        lab, n = ndi.label(opened & ~head, structure=np.ones((3, 3, 3), bool))
        if n:
            dist = ndi.distance_transform_edt(~head, sampling=bz)
            level = _BODY_LEVEL * float(np.median(bmean[head]))
            for i in np.unique(lab[(dist <= 2 * max(bz)) & (lab > 0)]):
                piece = lab == i
                bright = float(np.median(bmean[piece])) >= level
                if bright and float(np.percentile(dist[piece], 90)) <= _BODY_REACH_MM:
                    head |= piece
    closed = _erode_mm(_dilate_mm(head, close_mm, bz), close_mm, bz)
    return fill_holes(closed | head)


def _rayleigh_sigma(arr, valid, bg_blocks, f) -> float:
    """Rayleigh sigma from the lower quartile of the raw non-padding voxels of ``bg_blocks``."""
    vox = np.repeat(np.repeat(np.repeat(bg_blocks, f[0], 0), f[1], 1), f[2], 2)
    vox = vox[: arr.shape[0], : arr.shape[1], : arr.shape[2]] & valid
    raw = arr[vox]
    if raw.size == 0:
        return 0.0
    if raw.size > 2_000_000:
        raw = raw[:: raw.size // 1_000_000]
    return float(np.percentile(raw, 25)) / _RAYLEIGH_Q25


def lower_side_location_scale(values, floor: float = 0.0) -> tuple[float, float]:
    """Location and scale of the clean part of ``values`` when artifacts only push values
    up: from the lower quantiles, ``scale = max((q25 - q05) / (z05 - z25), floor)`` and
    ``location = q25 + z25 * scale`` (Gaussian quantiles), so up to about three quarters of
    the values may be raised without moving either. Also the site score's estimator
    (:func:`qc_pipeline.qc.score.relative_scores`)."""
    q05, q25 = np.percentile(values, [5, 25])
    scale = max(float(q25 - q05) / (_Z05 - _Z25), float(floor))
    return float(q25 + _Z25 * scale), scale


def _block_noise(m: np.ndarray, sigma: float, n_block_vox: float) -> tuple[float, float]:
    """Location and scale of the noise block means from their lower quantiles."""
    return lower_side_location_scale(m, _RAYLEIGH_SD * sigma / math.sqrt(n_block_vox))


def background_stats(data, zooms, *, phase_axis: Optional[int] = None, **params) -> BackgroundStats:
    """Measure structured signal in the background (outside the head) of one scan.

    Parameters
    ----------
    data : array-like, 3D
        The native image (float; a trailing singleton 4th axis is accepted), ideally after
        reorientation to RAS (a pure axis permutation: the statistic does not depend on it).
    zooms : 3 floats
        Voxel sizes in mm (morphology radii and volumes are in mm).
    phase_axis : int, optional
        The array axis of the phase encoding, when the image says it (``fov_contact`` then
        looks at that axis only); None: every axis.
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
        return _background_stats(data, zooms, p, phase_axis=phase_axis)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - odd data must not sink a scan
        LOGGER.warning("background statistic failed: %s: %s", type(exc).__name__, exc)
        return _unavailable(f"could not be computed ({type(exc).__name__}: {exc})", p)


def _background_stats(data, zooms, p, debug: Optional[dict] = None, phase_axis: Optional[int] = None) -> BackgroundStats:
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
    n_block_vox = float(np.prod(f))
    if np.count_nonzero(bvalid) < 64:
        return _unavailable("too few blocks with real (non-padding) signal", p)

    # 3. head mask: Otsu on log block means, then extended down to the noise floor
    vals = bmean[bvalid]
    lo, hi = np.percentile(vals, [0.5, 99.5])
    if not hi > lo or hi <= 0:
        return _unavailable("no intensity range to separate head from air", p)
    floor = max(lo, hi * 1e-4, np.finfo(np.float32).tiny)
    logv = np.log(np.clip(vals, floor, hi))
    thr = float(np.exp(_otsu(logv)))
    head = _head_mask((bmean > thr) & bvalid, bz, p["close_mm"], bmean)
    if not head.any():
        return _unavailable("no head found (nothing above the Otsu threshold after opening)", p)
    head_ml = float(bcnt[head].sum()) * bvol / 1e3
    if head_ml < _MIN_HEAD_ML:
        return _unavailable(f"no head found (largest bright component {head_ml:.0f} mL < {_MIN_HEAD_ML:g} mL)", p)
    # Otsu misses dim scalp/neck tissue (e.g. T2w skin and fat beyond a dark skull): add
    # everything connected that stands head_excess x sigma above the first noise estimate
    # within _HEAD_REACH_MM of it and touching its margin
    near = _dilate_mm(head, p["margin_mm"], bz)
    bg1 = ~near & bvalid
    if np.count_nonzero(bg1) >= 32:
        sigma1 = _rayleigh_sigma(arr, valid, bg1, f)
        if sigma1 > 0:
            loc1, s1 = _block_noise(bmean[bg1], sigma1, n_block_vox)
            low_cut = loc1 + max(p["head_excess"] * sigma1, 2 * p["z"] * s1)
            low = (bmean > low_cut) & bvalid & _dilate_mm(head, _HEAD_REACH_MM, bz)
            lab, n = ndi.label(low, structure=np.ones((3, 3, 3), bool))
            if n:
                touch = np.zeros(n + 1, bool)
                touch[np.unique(lab[near & low])] = True
                touch[0] = False
                head = head | touch[lab]
                closed = _erode_mm(_dilate_mm(head, p["close_mm"], bz), p["close_mm"], bz)
                head = fill_holes(closed | head)
    outside = ~_dilate_mm(head, p["margin_mm"], bz)
    # bright tissue only: the head mask's dim extensions reach into noise near the faces
    contact, contact_ax = fov_contact(head & (bmean > thr), bvalid,
                                      top_blocks=int(math.ceil(_SKULL_SPAN_MM / bz[2])),
                                      axes=_contact_axes(z, phase_axis))

    # padding share of the outside-head volume (voxel counts)
    out_vox = float(np.count_nonzero(outside)) * n_block_vox
    out_valid_vox = float(bcnt[outside].sum())
    padding_fraction = 1.0 - out_valid_vox / out_vox if out_vox > 0 else 0.0
    bg = outside & bvalid
    bg_ml = float(bcnt[bg].sum()) * bvol / 1e3
    known = {"padding_fraction": padding_fraction, "background_ml": bg_ml, "fov_contact": contact,
             "fov_contact_axis": contact_ax}
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
    sigma = _rayleigh_sigma(arr, valid, bg, f)
    if not sigma > 0:
        return _unavailable("the background carries no measurable noise (lower quartile is 0: noise "
                            "suppressed or masked by the scanner)", p, **known)

    # 5. the background less its smooth noise floor (coil sensitivity, parallel-imaging
    #    g-factor and intensity normalisation make the floor vary across the field of view),
    #    then smoothed (3x3x3-block box over background blocks only) and its noise
    #    distribution from the lower quantiles
    trend = _noise_floor_trend(bmean, bg, bcnt, int(p["trend_order"]))
    vals = np.where(bg, bmean - trend + float(np.median(trend[bg])), bmean)
    w = np.where(bg, bcnt, 0.0)
    den = ndi.uniform_filter(w, size=3, mode="constant")
    num = ndi.uniform_filter(vals * w, size=3, mode="constant")
    smooth = np.where(bg, num / np.maximum(den, 1e-12), 0.0)
    n_eff = float(np.median(den[bg])) * 27.0  # voxels averaged per smoothed block
    loc, scale = _block_noise(smooth[bg], sigma, n_eff)
    cut = max(loc + p["z"] * scale, loc + p["min_excess"] * sigma)
    # the same test on the unsmoothed blocks keeps thin structures (spike stripes) that
    # the box averages away
    loc_b, scale_b = _block_noise(vals[bg], sigma, n_block_vox)
    cut_b = max(loc_b + p["z"] * scale_b, loc_b + p["min_excess"] * sigma)
    art = bg & ((smooth > cut) | (vals > cut_b))
    if art.any():
        lab, n = ndi.label(art, structure=np.ones((3, 3, 3), bool))
        vol = ndi.sum(bcnt, lab, index=np.arange(1, n + 1)) * bvol / 1e3
        keep = np.zeros(n + 1, bool)
        keep[1:] = vol >= p["min_cluster_ml"]
        art = keep[lab]
    if debug is not None:  # internals for diagnostics (block grid)
        debug.update(bmean=bmean, smooth=smooth, head=head, bg=bg, art=art, cut=cut, loc=loc, scale=scale, f=f,
                     trend=trend)
    art_ml = float(bcnt[art].sum()) * bvol / 1e3
    fraction = art_ml / bg_ml

    # 6. ghost band: background in the head's shadow along an axis vs the rest
    ratios = {}
    for ax in range(3):
        band = np.broadcast_to(head.any(axis=ax, keepdims=True), head.shape) & bg
        rest = bg & ~band
        if np.count_nonzero(band) >= 8 and np.count_nonzero(rest) >= 8:
            ratios[ax] = (float(bmean[band].mean()) - float(bmean[rest].mean())) / med_tissue
    g_ax = max(ratios, key=ratios.get) if ratios else None
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
        fov_contact=contact,
        fov_contact_axis=contact_ax,
        parameters=dict(p),
    )


def background_stats_for_image(img, **params) -> BackgroundStats:
    """:func:`background_stats` of a nibabel image, reoriented to RAS first.

    The reorientation is ``nibabel.as_closest_canonical`` (an exact axis permutation, no
    interpolation, also for oblique scans); the zooms come from the header, and so does the
    phase-encoding axis (the NIfTI ``dim_info`` field, which dcm2niix fills), carried to
    its RAS axis for ``fov_contact``. Never raises on odd images (a 4D image with one volume
    is squeezed; anything unreadable gives ``available=False``);
    :class:`BackgroundParameterError` for bad ``params``.
    """
    from ..io import canonical_data

    p = _check_params(params)
    try:
        data, zooms = canonical_data(img)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        return _unavailable(f"image could not be read ({type(exc).__name__}: {exc})", p)
    return background_stats(data, zooms, phase_axis=_ras_phase_axis(img), **params)


def _ras_phase_axis(img) -> Optional[int]:
    """The RAS axis of the image's phase encoding from its NIfTI ``dim_info`` (None when the
    header does not say)."""
    try:
        phase = img.header.get_dim_info()[1]
        if phase is None:
            return None
        return int(nib.io_orientation(img.affine)[int(phase), 0])
    except Exception:  # noqa: BLE001 - a header without dim_info (MINC, Analyze) says nothing
        return None
