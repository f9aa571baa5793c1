"""BIDS-Derivatives written by the participant level: names, records and atomic writes.

Layout (``OUTPUT_DIR``)::

    dataset_description.json                 DatasetType "derivative", GeneratedBy, model ids
    logs/config-<runid>.json                 settings snapshot of each run
    logs/itermask-qc-<runid>.log             log file of each run
    sub-<label>.html                         per-subject report
    sub-<label>/[ses-<label>/]anat/
        <source>_desc-anomaly_mask.nii.gz    anomaly mask, native space and affine (uint8)
        <source>_desc-error_map.nii.gz       error map, native space and affine (float32)
        <source>_desc-candidate_mask.nii.gz  the mask before the model's spread rule (uint8;
                                             only models with a spread map): the group level's start
        <source>_qc.json                     the scan's record (status ok | error)

``<source>`` is the scan's file name without extension, so every entity (sub, ses, acq, ce,
rec, run, ..., suffix) is carried over. The ``_qc.json`` fields are listed in
:data:`QC_FIELDS` (``docs/outputs.md`` describes each).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from . import __version__
from .bids import ScanRecord
from .io import atomic_write_json


MASK_DESC = "desc-anomaly_mask"
#: the mask against the model's median normal error alone (models with a spread map)
CANDIDATE_MASK_DESC = "desc-candidate_mask"
ERROR_MAP_DESC = "desc-error_map"
#: written by the group level (qc_pipeline.sitenorm): the engine's mask (the candidate mask
#: when there is one) against the site's scans
SITE_MASK_DESC = "desc-siteanomaly_mask"

#: every field of ``<source>_qc.json``, in the order written
QC_FIELDS = (
    "status", "error", "warnings",
    "bids_name", "source_file", "source_path", "entities", "site", "metadata",
    "qc_score", "qc_score_driver", "qc_score_contributors",
    "anomaly_voxels", "anomaly_fraction", "anomaly_mm3", "raw_anomaly_voxels", "raw_anomaly_fraction",
    "normal_error", "candidate_anomaly_voxels", "candidate_anomaly_fraction",
    "anomaly_region_count", "anomaly_regions",
    "quality_features", "quality_z", "qc_score_reference",
    "tau_curve", "tau_stop", "fit", "forward_passes", "mean_error",
    "background_artifact_fraction", "background", "spectrum",
    "model_id", "model_key", "model_adapted_from", "schedule", "device", "input_sha256", "package_version", "runtime_s",
    "template_fit", "mask_file", "error_map_file", "candidate_mask_file",
)

RESULT_FIELDS = ("anomaly_voxels", "anomaly_fraction", "anomaly_mm3", "raw_anomaly_voxels",
                 "raw_anomaly_fraction", "normal_error", "candidate_anomaly_voxels",
                 "candidate_anomaly_fraction", "tau_curve", "tau_stop",
                 "fit", "forward_passes", "mean_error")


def _jf(v) -> Optional[float]:
    """A finite float or None (JSON has no NaN)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def site_mask_path(qc_json: str | os.PathLike, bids_name: str) -> Path:
    """The group level's ``desc-siteanomaly_mask`` of a scan, beside its qc.json."""
    return Path(qc_json).parent / f"{bids_name}_{SITE_MASK_DESC}.nii.gz"


def output_paths(output_dir: str | os.PathLike, scan: ScanRecord | Mapping) -> dict[str, Path]:
    """Where the derivatives of ``scan`` go: ``{"dir", "mask", "candidate_mask", "error_map",
    "site_mask", "qc_json"}``."""
    if isinstance(scan, Mapping):
        scan = ScanRecord.from_dict(dict(scan))
    folder = Path(output_dir) / scan.out_reldir
    stem = scan.bids_name
    return {
        "dir": folder,
        "mask": folder / f"{stem}_{MASK_DESC}.nii.gz",
        "candidate_mask": folder / f"{stem}_{CANDIDATE_MASK_DESC}.nii.gz",
        "error_map": folder / f"{stem}_{ERROR_MAP_DESC}.nii.gz",
        "site_mask": folder / f"{stem}_{SITE_MASK_DESC}.nii.gz",
        "qc_json": folder / f"{stem}_qc.json",
    }


def _atomic_json(obj: Any, path: Path) -> Path:
    return atomic_write_json(obj, path)


