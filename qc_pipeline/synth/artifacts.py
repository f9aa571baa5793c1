"""Acquisition-artifact simulators: a random parameter draw and a deterministic apply.

Every artifact registered in :data:`ARTIFACTS` has two steps, as TorchIO separates a
random transform's ``get_params()`` from the deterministic transform that takes them:

* the **draw** step ``draw(img, severity, rng, **options) -> params`` makes every random
  choice from ``rng`` (a :class:`numpy.random.Generator` or an int seed) and returns a
  JSON-serialisable dict (plain numbers, lists and strings) of everything the apply step
  needs: ``severity`` and the derived quantities (box corners in world mm, k-space
  positions, ghost count, motion rotations, translations and times, bias coefficients,
  the phase / readout / slice axis chosen, the background fill value, ...);
* the **apply** step ``apply(img, params) -> img`` uses no randomness: the same ``img``
  and ``params`` give the same voxels whatever the state of any random generator.

:func:`draw_artifact_params` and :func:`replay_artifact` run the two steps by artifact
name; :func:`apply_artifact` is ``replay_artifact(img, name, draw_artifact_params(...))``.
The draw step consumes ``rng`` exactly as much as the whole simulation does, so a caller
that reuses one generator for several scans gets the same scans either way.

``img`` is a nibabel image in its native (stored, acquisition) space, ``severity`` in
[0, 1] scales the effect monotonically (0 = no change, except where documented), and at a
fixed rng state a larger severity gives a larger effect. The result is a new float32 image
on the same grid (``wrap_around`` returns a smaller field of view) whose
``extra["artifact"]`` is the params dict the apply step took, so
``replay_artifact(clean, name, out.extra["artifact"])`` reproduces ``out``. Quantities
the draw step derives from the image (head position, background level, axes) are stored
in the params rather than recomputed, so a replay does not depend on how they are
estimated.

Two artifacts need more than numbers: ``kspace_noise`` stores the state of the numpy bit
generator at the draw (``noise_state``) and the apply step regenerates the noise fields
from it (a noise array does not fit in a params dict); ``different_sequence``
regenerates the subject, so its apply step takes ``meta=`` (the dict returned by
:func:`qc_pipeline.synth.make_subject`) besides the params.

Axes: the phase-encode / readout / slice axes are read from the NIfTI ``dim_info`` field
(set by :func:`qc_pipeline.synth.make_subject`); when it is empty the phase axis is the
second stored axis. "Superior" is +z of the image's world (RAS) space.

See ``docs/synth.md`` for every parameter and how severity enters.
"""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from .errors import SynthError, UnknownArtifactError

LOGGER = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers
def _as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise SynthError(f"rng must be a numpy Generator or an int seed; got {type(rng).__name__}")


def _check_3d(img):
    if len(img.shape) != 3:
        raise SynthError(f"artifact simulators need a 3D image; got shape {tuple(img.shape)}")


