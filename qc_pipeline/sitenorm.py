"""The engine's anomaly mask against the site's own scans (group level).

The network leaves the same error on the same anatomy in every scan of a site: ventricles,
sulcal CSF and deep grey matter that it reconstructs poorly on a scanner or in people it was
not trained on (``docs/engine.md``). Those voxels pass the model's normative threshold in
clean scans too, so the participant level's mask is never empty on a real brain. The site's
own scans tell what is usual: each scan's error map is brought into MNI space with the
template fit of its preprocessing (``template_fit`` in the qc.json), the voxel-wise median
over the site's scans is the site's normal error (grey-dilated by one voxel to absorb the
residual misalignment of an affine fit), and a voxel of a scan's anomaly mask (its
candidate mask, from before the model's spread rule, when the participant level wrote one:
the site's spread takes the place of the model's) stays an anomaly only where its error exceeds ``factor`` times that normal error and that normal
error plus ``spread_k`` times the site's voxel-wise robust SD (where the site's people differ
most, one person's anatomy is not an anomaly). A local artifact is not at the same place in
most of a site's scans, so the median and the MAD ignore it.

A site is rarely one population: several scanners or protocols, or a few people scanned many
times, make clusters of scans whose error differs from cluster to cluster, and against the
whole site a minority cluster's ordinary error reads as an anomaly in every one of its scans.
So each scan's reference is made of the ``neighbours`` scans of its site whose error maps are
most like its own (correlation of the log error on 4 mm blocks, :func:`nearest_maps`; the scan
itself never counts), which in a clustered site are its own cluster's, and in a site of one
population are as good as the whole site.

The same comparison runs at the participant level against the *model's* normal error
(:func:`normal_error_mask`): a template-space map that travels in the model folder
(``normal_error.nii.gz``, the card's ``normal_error`` section), the median error of the
model over normal heads of many people (synthetic and real, none of the held-out heads of
``docs/benchmarks.md``). It removes what the network gets wrong on every brain; the site's
reference then removes what it gets wrong on that site's scanner and people.

Pure functions on arrays (:func:`to_template`, :func:`from_template`, :func:`error_to_template`,
:func:`site_reference`, :func:`site_anomaly_mask`, :func:`normal_error_mask`) and one driver
over a site's files (:func:`site_normative`), which the group level calls per suffix, model and site.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtri

from .errors import QCPipelineError
from .io import atomic_write_nifti
from .preproc import mni_brain_mask

__all__ = [
    "DEFAULT_SITE_NORM_FACTOR",
    "DEFAULT_SITE_SPREAD_K",
    "DEFAULT_SITE_NEIGHBOURS",
    "MAX_REFERENCE_SCANS",
    "SiteNormError",
    "ScanMaps",
    "SiteAnomaly",
    "to_template",
    "from_template",
    "error_to_template",
    "site_reference",
    "site_reference_and_spread",
    "site_anomaly_mask",
    "site_normative",
    "nearest_maps",
    "similarity_vector",
    "normal_error_mask",
    "normal_error_masks",
    "template_grid",
]

LOGGER = logging.getLogger(__name__)

#: a voxel stays anomalous where its error exceeds this multiple of the site's normal error
#: there (chosen on the development heads of docs/benchmarks.md, checked on held-out heads)
DEFAULT_SITE_NORM_FACTOR = 3.0
#: at most this many scans (evenly spread over the site, by name) make the site's reference
MAX_REFERENCE_SCANS = 100
#: grey dilation of the reference, in 2 mm template voxels (3 = one voxel each way)
REFERENCE_DILATION = 3
#: a voxel stays anomalous only where its error also exceeds the site's normal error by this
#: many of the site's voxel-wise robust SDs (normal-consistent MAD over the site's scans): in
#: a site of different people the error of one person's anatomy (a wide sulcus, large
#: ventricles) lies above the site's median where people differ most. Chosen on the pooled
#: development heads, checked on the held-out pool (docs/benchmarks.md)
DEFAULT_SITE_SPREAD_K = 5.0
#: each scan is compared with this many of its site's scans, those whose error maps are most
#: like its own (None: the whole site). A site is rarely one population: scanners, protocols
#: or a few people scanned many times make clusters, and against the whole site a minority
#: cluster's ordinary error reads as an anomaly; its nearest scans are its own cluster's. Twice
#: the fewest scans a site reference needs (the group level's ``min_site_size``, 8)
DEFAULT_SITE_NEIGHBOURS = 16
#: error maps are compared on blocks of this many template voxels per axis (2 mm -> 4 mm)
SIMILARITY_BLOCK = 2
#: log(error + this) before comparing maps: relative differences count, near-zero noise does not
SIMILARITY_OFFSET = 0.05


class SiteNormError(QCPipelineError, ValueError):
    """A scan's maps or template fit cannot be used for the site reference."""


