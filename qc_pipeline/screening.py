"""One scan, start to finish: the participant level's steps as plain functions.

The Nipype nodes of the participant level (:mod:`qc_pipeline.workflows.interfaces`) are thin wrappers
around the steps here, so :func:`screen` (the call for library users: one NIfTI in, its
``_qc.json`` record out) gives the app's answer by construction::

    from qc_pipeline.screening import screen
    rec = screen("sub-01_T1w.nii.gz")              # packaged model of the file's suffix
    rec["qc_score"], rec["anomaly_fraction"]

Steps, in the order the data flows: :func:`load_scan` (file checks, checksum, validation),
:func:`preprocess_scan` (the model grid, skull strip, z-score and the native-image
measurements), :func:`engine_step` (IterMask3D, its mask against the model's normal error,
the QC score) and :func:`qc_pipeline.derivatives.write_scan_outputs` /
:func:`qc_pipeline.derivatives.ok_record` (native-space masks and the record).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

from .bids import ScanRecord, bids_name_of
from .config import SUFFIXES
from .derivatives import ok_record, one_line, prep_fields, write_scan_outputs

LOGGER = logging.getLogger(__name__)

__all__ = ["load_scan", "preprocess_scan", "skull_strip_device", "get_model", "clear_model_cache",
           "engine_step", "engine_batch", "scan_record_for", "screen"]

_MODEL_CACHE: dict[tuple, Any] = {}
_MODEL_LOCK = threading.Lock()
_STRIP_FALLBACK_SAID: list = []


def load_scan(path, *, name: Optional[str] = None, max_image_bytes: int = 0):
    """Check, checksum and load one scan: ``(image, input_sha256, warnings)``.

    The file type and header come first (:func:`qc_pipeline.io.check_image_file`), so a FIFO
    or a decompression bomb is never hashed nor inflated; ``max_image_bytes`` 0 is the
    package's budget.

    Raises
    ------
    qc_pipeline.errors.InputError
        The file cannot be screened; the message starts with ``name``.
    """
    from .io import DEFAULT_MAX_IMAGE_BYTES, check_image_file, load_image, sha256_file

    budget = max_image_bytes or DEFAULT_MAX_IMAGE_BYTES
    check_image_file(path, name=name, max_bytes=budget)
    sha = sha256_file(path)
    img = load_image(path, name=name, max_bytes=budget)
    return img, sha, [str(w) for w in img.extra.get("qc_warnings", [])]


def preprocess_scan(img, *, voxel_size, grid, skull_strip: str = "auto", contrast: str = "T1w",
                    name: Optional[str] = None, device: str = "cpu"):
    """The model-grid image of a loaded scan (:func:`qc_pipeline.preproc.preprocess`)
    with the native-image measurements (background statistic, spectral peak) in its ``info``.

    ``device`` "cuda" runs the skull-strip network (deepbet) on this process's GPU when it
    has one, else on the CPU (a preprocessing job of a GPU run may land on a CPU node).
    """
    from .preproc import preprocess
    from .qc.score import native_measurements

    prep = preprocess(img, voxel_size=tuple(voxel_size), grid=tuple(grid), skull_strip=skull_strip,
                      name=name, contrast=contrast, strip_kwargs={"device": skull_strip_device(device)})
    native = native_measurements(img)  # odd data gives available=False, never an exception
    prep.info.background, prep.info.spectrum = native["background"], native["spectrum"]
    return prep


def skull_strip_device(device: str) -> str:
    """The device for the skull-strip network: ``device`` when this process can use it, else
    "cpu" (said once in the log)."""
    if str(device) == "cpu":
        return "cpu"
    from .engine.inference import cuda_problem

    problem = cuda_problem()
    if problem:
        if not _STRIP_FALLBACK_SAID:
            _STRIP_FALLBACK_SAID.append(device)
            LOGGER.info("skull strip on the CPU in process %d: %s", os.getpid(), problem)
        return "cpu"
    return str(device)


def get_model(model_dir: Optional[str], contrast: str, device: str, *, expect_id: Optional[str] = None,
              expect_key: Optional[str] = None):
    """The IterMask3D model of ``model_dir`` (``None``: packaged default of ``contrast``),
    loaded once per process and device.

    With ``expect_id`` / ``expect_key`` (the folder's content key), a cached model of another
    id or content (the folder was rewritten, e.g. by the adapt level or by hand) is loaded
    again, and a folder that still holds another one raises
    :class:`~qc_pipeline.engine.errors.ModelCardError`.
    """
    from .engine import IterMask3D
    from .engine.errors import ModelCardError
    from .engine.inference import torch_build

    key = (str(model_dir) if model_dir else f"<packaged:{contrast}>", str(device))
    with _MODEL_LOCK:
        model = _MODEL_CACHE.get(key)
        if (model is None or (expect_id and model.model_id != expect_id)
                or (expect_key and model.model_key != expect_key)):
            LOGGER.info("loading IterMask3D model %s on %s with %s (pid %d)", key[0], device, torch_build(),
                        os.getpid())
            model = IterMask3D.from_folder(model_dir or None, device=device, contrast=contrast)
            _MODEL_CACHE[key] = model
    if expect_id and model.model_id != expect_id:
        raise ModelCardError(f"model folder {key[0]} holds {model.model_id!r}, expected "
                             f"{expect_id!r} (it was replaced after the run started)")
    if expect_key and model.model_key != expect_key:
        raise ModelCardError(f"model folder {key[0]} holds content {model.model_key}, expected "
                             f"{expect_key} (it was rewritten after the run started)")
    return model


def clear_model_cache() -> None:
    """Forget the models :func:`get_model` loaded (a folder rewritten in place, e.g. by the adapt level)."""
    with _MODEL_LOCK:
        _MODEL_CACHE.clear()


def engine_step(model, prep, *, schedule: str = "auto", seed: int = 0, name: Optional[str] = None):
    """IterMask3D on a preprocessed scan, its mask kept where the error beats the model's
    normal error, and the QC score: ``(Result, QCScore.to_dict())``.

    A failing image-quality measurement never fails the scan: the quality is then ``{}``
    (a warning naming ``name`` says why) and the scan keeps its anomaly score.
    """
    res = model.run(prep.image, prep.brain_mask, voxel_size=tuple(prep.info.voxel_size),
                    schedule=None if schedule == "auto" else schedule, seed=seed)
    return _finish_engine(model, prep, res, name)


def engine_batch(model, preps, *, schedule: str = "auto", seed: int = 0,
                 names: Optional[list] = None) -> list:
    """:func:`engine_step` over several preprocessed scans, their forward passes stacked
    (:meth:`qc_pipeline.engine.IterMask3D.run_batch`: a scan's result does not depend on the
    batch). Returns, per scan in order, ``(Result, quality)`` or the exception that scan
    raised: one bad scan never fails the others.
    """
    names = list(names) if names is not None else [None] * len(preps)
    sizes = {tuple(float(v) for v in p.info.voxel_size) for p in preps}
    try:
        if len(sizes) != 1:
            raise ValueError(f"scans on {len(sizes)} different grids cannot share a batch")
        results = model.run_batch([p.image for p in preps], [p.brain_mask for p in preps],
                                  voxel_size=sizes.pop(), seed=seed,
                                  schedule=None if schedule == "auto" else schedule)
    except Exception as exc:  # noqa: BLE001 - a scan the batch refuses is screened alone
        LOGGER.info("engine batch of %d scans screened one by one (%s)", len(preps), one_line(exc))
        return [_attempt(engine_step, model, p, schedule=schedule, seed=seed, name=n)
                for p, n in zip(preps, names)]
    return [_attempt(_finish_engine, model, p, r, n) for p, r, n in zip(preps, results, names)]


def _attempt(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the caller records it as that scan's error
        return exc


def _finish_engine(model, prep, res, name):
    """The loop's result against the model's normal error, and the QC score."""
    from .qc.score import scan_quality

    res = model.against_normal_error(
        res, grid_affine=getattr(prep.info, "grid_affine", None),
        template_to_world=(getattr(prep.info, "prior", None) or {}).get("affine"))
    try:
        quality = scan_quality(prep, res, model.card).to_dict()
    except Exception as exc:  # noqa: BLE001 - a measurement never fails the scan
        LOGGER.warning("%s: QC-score measurements failed (%s); the scan keeps its anomaly score",
                       name or "scan", one_line(exc))
        quality = {}
    quality.update(_regions(prep, res, name))
    return res, quality


def _regions(prep, res, name) -> dict:
    """The qc.json's ``anomaly_region_count`` and ``anomaly_regions`` (the largest connected
    regions of the final mask, :func:`qc_pipeline.qc.regions.anomaly_regions`); empty when
    the preprocessing recorded no grid affine or the description fails."""
    from .qc.regions import anomaly_regions

    grid_affine = getattr(prep.info, "grid_affine", None)
    if grid_affine is None:
        return {}
    try:
        n, regions = anomaly_regions(
            res.mask, brain_mask=prep.brain_mask, grid_affine=grid_affine, error_map=res.error_map,
            template_to_world=(getattr(prep.info, "prior", None) or {}).get("affine"))
    except Exception as exc:  # noqa: BLE001 - a description never fails the scan
        LOGGER.warning("%s: the anomaly regions could not be described (%s)", name or "scan", one_line(exc))
        return {}
    return {"anomaly_region_count": n, "anomaly_regions": [r.to_dict() for r in regions]}


def scan_record_for(path, *, contrast: Optional[str] = None) -> ScanRecord:
    """A :class:`~qc_pipeline.bids.ScanRecord` for a file outside any BIDS dataset: entities
    from its name where it follows BIDS (``sub-01_acq-x_T1w.nii.gz``), the suffix from
    ``contrast`` or the name (default ``T1w``), the subject from the name or its stem."""
    from bids.layout import parse_file_entities

    p = Path(path).absolute()
    stem = bids_name_of(p)
    # pybids reads sub-/ses- only after a path separator
    ents = {k: str(v) for k, v in parse_file_entities("/" + p.name).items()}
    suffix = contrast or (ents.get("suffix") if ents.get("suffix") in SUFFIXES else None) or "T1w"
    ents.update(suffix=suffix, datatype="anat")
    ents.setdefault("subject", stem)
    return ScanRecord(path=str(p), relpath=p.name, bids_name=stem, entities=ents)


def screen(path, *, model_dir=None, contrast: Optional[str] = None, device: str = "cpu",
           schedule: str = "auto", seed: int = 0, skull_strip: str = "auto",
           max_image_bytes: int = 0, output_dir=None, model=None) -> dict[str, Any]:
    """Screen one NIfTI as the participant level does; returns its ``_qc.json`` record.

    Parameters
    ----------
    path : path-like
        The scan (any folder; BIDS entities are read from the name where it has them).
    model_dir : path-like, optional
        Model folder; default the packaged model of ``contrast``.
    contrast : {"T1w", "T2w", "FLAIR"}, optional
        Default: the file name's suffix, else T1w.
    device, schedule, seed, skull_strip, max_image_bytes
        As the participant level's options.
    output_dir : path-like, optional
        Also write the derivatives there (``<name>_desc-anomaly_mask.nii.gz``, error map,
        candidate mask, ``<name>_qc.json``), as the app writes them; without it nothing is
        written and the record's ``*_file`` fields are None.
    model : qc_pipeline.engine.IterMask3D, optional
        An already loaded model (screening many files loads it once); overrides
        ``model_dir`` and ``device``.

    Raises
    ------
    qc_pipeline.errors.InputError
        The scan cannot be screened (the app writes the message as the scan's error row).
    qc_pipeline.engine.errors.EngineError
        The model folder is missing or broken.
    """
    import nibabel as nib

    from .engine import IterMask3D
    from .config import DEFAULT_GRID, DEFAULT_VOXEL_SIZE

    t0 = time.perf_counter()
    scan = scan_record_for(path, contrast=contrast)
    if model is None:
        model = IterMask3D.from_folder(model_dir, device=device, contrast=scan.suffix)
    img, sha, load_warnings = load_scan(path, name=scan.relpath, max_image_bytes=max_image_bytes)
    prep = preprocess_scan(img, voxel_size=model.voxel_size or DEFAULT_VOXEL_SIZE,
                           grid=model.grid or DEFAULT_GRID, skull_strip=skull_strip,
                           contrast=scan.suffix, name=scan.relpath,
                           device="cuda" if str(model.device).startswith("cuda") else "cpu")
    res, quality = engine_step(model, prep, schedule=schedule, seed=seed, name=scan.relpath)
    warnings = list(dict.fromkeys(load_warnings + [str(w) for w in prep.warnings]))
    common = dict(model_id=model.model_id, model_key=model.model_key,
                  model_adapted_from=(model.card.get("adaptation") or {}).get("base_model_id"),
                  schedule=schedule, device=model.device.type, input_sha256=sha,
                  quality=quality or None, warnings=warnings)
    if output_dir is not None:
        from .derivatives import read_qc

        return read_qc(write_scan_outputs(output_dir, scan, prep, res, nib.load(str(path)),
                                          runtime_s=time.perf_counter() - t0, **common))
    return ok_record(scan, res.to_dict(), runtime_s=time.perf_counter() - t0, **prep_fields(prep), **common)