def _data(img) -> np.ndarray:
    _check_3d(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return np.nan_to_num(data, copy=False)


def _like(img, data, params, affine=None) -> nib.Nifti1Image:
    """A float32 image on ``img``'s grid (or ``affine``) carrying ``params`` in its extra."""
    hdr = img.header.copy() if isinstance(img.header, nib.Nifti1Header) else nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    out = nib.Nifti1Image(np.asarray(data, np.float32), img.affine if affine is None else affine,
                          hdr, extra={"artifact": copy.deepcopy(dict(params))})
    out.header.set_slope_inter(None, None)
    if affine is not None:
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
    return out


def _axes(img):
    """(freq, phase, slice) stored axes from dim_info, with fallbacks."""
    try:
        freq, phase, slc = img.header.get_dim_info()
    except Exception:  # non-NIfTI header
        freq = phase = slc = None
    phase = 1 if phase is None else int(phase)
    if slc is None or slc == phase:
        slc = 2 if phase != 2 else 0
    if freq is None or freq in (phase, slc):
        freq = ({0, 1, 2} - {phase, slc}).pop()
    return int(freq), int(phase), int(slc)


def _world_axes(shape, affine):
    """Open grids of world x, y, z (mm) for every voxel (broadcast-friendly)."""
    idx = [np.arange(n, dtype=np.float32).reshape([-1 if b == a else 1 for b in range(3)])
           for a, n in enumerate(shape)]
    return [affine[r, 0] * idx[0] + affine[r, 1] * idx[1] + affine[r, 2] * idx[2] + affine[r, 3]
            for r in range(3)]


def _plain(obj):
    """``obj`` with numpy arrays and scalars (at any depth of dicts and lists) as Python ones."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _rng_from_state(state) -> np.random.Generator:
    """A Generator whose bit generator is set to ``state`` (``bit_generator.state`` as a dict)."""
    name = state.get("bit_generator") if isinstance(state, Mapping) else None
    cls = getattr(np.random, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, np.random.BitGenerator)):
        raise SynthError(f"noise_state must be a numpy bit generator state (a dict with "
                         f"'bit_generator', e.g. 'PCG64'); got {state!r:.80}")
    bitgen = cls(0)  # seeded only to construct it: the state below replaces the seed's
    try:
        bitgen.state = dict(state)
    except (TypeError, ValueError, KeyError) as exc:
        raise SynthError(f"noise_state is not a valid {name} state: {exc}") from None
    return np.random.Generator(bitgen)


def _vector(params, key, ndim=1, length=3) -> np.ndarray:
    """``params[key]`` as float64 (as the simulators computed it), checked to hold ``length``
    numbers (per row when ``ndim`` is 2)."""
    arr = np.asarray(params[key], dtype=np.float64)
    if arr.ndim != ndim or arr.shape[-1] != length:
        want = f"{length} numbers" if ndim == 1 else f"rows of {length} numbers"
        raise SynthError(f"params[{key!r}] must hold {want}; got {params[key]!r}")
    return arr


def _axis(params, key) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in (0, 1, 2):
        raise SynthError(f"params[{key!r}] must be a stored axis 0, 1 or 2; got {value!r}")
    return int(value)


@dataclass
class HeadInfo:
    foreground: np.ndarray  # bool, head (signal) voxels, subsampled by `step`
    background: float       # typical background (air) value
    ref: float              # bright-tissue reference level (p99 of the head)
    top: float              # world z (mm) of the top of the head
    centre: np.ndarray      # estimated brain centre, world mm
    extent: np.ndarray      # head extent along each stored axis (voxels)
    bbox: tuple             # (lo, hi) stored-index bounds of the head
    step: int = 1           # subsampling of `foreground`


def head_info(img, data=None) -> HeadInfo:
    """Rough head/brain localisation that works on any head scan.

    Foreground = voxels above 15 % of the 99th percentile, cleaned and reduced
    to the largest component. The brain centre is estimated 80 mm below the
    top of the head (world +z), laterally at the centroid of the head between
    100 and 30 mm below the top.
    """
    if data is None:
        data = _data(img)
    step = 2 if min(data.shape) >= 64 else 1  # work on a subsampled copy (speed)
    sub = data[::step, ::step, ::step]
    p99 = float(np.percentile(sub, 99.5))
    fg = sub > 0.15 * p99
    fg = ndi.binary_opening(fg, iterations=1)
    lab, n = ndi.label(fg)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        fg = lab == int(np.argmax(sizes))
    fg = ndi.binary_fill_holes(fg)
    bg_vals = sub[~ndi.binary_dilation(fg, iterations=2)]
    background = float(np.median(bg_vals)) if bg_vals.size else 0.0
    ref = float(np.percentile(sub[fg], 99)) if fg.any() else p99
    ijk = np.array(np.nonzero(fg), dtype=np.float32) * step
    if ijk.shape[1] == 0:
        raise SynthError("no head signal found in the image")
    xyz = img.affine[:3, :3] @ ijk + img.affine[:3, 3:]
    top = float(np.percentile(xyz[2], 99.7))
    band = (xyz[2] < top - 30) & (xyz[2] > top - 100)
    sel = xyz[:, band] if band.any() else xyz
    centre = np.array([sel[0].mean(), sel[1].mean(), top - 80.0])
    lo, hi = ijk.min(1).astype(int), ijk.max(1).astype(int) + step
    return HeadInfo(fg, background, ref, top, centre, (hi - lo).astype(float),
                    (lo, np.minimum(hi, np.array(data.shape))), step)


def _torchio_apply(img, data, transform, move_axis=None):
    """Run a deterministic torchio transform (no torch RNG involved)."""
    import torch
    import torchio as tio

    aff = img.affine.copy()
    arr = data
    if move_axis is not None and move_axis != 2:
        order = [a for a in range(3) if a != move_axis] + [move_axis]
        arr = np.transpose(data, order)
        aff = aff.copy()
        aff[:, :3] = img.affine[:, order]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tio_img = tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(arr))[None], affine=aff)
        out = transform(tio_img).data[0].numpy()
    if move_axis is not None and move_axis != 2:
        out = np.transpose(out, np.argsort(order))
    return np.abs(out).astype(np.float32)


def _check_severity(severity):
    try:
        s = float(severity)
    except (TypeError, ValueError):
        s = float("nan")
    if not (0.0 <= s <= 1.0) or not np.isfinite(s):
        raise SynthError(f"severity must be in [0, 1]; got {severity!r}")
    return s


# --------------------------------------------------------------------------- paper's six
_OTHER_CONTRAST = {"T1w": "T2w", "T2w": "T1w", "FLAIR": "T2w"}


def _check_meta(meta):
    if not meta or "seed" not in meta:
        raise SynthError("different_sequence needs meta= the dict returned by make_subject")
    return meta


def draw_different_sequence(img, severity, rng, *, meta=None, other=None):
    """A scan of another sequence labelled as this one (cohort-level).

    The apply step regenerates the subject of ``meta`` (from :func:`make_subject`) with
    the same seed, geometry and noise, but tissue intensities of ``other`` (default:
    T1w->T2w, T2w->T1w, FLAIR->T2w), blended with the own contrast's by weight
    ``severity`` (1 = pure other contrast, 0.5 ~ a PD-like mix). Nothing is random.

    Returns
    -------
    dict
        ``severity`` (the blend weight), ``other`` (the contrast blended in).
    """
    own = _check_meta(meta)["contrast"]
    return {"severity": severity, "other": other or _OTHER_CONTRAST[own]}


def apply_different_sequence(img, params, *, meta=None):
    """Regenerate ``meta``'s subject with ``params["other"]``'s tissue intensities.

    Needs ``meta=``, the dict :func:`make_subject` returned for ``img``: the subject is
    regenerated from its seed and geometry, which the params do not hold.
    """
    from .subject import SITES, make_subject

    meta = _check_meta(meta)
    site = meta.get("site")
    out, _ = make_subject(
        meta["seed"], meta["contrast"], site=site if site in SITES else None,
        work_mm=meta.get("work_mm", 1.5), voxel_size=meta["acquisition"]["voxel_size"],
        tissue_contrast=params["other"], contrast_mix=params["severity"], finalize=False,
        cortex_detail=meta.get("cortex_detail", {}).get("sulci", 0.0) > 0,
    )
    if out.shape != img.shape or not np.allclose(out.affine, img.affine, atol=1e-3):
        raise SynthError("different_sequence: meta does not describe this image (grid differs)")
    return _like(img, _data(out), params)


def _noise_pair(rng, shape):
    return (rng.standard_normal(shape, dtype=np.float32),
            rng.standard_normal(shape, dtype=np.float32))


def draw_kspace_noise(img, severity, rng, *, max_fraction=0.3):
    """Complex white Gaussian noise added to k-space, magnitude image back.

    Noise std = ``max_fraction * severity`` x the head's bright-tissue level.
    With the orthonormal FFT, white complex noise in k-space is white complex
    noise of the same std in image space, so it is drawn there directly
    (identical in distribution, no FFT needed); the magnitude makes it Rician.

    Returns
    -------
    dict
        ``severity``, ``sigma`` (noise std), ``noise_state`` (the state of ``rng``'s bit
        generator before the two noise fields, from which the apply step draws them).
    """
    data = _data(img)
    sigma = max_fraction * severity * head_info(img, data).ref
    state = _plain(rng.bit_generator.state)
    # The fields are too big for a params dict; the apply step regenerates them from
    # `state`. Drawing them here too leaves `rng` where the whole simulation leaves it.
    _noise_pair(rng, data.shape)
    return {"severity": severity, "sigma": float(sigma), "noise_state": state}


def apply_kspace_noise(img, params):
    """Add the noise fields regenerated from ``params["noise_state"]`` (std ``sigma``)."""
    data = _data(img)
    n1, n2 = _noise_pair(_rng_from_state(params["noise_state"]), data.shape)
    sigma = params["sigma"]
    out = np.sqrt((data + sigma * n1) ** 2 + (sigma * n2) ** 2)
    return _like(img, out, params)


def _box_mask(img, lo, hi):
    x, y, z = _world_axes(img.shape, img.affine)
    return (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])


def _box_params(severity, lo, hi, fill):
    return {"severity": severity, "box_world_lo": lo.tolist(), "box_world_hi": hi.tolist(),
            "fill": float(fill)}


def draw_chunk_middle(img, severity, rng, *, min_mm=20.0, max_mm=60.0, jitter_mm=10.0):
    """A box inside the brain set to the background value.

    Box edge = ``min_mm + (max_mm - min_mm) * severity`` mm (x 0.8-1.2 per
    axis), centred within ``jitter_mm`` of the estimated brain centre,
    axis-aligned in world space. Severity 0 removes nothing.

    Returns
    -------
    dict
        ``severity``, ``box_world_lo`` / ``box_world_hi`` (box corners, world mm),
        ``fill`` (the background value written into the box).
    """
    data = _data(img)
    info = head_info(img, data)
    edge = (min_mm + (max_mm - min_mm) * severity) * rng.uniform(0.8, 1.2, 3)
    centre = info.centre + rng.uniform(-1, 1, 3) * jitter_mm
    return _box_params(severity, centre - edge / 2, centre + edge / 2, info.background)


def draw_chunk_top(img, severity, rng, *, min_depth_mm=15.0, max_depth_mm=50.0):
    """A box at the top of the head (scalp, skull and upper brain) set to background.

    Depth below the top of the head = ``min_depth + (max_depth - min_depth) * s``
    mm (the brain starts ~12-18 mm below the top), width 60-140 mm (x) and
    70-160 mm (y) growing with severity, centred on the head. Severity 0
    removes nothing.

    Returns
    -------
    dict
        As :func:`draw_chunk_middle`; the box reaches 1 m above the top of the head.
    """
    data = _data(img)
    info = head_info(img, data)
    depth = min_depth_mm + (max_depth_mm - min_depth_mm) * severity
    wx, wy = 60 + 80 * severity, 70 + 90 * severity
    c = info.centre + np.r_[rng.uniform(-1, 1, 2) * 10.0, 0.0]
    lo = np.array([c[0] - wx / 2, c[1] - wy / 2, info.top - depth])
    hi = np.array([c[0] + wx / 2, c[1] + wy / 2, info.top + 1000.0])
    return _box_params(severity, lo, hi, info.background)


def apply_box(img, params):
    """Set the voxels whose centres lie in the world box to ``params["fill"]``.

    The apply step of ``chunk_middle`` and ``chunk_top``; severity 0 changes nothing.
    """
    data = _data(img)
    lo, hi = _vector(params, "box_world_lo"), _vector(params, "box_world_hi")
    box = _box_mask(img, lo, hi) if params["severity"] > 0 else np.zeros(data.shape, bool)
    out = data.copy()
    out[box] = params["fill"]
    return _like(img, out, params)


def draw_periodic_line(img, severity, rng, *, max_amplitude=0.6, n_spikes=(3, 5)):
    """Periodic stripes from a comb of k-space spikes.

    ``M`` spikes (``n_spikes`` range) at k = k0 + m * dk along one in-plane
    axis (k0 at 15-35 % of that axis's k-range, with a small component on the
    other in-plane axis; dk = 4-8 % of the k-range). Their sum is a train of
    thin bright/dark lines repeating every N/dk voxels across the whole field
    of view (a spike comb, unlike the single spikes of ``spike``). The peak
    stripe amplitude is ``max_amplitude * severity`` x the bright-tissue
    level. Computed exactly in image space: a k-space spike of amplitude A at
    k adds the plane wave A*exp(2 pi i k.x/N) to the (real) complex image,
    then the magnitude is taken.

    Returns
    -------
    dict
        ``severity``, ``axis`` (the comb's stored axis), ``k0`` (first spike, cycles per
        field of view on each stored axis), ``dk`` (spacing along ``axis``),
        ``n_spikes``, ``spike_amplitude`` (each spike's) and ``amplitude`` (the peak,
        ``n_spikes`` x ``spike_amplitude``).
    """
    data = _data(img)
    info = head_info(img, data)
    _, _, slc = _axes(img)
    inplane = [a for a in range(3) if a != slc]
    a = inplane[rng.integers(2)]
    b = [ax for ax in inplane if ax != a][0]
    m = int(rng.integers(n_spikes[0], n_spikes[1] + 1))
    n = data.shape
    k0 = np.zeros(3)
    k0[a] = rng.choice([-1, 1]) * rng.uniform(0.15, 0.35) * n[a] / 2
    k0[b] = rng.uniform(-0.05, 0.05) * n[b] / 2
    dk = max(1.0, round(rng.uniform(0.04, 0.08) * n[a]))
    amp = max_amplitude * severity * info.ref / m
    # both amplitudes are kept: the peak for readers, the per-spike one for an exact
    # replay (peak / n_spikes need not round back to it)
    return {"severity": severity, "axis": int(a), "k0": k0.tolist(), "dk": float(dk),
            "n_spikes": m, "spike_amplitude": float(amp), "amplitude": float(amp * m)}


def apply_periodic_line(img, params):
    """Add the plane waves of the spike comb to the image and take the magnitude."""
    data = _data(img)
    n = data.shape
    a, k0, dk = _axis(params, "axis"), _vector(params, "k0"), params["dk"]
    pattern = np.ones((1, 1, 1), np.complex64) * params["spike_amplitude"]
    for ax in range(3):
        x = np.arange(n[ax], dtype=np.float64)
        v = np.exp(2j * np.pi * k0[ax] * x / n[ax])
        if ax == a:
            v = v * sum(np.exp(2j * np.pi * j * dk * x / n[ax]) for j in range(params["n_spikes"]))
        pattern = pattern * v.astype(np.complex64).reshape([-1 if c == ax else 1 for c in range(3)])
    return _like(img, np.abs(data + pattern), params)


def draw_ring(img, severity, rng, *, min_cutoff=0.3, max_boost=3.0):
    """Gibbs ringing: hard k-space truncation with an emphasised edge.

    k-space is cut to the ellipsoid ``|k/k_nyquist| <= rc`` with
    ``rc = 1 - (1 - min_cutoff) * severity`` (no apodisation) and the shell
    ``0.85 rc .. rc`` is multiplied by ``1 + max_boost * severity``. The hard
    edge rings at every tissue boundary; the boosted shell makes the rings
    concentric bands around the head and brain. Magnitude image back.
    Nothing is random.

    Returns
    -------
    dict
        ``severity``, ``cutoff`` (rc, fraction of Nyquist), ``boost`` (shell gain).
    """
    return {"severity": severity, "cutoff": 1.0 - (1.0 - min_cutoff) * severity,
            "boost": 1.0 + max_boost * severity}


def apply_ring(img, params):
    """Truncate k-space at ``cutoff`` with the outer shell scaled by ``boost``."""
    from scipy import fft as sfft

    data = _data(img)
    if params["severity"] <= 0:
        return _like(img, data.copy(), params)
    rc = params["cutoff"]
    spec = sfft.rfftn(data, workers=1)
    n = data.shape
    ks = [np.abs(sfft.fftfreq(n[0])) * 2, np.abs(sfft.fftfreq(n[1])) * 2,
          np.abs(sfft.rfftfreq(n[2])) * 2]
    r = np.sqrt(ks[0][:, None, None] ** 2 + ks[1][None, :, None] ** 2
                + ks[2][None, None, :] ** 2).astype(np.float32)
    gain = np.where(r <= rc, 1.0, 0.0).astype(np.float32)
    gain[(r > 0.85 * rc) & (r <= rc)] = params["boost"]
    spec *= gain
    out = np.abs(sfft.irfftn(spec, s=n, workers=1)).astype(np.float32)
    return _like(img, out, params)


# --------------------------------------------------------------------------- extra types
def draw_motion(img, severity, rng, *, max_degrees=6.0, max_mm=6.0, n_moves=2, max_gap=0.15,
                min_gap=0.02):
    """Rigid head motion between k-space segments (torchio ``Motion``).

    The head moves ``n_moves`` times during the acquisition and stays where it moved to;
    k-space lines (segments along the phase-encode axis) acquired after a move carry the
    moved head. Each move rotates by ``max_degrees * severity`` x (0.6-1) about a random
    axis and translates by ``max_mm * severity`` x (0.6-1) in a random direction.

    How visible motion is depends as much on *when* it happens as on how far the head
    moves: lines near the k-space centre (acquired mid-scan with sequential ordering) carry
    the image's contrast and shape, the periphery only its edges. torchio keeps the
    segment that holds the k-space centre in the original pose, so moves at 0.2 and 0.8
    only touch the outer 20 % on each side and change the image by a fraction of the
    noise (measured: under 0.1 noise SD after a 1-voxel smoothing for 8 of 20 such scans
    when the times were drawn in 0.15-0.85 whatever the severity). The severity therefore
    also sets how close to the centre the moved lines reach: the first move comes
    ``gap = min_gap + (max_gap - min_gap) * (1 - severity)`` of the phase-encode lines
    after the centre (or the last move that far before it, side drawn at random), the
    others further out. torchio's ``Motion`` is deterministic: it draws nothing.

    Returns
    -------
    dict
        ``severity``, ``degrees`` and ``translation`` (one row of 3 per move, degrees and
        mm), ``times`` (sorted, fractions of the phase-encode lines), ``centre_gap``,
        ``phase_axis``.
    """
    _, phase, _ = _axes(img)
    dirs = rng.standard_normal((n_moves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    tdirs = rng.standard_normal((n_moves, 3))
    tdirs /= np.linalg.norm(tdirs, axis=1, keepdims=True)
    scale = rng.uniform(0.6, 1.0, (n_moves, 1))
    degrees = dirs * max_degrees * severity * scale
    trans = tdirs * max_mm * severity * scale
    gap = min_gap + (max_gap - min_gap) * (1.0 - severity)
    near = 0.5 + gap
    times = np.sort(np.concatenate([[near], rng.uniform(near, 0.95, n_moves - 1)]))
    if rng.random() < 0.5:  # the head moved before the centre was acquired: mirror the times
        times = np.sort(1.0 - times)
    return {"severity": severity, "degrees": degrees.tolist(), "translation": trans.tolist(),
            "times": times.tolist(), "centre_gap": float(gap), "phase_axis": phase}


def apply_motion(img, params):
    """Run torchio's ``Motion`` with the drawn moves along ``phase_axis``; severity 0 changes
    nothing."""
    import torchio as tio

    data = _data(img)
    if params["severity"] <= 0:
        return _like(img, data.copy(), params)
    tr = tio.transforms.augmentation.intensity.random_motion.Motion(
        degrees=_vector(params, "degrees", ndim=2), translation=_vector(params, "translation", ndim=2),
        times=np.asarray(params["times"], dtype=np.float64), image_interpolation="linear")
    out = _torchio_apply(img, data, tr, move_axis=_axis(params, "phase_axis"))
    return _like(img, out, params)


def draw_ghosting(img, severity, rng, *, max_intensity=1.0, n_ghosts=(2, 6)):
    """N/2-style ghosts along the phase-encode axis (torchio ``Ghosting``).

    Number of ghosts drawn in ``n_ghosts``; ghost strength (torchio's
    intensity: fraction of the k-space maximum) = ``max_intensity * severity``.

    Returns
    -------
    dict
        ``severity``, ``num_ghosts``, ``intensity``, ``phase_axis``.
    """
    _, phase, _ = _axes(img)
    k = int(rng.integers(n_ghosts[0], n_ghosts[1] + 1))
    return {"severity": severity, "num_ghosts": k, "intensity": float(max_intensity * severity),
            "phase_axis": phase}


def apply_ghosting(img, params):
    """Run torchio's ``Ghosting``; intensity 0 changes nothing."""
    import torchio as tio

    data = _data(img)
    if params["intensity"] <= 0:
        return _like(img, data.copy(), params)
    tr = tio.transforms.augmentation.intensity.random_ghosting.Ghosting(
        num_ghosts=params["num_ghosts"], axis=_axis(params, "phase_axis"),
        intensity=params["intensity"], restore=0.02)
    return _like(img, _torchio_apply(img, data, tr), params)


def draw_spike(img, severity, rng, *, max_intensity=1.5, n_spikes=(1, 2)):
    """Herringbone stripes from one or two random k-space spikes (torchio ``Spike``).

    Spike positions drawn away from the k-space centre (10-40 % of the range
    on each side); spike size = ``max_intensity * severity`` x the k-space
    maximum.

    Returns
    -------
    dict
        ``severity``, ``positions`` (one row of 3 per spike, fractions of the k-space
        range, 0.5 = centre), ``intensity``.
    """
    m = int(rng.integers(n_spikes[0], n_spikes[1] + 1))
    pos = 0.5 + rng.choice([-1, 1], (m, 3)) * rng.uniform(0.1, 0.4, (m, 3)) / 1.0
    pos = np.clip(pos, 0.0, 0.999)
    return {"severity": severity, "positions": pos.tolist(),
            "intensity": float(max_intensity * severity)}


def apply_spike(img, params):
    """Run torchio's ``Spike``; intensity 0 changes nothing."""
    import torchio as tio

    data = _data(img)
    if params["intensity"] <= 0:
        return _like(img, data.copy(), params)
    tr = tio.transforms.augmentation.intensity.random_spike.Spike(
        spikes_positions=_vector(params, "positions", ndim=2), intensity=params["intensity"])
    return _like(img, _torchio_apply(img, data, tr), params)


def draw_wrap_around(img, severity, rng, *, max_shrink=0.35):
    """Aliasing (wrap-around): the field of view along phase-encode is too small.

    The new FOV is ``head extent x (1 - max_shrink * severity)`` along the
    phase axis, centred on the head; the array shrinks to it (affine updated)
    and the signal outside the window folds back in from the opposite side
    (added above the background level). Severity 0 keeps the whole head.
    Nothing is random.

    Returns
    -------
    dict
        ``severity``, ``phase_axis``, ``old_n`` / ``new_n`` (voxels along it before and
        after), ``start`` (stored index of the window's first voxel, may be negative),
        ``fill`` (background value).
    """
    data = _data(img)
    info = head_info(img, data)
    _, phase, _ = _axes(img)
    n = data.shape[phase]
    lo, hi = info.bbox[0][phase], info.bbox[1][phase]
    ext = hi - lo
    new_n = int(np.clip(round(ext * (1 - max_shrink * severity)), 8, n))
    start = int(round((lo + hi) / 2 - new_n / 2))
    start = int(np.clip(start, -(new_n - 1), n - 1))
    return {"severity": severity, "phase_axis": phase, "new_n": new_n, "old_n": int(n),
            "start": start, "fill": float(info.background)}


def apply_wrap_around(img, params):
    """Crop to the window along ``phase_axis`` and fold the rest back in."""
    data = _data(img)
    phase = _axis(params, "phase_axis")
    n, new_n, start, fill = data.shape[phase], params["new_n"], params["start"], params["fill"]
    if n != params["old_n"]:
        raise SynthError(f"wrap_around: params were drawn for {params['old_n']} voxels along "
                         f"axis {phase}; this image has {n}")
    moved = np.moveaxis(data, phase, 0)
    window = np.full((new_n,) + moved.shape[1:], fill, np.float32)
    fold = np.zeros_like(window)
    for i in range(n):
        q, r = divmod(i - start, new_n)
        if q == 0:
            window[r] = moved[i]
        else:
            fold[r] += np.clip(moved[i] - fill, 0, None)
    out = np.moveaxis(window + fold, 0, phase)
    aff = img.affine.copy()
    aff[:3, 3] = aff[:3, 3] + aff[:3, phase] * start
    return _like(img, out, params, affine=aff)


def draw_susceptibility(img, severity, rng, *, min_radius_mm=4.0, max_radius_mm=18.0,
                        max_shift_mm=10.0):
    """Metal / susceptibility artifact: signal void, bright rim, local distortion.

    A dipole field around a point near the brain surface (50-85 % of the way
    from the brain centre) shifts voxels along the readout axis by up to
    ``max_shift_mm * severity`` (pixel-shift model; intensity x Jacobian gives
    the bright pile-up / dark stretch), and a sphere of radius
    ``min_radius + (max_radius - min_radius) * severity`` mm loses its signal.
    Severity 0 changes nothing.

    Returns
    -------
    dict
        ``severity``, ``centre_world`` (world mm), ``radius_mm``, ``max_shift_mm``,
        ``readout_axis``, ``fill`` (background value of the void).
    """
    data = _data(img)
    info = head_info(img, data)
    freq, _, _ = _axes(img)
    direc = rng.standard_normal(3)
    direc /= np.linalg.norm(direc)
    semi = np.array([60.0, 75.0, 55.0])
    centre = info.centre + direc * semi * rng.uniform(0.5, 0.85)
    return {"severity": severity, "centre_world": centre.tolist(),
            "radius_mm": min_radius_mm + (max_radius_mm - min_radius_mm) * severity,
            "max_shift_mm": max_shift_mm * severity, "readout_axis": freq,
            "fill": float(info.background)}


def apply_susceptibility(img, params):
    """Warp along ``readout_axis`` by the dipole field and blank the void."""
    data = _data(img)
    out = data.copy()
    if params["severity"] <= 0:
        return _like(img, out, params)
    centre, radius = _vector(params, "centre_world"), params["radius_mm"]
    shift_mm, freq, fill = params["max_shift_mm"], _axis(params, "readout_axis"), params["fill"]
    vox = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    ijk_c = np.linalg.solve(img.affine[:3, :3], centre - img.affine[:3, 3])
    reach = 4.0 * radius / vox
    lo = np.clip(np.floor(ijk_c - reach).astype(int), 0, np.array(data.shape))
    hi = np.clip(np.ceil(ijk_c + reach).astype(int) + 1, 0, np.array(data.shape))
    if np.any(hi - lo < 2):
        raise SynthError(f"susceptibility: the site {params['centre_world']} (world mm) lies "
                         f"outside the image")
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij")
    d_mm = [(grid[a] - ijk_c[a]) * vox[a] for a in range(3)]
    r = np.sqrt(sum(g * g for g in d_mm)) + 1e-3
    cos_t = d_mm[2] / r  # B0 along world-ish z of the array
    rr = np.maximum(r, radius)
    dip = (radius / rr) ** 3 * (3 * cos_t**2 - 1) / 2
    shift_vox = shift_mm * dip / vox[freq]
    coords = [g.copy() for g in grid]
    coords[freq] = coords[freq] - shift_vox
    warped = ndi.map_coordinates(data, coords, order=1, mode="nearest")
    jac = 1.0 - np.gradient(shift_vox, axis=freq)
    warped = warped / np.clip(np.abs(jac), 0.3, 3.0)
    void = 1.0 / (1.0 + np.exp((r - radius) / 1.0))
    warped = warped * (1 - void) + fill * void
    out[sub] = warped
    return _like(img, out, params)


def draw_bias_field(img, severity, rng, *, max_coefficient=0.8, order=3):
    """Strong smooth intensity inhomogeneity (torchio ``BiasField``).

    Polynomial log-field of ``order`` with coefficients
    ``max_coefficient * severity * u``, ``u`` uniform in [-1, 1] (drawn from
    ``rng``), so larger severity means the same pattern, stronger.

    Returns
    -------
    dict
        ``severity``, ``coefficients`` (torchio's order of the monomials), ``order``.
    """
    n_coef = sum(1 for x in range(order + 1) for y in range(order + 1 - x)
                 for _ in range(order + 1 - x - y))
    coefs = (max_coefficient * severity * rng.uniform(-1, 1, n_coef)).tolist()
    return {"severity": severity, "coefficients": coefs, "order": int(order)}


def apply_bias_field(img, params):
    """Multiply by torchio's ``BiasField`` of the given coefficients; severity 0 changes
    nothing."""
    import torchio as tio

    data = _data(img)
    if params["severity"] <= 0:
        return _like(img, data.copy(), params)
    tr = tio.transforms.augmentation.intensity.random_bias_field.BiasField(
        coefficients=list(params["coefficients"]), order=params["order"])
    return _like(img, _torchio_apply(img, data, tr), params)


def draw_blur(img, severity, rng, *, max_thickness=5, max_sigma_vox=1.2):
    """Blurring / thick slices: slab averaging + slice decimation + in-plane blur.

    Slices are averaged over ``k = 1 + round((max_thickness - 1) * severity)``
    neighbours along the slice axis, every k-th slice is kept and linearly
    interpolated back onto the original grid (as a scanner's interpolated
    reconstruction), and an in-plane Gaussian of ``max_sigma_vox * severity``
    voxels is applied. Nothing is random.

    Returns
    -------
    dict
        ``severity``, ``slice_axis``, ``thickness_factor`` (k), ``inplane_sigma_vox``.
    """
    _, _, slc = _axes(img)
    return {"severity": severity, "slice_axis": slc,
            "thickness_factor": int(1 + round((max_thickness - 1) * severity)),
            "inplane_sigma_vox": float(max_sigma_vox * severity)}


def apply_blur(img, params):
    """Average slabs of ``thickness_factor`` slices, decimate, re-interpolate, blur in-plane."""
    data = _data(img)
    slc, k, sig = _axis(params, "slice_axis"), params["thickness_factor"], params["inplane_sigma_vox"]
    out = data
    if k > 1:
        thick = ndi.uniform_filter1d(data, k, axis=slc, mode="nearest")
        n = data.shape[slc]
        keep = np.arange(k // 2, n, k)
        dec = np.take(thick, keep, axis=slc)
        pos = (np.arange(n, dtype=np.float32) - keep[0]) / k
        pos = np.clip(pos, 0, len(keep) - 1)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, len(keep) - 1)
        w = (pos - i0).reshape([-1 if a == slc else 1 for a in range(3)])
        out = np.take(dec, i0, axis=slc) * (1 - w) + np.take(dec, i1, axis=slc) * w
    if sig > 0:
        sigmas = [sig if a != slc else 0.0 for a in range(3)]
        out = ndi.gaussian_filter(out, sigmas)
    return _like(img, out, params)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Artifact:
    """A registered artifact: its draw and apply steps and its documentation.

    ``draw(img, severity, rng, **options) -> params`` makes the random choices;
    ``apply(img, params) -> img`` (``apply(img, params, meta=...)`` when ``needs_meta``)
    uses no randomness. ``param_keys`` are the keys of the params the apply step reads
    besides ``severity`` (the draw step may add descriptive ones).
    """

    name: str
    draw: Callable
    apply: Callable
    param_keys: tuple
    description: str
    paper: bool = False       # one of the paper's Table 1 six
    needs_meta: bool = False  # apply needs make_subject's meta (cohort-level)


_BOX_KEYS = ("box_world_lo", "box_world_hi", "fill")

ARTIFACTS = {
    a.name: a
    for a in [
        Artifact("different_sequence", draw_different_sequence, apply_different_sequence,
                 ("other",), "scan of another contrast stored as this one",
                 paper=True, needs_meta=True),
        Artifact("kspace_noise", draw_kspace_noise, apply_kspace_noise, ("sigma", "noise_state"),
                 "Gaussian noise added in k-space", paper=True),
        Artifact("chunk_middle", draw_chunk_middle, apply_box, _BOX_KEYS,
                 "box in the brain set to background", paper=True),
        Artifact("chunk_top", draw_chunk_top, apply_box, _BOX_KEYS,
                 "top of the head/brain set to background", paper=True),
        Artifact("periodic_line", draw_periodic_line, apply_periodic_line,
                 ("axis", "k0", "dk", "n_spikes", "spike_amplitude"),
                 "k-space spike comb: periodic stripes", paper=True),
        Artifact("ring", draw_ring, apply_ring, ("cutoff", "boost"),
                 "Gibbs ringing from hard k-space truncation", paper=True),
        Artifact("motion", draw_motion, apply_motion,
                 ("degrees", "translation", "times", "phase_axis"),
                 "rigid motion between k-space segments (torchio)"),
        Artifact("ghosting", draw_ghosting, apply_ghosting,
                 ("num_ghosts", "intensity", "phase_axis"), "phase-encode ghosts (torchio)"),
        Artifact("spike", draw_spike, apply_spike, ("positions", "intensity"),
                 "herringbone from k-space spikes (torchio)"),
        Artifact("wrap_around", draw_wrap_around, apply_wrap_around,
                 ("phase_axis", "new_n", "old_n", "start", "fill"),
                 "aliasing from a too-small phase FOV"),
        Artifact("susceptibility", draw_susceptibility, apply_susceptibility,
                 ("centre_world", "radius_mm", "max_shift_mm", "readout_axis", "fill"),
                 "metal: void, bright rim, distortion"),
        Artifact("bias_field", draw_bias_field, apply_bias_field, ("coefficients", "order"),
                 "strong intensity inhomogeneity (torchio)"),
        Artifact("blur", draw_blur, apply_blur,
                 ("slice_axis", "thickness_factor", "inplane_sigma_vox"),
                 "thick slices and blurring"),
    ]
}
PAPER_ARTIFACTS = tuple(n for n, a in ARTIFACTS.items() if a.paper)


def _registered(name) -> Artifact:
    if name not in ARTIFACTS:
        raise UnknownArtifactError(
            f"unknown artifact {name!r}; expected one of: {', '.join(ARTIFACTS)}")
    return ARTIFACTS[name]


def draw_artifact_params(img, name: str, severity: float, rng=None, **options) -> dict:
    """Draw the random parameters of artifact ``name`` for ``img`` (the draw step).

    Parameters
    ----------
    img : nibabel image
        3D scan in its stored space.
    name : str
        A key of :data:`ARTIFACTS`.
    severity : float
        In [0, 1].
    rng : numpy.random.Generator or int or None
        Source of every random choice; advanced exactly as :func:`apply_artifact`
        advances it.
    **options
        The artifact's keyword options (its ``draw_<name>`` function's; ``meta=`` for
        ``different_sequence``).

    Returns
    -------
    dict
        JSON-serialisable parameters (``severity`` included) for :func:`replay_artifact`;
        a JSON round trip gives an equal dict.

    Raises
    ------
    UnknownArtifactError
        ``name`` is not registered.
    SynthError
        Severity outside [0, 1], an image that is not 3D, a bad ``rng``, or (for
        ``different_sequence``) no ``meta``.
    TypeError
        An option the artifact's draw step does not take.
    """
    art = _registered(name)
    s = _check_severity(severity)
    _check_3d(img)
    params = art.draw(img, s, _as_rng(rng), **options)
    # normalised through JSON: the dict the apply step takes is then exactly the one a
    # labels TSV (or any JSON store) gives back, so a replay from there is bit-identical
    return json.loads(json.dumps(params))


def _check_params(art: Artifact, params) -> dict:
    if not isinstance(params, Mapping):
        raise SynthError(f"params for {art.name!r} must be a dict (from draw_artifact_params "
                         f"or an image's extra['artifact']); got {type(params).__name__}")
    expected = ("severity",) + tuple(art.param_keys)
    missing = [k for k in expected if k not in params]
    if missing:
        raise SynthError(f"params for {art.name!r} lack {', '.join(map(repr, missing))}; "
                         f"expected keys: {', '.join(expected)}")
    return {**params, "severity": _check_severity(params["severity"])}


def replay_artifact(img, name: str, params, *, meta=None):
    """Apply artifact ``name`` with drawn ``params`` (the deterministic apply step).

    Parameters
    ----------
    img : nibabel image
        3D scan in its stored space (the clean scan the params were drawn for).
    name : str
        A key of :data:`ARTIFACTS`.
    params : dict
        From :func:`draw_artifact_params`, an artifact image's ``extra["artifact"]`` or a
        labels TSV's ``artifact_params``.
    meta : dict, optional
        :func:`make_subject`'s dict for ``img``; needed by artifacts with ``needs_meta``
        (``different_sequence``, which regenerates the subject), ignored by the others.

    Returns
    -------
    nibabel.Nifti1Image
        float32 image whose ``extra["artifact"]`` equals ``params``. No random generator
        is read or advanced: the same inputs always give the same voxels.

    Raises
    ------
    UnknownArtifactError
        ``name`` is not registered.
    SynthError
        ``params`` is not a dict, lacks a key the apply step reads (the message names it),
        holds a value of the wrong shape, or ``img`` is not 3D.
    """
    art = _registered(name)
    params = _check_params(art, params)
    _check_3d(img)
    if art.needs_meta:
        return art.apply(img, params, meta=meta)
    return art.apply(img, params)


def apply_artifact(img, name: str, severity: float, rng=None, **options):
    """Apply the registered artifact ``name`` at ``severity`` in [0, 1].

    ``replay_artifact(img, name, draw_artifact_params(img, name, severity, rng,
    **options))``: ``rng`` (numpy Generator or int seed) fixes the random choices,
    ``options`` go to the artifact's draw step (``meta=`` for ``different_sequence``,
    which its apply step takes too). The result's ``extra["artifact"]`` holds the params.
    """
    params = draw_artifact_params(img, name, severity, rng, **options)
    return replay_artifact(img, name, params, meta=options.get("meta"))
