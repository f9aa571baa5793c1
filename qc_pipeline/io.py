"""Loading and validating scans; atomic writes; checksums.

``load_image`` reads the *whole* file up front (so a truncated gzip fails here, with a typed
error naming the file, and not later inside a worker), checks that it is one 3D volume with
sane voxel sizes and finite, non-blank data, and returns an in-memory ``nib.Nifti1Image``
(float32 data, original affine/header). Problems raise a subclass of
:class:`qc_pipeline.errors.InputError`; fixable oddities are repaired and reported as
:class:`InputWarning` (also listed in ``img.extra["qc_warnings"]`` so the caller can carry
them into the scan's ``*_qc.json``).

Non-finite policy: if more than ``MAX_NONFINITE_FRACTION`` (1 %) of the voxels are NaN/inf
the scan is rejected (:class:`NonFiniteError`); otherwise those voxels are set to 0 with a
warning.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tempfile
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import (
    BlankImageError,
    CorruptImageError,
    EmptyImageError,
    InputError,
    NonFiniteError,
    NotThreeDError,
    VoxelSizeError,
)

__all__ = [
    "InputWarning",
    "load_image",
    "validate_image",
    "voxel_sizes",
    "canonical_data",
    "atomic_write_nifti",
    "atomic_write_npz",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_bytes",
    "sha256_file",
    "MIN_VOXEL_MM",
    "MAX_VOXEL_MM",
    "MAX_NONFINITE_FRACTION",
]

logger = logging.getLogger(__name__)

#: voxel sizes outside [MIN_VOXEL_MM, MAX_VOXEL_MM] are rejected
MIN_VOXEL_MM = 0.2
MAX_VOXEL_MM = 8.0
#: more NaN/inf voxels than this fraction -> NonFiniteError, else they are zeroed
MAX_NONFINITE_FRACTION = 0.01
#: a spatial axis shorter than this many voxels makes the image "2D" (a slice or a slab)
MIN_AXIS_VOXELS = 4
#: fewer non-zero voxels than this fraction -> BlankImageError
MIN_NONZERO_FRACTION = 1e-3


class InputWarning(UserWarning):
    """A fixable problem with an input scan (squeezed 4D, zeroed NaNs, ...)."""


def _warn(img_warnings: list, source: str, msg: str) -> None:
    line = f"{source}: {msg}"
    img_warnings.append(msg)
    logger.warning(line)
    warnings.warn(line, InputWarning, stacklevel=3)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) implied by an affine: the column norms of its 3x3 part."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    return np.sqrt((a**2).sum(axis=0))


def canonical_data(img) -> tuple[np.ndarray, tuple]:
    """``(float32 array, zooms)`` of a nibabel image reoriented to RAS
    (``nibabel.as_closest_canonical``: an exact axis permutation, no interpolation, also for
    oblique scans); a 4D image with one volume is squeezed to 3D. Raises what nibabel raises
    on an unreadable image."""
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    can = nib.as_closest_canonical(img)
    return np.asarray(can.dataobj, dtype=np.float32), tuple(can.header.get_zooms()[:3])


def load_image(path, *, name: str | None = None) -> nib.Nifti1Image:
    """Load and validate one anatomical scan.

    Parameters
    ----------
    path : str or os.PathLike
        A NIfTI file (``.nii`` or ``.nii.gz``; anything nibabel reads as a spatial image
        is accepted and converted).
    name : str, optional
        Label used in error messages (default: the path as given).

    Returns
    -------
    nibabel.Nifti1Image
        In-memory float32 image with the file's affine and header; ``img.extra`` holds
        ``"qc_warnings"`` (list of str) and ``"source"`` (the path).

    Raises
    ------
    InputError
        Or one of its subclasses: :class:`EmptyImageError`, :class:`CorruptImageError`,
        :class:`NotThreeDError`, :class:`NonFiniteError`, :class:`BlankImageError`,
        :class:`VoxelSizeError`.
    """
    src = name or os.fspath(path)
    p = Path(path)
    if not p.exists():
        hint = " (broken symlink: git-annex/datalad content not fetched?)" if p.is_symlink() else ""
        raise InputError(src, f"file not found{hint}")
    if p.is_dir():
        raise InputError(src, "is a directory, not an image file")
    size = p.stat().st_size
    if size == 0:
        raise EmptyImageError(src, "file is empty (0 bytes)")
    try:
        img = nib.load(str(p))
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorruptImageError(src, f"truncated or corrupt gzip stream ({_short(exc)})") from exc
    except Exception as exc:  # ImageFileError, HeaderDataError, struct errors, ...
        raise CorruptImageError(src, f"unreadable image header ({_short(exc)})") from exc
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise CorruptImageError(src, f"not a spatial image ({type(img).__name__})")
    # Read every byte now: truncation must surface here, not in a later node.
    read_warnings: list[str] = []
    try:
        data = _voxel_values(img, src, read_warnings)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorruptImageError(src, f"truncated or corrupt gzip stream ({_short(exc)})") from exc
    except (OSError, ValueError, MemoryError) as exc:
        raise CorruptImageError(src, f"image data cannot be read completely ({_short(exc)})") from exc
    header = img.header.copy() if isinstance(img, nib.Nifti1Image) else None
    out = nib.Nifti1Image(data, img.affine, header)
    out.set_data_dtype(np.float32)
    out.header.set_slope_inter(1.0, 0.0)
    out.extra["source"] = os.fspath(path)
    out.extra["qc_warnings"] = read_warnings
    return validate_image(out, name=src)


def _voxel_values(img, src: str, img_warnings: list) -> np.ndarray:
    """The voxel values as float32: the magnitude of complex data (with a warning), a clear
    error for RGB or other structured data. (A scl_slope of 0, NaN or inf means "unscaled" to
    nibabel, as the NIfTI standard says for 0.)"""
    try:
        dtype = np.dtype(img.get_data_dtype())
    except (AttributeError, TypeError):
        dtype = np.asarray(img.dataobj).dtype
    if dtype.names or dtype.kind == "V":
        raise CorruptImageError(src, f"voxels of data type {dtype} (RGB or structured); expected "
                                     f"one grey value per voxel")
    if dtype.kind == "c":
        _warn(img_warnings, src, f"complex voxels ({dtype}); their magnitude is screened")
        return np.abs(np.asarray(img.dataobj)).astype(np.float32)
    return np.asarray(img.dataobj, dtype=np.float32)


def validate_image(img: nib.spatialimages.SpatialImage, *, name: str | None = None) -> nib.Nifti1Image:
    """Check an in-memory image; return a (possibly squeezed / NaN-zeroed) Nifti1Image.

    Same checks and errors as :func:`load_image` (minus file-level ones). Warnings are
    appended to ``img.extra["qc_warnings"]`` of the returned image.
    """
    src = name or getattr(img, "extra", {}).get("source") or "<in-memory image>"
    extra = dict(getattr(img, "extra", {}) or {})
    img_warnings = list(extra.get("qc_warnings", []))
    data = _voxel_values(img, src, img_warnings)
    affine = np.asarray(img.affine, dtype=float)

    # --- dimensionality -------------------------------------------------------------
    shape = data.shape
    if data.size == 0:
        raise EmptyImageError(src, f"image has no voxels (shape {shape})")
    if data.ndim > 3:
        extra_dims = shape[3:]
        n_vol = int(np.prod(extra_dims))
        if n_vol > 1:
            raise NotThreeDError(src, f"4D image with {n_vol} volumes (shape {shape}); expected one 3D volume")
        data = data.reshape(shape[:3])
        _warn(img_warnings, src, f"4D image with a single volume (shape {shape}) squeezed to 3D")
    if data.ndim < 3 or min(data.shape) < MIN_AXIS_VOXELS:
        raise NotThreeDError(src, f"image is 2D or a thin slab (shape {shape}); expected a 3D volume")

    # --- geometry -------------------------------------------------------------------
    if not np.all(np.isfinite(affine)):
        raise VoxelSizeError(src, "affine contains NaN/inf")
    det = float(np.linalg.det(affine[:3, :3]))
    zooms = voxel_sizes(affine)
    if not np.isfinite(det) or abs(det) < 1e-6 * max(float(np.prod(zooms)), 1e-12) or abs(det) < 1e-9:
        raise VoxelSizeError(src, "degenerate affine (singular 3x3 part)")
    if np.any(zooms < MIN_VOXEL_MM) or np.any(zooms > MAX_VOXEL_MM):
        z = ", ".join(f"{v:.3g}" for v in zooms)
        raise VoxelSizeError(
            src, f"absurd voxel size ({z}) mm; expected each between {MIN_VOXEL_MM} and {MAX_VOXEL_MM} mm"
        )

    # --- values ---------------------------------------------------------------------
    finite = np.isfinite(data)
    n_bad = int(data.size - np.count_nonzero(finite))
    if n_bad:
        frac = n_bad / data.size
        if frac > MAX_NONFINITE_FRACTION:
            raise NonFiniteError(
                src, f"{frac:.1%} of voxels are NaN/inf (more than {MAX_NONFINITE_FRACTION:.0%} allowed)"
            )
        data = np.where(finite, data, np.float32(0))
        _warn(img_warnings, src, f"{n_bad} NaN/inf voxels ({frac:.3%}) set to 0")
    dmin, dmax = float(data.min()), float(data.max())
    if dmax == dmin:
        what = "all zero" if dmax == 0 else f"constant (every voxel = {dmax:g})"
        raise BlankImageError(src, f"image is {what}")
    nonzero = np.count_nonzero(data != np.median(data))
    if nonzero < MIN_NONZERO_FRACTION * data.size:
        raise BlankImageError(src, f"image is nearly blank ({nonzero} voxels differ from the background)")

    header = img.header.copy() if isinstance(img, nib.Nifti1Image) else None
    out = nib.Nifti1Image(data, affine, header)
    out.set_data_dtype(np.float32)
    out.header.set_slope_inter(1.0, 0.0)
    extra["qc_warnings"] = img_warnings
    extra.setdefault("source", src)
    out.extra.update(extra)
    return out


def _short(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


# --------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------
def _atomic(path, write_to_tmp, suffix: str = "") -> Path:
    """Write through a temp file in the target's folder, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        write_to_tmp(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _nifti_suffix(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return ext
    raise ValueError(f"{path}: expected a .nii or .nii.gz file name")


