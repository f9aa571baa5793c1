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
import dataclasses
import json
import logging
import math
import os
import stat
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
    ImageBudgetError,
    InputError,
    NonFiniteError,
    NotThreeDError,
    QCPipelineError,
    VoxelSizeError,
)

__all__ = [
    "InputWarning",
    "load_image",
    "check_image_file",
    "check_scan_file",
    "check_header",
    "validate_image",
    "voxel_sizes",
    "canonical_data",
    "atomic_write_nifti",
    "atomic_write_npz",
    "write_record_npz",
    "read_record_npz",
    "RecordError",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_bytes",
    "to_jsonable",
    "sha256_file",
    "MIN_VOXEL_MM",
    "MAX_VOXEL_MM",
    "MAX_NONFINITE_FRACTION",
    "DEFAULT_MAX_IMAGE_BYTES",
    "MAX_COMPRESSION_RATIO",
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
#: default memory budget of one scan's voxels (declared voxels x max(stored bytes, 4)): a
#: 1 mm head is about 70 MB as float32, a 0.5 mm one under 1 GiB
DEFAULT_MAX_IMAGE_BYTES = 2 * 1024**3
#: a compressed file declaring more than this many times its own size is refused: noisy MR
#: data compresses 2-10 times, while gzip can inflate about 1000 times
MAX_COMPRESSION_RATIO = 100
#: ... from this much declared voxel data up (small, mostly empty test volumes compress well)
COMPRESSION_CHECK_BYTES = 64 * 1024**2
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst")


class InputWarning(UserWarning):
    """A fixable problem with an input scan (squeezed 4D, zeroed NaNs, ...)."""


def _warn(img_warnings: list, source: str, msg: str) -> None:
    line = f"{source}: {msg}"
    img_warnings.append(msg)
    logger.warning(line)
    warnings.warn(line, InputWarning, stacklevel=3)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) implied by an affine: the column norms of its 3x3 part."""
    return nib.affines.voxel_sizes(np.asarray(affine, dtype=float))


def canonical_data(img) -> tuple[np.ndarray, tuple]:
    """``(float32 array, zooms)`` of a nibabel image reoriented to RAS
    (``nibabel.as_closest_canonical``: an exact axis permutation, no interpolation, also for
    oblique scans); a 4D image with one volume is squeezed to 3D. Raises what nibabel raises
    on an unreadable image."""
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    can = nib.as_closest_canonical(img)
    return np.asarray(can.dataobj, dtype=np.float32), tuple(can.header.get_zooms()[:3])


def check_scan_file(path, *, name: str | None = None) -> os.stat_result:
    """Check that ``path`` is a readable, non-empty regular file (links followed) without
    opening it, so that a FIFO, a device or a folder never blocks or floods a reader.

    Returns
    -------
    os.stat_result
        The file's status.

    Raises
    ------
    InputError
        A missing file or broken symlink, a directory, FIFO, device file or socket, or a
        file that cannot be read; :class:`EmptyImageError` for a 0-byte file.
    """
    src = name or os.fspath(path)
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if p.is_symlink():
            raise InputError(src, f"broken symlink to {os.readlink(p)} (git-annex/datalad content "
                                  f"not fetched?)") from None
        raise InputError(src, "file not found") from None
    except PermissionError:
        raise InputError(src, "cannot be read (permission denied)") from None
    except OSError as exc:  # a symlink loop, a name too long, a stale NFS handle
        raise InputError(src, f"cannot be opened ({exc.strerror or exc})") from None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        if st.st_size == 0:
            raise EmptyImageError(src, "file is empty (0 bytes)")
        if not os.access(p, os.R_OK):
            raise InputError(src, "cannot be read (permission denied)")
        return st
    if stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISFIFO(mode):
        kind = "a FIFO (named pipe)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device file"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    else:
        kind = "a special file"
    via = f" (symlink to {os.readlink(p)})" if p.is_symlink() else ""
    raise InputError(src, f"is {kind}{via}, not an image file")


def _gib(n_bytes: float) -> str:
    if n_bytes >= 1024**3:
        return f"{n_bytes / 1024**3:.1f} GiB"
    if n_bytes >= 1024**2:
        return f"{n_bytes / 1024**2:.1f} MiB"
    return f"{n_bytes / 1024:.1f} KiB"


def check_header(img, src: str, *, file_size: int, max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
                 compressed: bool = False) -> None:
    """Judge an image from its header alone, before any voxel is read.

    Parameters
    ----------
    img : nibabel spatial image
        Opened with ``nib.load`` (voxels not read yet).
    src : str
        Name for messages.
    file_size : int
        Size of the file on disk (bytes).
    max_bytes : int or None
        Budget of the voxel data in memory: declared voxels x max(bytes per stored voxel, 4
        for the float32 working copy). ``None`` or 0: no budget.
    compressed : bool
        The file is compressed (``.nii.gz``): its declared size is compared with its own.

    Raises
    ------
    NotThreeDError
        More than one volume (a series is not read to find out).
    ImageBudgetError
        Over the budget, or a compressed file declaring more than ``MAX_COMPRESSION_RATIO``
        times its size (from ``COMPRESSION_CHECK_BYTES`` of declared data up).
    CorruptImageError
        An uncompressed file shorter than its header's voxel data.
    """
    shape = tuple(int(n) for n in img.shape)
    if len(shape) > 3 and math.prod(shape[3:]) > 1:
        raise NotThreeDError(src, f"4D image with {math.prod(shape[3:])} volumes (shape {shape}); "
                                  f"expected one 3D volume")
    try:
        itemsize = np.dtype(img.get_data_dtype()).itemsize
    except (AttributeError, TypeError):
        itemsize = 4
    n_voxels = math.prod(shape)
    stored = n_voxels * itemsize
    in_memory = n_voxels * max(itemsize, 4)
    if max_bytes and in_memory > max_bytes:
        dims = " x ".join(str(n) for n in shape)
        raise ImageBudgetError(src, f"header declares {dims} voxels ({_gib(in_memory)} in memory); "
                                    f"more than the budget of {_gib(max_bytes)} per scan "
                                    f"(--max-image-gb)")
    if compressed and stored > COMPRESSION_CHECK_BYTES and stored > MAX_COMPRESSION_RATIO * file_size:
        raise ImageBudgetError(src, f"{_gib(file_size)} of compressed data declare {_gib(stored)} of "
                                    f"voxels ({stored / max(file_size, 1):.0f} times the file; real "
                                    f"scans compress less than {MAX_COMPRESSION_RATIO} times): a "
                                    f"decompression bomb or a header that lies")
    offset = getattr(getattr(img, "dataobj", None), "offset", None)
    offset = offset if isinstance(offset, int) else 352
    if not compressed and file_size < offset + stored:
        raise CorruptImageError(src, f"truncated: the header declares {stored} bytes of voxels from "
                                     f"byte {offset}, the file has {file_size} bytes")
    # a file far larger than what its header declares would only cost time (hashing it)
    if file_size > 2 * (offset + stored) + 1024**2:
        raise CorruptImageError(src, f"the file ({_gib(file_size)}) is far larger than the "
                                     f"{_gib(offset + stored)} its header declares")


def _open_image(p: Path, src: str):
    """``nib.load`` (header only; the voxels stay on disk) with typed errors."""
    try:
        img = nib.load(str(p))
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorruptImageError(src, f"truncated or corrupt gzip stream ({_short(exc)})") from exc
    except MemoryError as exc:
        raise ImageBudgetError(src, "the header alone does not fit in memory") from exc
    except Exception as exc:  # ImageFileError, HeaderDataError, struct errors, ...
        raise CorruptImageError(src, f"unreadable image header ({_short(exc)})") from exc
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise CorruptImageError(src, f"not a spatial image ({type(img).__name__})")
    return img


def _is_compressed(p: Path) -> bool:
    return p.name.lower().endswith(COMPRESSED_SUFFIXES)


def check_image_file(path, *, name: str | None = None,
                     max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> None:
    """Everything that can be judged without reading voxels: the file itself
    (:func:`check_scan_file`) and its header (:func:`check_header`). Milliseconds, whatever
    the file claims; raises what those raise."""
    src = name or os.fspath(path)
    p = Path(path)
    st = check_scan_file(p, name=src)
    img = _open_image(p, src)
    check_header(img, src, file_size=st.st_size, max_bytes=max_bytes, compressed=_is_compressed(p))


def load_image(path, *, name: str | None = None,
               max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> nib.Nifti1Image:
    """Load and validate one anatomical scan.

    Parameters
    ----------
    path : str or os.PathLike
        A NIfTI file (``.nii`` or ``.nii.gz``; anything nibabel reads as a spatial image
        is accepted and converted).
    name : str, optional
        Label used in error messages (default: the path as given).
    max_bytes : int or None
        Memory budget of the voxel data, checked from the header before any voxel is read
        (:func:`check_header`); ``None`` or 0: no budget.

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
        :class:`VoxelSizeError`, :class:`ImageBudgetError`.
    """
    src = name or os.fspath(path)
    p = Path(path)
    st = check_scan_file(p, name=src)
    img = _open_image(p, src)
    check_header(img, src, file_size=st.st_size, max_bytes=max_bytes, compressed=_is_compressed(p))
    # Read every byte now: truncation must surface here, not in a later node.
    read_warnings: list[str] = []
    _warn_scaling(img, src, read_warnings)
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


def _warn_scaling(img, src: str, img_warnings: list) -> None:
    """Warn about a scl_slope of 0 or inf: nibabel (as the NIfTI standard says for 0) then
    uses the stored values unscaled, which is right only when the writer meant "no scaling";
    a converter that lost the slope gives intensities in the wrong units. NaN is not warned
    about: it is how nibabel itself writes "no scaling", on most files it saves."""
    header = getattr(img, "header", None)
    if not isinstance(header, nib.Nifti1Header):  # also Nifti2Header
        return
    # nibabel moves the scaling into the image's data proxy and blanks the loaded header's
    # fields, so the slope as written is read from the file's header again
    try:
        holder = img.file_map.get("header") or img.file_map["image"]
        with holder.get_prepare_fileobj("rb") as fobj:
            raw = type(header).from_fileobj(fobj, check=False)
        slope = float(np.asarray(raw["scl_slope"]))
    except Exception:  # noqa: BLE001 - the voxels' own read reports a broken file
        return
    if slope == 0 or np.isinf(slope):
        _warn(img_warnings, src, f"scl_slope is {slope:g}; the stored values are used unscaled "
                                 f"(slope 1, intercept 0)")


def _voxel_values(img, src: str, img_warnings: list) -> np.ndarray:
    """The voxel values as float32: the magnitude of complex data (with a warning), a clear
    error for RGB or other structured data."""
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


class RecordError(QCPipelineError, ValueError):
    """A record file (:func:`read_record_npz`) is unreadable or holds what was not expected."""


_RECORD_KEY = "__record__"
_TAG = "__t__"


def _type_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def write_record_npz(obj, path, *, types) -> Path:
    """Write a record into one uncompressed NPZ, atomically: a dataclass of ``types`` whose
    fields hold arrays, NumPy scalars, dataclasses of ``types``, dicts, lists, tuples and JSON
    scalars. Every array and NumPy scalar is an entry of its own (dtype and value exact), the
    structure is JSON (Python floats, NaN included, round-trip exactly). Unlike a pickle, the
    file can be opened with NumPy alone and reading it runs no code.
    """
    names = {_type_name(t) for t in types}
    arrays: dict = {}

    def enc(v):
        if isinstance(v, (np.ndarray, np.generic)):
            a = np.asarray(v)
            if a.dtype.hasobject:
                raise RecordError(f"{path}: an array of Python objects cannot go into a record")
            key = f"a{len(arrays)}"
            arrays[key] = a
            return {_TAG: "array", "key": key, "scalar": isinstance(v, np.generic)}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            name = _type_name(type(v))
            if name not in names:
                raise RecordError(f"{path}: a {name} cannot go into this record (expected one of {sorted(names)})")
            return {_TAG: "dataclass", "type": name,
                    "fields": {f.name: enc(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}}
        if isinstance(v, tuple):
            return {_TAG: "tuple", "items": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if isinstance(v, dict):
            return {_TAG: "dict", "items": [[enc(k), enc(x)] for k, x in v.items()]}
        if v is None or type(v) in (bool, int, float, str):
            return v
        raise RecordError(f"{path}: a {type(v).__name__} cannot go into a record")

    meta = json.dumps(enc(obj), allow_nan=True)
    arrays[_RECORD_KEY] = np.frombuffer(meta.encode("utf-8"), dtype=np.uint8)
    return _atomic(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def read_record_npz(path, *, types):
    """The record :func:`write_record_npz` wrote, rebuilt with the dataclasses of ``types``
    (a type not among them is refused)."""
    by_name = {_type_name(t): t for t in types}
    try:
        with np.load(path, allow_pickle=False) as z:
            entries = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zlib.error) as exc:
        raise RecordError(f"{path}: not a readable record file ({exc})") from exc
    if _RECORD_KEY not in entries:
        raise RecordError(f"{path}: not a record file (no {_RECORD_KEY} entry)")

    def dec(v):
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        tag = v.get(_TAG)
        if tag == "array":
            a = entries[v["key"]]
            return a[()] if v["scalar"] else a
        if tag == "tuple":
            return tuple(dec(x) for x in v["items"])
        if tag == "dict":
            return {dec(k): dec(x) for k, x in v["items"]}
        if tag == "dataclass":
            cls = by_name.get(v["type"])
            if cls is None:
                raise RecordError(f"{path}: holds a {v['type']}, expected one of {sorted(by_name)}")
            return cls(**{k: dec(x) for k, x in v["fields"].items()})
        raise RecordError(f"{path}: unknown record entry {v!r:.80}")

    try:
        meta = json.loads(bytes(entries[_RECORD_KEY]).decode("utf-8"))
        return dec(meta)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError(f"{path}: a broken record ({exc})") from exc


def atomic_write_bytes(data: bytes, path) -> Path:
    """Write bytes atomically."""

    def _w(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)

    return _atomic(path, _w)


def atomic_write_text(text: str, path, encoding: str = "utf-8") -> Path:
    """Write text atomically."""
    return atomic_write_bytes(text.encode(encoding), path)


def to_jsonable(obj):
    """``obj`` as plain JSON values: containers recursively, NumPy arrays and scalars as Python
    ones, non-finite floats as None (JSON has no NaN), paths and anything else as text."""
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return str(obj)


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
    """Hex SHA-256 of a regular file's bytes.

    The file is opened without blocking and checked to be a regular file before a byte is
    read (a FIFO or a link to ``/dev/zero`` would block or never end), and at most its size
    at opening is read, so the time is bounded by the file's size.

    Raises
    ------
    InputError
        ``path`` is not a regular file.
    OSError
        It cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(os.fspath(path), flags)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputError(path, "not a regular file; not read")
        h = hashlib.sha256()
        left = st.st_size
        while left > 0:
            block = fh.read(min(chunk_size, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()
