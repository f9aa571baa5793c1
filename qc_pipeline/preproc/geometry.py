"""Geometry of the preprocessing: the world-aligned RAS lattice, resampling, the integer
crop/pad onto the model grid, and the way back to the scan's native voxels.

World-aligned lattice
    Every resampled image lives on the lattice ``x = k * voxel_size`` (scanner mm, RAS
    axes). An LPS/LAS/oblique copy of a scan therefore lands on exactly the same voxel
    centres as the RAS original, and cropping to the model grid is an integer shift on
    that lattice (no second interpolation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..io import voxel_sizes

__all__ = ["CropInfo", "is_oblique", "as_vs3", "to_lattice", "crop_pad_to_grid", "apply_crop_pad", "to_native"]


@dataclass
class CropInfo:
    """Integer crop/pad of an array onto a grid: ``out[i] = in[i + start]`` (0 outside)."""

    start: tuple  # index in the input array of the grid's voxel (0, 0, 0); may be negative
    in_shape: tuple
    grid: tuple

    @property
    def pad_before(self):
        return tuple(max(0, -s) for s in self.start)

    @property
    def pad_after(self):
        return tuple(max(0, s + g - n) for s, g, n in zip(self.start, self.grid, self.in_shape))

    @property
    def crop_before(self):
        return tuple(max(0, s) for s in self.start)

    @property
    def crop_after(self):
        return tuple(max(0, n - s - g) for s, g, n in zip(self.start, self.grid, self.in_shape))

    def to_dict(self):
        return {
            "start": [int(s) for s in self.start],
            "in_shape": [int(s) for s in self.in_shape],
            "grid": [int(s) for s in self.grid],
            "pad_before": list(self.pad_before),
            "pad_after": list(self.pad_after),
            "crop_before": list(self.crop_before),
            "crop_after": list(self.crop_after),
        }




def is_oblique(affine, tol_deg: float = 0.05) -> bool:
    """True when the voxel axes are rotated away from the world axes by more than ``tol_deg``."""
    ob = nib.affines.obliquity(np.asarray(affine, dtype=float))
    return bool(np.max(np.abs(np.degrees(ob))) > tol_deg)


def as_vs3(voxel_size) -> np.ndarray:
    vs = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,)).copy()
    if np.any(vs <= 0):
        raise ValueError(f"voxel_size must be positive, got {voxel_size!r}")
    return vs


def _lattice_for(img_affine, img_shape, vs) -> tuple[np.ndarray, tuple]:
    """RAS lattice (x = k*vs) covering the image's field of view (voxel edges included)."""
    n = np.asarray(img_shape[:3], dtype=float)
    corners = np.array(np.meshgrid(*[[-0.5, m - 0.5] for m in n], indexing="ij")).reshape(3, -1)
    world = img_affine[:3, :3] @ corners + img_affine[:3, 3:4]
    lo = np.floor(world.min(axis=1) / vs + 1e-6) * vs
    hi = np.ceil(world.max(axis=1) / vs - 1e-6) * vs
    shape = tuple(int(v) for v in np.round((hi - lo) / vs) + 1)
    aff = np.diag(np.r_[vs, 1.0])
    aff[:3, 3] = lo
    return aff, shape


def _smooth_for_downsampling(data, in_zooms, out_vs):
    """Gaussian anti-aliasing along each input axis that is finer than the output."""
    in_zooms = np.asarray(in_zooms, dtype=float)
    target = float(np.min(out_vs)) if np.ndim(out_vs) else float(out_vs)
    sig_mm = np.sqrt(np.clip(target**2 - in_zooms**2, 0, None)) / 2.3548
    sigma = sig_mm / in_zooms
    if np.all(sigma < 0.2):
        return data
    return ndi.gaussian_filter(data, sigma=np.where(sigma < 0.2, 0, sigma), mode="nearest")


def _resample(data, in_affine, out_affine, out_shape, order=1, fill=0.0, edge="nearest"):
    """Sample ``data`` (voxel grid ``in_affine``) on ``out_affine``/``out_shape``.

    Points within half a voxel outside the input take the edge value; points further
    out get ``fill``. Returns (resampled, inside-FOV mask).
    """
    m = np.linalg.inv(in_affine) @ out_affine
    matrix, offset = m[:3, :3], m[:3, 3]
    out = ndi.affine_transform(
        np.asarray(data, dtype=np.float32), matrix, offset, output_shape=tuple(out_shape),
        order=order, mode=edge, prefilter=False,
    )
    fov = _fov_mask(data.shape[:3], m, out_shape)
    out[~fov] = fill
    return out, fov


def _fov_mask(in_shape, vox_to_vox, out_shape):
    """Output voxels whose centre maps inside the input's voxel extent [-0.5, n-0.5]."""
    inside = np.ones(tuple(out_shape), dtype=bool)
    idx = np.indices(out_shape, dtype=np.float32).reshape(3, -1)
    coords = vox_to_vox[:3, :3].astype(np.float32) @ idx + vox_to_vox[:3, 3:4].astype(np.float32)
    for ax in range(3):
        c = coords[ax].reshape(out_shape)
        inside &= (c >= -0.5 - 1e-4) & (c <= in_shape[ax] - 0.5 + 1e-4)
    return inside


