"""The artifact simulators' shared pieces: random generators and parameter checks, the
image a simulator returns, acquisition axes, world coordinates, the rough head localisation
and deterministic torchio transforms (used by :mod:`~qc_pipeline.synth.paper_artifacts` and
:mod:`~qc_pipeline.synth.scanner_artifacts`)."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from .errors import SynthError

__all__ = ["HeadInfo", "acquisition_axes", "as_rng", "axis_param", "check_3d", "check_severity", "float_voxels",
           "head_info", "image_like", "plain_values", "rng_from_state", "torchio_apply", "vector_param",
           "world_axes"]


def as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise SynthError(f"rng must be a numpy Generator or an int seed; got {type(rng).__name__}")


def check_3d(img):
    if len(img.shape) != 3:
        raise SynthError(f"artifact simulators need a 3D image; got shape {tuple(img.shape)}")


def float_voxels(img) -> np.ndarray:
    check_3d(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return np.nan_to_num(data, copy=False)


def image_like(img, data, params, affine=None) -> nib.Nifti1Image:
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


def acquisition_axes(img):
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


def world_axes(shape, affine):
    """Open grids of world x, y, z (mm) for every voxel (broadcast-friendly)."""
    idx = [np.arange(n, dtype=np.float32).reshape([-1 if b == a else 1 for b in range(3)])
           for a, n in enumerate(shape)]
    return [affine[r, 0] * idx[0] + affine[r, 1] * idx[1] + affine[r, 2] * idx[2] + affine[r, 3]
            for r in range(3)]


def plain_values(obj):
    """``obj`` with numpy arrays and scalars (at any depth of dicts and lists) as Python ones."""
    if isinstance(obj, Mapping):
        return {k: plain_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [plain_values(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def rng_from_state(state) -> np.random.Generator:
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


def vector_param(params, key, ndim=1, length=3) -> np.ndarray:
    """``params[key]`` as float64 (as the simulators computed it), checked to hold ``length``
    numbers (per row when ``ndim`` is 2)."""
    arr = np.asarray(params[key], dtype=np.float64)
    if arr.ndim != ndim or arr.shape[-1] != length:
        want = f"{length} numbers" if ndim == 1 else f"rows of {length} numbers"
        raise SynthError(f"params[{key!r}] must hold {want}; got {params[key]!r}")
    return arr


def axis_param(params, key) -> int:
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
        data = float_voxels(img)
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


def torchio_apply(img, data, transform, move_axis=None):
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


def check_severity(severity):
    try:
        s = float(severity)
    except (TypeError, ValueError):
        s = float("nan")
    if not (0.0 <= s <= 1.0) or not np.isfinite(s):
        raise SynthError(f"severity must be in [0, 1]; got {severity!r}")
    return s
