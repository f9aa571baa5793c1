"""The anatomy bank: the head model's tissue maps on one 1 mm canvas, for training on any device.

:class:`qc_pipeline.engine.domainrand.DomainRandomizer` draws training heads from these maps on the GPU (or
the CPU): per-subject deformation, skull and scalp thicknesses, tissue contrasts, scanner
effects. The bank holds what does not change between subjects, as compact arrays, so a
training machine needs neither nilearn nor the template files: one ``.npz`` travels.

Channels (:data:`~qc_pipeline.engine.domainrand.BANK_CHANNELS`; float32 after
:func:`~qc_pipeline.engine.domainrand.load_bank`)
    ``gm``, ``wm``, ``csf``  brain tissue fractions (sum = brain fraction)
    ``depth``                mm inside the filled brain hull (0 outside): deep grey nuclei
                             are grey matter far from the hull
    ``hull_dist``            mm outside the filled brain hull (0 inside): skull layers
    ``ext_dist``             mm inside the head envelope (0 outside): skin and fat
    ``fat``, ``eye``, ``air``, ``marrow``  fixed structures of the head model (0/1)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from qc_pipeline.engine.domainrand import BANK_CHANNELS, BANK_SCALE

from . import template as tpl

__all__ = ["CANVAS_CENTRE_MM", "build_anatomy_bank", "save_bank"]

#: MNI centre of the canvas: the middle of the template brain's bounding box, which is
#: where preprocessing centres the model grid
CANVAS_CENTRE_MM = (0.0, -17.0, 4.0)


def build_anatomy_bank(size_mm=(192, 224, 192), voxel_mm: float = 1.0) -> dict:
    """Tissue maps of the head model on a canvas of ``size_mm`` around :data:`CANVAS_CENTRE_MM`.

    Returns a dict of float32 arrays (:data:`BANK_CHANNELS`) and ``voxel_mm``.
    """
    model = tpl.load_head_model(voxel_mm)
    shape = tuple(int(round(s / voxel_mm)) for s in size_mm)
    centre = np.asarray(CANVAS_CENTRE_MM, float)
    start_mm = centre - (np.asarray(shape) - 1) / 2.0 * voxel_mm
    idx0 = np.rint((start_mm - model.affine[:3, 3]) / voxel_mm).astype(int)
    hull = model.hull_dist <= 0
    depth = (ndi.distance_transform_edt(hull) * voxel_mm).astype(np.float32)
    full = {
        "gm": model.gm, "wm": model.wm, "csf": model.csf, "depth": depth,
        "hull_dist": model.hull_dist, "ext_dist": model.ext_dist,
        "fat": (model.extras == tpl.FAT).astype(np.float32),
        "eye": (model.extras == tpl.EYE).astype(np.float32),
        "air": ((model.extras == tpl.AIR) & model.head).astype(np.float32),
        "marrow": (model.extras == tpl.MARROW).astype(np.float32),
    }
    out = {}
    for name in BANK_CHANNELS:
        vol = full[name]
        canvas = np.zeros(shape, np.float32)
        src = [slice(max(0, i), min(n, i + s)) for i, s, n in zip(idx0, shape, vol.shape)]
        dst = [slice(a.start - i, a.stop - i) for a, i in zip(src, idx0)]
        canvas[tuple(dst)] = vol[tuple(src)]
        out[name] = canvas
    out["voxel_mm"] = float(voxel_mm)
    return out


def save_bank(bank: dict, path) -> Path:
    """Write the bank as a compressed ``.npz`` of uint8 channels (fractions x255, mm x4)."""
    from qc_pipeline.io import atomic_write_npz

    arrays = {}
    for name in BANK_CHANNELS:
        s = BANK_SCALE.get(name, 255.0)
        arrays[name] = np.clip(np.rint(bank[name] * s), 0, 255).astype(np.uint8)
    arrays["voxel_mm"] = np.asarray(bank["voxel_mm"], np.float32)
    path = Path(path)
    atomic_write_npz(path, **arrays)
    return path