def to_lattice(img, voxel_size, order=1, antialias=True):
    img = _as_3d_nifti(img)
    vs = as_vs3(voxel_size)
    data = np.asarray(img.dataobj, dtype=np.float32)
    in_aff = np.asarray(img.affine, dtype=float)
    if antialias and order > 0:
        data = _smooth_for_downsampling(data, voxel_sizes(in_aff), vs)
    aff, shape = _lattice_for(in_aff, img.shape, vs)
    out, fov = _resample(data, in_aff, aff, shape, order=order)
    return out, fov, aff


def _as_3d_nifti(img) -> nib.Nifti1Image:
    if len(img.shape) > 3:
        if int(np.prod(img.shape[3:])) != 1:
            raise ValueError(f"expected a 3D image, got shape {img.shape}")
        data = np.asarray(img.dataobj).reshape(img.shape[:3])
        out = nib.Nifti1Image(data, img.affine)
        out.extra.update(getattr(img, "extra", {}) or {})
        return out
    return img


def crop_pad_to_grid(volume: np.ndarray, mask: np.ndarray | None, grid: Sequence[int], *,
                     center=None, fill=0) -> tuple[np.ndarray, CropInfo]:
    """Crop/pad ``volume`` to ``grid`` with the brain centred.

    Parameters
    ----------
    volume : array (3D)
    mask : bool array or None
        Its bounding-box centre is put at the grid centre (ignored if ``center`` given;
        if both are None the array centre is used).
    grid : 3 ints
    center : 3 floats, optional
        Voxel coordinates (in ``volume``) to put at the grid centre.

    Returns
    -------
    out : array of shape ``grid``
    crop : CropInfo
        ``out[i] = volume[i + crop.start]``; use :func:`apply_crop_pad` for other arrays.
    """
    grid = tuple(int(g) for g in grid)
    shape = volume.shape[:3]
    if center is None:
        if mask is not None and np.any(mask):
            idx = np.nonzero(mask)
            center = [(i.min() + i.max()) / 2.0 for i in idx]
        else:
            center = [(n - 1) / 2.0 for n in shape]
    start = tuple(int(np.floor(c - (g - 1) / 2.0 + 0.5)) for c, g in zip(center, grid))
    crop = CropInfo(start=start, in_shape=tuple(shape), grid=grid)
    return apply_crop_pad(volume, crop, fill=fill), crop


def apply_crop_pad(volume: np.ndarray, crop: CropInfo, fill=0) -> np.ndarray:
    """Apply a :class:`CropInfo` (from :func:`crop_pad_to_grid`) to another array."""
    out = np.full(crop.grid, fill, dtype=volume.dtype)
    src, dst = [], []
    for s, g, n in zip(crop.start, crop.grid, volume.shape[:3]):
        a, b = max(s, 0), min(s + g, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = volume[tuple(src)]
    return out


# --------------------------------------------------------------------------------------
# back to native space
# --------------------------------------------------------------------------------------
def to_native(volume_on_grid: np.ndarray, prep_info, reference_img: nib.spatialimages.SpatialImage,
              order: int | None = None) -> nib.Nifti1Image:
    """Map a grid-space mask or map back onto the scan's native voxel grid and affine.

    Parameters
    ----------
    volume_on_grid : array of shape ``prep_info.grid``
    prep_info : PrepInfo
        :class:`~qc_pipeline.preproc.chain.PrepInfo` (only its ``grid`` and ``grid_affine``
        are read; not imported here: the chain imports this module)
    reference_img : the native scan (as loaded; 4D single-volume is fine)
    order : 0 (nearest, default for bool/integer input) or 1 (linear, default for float)

    Returns
    -------
    nibabel.Nifti1Image
        uint8 for masks (order 0 of a bool array), float32 otherwise, with the reference's
        affine (qform/sform codes copied). Voxels outside the grid are 0.
    """
    vol = np.asarray(volume_on_grid)
    if tuple(vol.shape) != tuple(prep_info.grid):
        raise ValueError(f"volume shape {vol.shape} != grid {tuple(prep_info.grid)}")
    is_mask = vol.dtype == bool or np.issubdtype(vol.dtype, np.integer)
    if order is None:
        order = 0 if is_mask else 1
    ref_aff = np.asarray(reference_img.affine, dtype=float)
    shape = tuple(reference_img.shape[:3])
    m = np.linalg.inv(np.asarray(prep_info.grid_affine, dtype=float)) @ ref_aff
    out = ndi.affine_transform(vol.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape, order=order,
                               mode="constant", cval=0.0, prefilter=False)
    if vol.dtype == bool:
        data = (out >= 0.5).astype(np.uint8)
    elif is_mask and order == 0:
        data = np.rint(out).astype(vol.dtype if vol.dtype.itemsize <= 2 else np.int32)
    else:
        data = out.astype(np.float32)
    hdr = None
    if isinstance(reference_img, nib.Nifti1Image):
        hdr = reference_img.header.copy()
        hdr.set_data_shape(shape)
    img = nib.Nifti1Image(data, ref_aff, hdr)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if hdr is not None:
        img.header["dim"][0] = 3
        img.header["pixdim"][4:] = 1.0
    return img
