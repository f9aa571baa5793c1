"""The paper's six synthetic artifacts (IterMask3D, Table 1) as draw / apply pairs: a different
sequence, k-space noise, a missing chunk in the middle or at the top, periodic lines and
ringing (the registry and the contract: :mod:`qc_pipeline.synth.artifacts`)."""
from __future__ import annotations

import numpy as np

from .errors import SynthError
from .simulator_base import (acquisition_axes, axis_param, float_voxels, head_info, image_like,
                             plain_values, rng_from_state, vector_param, world_axes)

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
    return image_like(img, float_voxels(out), params)


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
    data = float_voxels(img)
    sigma = max_fraction * severity * head_info(img, data).ref
    state = plain_values(rng.bit_generator.state)
    # The fields are too big for a params dict; the apply step regenerates them from
    # `state`. Drawing them here too leaves `rng` where the whole simulation leaves it.
    _noise_pair(rng, data.shape)
    return {"severity": severity, "sigma": float(sigma), "noise_state": state}


def apply_kspace_noise(img, params):
    """Add the noise fields regenerated from ``params["noise_state"]`` (std ``sigma``)."""
    data = float_voxels(img)
    n1, n2 = _noise_pair(rng_from_state(params["noise_state"]), data.shape)
    sigma = params["sigma"]
    out = np.sqrt((data + sigma * n1) ** 2 + (sigma * n2) ** 2)
    return image_like(img, out, params)


def _box_mask(img, lo, hi):
    x, y, z = world_axes(img.shape, img.affine)
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
    data = float_voxels(img)
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
    data = float_voxels(img)
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
    data = float_voxels(img)
    lo, hi = vector_param(params, "box_world_lo"), vector_param(params, "box_world_hi")
    box = _box_mask(img, lo, hi) if params["severity"] > 0 else np.zeros(data.shape, bool)
    out = data.copy()
    out[box] = params["fill"]
    return image_like(img, out, params)


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
    data = float_voxels(img)
    info = head_info(img, data)
    _, _, slc = acquisition_axes(img)
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
    data = float_voxels(img)
    n = data.shape
    a, k0, dk = axis_param(params, "axis"), vector_param(params, "k0"), params["dk"]
    pattern = np.ones((1, 1, 1), np.complex64) * params["spike_amplitude"]
    for ax in range(3):
        x = np.arange(n[ax], dtype=np.float64)
        v = np.exp(2j * np.pi * k0[ax] * x / n[ax])
        if ax == a:
            v = v * sum(np.exp(2j * np.pi * j * dk * x / n[ax]) for j in range(params["n_spikes"]))
        pattern = pattern * v.astype(np.complex64).reshape([-1 if c == ax else 1 for c in range(3)])
    return image_like(img, np.abs(data + pattern), params)


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

    data = float_voxels(img)
    if params["severity"] <= 0:
        return image_like(img, data.copy(), params)
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
    return image_like(img, out, params)
