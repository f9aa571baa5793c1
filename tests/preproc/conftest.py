"""Fixtures for the preprocessing tests: small synthetic heads and geometry helpers.

Heads come from ``qc_pipeline.synth.make_subject`` (coarse working grid, 2 mm voxels) with
their ground-truth brain masks, so the tests can measure masks against the truth.
"""
import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi


@pytest.fixture(scope="session")
def head():
    """(scan, ground-truth brain mask) of one synthetic T1w head, 2 mm voxels, odd orientation."""
    from qc_pipeline.synth.subject import make_subject

    img, meta = make_subject(0, "T1w", work_mm=3.0, voxel_size=2.0, return_brain_mask=True, finalize=False)
    return img, meta["brain_mask"]


@pytest.fixture(scope="session")
def stripped(head):
    """The same head, skull-stripped with the ground truth (for ``skull_strip='none'``)."""
    img, gt = head
    data = img.get_fdata(dtype=np.float32) * (np.asarray(gt.dataobj) > 0)
    return nib.Nifti1Image(data, img.affine), gt


def reorient_copy(img, codes):
    """Exact copy of ``img`` stored in orientation ``codes`` (e.g. "LPS"): same world data."""
    ornt_from = nib.io_orientation(img.affine)
    ornt_to = nib.orientations.axcodes2ornt(codes)
    tr = nib.orientations.ornt_transform(ornt_from, ornt_to)
    data = nib.orientations.apply_orientation(np.asarray(img.dataobj), tr)
    aff = img.affine @ nib.orientations.inv_ornt_aff(tr, img.shape)
    return nib.Nifti1Image(data, aff)


def rotation(deg):
    rx, ry, rz = np.radians(deg)
    cx, cy, cz, sx, sy, sz = np.cos(rx), np.cos(ry), np.cos(rz), np.sin(rx), np.sin(ry), np.sin(rz)
    a = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    b = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    c = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return c @ b @ a


def oblique_copy(img, deg=(12.0, -8.0, 6.0), voxel=1.5, order=3):
    """Resample ``img`` onto an oblique grid (voxel axes rotated by ``deg``) covering it."""
    aff = np.asarray(img.affine, float)
    n = np.array(img.shape[:3])
    centre = aff[:3, :3] @ ((n - 1) / 2) + aff[:3, 3]
    ext = np.abs(aff[:3, :3]).sum(axis=1) * n  # world extent
    rot = rotation(deg)
    new_n = np.ceil(np.abs(rot.T) @ ext / voxel).astype(int) + 2
    new = np.eye(4)
    new[:3, :3] = rot @ np.diag([voxel] * 3)
    new[:3, 3] = centre - new[:3, :3] @ ((new_n - 1) / 2)
    m = np.linalg.inv(aff) @ new
    data = ndi.affine_transform(np.asarray(img.dataobj, dtype=np.float32), m[:3, :3], m[:3, 3],
                                output_shape=tuple(new_n), order=order, mode="constant", cval=0.0)
    return nib.Nifti1Image(np.clip(data, 0, None).astype(np.float32), new)


def world_coords(img):
    idx = np.indices(img.shape[:3], dtype=np.float32).reshape(3, -1)
    return (img.affine[:3, :3] @ idx + img.affine[:3, 3:4]).reshape((3,) + img.shape[:3])


def on_grid(native_img, info, order=1):
    """Resample a native image (e.g. the ground-truth mask) onto the preprocessing grid."""
    m = np.linalg.inv(native_img.affine) @ info.grid_affine
    return ndi.affine_transform(np.asarray(native_img.dataobj, dtype=np.float32), m[:3, :3], m[:3, 3],
                                output_shape=tuple(info.grid), order=order, mode="constant", cval=0.0)


def brain_centre_world(gt):
    idx = np.argwhere(np.asarray(gt.dataobj) > 0)
    return idx.mean(0) @ gt.affine[:3, :3].T + gt.affine[:3, 3]


def brain_top_world(gt):
    idx = np.argwhere(np.asarray(gt.dataobj) > 0)
    return float((idx @ gt.affine[:3, :3].T + gt.affine[:3, 3])[:, 2].max())


def blank_region(img, region_world):
    """Copy of ``img`` with voxels where ``region_world(x, y, z)`` is True set to 0."""
    x, y, z = world_coords(img)
    sel = region_world(x, y, z)
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[sel] = 0
    return nib.Nifti1Image(data, img.affine), sel


def cut_fov_top(img, z_cut):
    """Crop the array so that no voxel above world z = ``z_cut`` remains (FOV cut off)."""
    ras = nib.as_closest_canonical(img)
    z = world_coords(ras)[2]
    keep = np.nonzero(np.median(z, axis=(0, 1)) <= z_cut)[0]
    k1 = int(keep.max()) + 1
    return ras.slicer[:, :, :k1]


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="session")
def geo():
    """Geometry helpers (a namespace, since tests are imported with importlib mode)."""
    from types import SimpleNamespace

    return SimpleNamespace(reorient_copy=reorient_copy, oblique_copy=oblique_copy, world_coords=world_coords,
                           on_grid=on_grid, brain_centre_world=brain_centre_world,
                           brain_top_world=brain_top_world, blank_region=blank_region,
                           cut_fov_top=cut_fov_top, dice=dice, rotation=rotation)