#: the qc.json fields that the QC score (``qc_pipeline.qc.score.combine(...).to_dict()``) fills
QUALITY_FIELDS = ("qc_score", "qc_score_driver", "qc_score_contributors", "quality_features", "quality_z",
                  "qc_score_reference")
#: the qc.json fields that describe the engine's mask region by region (:mod:`qc_pipeline.qc.regions`);
#: they travel with the measurements and a rescoring keeps them
REGION_FIELDS = ("anomaly_region_count", "anomaly_regions")


def one_line(text: Any, limit: int = 400) -> str:
    """Collapse whitespace so a reason always fits on one line."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def base_record(scan: ScanRecord | Mapping, *, model_id: Optional[str], schedule: str,
                device: str, input_sha256: Optional[str],
                model_adapted_from: Optional[str] = None,
                model_key: Optional[str] = None) -> dict[str, Any]:
    """The fields every ``_qc.json`` has, scores empty. ``model_key``: the model folder's
    content key (:func:`qc_pipeline.engine.modelio.model_content_key`)."""
    if isinstance(scan, Mapping):
        scan = ScanRecord.from_dict(dict(scan))
    rec: dict[str, Any] = {k: None for k in QC_FIELDS}
    rec.update(
        status="error",
        warnings=[],
        bids_name=scan.bids_name,
        source_file=scan.relpath,
        source_path=str(scan.path),
        entities=dict(scan.entities),
        site=scan.site,
        metadata=dict(scan.metadata),
        model_id=model_id,
        model_key=model_key or None,
        model_adapted_from=model_adapted_from or None,
        schedule=schedule,
        device=device,
        input_sha256=input_sha256,
        package_version=__version__,
    )
    return rec


def write_error_qc(output_dir, scan, reason: str, *, model_id=None, schedule="auto", device="cpu",
                   input_sha256=None, warnings: Iterable[str] = (), runtime_s=None,
                   model_adapted_from=None, model_key=None) -> Path:
    """Write ``<source>_qc.json`` with ``status: "error"`` and a one-line ``error``.

    Stale images of an earlier successful run are removed so that the folder never pairs
    an error record with an old mask.
    """
    paths = output_paths(output_dir, scan)
    rec = base_record(scan, model_id=model_id, schedule=schedule, device=device,
                      input_sha256=input_sha256, model_adapted_from=model_adapted_from,
                      model_key=model_key)
    rec["error"] = one_line(reason)
    rec["warnings"] = [one_line(w) for w in warnings]
    rec["runtime_s"] = None if runtime_s is None else round(float(runtime_s), 3)
    for key in ("mask", "error_map", "site_mask"):
        try:
            paths[key].unlink()
        except FileNotFoundError:
            pass
    return _atomic_json(rec, paths["qc_json"])


def write_ok_qc(output_dir, scan, result: Mapping[str, Any], **fields) -> Path:
    """Write ``<source>_qc.json`` with ``status: "ok"`` (call after the images are written):
    :func:`ok_record` with this output folder's file names, written atomically."""
    paths = output_paths(output_dir, scan)
    return _atomic_json(ok_record(scan, result, paths=paths, **fields), paths["qc_json"])