def template_grid() -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine (voxel -> MNI mm) of the template grid the normative maps live on
    (the 2 mm MNI152 brain mask of :func:`qc_pipeline.preproc.mni_brain_mask`)."""
    mask, affine = mni_brain_mask()
    return tuple(int(n) for n in mask.shape), np.asarray(affine, dtype=float)


def _check_affine(a, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-6:
        raise SiteNormError(f"{what} must be a finite, invertible 4x4 affine, got {a.tolist()!r}")
    return a


def to_template(volume: np.ndarray, affine: np.ndarray, template_to_world: np.ndarray, *,
                order: int = 1) -> np.ndarray:
    """Resample a scan-space volume onto the 2 mm MNI grid (NaN outside the scan).

    Parameters
    ----------
    volume : (X, Y, Z) array
        Values on the scan's voxel grid ``affine`` (voxel -> scanner mm).
    template_to_world : (4, 4) array
        MNI world -> scanner world (the preprocessing's ``template_fit["affine"]``).
    """
    shape, t_aff = template_grid()
    m = np.linalg.inv(_check_affine(affine, "scan affine")) @ _check_affine(
        template_to_world, "template_fit affine") @ t_aff
    return ndi.affine_transform(np.asarray(volume, dtype=np.float32), m[:3, :3], m[:3, 3],
                                output_shape=shape, order=order, mode="constant", cval=np.nan,
                                prefilter=False)


def from_template(volume_t: np.ndarray, affine: np.ndarray, shape: Sequence[int],
                  template_to_world: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_template`: a template-grid volume on the scan's grid (linear)."""
    _, t_aff = template_grid()
    m = np.linalg.inv(t_aff) @ np.linalg.inv(_check_affine(template_to_world, "template_fit affine")) \
        @ _check_affine(affine, "scan affine")
    return ndi.affine_transform(np.asarray(volume_t, dtype=np.float32), m[:3, :3], m[:3, 3],
                                output_shape=tuple(int(n) for n in shape), order=1, mode="nearest",
                                prefilter=False)


def _median_and_mad(maps_t: Sequence[np.ndarray], *, with_mad: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Voxel-wise median (and normal-consistent MAD) over the maps that cover each voxel
    (NaN = outside a scan's brain); 0 where none does. ``np.nanmedian``'s values, from one
    sort per slab (NaN sorts last), over slabs of the template so that memory stays at one
    float16 stack."""
    if len(maps_t) == 0:
        raise SiteNormError("site_reference needs at least one error map")
    stack = np.stack([np.asarray(m, dtype=np.float16) for m in maps_t])
    ref = np.zeros(stack.shape[1:], dtype=np.float32)
    mad = np.zeros(stack.shape[1:], dtype=np.float32) if with_mad else None
    for i in range(0, stack.shape[1], 8):
        slab = stack[:, i:i + 8].astype(np.float32)
        count = np.isfinite(slab).sum(axis=0)
        if not count.any():
            continue
        med = _sorted_median(np.sort(slab, axis=0), count)
        ref[i:i + 8] = med
        if with_mad:
            dev = np.sort(np.abs(slab - med), axis=0)  # NaN stays NaN and sorts last
            mad[i:i + 8] = _sorted_median(dev, count) / ndtri(0.75)
    return ref, mad


def _sorted_median(sorted_slab: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Median along axis 0 of values sorted with their NaN last, ``count`` finite per voxel;
    0 where ``count`` is 0."""
    lo = np.maximum(count - 1, 0) // 2
    hi = count // 2
    a = np.take_along_axis(sorted_slab, lo[None], axis=0)[0]
    b = np.take_along_axis(sorted_slab, np.minimum(hi, sorted_slab.shape[0] - 1)[None], axis=0)[0]
    return np.where(count > 0, (a + b) / 2, 0.0).astype(np.float32)


def site_reference(maps_t: Sequence[np.ndarray], *, dilation: int = REFERENCE_DILATION) -> np.ndarray:
    """The site's normal error per template voxel: the median over the scans that cover the
    voxel (NaN = outside a scan's brain), 0 where none does, grey-dilated by ``dilation``."""
    ref, _ = _median_and_mad(maps_t, with_mad=False)
    if dilation and dilation > 1:
        ref = ndi.grey_dilation(ref, size=(dilation,) * 3)
    return ref


def site_reference_and_spread(maps_t: Sequence[np.ndarray], *,
                              dilation: int = REFERENCE_DILATION) -> tuple[np.ndarray, np.ndarray]:
    """:func:`site_reference` and the site's voxel-wise spread (normal-consistent MAD over the
    same scans, ``scipy.stats.median_abs_deviation(..., scale="normal")`` per voxel), both
    grey-dilated by ``dilation``."""
    ref, mad = _median_and_mad(maps_t, with_mad=True)
    if dilation and dilation > 1:
        ref = ndi.grey_dilation(ref, size=(dilation,) * 3)
        mad = ndi.grey_dilation(mad, size=(dilation,) * 3)
    return ref, mad


def site_anomaly_mask(error: np.ndarray, mask: np.ndarray, reference: np.ndarray,
                      factor: float = DEFAULT_SITE_NORM_FACTOR, *, spread: np.ndarray | None = None,
                      spread_k: float = DEFAULT_SITE_SPREAD_K) -> np.ndarray:
    """Voxels of the engine's ``mask`` whose error exceeds ``factor`` x the site's normal error
    and, with ``spread`` (the site's voxel-wise robust SD), the normal error + ``spread_k`` x
    the spread."""
    if not (math.isfinite(factor) and factor > 0):
        raise SiteNormError(f"factor must be a positive number, got {factor!r}")
    error, mask, reference = np.asarray(error), np.asarray(mask, dtype=bool), np.asarray(reference)
    if not (error.shape == mask.shape == reference.shape):
        raise SiteNormError(f"shapes differ: error {error.shape}, mask {mask.shape}, reference {reference.shape}")
    out = mask & (error > factor * reference)
    if spread is not None:
        if not (math.isfinite(spread_k) and spread_k >= 0):
            raise SiteNormError(f"spread_k must be a number >= 0, got {spread_k!r}")
        spread = np.asarray(spread)
        if spread.shape != error.shape:
            raise SiteNormError(f"shapes differ: error {error.shape}, spread {spread.shape}")
        out &= error > reference + spread_k * spread
    return out


def normal_error_mask(error: np.ndarray, mask: np.ndarray, normal_error_t: np.ndarray, *,
                      grid_affine: np.ndarray, template_to_world: np.ndarray,
                      factor: float, spread_t: np.ndarray | None = None,
                      spread_k: float = DEFAULT_SITE_SPREAD_K) -> np.ndarray:
    """Voxels of an engine ``mask`` (on the model grid) whose error exceeds ``factor`` x the
    normal error there and, with ``spread_t`` (the normal heads' voxel-wise robust SD), the
    normal error + ``spread_k`` x that spread. The maps are on :func:`template_grid`, brought
    to the grid through the scan's template fit (``grid_affine``: grid voxel -> scanner mm;
    ``template_to_world``: MNI mm -> scanner mm)."""
    return normal_error_masks(error, mask, normal_error_t, grid_affine=grid_affine,
                              template_to_world=template_to_world, factor=factor,
                              spread_t=spread_t, spread_k=spread_k)[1]


def normal_error_masks(error: np.ndarray, mask: np.ndarray, normal_error_t: np.ndarray, *,
                       grid_affine: np.ndarray, template_to_world: np.ndarray, factor: float,
                       spread_t: np.ndarray | None = None,
                       spread_k: float = DEFAULT_SITE_SPREAD_K) -> tuple[np.ndarray, np.ndarray]:
    """:func:`normal_error_mask` and, first, the mask against the median map alone (the same
    when there is no ``spread_t``); each map is brought to the grid once."""
    shape, _ = template_grid()
    for what, vol in (("normal-error map", normal_error_t), ("normal-error spread map", spread_t)):
        if vol is not None and tuple(np.shape(vol)) != shape:
            raise SiteNormError(f"{what} has shape {tuple(np.shape(vol))}; expected the template grid {shape}")
    ref = from_template(normal_error_t, grid_affine, np.shape(error), template_to_world)
    before = site_anomaly_mask(error, mask, ref, factor)
    if spread_t is None:
        return before, before
    spread = from_template(spread_t, grid_affine, np.shape(error), template_to_world)
    return before, site_anomaly_mask(error, before, ref, factor, spread=spread, spread_k=spread_k)


@dataclass(frozen=True)
class ScanMaps:
    """One scan's participant-level outputs, as the site reference needs them."""

    key: str
    error_map: Path
    mask: Path
    out_mask: Path
    template_to_world: np.ndarray
    anomaly_voxels: float
    anomaly_fraction: float


@dataclass(frozen=True)
class SiteAnomaly:
    """A scan's anomaly against its site: grid voxels and share of the brain (as the
    participant level counts them), the mask file written, the reference's size and, when it
    was made of the scan's nearest scans, their keys (empty: the whole site; the group level
    scores the scan's measurements against the same scans)."""

    voxels: int
    fraction: float
    mask_file: Path
    n_reference: int
    reference: tuple[str, ...] = ()


def error_to_template(error: np.ndarray, affine: np.ndarray, template_to_world: np.ndarray) -> np.ndarray:
    """One scan's error map on the template grid, as :func:`site_reference` takes it: NaN
    where the scan has no brain (the error map is 0 there, which means "not covered", not
    "no error")."""
    err = np.where(np.asarray(error, dtype=np.float32) > 0, error, np.float32(-1.0))
    t = to_template(err, affine, template_to_world)
    t[~(t >= 0)] = np.nan
    return t


def _error_in_template(s: ScanMaps) -> np.ndarray:
    img = nib.load(str(s.error_map))
    return error_to_template(np.asarray(img.dataobj, dtype=np.float32), img.affine, s.template_to_world)


def _write_if_changed(mask: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write the mask unless the file already holds it: a group level run again over the same
    scans leaves the file, and the figures drawn from it, as they are."""
    try:
        old = nib.load(str(path))
        if np.array_equal(np.asarray(old.dataobj) > 0, mask) and np.allclose(old.affine, affine):
            return
    except Exception:  # noqa: BLE001 - absent or unreadable: (re)write it
        pass
    atomic_write_nifti(nib.Nifti1Image(mask.astype(np.uint8), affine), path)


def similarity_vector(map_t: np.ndarray, block: int = SIMILARITY_BLOCK) -> np.ndarray:
    """A template-grid error map as the vector its similarity to others is taken on: the mean
    of each ``block``^3 block (NaN where the scan covers none of it), log(x + offset)."""
    a = np.asarray(map_t, dtype=np.float32)
    n = [d // block * block for d in a.shape]
    a = a[:n[0], :n[1], :n[2]].reshape(n[0] // block, block, n[1] // block, block, n[2] // block, block)
    with warnings.catch_warnings():  # blocks outside the brain: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.log(np.nanmean(a, axis=(1, 3, 5)) + SIMILARITY_OFFSET).ravel()


def nearest_maps(vectors: np.ndarray, targets: np.ndarray, k: int,
                 exclude: Sequence[int | None] | None = None) -> list[tuple[int, ...]]:
    """For each row of ``targets`` the indices of the ``k`` rows of ``vectors`` most like it.

    Likeness is the correlation over the blocks at least half of ``vectors`` cover, a
    missing block taken as that block's median over ``vectors``; ``exclude[i]`` (the target's
    own row of ``vectors``, or None) is never its own neighbour. Sorted indices, so that scans
    with the same neighbours share one reference.
    """
    v, t = np.array(vectors, dtype=np.float32), np.array(targets, dtype=np.float32)
    if v.ndim != 2 or t.ndim != 2 or v.shape[1] != t.shape[1]:
        raise SiteNormError(f"similarity vectors disagree: {v.shape} and {t.shape}")
    if not 1 <= k < v.shape[0]:
        raise SiteNormError(f"k must be in [1, {v.shape[0] - 1}] for {v.shape[0]} maps, got {k!r}")
    keep = np.isfinite(v).sum(axis=0) >= 0.5 * v.shape[0]
    if not keep.any():
        raise SiteNormError("the error maps share no covered region to compare")
    v, t = v[:, keep], t[:, keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fill = np.nanmedian(v, axis=0)
    fill = np.where(np.isfinite(fill), fill, 0.0)

    def standardise(x):
        x = np.where(np.isfinite(x), x, fill)
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sim = standardise(t) @ standardise(v).T
    out = []
    for i, row in enumerate(sim):
        if exclude is not None and exclude[i] is not None:
            row = row.copy()
            row[exclude[i]] = -np.inf
        out.append(tuple(sorted(int(j) for j in np.argsort(-row, kind="stable")[:k])))
    return out


def site_normative(scans: Sequence[ScanMaps], *, factor: float = DEFAULT_SITE_NORM_FACTOR,
                   min_scans: int = 8, max_reference: int = MAX_REFERENCE_SCANS,
                   targets: Collection[str] | None = None,
                   spread_k: float | None = DEFAULT_SITE_SPREAD_K,
                   neighbours: int | None = DEFAULT_SITE_NEIGHBOURS) -> dict[str, SiteAnomaly]:
    """Site reference from ``scans`` and each scan's mask against it (written to ``out_mask``).

    A mask voxel stays where the scan's error exceeds ``factor`` x the site's normal error
    and the normal error + ``spread_k`` x the site's voxel-wise robust SD
    (:func:`site_reference_and_spread`; ``spread_k=None``: the factor alone).

    ``neighbours``: each scan's reference is made of that many of the site's reference scans,
    those whose error maps are most like its own (:func:`nearest_maps`; never the scan
    itself); with no more reference scans than ``neighbours`` + 1, or ``None``, every scan is
    compared with the whole site. A local artifact lies elsewhere in each neighbour, so their
    median ignores it as the whole site's does.

    ``targets``: the keys of the scans to score (default: all of ``scans``); the others only
    make the reference (a pool lent to small sites). A scan whose files cannot be read or
    resampled is left out with one warning; with fewer than ``min_scans`` usable scans
    nothing is computed (an empty dict). Returns ``{key: SiteAnomaly}``.
    """
    if not (math.isfinite(factor) and factor > 0):
        raise SiteNormError(f"factor must be a positive number, got {factor!r}")
    if neighbours is not None and not (isinstance(neighbours, int) and neighbours >= 1):
        raise SiteNormError(f"neighbours must be a whole number >= 1 or None, got {neighbours!r}")
    scans = sorted(scans, key=lambda s: s.key)
    if len(scans) < min_scans:
        return {}
    step = max(1, math.ceil(len(scans) / max(int(max_reference), 1)))
    maps, ref_keys, usable = [], [], []
    for i, s in enumerate(scans):
        try:
            if i % step == 0:
                maps.append(_error_in_template(s))
                ref_keys.append(s.key)
            usable.append(s)
        except Exception as exc:  # noqa: BLE001 - one bad scan never stops the site
            LOGGER.warning("%s: left out of the site reference: %s", s.key, exc)
    if len(maps) < min_scans:
        LOGGER.warning("only %d usable error maps (< %d): no site reference", len(maps), min_scans)
        return {}
    chosen = [s for s in usable if targets is None or s.key in targets]
    k = len(maps) if neighbours is None else max(neighbours, min_scans)
    by_neighbours = len(maps) > k + 1
    if by_neighbours:
        vectors = np.stack([similarity_vector(m) for m in maps])
        own = {key: j for j, key in enumerate(ref_keys)}
        tv = []
        for s in chosen:
            j = own.get(s.key)
            tv.append(vectors[j] if j is not None else _target_vector(s, vectors.shape[1]))
        sets = nearest_maps(vectors, np.stack(tv), k, exclude=[own.get(s.key) for s in chosen]) if chosen else []
    else:
        sets = [tuple(range(len(maps)))] * len(chosen)
    out: dict[str, SiteAnomaly] = {}
    held: tuple[tuple[int, ...] | None, tuple] = (None, ())  # one reference in memory at a time
    for s, idx in sorted(zip(chosen, sets), key=lambda pair: pair[1]):
        try:
            if held[0] != idx:
                sel = [maps[j] for j in idx]
                held = (idx, (site_reference(sel), None) if spread_k is None else site_reference_and_spread(sel))
            ref_t, spread_t = held[1]
            e_img, m_img = nib.load(str(s.error_map)), nib.load(str(s.mask))
            err = np.asarray(e_img.dataobj, dtype=np.float32)
            mask = np.asarray(m_img.dataobj) > 0
            ref = from_template(ref_t, e_img.affine, err.shape, s.template_to_world)
            spread = None if spread_t is None else from_template(spread_t, e_img.affine, err.shape,
                                                                 s.template_to_world)
            site_mask = site_anomaly_mask(err, mask, ref, factor, spread=spread,
                                          spread_k=DEFAULT_SITE_SPREAD_K if spread_k is None else spread_k)
            _write_if_changed(site_mask, m_img.affine, s.out_mask)
        except Exception as exc:  # noqa: BLE001
            LOGGER.warning("%s: no site-normative mask: %s", s.key, exc)
            continue
        kept = float(site_mask.sum()) / float(mask.sum()) if mask.any() else 0.0
        out[s.key] = SiteAnomaly(voxels=int(round(kept * float(s.anomaly_voxels))),
                                 fraction=kept * float(s.anomaly_fraction),
                                 mask_file=s.out_mask, n_reference=len(idx),
                                 reference=tuple(ref_keys[j] for j in idx) if by_neighbours else ())
    return out


def _target_vector(s: ScanMaps, size: int) -> np.ndarray:
    """The similarity vector of a scan that is not among the reference maps (all NaN when its
    map cannot be read: it then gets the reference scans most like the site's median)."""
    try:
        return similarity_vector(_error_in_template(s))
    except Exception as exc:  # noqa: BLE001
        LOGGER.warning("%s: compared with the median scan of its site: %s", s.key, exc)
        return np.full(size, np.nan, dtype=np.float32)
