"""BIDS writer for synthetic cohorts and the demo dataset.

Layout written::

    OUT/dataset_description.json
    OUT/participants.tsv                 participant_id, site, age, sex
    OUT/participants.json
    OUT/sub-XX/[ses-YY/]anat/sub-XX_[...]_<suffix>.nii.gz + .json
    OUT/sourcedata/qc_labels.tsv         bids_name, label, artifact, severity, seed,
                                         artifact_params

``sourcedata/`` is ignored by BIDS indexers, so the ground truth travels with
the data without being mistaken for it. ``artifact_params`` is the artifact's
parameter dict as compact JSON (empty for clean scans): with the clean scan
re-made by :func:`make_subject` from the subject's seed,
:func:`qc_pipeline.synth.artifacts.replay_artifact` reproduces the artifact scan
(``different_sequence`` also takes ``meta=``). The whole tree is built in a
temporary sibling folder and moved into place at the end (atomic for the
reader: OUT is either the old tree or the complete new one).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__
from ..io import atomic_write_nifti, atomic_write_text
from .artifacts import ARTIFACTS, apply_artifact
from .errors import OutputExistsError, SynthError
from .subject import CONTRASTS, SEQUENCE_META, SITES, finalize_dtype, make_subject

LOGGER = logging.getLogger(__name__)

LABEL_COLUMNS = ("bids_name", "label", "artifact", "severity", "seed", "artifact_params")
LABELS_RELPATH = Path("sourcedata") / "qc_labels.tsv"


@dataclass
class ScanSpec:
    """One scan to generate."""

    subject: str
    suffix: str
    seed: int
    site: str
    session: str | None = None
    acq: str | None = None
    run: int | None = None
    artifact: str | None = None
    severity: float = 0.0
    voxel_size: object = None
    cortex_detail: bool = True

    @property
    def bids_name(self) -> str:
        parts = [f"sub-{self.subject}"]
        if self.session:
            parts.append(f"ses-{self.session}")
        if self.acq:
            parts.append(f"acq-{self.acq}")
        if self.run is not None:
            parts.append(f"run-{self.run:02d}")
        return "_".join(parts + [self.suffix])

    @property
    def relpath(self) -> Path:
        d = Path(f"sub-{self.subject}")
        if self.session:
            d = d / f"ses-{self.session}"
        return d / "anat" / f"{self.bids_name}.nii.gz"


def _check_out(out: Path, overwrite: bool):
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {out} exists and is not empty; pass overwrite=True (--overwrite)")


def _atomic_text(path: Path, text: str):
    atomic_write_text(text, path)


def _atomic_nifti(path: Path, img):
    atomic_write_nifti(img, path)


def _sidecar(meta: dict, suffix: str) -> dict:
    acq = meta["acquisition"]
    side = {
        "Manufacturer": meta["manufacturer"],
        "MagneticFieldStrength": meta["field_strength"],
        "InstitutionName": f"Synthetic site {meta['site']}",
        **SEQUENCE_META.get(suffix, {}),
        "PhaseEncodingDirection": acq["phase_dir"],
        "SliceThickness": round(acq["voxel_size"][acq["slice_axis"]], 4),
        "AcquisitionPlane": acq["plane"],
        "GeneratedBy": [{"Name": "itermask-qc-synth", "Version": __version__}],
    }
    return side


def generate_scan(spec: ScanSpec, work_mm: float = 1.5, max_voxels: float = 1.2e7):
    """Make one scan (with its artifact, if any) -> (image, meta).

    An artifact scan's image carries the artifact's params in ``extra["artifact"]``.
    """
    img, meta = make_subject(spec.seed, spec.suffix, site=spec.site, work_mm=work_mm,
                             voxel_size=spec.voxel_size, max_voxels=max_voxels, finalize=False,
                             cortex_detail=spec.cortex_detail)
    if spec.artifact:
        rng = np.random.default_rng([spec.seed & 0xFFFFFFFF, 99, CONTRASTS.index(spec.suffix)])
        kw = {"meta": meta} if ARTIFACTS[spec.artifact].needs_meta else {}
        img = apply_artifact(img, spec.artifact, spec.severity, rng, **kw)
    # same on-disk dtype as the clean scans of this subject/site (no label leak)
    params = img.extra.get("artifact") if spec.artifact else None
    img = finalize_dtype(img, meta["dtype"])
    if params is not None:  # finalize_dtype makes a new image without the extra
        img.extra["artifact"] = params
    return img, meta


def _write_one(args):
    """Write one scan and its sidecar -> (bids_name, artifact params or None)."""
    root, spec, work_mm, max_voxels = args
    img, meta = generate_scan(spec, work_mm, max_voxels)
    path = Path(root) / spec.relpath
    _atomic_nifti(path, img)
    _atomic_text(path.with_name(spec.bids_name + ".json"),
                 json.dumps(_sidecar(meta, spec.suffix), indent=2) + "\n")
    return spec.bids_name, img.extra.get("artifact")


def _labels_row(spec: ScanSpec, params) -> str:
    # compact JSON holds no tab or newline (json escapes them inside strings), so the
    # row stays one TSV line
    cells = [spec.bids_name, str(int(bool(spec.artifact))), spec.artifact or "none",
             f"{spec.severity:.3f}" if spec.artifact else "0", str(spec.seed),
             json.dumps(params, separators=(",", ":")) if spec.artifact else ""]
    return "\t".join(cells)


def _write_tree(out: Path, specs, participants, *, name, overwrite, work_mm, max_voxels,
                nprocs=1, extra=None):
    out = Path(out)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        desc = {
            "Name": name, "BIDSVersion": "1.9.0", "DatasetType": "raw",
            "License": "CC0",
            "GeneratedBy": [{"Name": "itermask-qc-synth", "Version": __version__,
                             "Description": "synthetic heads from ICBM152 2009 (nilearn)"}],
        }
        _atomic_text(tmp / "dataset_description.json", json.dumps(desc, indent=2) + "\n")
        lines = ["participant_id\tsite\tage\tsex"] + [
            f"sub-{p['subject']}\t{p['site']}\t{p['age']}\t{p['sex']}" for p in participants]
        _atomic_text(tmp / "participants.tsv", "\n".join(lines) + "\n")
        _atomic_text(tmp / "participants.json", json.dumps({
            "site": {"Description": "acquisition site (scanner settings differ by site)"},
            "age": {"Description": "age in years (synthetic)", "Units": "year"},
            "sex": {"Description": "sex (synthetic)", "Levels": {"F": "female", "M": "male"}},
        }, indent=2) + "\n")
        _atomic_text(tmp / "README", f"{name}: synthetic MRI heads written by itermask-qc-synth "
                     f"{__version__}. Ground-truth QC labels: {LABELS_RELPATH}.\n")
        jobs = [(str(tmp), s, work_mm, max_voxels) for s in specs]
        parallel = nprocs > 1 and len(jobs) > 1
        params = {}  # bids_name -> artifact params (None for clean scans)
        with ProcessPoolExecutor(nprocs) if parallel else contextlib.nullcontext() as pool:
            for name, p in (pool.map if parallel else map)(_write_one, jobs):
                params[name] = p
                LOGGER.info("wrote %s", name)
        if extra is not None:
            extra(tmp)
        rows = ["\t".join(LABEL_COLUMNS)] + [_labels_row(s, params[s.bids_name]) for s in specs]
        _atomic_text(tmp / LABELS_RELPATH, "\n".join(rows) + "\n")
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def parse_severity(text) -> tuple[float, float]:
    """``"0.3:1.0"`` or ``"0.5"`` -> (lo, hi) within [0, 1]."""
    try:
        parts = [float(p) for p in str(text).split(":")]
    except ValueError:
        raise SynthError(f"severity must be 'LO:HI' or one number in [0, 1]; got {text!r}")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 0 <= parts[0] <= parts[1] <= 1:
        raise SynthError(f"severity must be 'LO:HI' with 0 <= LO <= HI <= 1; got {text!r}")
    return parts[0], parts[1]


def resolve_artifacts(names) -> list[str]:
    """``"all"``, ``"paper"``, a comma list or a list of names -> validated list."""
    if names in (None, "", "none"):
        return []
    if isinstance(names, str):
        if names == "all":
            return list(ARTIFACTS)
        if names == "paper":
            return [n for n, a in ARTIFACTS.items() if a.paper]
        names = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in names if n not in ARTIFACTS]
    if bad:
        raise SynthError(f"unknown artifact(s) {bad}; expected 'all', 'paper' or names from: "
                         f"{', '.join(ARTIFACTS)}")
    return list(names)


def write_cohort(
    out,
    n_subjects: int,
    *,
    contrasts=("T1w",),
    seed: int = 0,
    artifacts=None,
    artifact_fraction: float = 0.5,
    severity=(0.3, 1.0),
    sites=("A", "B", "C"),
    overwrite: bool = False,
    work_mm: float = 1.5,
    max_voxels: float = 1.2e7,
    voxel_size=None,
    nprocs: int = 1,
    cortex_detail: bool = True,
) -> Path:
    """Write a synthetic BIDS cohort and its labels; returns the root.

    ``cortex_detail=False`` makes the heads from the plain averaged template (no
    sulci, smooth GM/WM boundary; see :func:`qc_pipeline.synth.subject.cortical_detail`).

    Each subject gets a seed derived from ``seed`` and its index and a site
    (cycling through ``sites``). Each scan carries an artifact with
    probability ``artifact_fraction``; types cycle (shuffled) through
    ``artifacts`` so they are balanced; severities are uniform in
    ``severity``. Deterministic for a given argument set.
    """
    if int(n_subjects) < 1:
        raise SynthError(f"n_subjects must be >= 1; got {n_subjects}")
    if isinstance(contrasts, str):
        contrasts = [c.strip() for c in contrasts.split(",") if c.strip()]
    bad = [c for c in contrasts if c not in CONTRASTS]
    if bad or not contrasts:
        raise SynthError(f"contrasts must be from {CONTRASTS}; got {contrasts}")
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise SynthError(f"sites must be from {sorted(SITES)}; got {list(sites)}")
    if not 0 <= artifact_fraction <= 1:
        raise SynthError(f"artifact_fraction must be in [0, 1]; got {artifact_fraction}")
    arts = resolve_artifacts(artifacts)
    lo, hi = parse_severity(severity if isinstance(severity, str) else f"{severity[0]}:{severity[1]}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7])
    width = max(2, len(str(n_subjects)))
    specs, participants, cycle = [], [], []
    for i in range(int(n_subjects)):
        sub = f"{i + 1:0{width}d}"
        sub_seed = int(np.random.default_rng([int(seed) & 0xFFFFFFFF, i]).integers(2**31 - 1))
        site = sites[i % len(sites)]
        participants.append({"subject": sub, "site": site, "age": int(rng.integers(20, 80)),
                             "sex": "FM"[int(rng.integers(2))]})
        for c in contrasts:
            art, sev = None, 0.0
            if arts and rng.uniform() < artifact_fraction:
                if not cycle:
                    cycle = list(rng.permutation(arts))
                art = str(cycle.pop())
                sev = float(rng.uniform(lo, hi))
            specs.append(ScanSpec(sub, c, sub_seed, site, artifact=art, severity=sev,
                                  voxel_size=voxel_size, cortex_detail=cortex_detail))
    return _write_tree(out, specs, participants, name="itermask-qc synthetic cohort",
                       overwrite=overwrite, work_mm=work_mm, max_voxels=max_voxels,
                       nprocs=nprocs)


def _dummy_bold(root: Path, subject: str):
    """A tiny 4D BOLD run beside anat/ (to check that tools skip it)."""
    rng = np.random.default_rng(1)
    data = (rng.random((12, 12, 8, 5)) * 100 + 500).astype(np.int16)
    aff = np.diag([3.5, 3.5, 4.0, 1.0])
    img = nib.Nifti1Image(data, aff)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.0
    name = f"sub-{subject}_task-rest_bold"
    _atomic_nifti(root / f"sub-{subject}" / "func" / f"{name}.nii.gz", img)
    _atomic_text(root / f"sub-{subject}" / "func" / f"{name}.json",
                 json.dumps({"RepetitionTime": 2.0, "TaskName": "rest"}, indent=2) + "\n")


def write_demo(out, *, overwrite: bool = False, seed: int = 2024, work_mm: float = 2.0,
               nprocs: int = 1) -> Path:
    """Write the small demo dataset (T1w, 6 subjects, 2 sites, ~half with artifacts).

    sub-01 has two sessions; sub-03 has ``acq-`` variants and two runs;
    sub-02 has a tiny ``func/`` BOLD run. Scans are stored at 1.2-1.5 mm so
    the demo builds fast.
    """
    plan = [  # subject, session, acq, run, site, artifact, severity
        ("01", "01", None, None, "A", None, 0.0),
        ("01", "02", None, None, "A", "motion", 0.8),
        ("02", None, None, None, "B", None, 0.0),
        ("03", None, "mprage", 1, "A", None, 0.0),
        ("03", None, "mprage", 2, "A", "ghosting", 0.7),
        ("03", None, "fast", None, "A", "kspace_noise", 0.6),
        ("04", None, None, None, "B", "chunk_middle", 0.8),
        ("05", None, None, None, "A", None, 0.0),
        ("06", None, None, None, "B", "chunk_top", 0.8),
    ]
    specs = []
    for sub, ses, acq, run, site, art, sev in plan:
        s = int(np.random.default_rng([seed, int(sub)]).integers(2**31 - 1))
        vox = 1.5 if acq == "fast" else 1.25
        specs.append(ScanSpec(sub, "T1w", s, site, session=ses, acq=acq, run=run,
                              artifact=art, severity=sev, voxel_size=vox))
    participants = [
        {"subject": "01", "site": "A", "age": 34, "sex": "F"},
        {"subject": "02", "site": "B", "age": 58, "sex": "M"},
        {"subject": "03", "site": "A", "age": 27, "sex": "M"},
        {"subject": "04", "site": "B", "age": 45, "sex": "F"},
        {"subject": "05", "site": "A", "age": 63, "sex": "F"},
        {"subject": "06", "site": "B", "age": 39, "sex": "M"},
    ]
    return _write_tree(out, specs, participants, name="itermask-qc demo", overwrite=overwrite,
                       work_mm=work_mm, max_voxels=4e6, nprocs=nprocs,
                       extra=lambda root: _dummy_bold(root, "02"))


def read_labels(path) -> list[dict]:
    """Read a ``qc_labels.tsv`` into a list of dicts (typed).

    Parameters
    ----------
    path : str or Path
        The labels file (``OUT/sourcedata/qc_labels.tsv``).

    Returns
    -------
    list of dict
        One per scan: ``bids_name`` and ``artifact`` (str), ``label`` and ``seed`` (int),
        ``severity`` (float, rounded to 3 decimals; the exact value is in the params),
        ``artifact_params`` (dict for :func:`replay_artifact`; empty for clean scans and
        for files written without the column).

    Raises
    ------
    SynthError
        An ``artifact_params`` cell that is not a JSON object; the message names the row.
    """
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        r["label"] = int(r["label"])
        r["severity"] = float(r["severity"])
        r["seed"] = int(r["seed"])
        r["artifact_params"] = _parse_params(r.get("artifact_params"), path, i)
    return rows


def _parse_params(text, path, row) -> dict:
    if not text:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SynthError(f"{path}, row {row}: artifact_params is not valid JSON ({exc}); "
                         f"got {text[:80]!r}") from None
    if not isinstance(params, dict):
        raise SynthError(f"{path}, row {row}: artifact_params must be a JSON object; "
                         f"got {text[:80]!r}")
    return params
