"""Scanner artifacts beyond the paper's six as draw / apply pairs: motion, ghosting, a
k-space spike, wrap-around, susceptibility voids, a bias field and blur / thick slices (the
registry and the contract: :mod:`qc_pipeline.synth.artifacts`)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .errors import SynthError
from .simulator_base import (acquisition_axes, axis_param, float_voxels, head_info, image_like,
                             torchio_apply, vector_param)


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
    _, phase, _ = acquisition_axes(img)
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

    data = float_voxels(img)
    if params["severity"] <= 0:
        return image_like(img, data.copy(), params)
    tr = tio.transforms.augmentation.intensity.random_motion.Motion(
        degrees=vector_param(params, "degrees", ndim=2), translation=vector_param(params, "translation", ndim=2),
        times=np.asarray(params["times"], dtype=np.float64), image_interpolation="linear")
    out = torchio_apply(img, data, tr, move_axis=axis_param(params, "phase_axis"))
    return image_like(img, out, params)


def draw_ghosting(img, severity, rng, *, max_intensity=1.0, n_ghosts=(2, 6)):
    """N/2-style ghosts along the phase-encode axis (torchio ``Ghosting``).

    Number of ghosts drawn in ``n_ghosts``; ghost strength (torchio's
    intensity: fraction of the k-space maximum) = ``max_intensity * severity``.

    Returns
    -------
    dict
        ``severity``, ``num_ghosts``, ``intensity``, ``phase_axis``.
    """
    _, phase, _ = acquisition_axes(img)
    k = int(rng.integers(n_ghosts[0], n_ghosts[1] + 1))
    return {"severity": severity, "num_ghosts": k, "intensity": float(max_intensity * severity),
            "phase_axis": phase}


def apply_ghosting(img, params):
    """Run torchio's ``Ghosting``; intensity 0 changes nothing."""
    import torchio as tio

    data = float_voxels(img)
    if params["intensity"] <= 0:
        return image_like(img, data.copy(), params)
    tr = tio.transforms.augmentation.intensity.random_ghosting.Ghosting(
        num_ghosts=params["num_ghosts"], axis=axis_param(params, "phase_axis"),
        intensity=params["intensity"], restore=0.02)
    return image_like(img, torchio_apply(img, data, tr), params)


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

    data = float_voxels(img)
    if params["intensity"] <= 0:
        return image_like(img, data.copy(), params)
    tr = tio.transforms.augmentation.intensity.random_spike.Spike(
        spikes_positions=vector_param(params, "positions", ndim=2), intensity=params["intensity"])
    return image_like(img, torchio_apply(img, data, tr), params)


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
    data = float_voxels(img)
    info = head_info(img, data)
    _, phase, _ = acquisition_axes(img)
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
    data = float_voxels(img)
    phase = axis_param(params, "phase_axis")
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
    return image_like(img, out, params, affine=aff)


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
    data = float_voxels(img)
    info = head_info(img, data)
    freq, _, _ = acquisition_axes(img)
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
    data = float_voxels(img)
    out = data.copy()
    if params["severity"] <= 0:
        return image_like(img, out, params)
    centre, radius = vector_param(params, "centre_world"), params["radius_mm"]
    shift_mm, freq, fill = params["max_shift_mm"], axis_param(params, "readout_axis"), params["fill"]
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
    return image_like(img, out, params)


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

    data = float_voxels(img)
    if params["severity"] <= 0:
        return image_like(img, data.copy(), params)
    tr = tio.transforms.augmentation.intensity.random_bias_field.BiasField(
        coefficients=list(params["coefficients"]), order=params["order"])
    return image_like(img, torchio_apply(img, data, tr), params)


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
    _, _, slc = acquisition_axes(img)
    return {"severity": severity, "slice_axis": slc,
            "thickness_factor": int(1 + round((max_thickness - 1) * severity)),
            "inplane_sigma_vox": float(max_sigma_vox * severity)}


def apply_blur(img, params):
    """Average slabs of ``thickness_factor`` slices, decimate, re-interpolate, blur in-plane."""
    data = float_voxels(img)
    slc, k, sig = axis_param(params, "slice_axis"), params["thickness_factor"], params["inplane_sigma_vox"]
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
    return image_like(img, out, params)