def ok_record(scan, result: Mapping[str, Any], *, model_id, schedule, device,
              input_sha256, warnings: Iterable[str] = (), runtime_s=None,
              model_adapted_from: Optional[str] = None,
              model_key: Optional[str] = None,
              background: Optional[Mapping[str, Any]] = None,
              quality: Optional[Mapping[str, Any]] = None,
              spectrum: Optional[Mapping[str, Any]] = None,
              template_fit: Optional[Mapping[str, Any]] = None,
              paths: Optional[Mapping[str, Path]] = None) -> dict[str, Any]:
    """The ``status: "ok"`` record of a screened scan (``result``: ``Result.to_dict()``).

    ``background``: the out-of-head statistic
    (:meth:`qc_pipeline.qc.background.BackgroundStats.to_dict`), written as ``background``;
    its ``background_artifact_fraction`` (None when unavailable) also goes to the top level.
    ``spectrum``: the native image's spectral peak and line comb
    (:meth:`qc_pipeline.qc.spectrum.SpectralPeak.to_dict`), written as ``spectrum``.
    ``quality``: :meth:`qc_pipeline.qc.score.QCScore.to_dict` (``qc_score``,
    ``qc_score_driver``, ``qc_score_contributors``, ``quality_z``, ``quality_features``,
    ``qc_score_reference``) and the engine mask's regions (:data:`REGION_FIELDS`), written at
    the top level.
    ``template_fit``: the preprocessing's fit of the MNI152 brain mask to the scan
    (:func:`qc_pipeline.preproc.prior.align_template_prior`); its ``affine`` (MNI world ->
    scanner world) and ``surface_agreement`` are written as ``template_fit``, which the group
    level uses to bring a site's error maps into one space (:mod:`qc_pipeline.sitenorm`).
    ``paths``: :func:`output_paths` of the folder the images were written to; None (nothing
    written) leaves the ``*_file`` fields None.
    """
    rec = base_record(scan, model_id=model_id, schedule=schedule, device=device,
                      input_sha256=input_sha256, model_adapted_from=model_adapted_from,
                      model_key=model_key)
    rec["status"] = "ok"
    q = dict(quality or {})
    for key in QUALITY_FIELDS + REGION_FIELDS:
        rec[key] = q.get(key)
    for key in RESULT_FIELDS:
        rec[key] = result.get(key)
    if background:
        rec["background"] = dict(background)
        rec["background_artifact_fraction"] = background.get("background_artifact_fraction")
    if spectrum:
        rec["spectrum"] = dict(spectrum)
    if template_fit and template_fit.get("affine") is not None:
        rec["template_fit"] = {
            "affine": [[round(float(v), 6) for v in row] for row in template_fit["affine"]],
            "surface_agreement": _jf(template_fit.get("surface_agreement")),
        }
    notes = scan.acquisition_notes if isinstance(scan, ScanRecord) else []
    rec["warnings"] = list(dict.fromkeys(one_line(w) for w in [*warnings, *notes]))
    rec["runtime_s"] = None if runtime_s is None else round(float(runtime_s), 3)
    if paths is not None:
        rec["mask_file"] = paths["mask"].name
        rec["error_map_file"] = paths["error_map"].name
        rec["candidate_mask_file"] = (paths["candidate_mask"].name
                                      if result.get("candidate_anomaly_voxels") is not None else None)
    return rec


def prep_fields(prep) -> dict[str, Any]:
    """What the record takes from the preprocessing: the native-image measurements
    (``background``, ``spectrum``) and the template fit, None where there are none."""
    return {"background": getattr(prep.info, "background", None) or None,
            "spectrum": getattr(prep.info, "spectrum", None) or None,
            "template_fit": getattr(prep.info, "prior", None) or None}


def write_scan_outputs(output_dir, scan, prep, result, native_img, **fields) -> Path:
    """Write one screened scan's derivatives: the engine's mask, error map and (when the model
    has the normal heads' spread) candidate mask, brought back to the scan's native grid
    (``native_img``: the scan as stored), then the record (:func:`write_ok_qc`; ``fields``
    as :func:`ok_record` takes them, less what :func:`prep_fields` gives). Returns the
    ``_qc.json`` path."""
    from .io import atomic_write_nifti
    from .preproc import to_native

    paths = output_paths(output_dir, scan)
    paths["dir"].mkdir(parents=True, exist_ok=True)
    atomic_write_nifti(to_native(result.mask.astype(bool), prep.info, native_img), paths["mask"])
    atomic_write_nifti(to_native(result.error_map.astype("float32"), prep.info, native_img), paths["error_map"])
    if result.candidate_mask is not None:
        atomic_write_nifti(to_native(result.candidate_mask.astype(bool), prep.info, native_img),
                           paths["candidate_mask"])
    else:
        paths["candidate_mask"].unlink(missing_ok=True)
    return write_ok_qc(output_dir, scan, result.to_dict(), **prep_fields(prep), **fields)


def rescore_qc(path, reference: Optional[Mapping[str, Any]]) -> Optional[Path]:
    """Recompute the QC score of an ok ``_qc.json`` from its stored ``quality_features`` with
    ``reference`` (a model card's ``qc_score`` section) and rewrite it atomically; the engine's
    results are untouched. Returns the path, or None when the record has nothing to rescore."""
    from .qc.score import combine

    rec = read_qc(path)
    if not rec or rec.get("status") != "ok" or not isinstance(rec.get("quality_features"), dict):
        return None
    q = combine(rec["quality_features"], reference).to_dict()
    for key in QUALITY_FIELDS:
        rec[key] = q.get(key)
    return _atomic_json(rec, Path(path))