def atomic_write_file(path, write_to_tmp) -> Path:
    """Write ``path`` atomically through ``write_to_tmp(tmp_path)`` (e.g. ``torch.save``):
    temp file in the target's folder, fsync, permissions from the umask, ``os.replace``."""
    return _atomic(path, write_to_tmp)


def atomic_write_nifti(img: nib.spatialimages.SpatialImage, path) -> Path:
    """Save ``img`` to ``path`` (``.nii`` / ``.nii.gz``) atomically; returns the path."""
    path = Path(path)
    return _atomic(path, lambda tmp: nib.save(img, tmp), suffix=_nifti_suffix(path))


def atomic_write_npz(path, **arrays) -> Path:
    """``numpy.savez_compressed(path, **arrays)`` atomically (``path`` should end in ``.npz``,
    which NumPy would otherwise append); returns the path."""
    return _atomic(path, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".npz")


def atomic_write_bytes(data: bytes, path) -> Path:
    """Write bytes atomically."""

    def _w(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)

    return _atomic(path, _w)


def atomic_write_text(text: str, path, encoding: str = "utf-8") -> Path:
    """Write text atomically."""
    return atomic_write_bytes(text.encode(encoding), path)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def atomic_write_json(obj, path, *, indent: int = 2) -> Path:
    """Serialise ``obj`` to JSON (NumPy scalars/arrays allowed) and write it atomically.

    The object is serialised *before* the temp file is created, so an unserialisable
    object never leaves anything on disk.
    """
    text = json.dumps(obj, indent=indent, default=_json_default, allow_nan=False) + "\n"
    return atomic_write_text(text, path)


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()