def _read_json_object(path: str | os.PathLike) -> tuple[Optional[dict], Optional[str]]:
    """``(record, None)``, or ``(None, why)`` for a missing, unreadable or non-object file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, str(exc)
    if not isinstance(data, dict):
        return None, "top level is not an object"
    return data, None


def read_qc(path: str | os.PathLike) -> Optional[dict]:
    """A ``_qc.json`` record, or None when it is missing or unreadable."""
    return _read_json_object(path)[0]


def is_done(output_dir, scan, *, input_sha256: str, model_id: str, schedule: str,
            model_key: Optional[str] = None) -> bool:
    """True when the scan already has an ok ``_qc.json`` for this input, model (its id and,
    given, its content key), schedule and package version (and its images exist): the
    resume rule of the participant level. A record without a key never matches a key."""
    paths = output_paths(output_dir, scan)
    rec = read_qc(paths["qc_json"])
    return bool(
        rec
        and rec.get("status") == "ok"
        and rec.get("input_sha256") == input_sha256
        and rec.get("model_id") == model_id
        and (model_key is None or rec.get("model_key") == model_key)
        and rec.get("package_version") == __version__
        and rec.get("schedule") == schedule
        and paths["mask"].is_file()
        and paths["error_map"].is_file()
    )


# --------------------------------------------------------------------------- dataset
def write_dataset_description(output_dir, *, model_ids: Iterable[str] = (),
                              source_dataset: Optional[str] = None) -> Path:
    """Create or update ``dataset_description.json`` (model ids accumulate across runs)."""
    path = Path(output_dir) / "dataset_description.json"
    old = read_qc(path) or {}
    ids = set()
    for g in old.get("GeneratedBy", []) or []:
        if isinstance(g, dict) and g.get("Name") == "itermask-qc":
            ids.update(g.get("ModelIds", []) or [])
    ids.update(m for m in model_ids if m)
    desc = {
        "Name": "itermask-qc: IterMask3D artifact screening",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "itermask-qc",
                "Version": __version__,
                "Description": "Unsupervised artifact screening with IterMask3D",
                "ModelIds": sorted(ids),
            }
        ],
        "HowToAcknowledge": "Cite IterMask3D (Liang et al.) and itermask-qc.",
    }
    if source_dataset:
        desc["SourceDatasets"] = [{"URL": Path(source_dataset).resolve().as_uri()}]
    return _atomic_json(desc, path)


# --------------------------------------------------------------------------- reading records
#: the site of a scan whose record names none
SINGLE_SITE = "all"

_ENTITY_KEYS = {"sub": "subject", "ses": "session", "acq": "acquisition", "run": "run",
                "rec": "reconstruction", "ce": "ceagent", "task": "task", "echo": "echo",
                "part": "part"}

@dataclass
class QCRecord:
    """One ``*_qc.json`` as the group level and the reports see it."""

    path: Path
    data: dict
    bids_name: str
    entities: dict
    site: str
    status: str
    error: str | None = None
    warnings: list = field(default_factory=list)
    #: score against the scan's own site and its driving measurement (set by the group level)
    site_score: float = math.nan
    site_driver: str | None = None
    #: every measurement beyond the site's clean scans, worst first (``[(name, z), ...]``)
    site_contributors: list = field(default_factory=list)
    #: the engine's anomaly against the site's own scans (set by the group level, NaN when
    #: the site had too few scans with a template fit; :mod:`qc_pipeline.sitenorm`)
    site_anomaly_fraction: float = math.nan
    site_anomaly_voxels: float = math.nan
    #: the nearest scans of the site the engine's mask was compared with (their ``bids_name``;
    #: empty: the whole site, or no site reference); the site score compares the scan's
    #: measurements with the same scans
    site_neighbours: tuple = ()

    @property
    def subject(self) -> str:
        return str(self.entities.get("subject", ""))

    @property
    def suffix(self) -> str:
        return str(self.entities.get("suffix", ""))

    @property
    def ok(self) -> bool:
        return self.status == "ok" and math.isfinite(self.fraction)

    def _num(self, key) -> float:
        try:
            v = float(self.data.get(key))
        except (TypeError, ValueError):
            return math.nan
        return v

    @property
    def fraction(self) -> float:
        return self._num("anomaly_fraction")

    @property
    def qc_score(self) -> float:
        """The combined QC score (NaN when the qc.json has none)."""
        return self._num("qc_score")

    @property
    def background(self) -> dict:
        bg = self.data.get("background")
        return bg if isinstance(bg, dict) else {}

    @property
    def background_fraction(self) -> float:
        """``background_artifact_fraction``; NaN when missing or unavailable."""
        return self._num("background_artifact_fraction")

    @property
    def background_note(self) -> str:
        """Why the background statistic is missing ('' when it is there)."""
        if math.isfinite(self.background_fraction):
            return ""
        bg = self.background
        if bg.get("reason"):
            return f"background statistic unavailable: {bg['reason']}"
        return "no background statistic in qc.json"

    @property
    def voxels(self) -> float:
        return self._num("anomaly_voxels")

    @property
    def mm3(self) -> float:
        return self._num("anomaly_mm3")

    def resolve(self, key: str) -> Path | None:
        """Path of a file named by field ``key`` (relative to the qc.json or absolute)."""
        value = self.data.get(key)
        if not value or not isinstance(value, str):
            return None
        p = Path(value)
        candidates = [p] if p.is_absolute() else [self.path.parent / p, self.path.parent / p.name]
        for c in candidates:
            if c.is_file():
                return c
        return None


def parse_bids_name(name: str) -> dict:
    """Entities of a BIDS file name (``sub-01_ses-a_run-1_T1w`` -> dict)."""
    base = Path(name).name
    base = re.sub(r"(_qc\.json|\.nii\.gz|\.nii|\.json)$", "", base)
    parts = base.split("_")
    ent: dict = {}
    for part in parts:
        if "-" in part:
            k, _, v = part.partition("-")
            ent[_ENTITY_KEYS.get(k, k)] = v
    if parts and "-" not in parts[-1]:
        ent["suffix"] = parts[-1]
    return ent


def normalise_bids_name(name: str) -> str:
    """``/x/sub-01_T1w.nii.gz`` or ``sub-01_T1w_qc.json`` -> ``sub-01_T1w``."""
    base = Path(str(name).strip()).name
    return re.sub(r"(_qc\.json|\.nii\.gz|\.nii|\.json)$", "", base)


def _site_of(data: dict, site_column: str) -> str:
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        meta = {}
    candidates = []
    if site_column != "site":
        candidates.append(meta.get(site_column))
    candidates += [data.get("site"), meta.get(site_column)]
    for c in candidates:
        if c is not None and str(c).strip() not in ("", "n/a", "nan", "None"):
            return str(c).strip()
    return SINGLE_SITE


def _read_record(path: Path, site_column: str) -> QCRecord:
    fallback_name = normalise_bids_name(path.name)
    data, why = _read_json_object(path)
    if data is None:
        return QCRecord(path=path, data={}, bids_name=fallback_name,
                        entities=parse_bids_name(fallback_name), site=SINGLE_SITE,
                        status="error", error=f"unreadable qc.json: {why}")
    bids_name = str(data.get("bids_name") or fallback_name)
    ent = parse_bids_name(bids_name)
    given = data.get("entities")
    if isinstance(given, dict):
        ent.update({k: v for k, v in given.items() if v is not None})
    status = str(data.get("status") or "error").lower()
    error = data.get("error")
    if status != "ok" and not error:
        error = f"status {status!r} with no reason given"
    warnings = data.get("warnings") or []
    if not isinstance(warnings, list):
        warnings = [str(warnings)]
    rec = QCRecord(path=path, data=data, bids_name=bids_name, entities=ent,
                   site=_site_of(data, site_column), status="ok" if status == "ok" else "error",
                   error=None if status == "ok" else str(error), warnings=[str(w) for w in warnings])
    if rec.status == "ok" and not math.isfinite(rec.fraction):
        rec.status = "error"
        rec.error = "status ok but anomaly_fraction is missing or not finite"
    return rec


def load_qc_records(output_dir, *, subject: str | None = None,
                    site_column: str = "site") -> list[QCRecord]:
    """Every ``*_qc.json`` under ``output_dir/sub-*/[ses-*/]anat`` (optionally one subject)."""
    root = Path(output_dir)
    sub = "sub-*" if subject is None else f"sub-{str(subject).removeprefix('sub-')}"
    paths = sorted(set(root.glob(f"{sub}/anat/*_qc.json")) | set(root.glob(f"{sub}/ses-*/anat/*_qc.json")))
    return [_read_record(p, site_column) for p in paths]
