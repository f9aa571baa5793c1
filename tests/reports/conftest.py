"""Fixtures: a small synthetic derivatives folder following the qc.json contract.

Two sites (A from the qc.json ``site`` field, B from ``metadata.site``), sessions and runs,
a second suffix (FLAIR), failed scans, artifact scans with a blob-shaped anomaly mask,
clean scans with tiny masks, source scans present for site A only (site B's raw data is
"missing"), a ``<script>`` label, and a ratings TSV in the format the pages download.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

SHAPE = (32, 36, 30)
ZOOMS = (2.0, 2.0, 2.0)
EVIL = "<script>alert(1)</script>"


@dataclass
class Scan:
    bids_name: str
    subject: str
    suffix: str
    site: str
    session: str | None = None
    run: str | None = None
    acquisition: str | None = None
    kind: str = "clean"          # clean | artifact | failed
    n_anomaly: int = 0
    error: str | None = None
    centre: tuple | None = None
    fraction: float = 0.0
    qc_path: Path | None = None
    source: Path | None = None


@dataclass
class Derivs:
    root: Path
    bids: Path
    scans: list = field(default_factory=list)
    labels_tsv: Path | None = None
    labels: dict = field(default_factory=dict)

    def by_name(self, name):
        return next(s for s in self.scans if s.bids_name == name)


def _brain(shape=SHAPE):
    g = np.indices(shape).astype(float)
    c = [(s - 1) / 2 for s in shape]
    r = np.sqrt(sum(((g[i] - c[i]) / (0.42 * shape[i])) ** 2 for i in range(3)))
    return r <= 1.0


def _blob(brain, centre, n):
    """The ``n`` brain voxels closest to ``centre`` (a compact blob)."""
    idx = np.argwhere(brain)
    d = ((idx - np.array(centre)) ** 2).sum(1)
    pick = idx[np.argsort(d, kind="stable")[:n]]
    m = np.zeros(brain.shape, bool)
    m[tuple(pick.T)] = True
    return m


def _save(arr, path, dtype):
    aff = np.diag(list(ZOOMS) + [1.0])
    aff[:3, 3] = [-30, -35, -28]
    nib.save(nib.Nifti1Image(arr.astype(dtype), aff), str(path))


def write_scan(root: Path, bids: Path, sc: Scan, rng, *, with_source: bool,
               source_missing_relative: bool = False):
    parts = [f"sub-{sc.subject}"] + ([f"ses-{sc.session}"] if sc.session else []) + ["anat"]
    d = root.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    fname = sc.bids_name.replace(EVIL, "evil")
    qc = {
        "status": "ok", "error": None, "warnings": [], "bids_name": sc.bids_name,
        "source_file": "/".join(parts + [fname + ".nii.gz"]),
        "entities": {"subject": sc.subject, "session": sc.session, "run": sc.run,
                     "acquisition": sc.acquisition, "suffix": sc.suffix},
        "site": sc.site if sc.site == "A" else None,
        "metadata": {"site": sc.site} if sc.site != "A" else {},
        "model_id": f"{sc.suffix.lower()}-test-model", "schedule": "fast", "device": "cpu",
        "input_sha256": "ab" * 32, "package_version": "0.1.0", "runtime_s": 1.25,
        "forward_passes": 12, "mean_error": 0.1,
    }
    if sc.kind == "failed":
        qc.update(status="error", error=sc.error, anomaly_voxels=None, anomaly_fraction=None,
                  anomaly_mm3=None)
    else:
        brain = _brain()
        if sc.centre is None:
            sc.centre = tuple(int(c) for c in np.argwhere(brain)[rng.integers(brain.sum())])
        mask = _blob(brain, sc.centre, sc.n_anomaly) if sc.n_anomaly else np.zeros(SHAPE, bool)
        err = np.where(brain, rng.gamma(2.0, 0.05, SHAPE), 0.0)
        err[mask] += 1.5
        _save(mask.astype(np.uint8), d / f"{fname}_desc-anomaly_mask.nii.gz", np.uint8)
        _save(err, d / f"{fname}_desc-error_map.nii.gz", np.float32)
        sc.fraction = float(mask.sum() / brain.sum())
        t = np.arange(0, 20, dtype=float)
        a, b = 0.2, 0.07
        tau = a * np.tan(b * t) + rng.normal(0, 0.005, t.size)
        qc.update(anomaly_voxels=int(mask.sum()), anomaly_fraction=sc.fraction,
                  anomaly_mm3=float(mask.sum() * np.prod(ZOOMS)),
                  tau_curve=[[float(x), float(y)] for x, y in zip(t, tau)], tau_stop=0.6,
                  fit={"a": a, "b": b, "r2": 0.97, "path": "tan"},
                  mask_file=f"{fname}_desc-anomaly_mask.nii.gz",
                  error_map_file=f"{fname}_desc-error_map.nii.gz")
        if with_source:
            sd = bids.joinpath(*parts)
            sd.mkdir(parents=True, exist_ok=True)
            src = np.where(brain, 100 + rng.normal(0, 5, SHAPE), 0)
            src[mask] = 20  # signal void where the artifact is
            sc.source = sd / f"{fname}.nii.gz"
            _save(src, sc.source, np.float32)
            qc["source_file"] = str(sc.source)
    if EVIL in sc.bids_name:
        qc["warnings"] = [f"odd label {EVIL}"]
    sc.qc_path = d / f"{fname}_qc.json"
    sc.qc_path.write_text(json.dumps(qc, indent=1))
    return sc


def build_derivs(tmp: Path) -> Derivs:
    rng = np.random.default_rng(42)
    root, bids = tmp / "out", tmp / "bids"
    root.mkdir()
    bids.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "test", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "itermask-qc", "Version": "0.1.0",
                         "CommandLine": "itermask-qc /bids /out participant"}]}))
    specs = [
        # site A: 10 successful T1w (robust per-site threshold), 1 failed
        dict(subject="01", session="1", run="1", n=6), dict(subject="01", session="1", run="2", n=3),
        dict(subject="01", session="2", run="1", n=380, kind="artifact"),
        dict(subject="02", n=0), dict(subject="03", n=5), dict(subject="04", n=8),
        dict(subject="05", n=520, kind="artifact"), dict(subject="06", n=4, acquisition=EVIL),
        dict(subject="07", n=2), dict(subject="08", n=7),
        dict(subject="09", kind="failed", error="CorruptImage: truncated gzip stream"),
        # site B: 4 successful (pooled fallback), 1 failed; raw data missing
        dict(subject="10", n=3, site="B"), dict(subject="11", n=9, site="B"),
        dict(subject="12", n=450, kind="artifact", site="B"), dict(subject="13", n=1, site="B"),
        dict(subject="14", kind="failed", error="Not3D: image has 4 dimensions (32, 36, 30, 5)", site="B"),
    ]
    dv = Derivs(root=root, bids=bids)
    for sp in specs:
        ent = [f"sub-{sp['subject']}"]
        if sp.get("session"):
            ent.append(f"ses-{sp['session']}")
        if sp.get("acquisition"):
            ent.append(f"acq-{sp['acquisition']}")
        if sp.get("run"):
            ent.append(f"run-{sp['run']}")
        sc = Scan(bids_name="_".join(ent + ["T1w"]), subject=sp["subject"], suffix="T1w",
                  site=sp.get("site", "A"), session=sp.get("session"), run=sp.get("run"),
                  acquisition=sp.get("acquisition"), kind=sp.get("kind", "clean"),
                  n_anomaly=sp.get("n", 0), error=sp.get("error"))
        dv.scans.append(write_scan(root, bids, sc, rng, with_source=sc.site == "A"))
    for subj, n in (("01", 0), ("02", 40)):
        sc = Scan(bids_name=f"sub-{subj}_FLAIR", subject=subj, suffix="FLAIR", site="A",
                  n_anomaly=n, kind="artifact" if n > 10 else "clean")
        dv.scans.append(write_scan(root, bids, sc, rng, with_source=False))
    # ratings TSV exactly as the subject pages download it (plus a re-rating and a questionable)
    ratings = [
        ("sub-01_ses-1_run-1_T1w", "good", "", "", "ab", "2024-01-01T10:00:00.000Z"),
        ("sub-01_ses-2_run-1_T1w", "bad", "motion;metal/susceptibility", "big void", "ab", "2024-01-01T10:01:00.000Z"),
        ("sub-02_T1w", "good", "", "", "ab", "2024-01-01T10:02:00.000Z"),
        ("sub-03_T1w", "bad", "", "first look", "ab", "2024-01-01T10:03:00.000Z"),
        ("sub-03_T1w", "good", "", "changed my mind", "ab", "2024-01-01T11:03:00.000Z"),
        ("sub-04_T1w", "questionable", "noise", "", "ab", "2024-01-01T10:04:00.000Z"),
        ("sub-05_T1w", "bad", "", "", "ab", "2024-01-01T10:05:00.000Z"),
        ("sub-07_T1w", "good", "", "", "ab", "2024-01-01T10:06:00.000Z"),
        ("sub-08_T1w", "good", "", "", "ab", "2024-01-01T10:07:00.000Z"),
        ("sub-10_T1w", "good", "", "", "cd", "2024-01-01T10:08:00.000Z"),
        ("sub-11_T1w", "good", "", "", "cd", "2024-01-01T10:09:00.000Z"),
        ("sub-12_T1w", "bad", "", "", "cd", "2024-01-01T10:10:00.000Z"),
        ("sub-13_T1w", "good", "", "", "cd", "2024-01-01T10:11:00.000Z"),
    ]
    dv.labels_tsv = tmp / "ratings.tsv"
    dv.labels_tsv.write_text("bids_name\trating\tartifacts\tcomment\trater\ttimestamp\n" +
                             "".join("\t".join(r) + "\n" for r in ratings))
    dv.labels = {"sub-01_ses-1_run-1_T1w": 0, "sub-01_ses-2_run-1_T1w": 1, "sub-02_T1w": 0,
                 "sub-03_T1w": 0, "sub-05_T1w": 1, "sub-07_T1w": 0, "sub-08_T1w": 0,
                 "sub-10_T1w": 0, "sub-11_T1w": 0, "sub-12_T1w": 1, "sub-13_T1w": 0}
    return dv


@pytest.fixture
def derivs(tmp_path) -> Derivs:
    """A fresh synthetic derivatives folder (function scope: tests may modify it)."""
    return build_derivs(tmp_path)


@pytest.fixture(scope="session")
def group_run(tmp_path_factory):
    """Derivatives with the group level already run with the ratings TSV (read-only: copy
    the folder before changing anything)."""
    from qc_pipeline.grouplevel import run_group

    dv = build_derivs(tmp_path_factory.mktemp("grp"))
    written = run_group(dv.root, labels=dv.labels_tsv)
    return dv, written


def add_quality(dv: Derivs, *, spikes: dict | None = None, driver: dict | None = None) -> None:
    """Give every successful T1w scan QC-score measurements and a reference, so that the
    group level ranks by ``qc_score_site``.

    ``spikes`` raises one measurement of a scan (``{bids_name: (measurement, value)}``);
    ``driver`` overrides the qc.json's own ``qc_score`` and driver (``{bids_name: (score,
    measurement)}``), as the model's reference may disagree with the site.
    """
    from qc_pipeline.qc.score import fit_reference

    rng = np.random.default_rng(7)
    clean = [{"noise": float(v), "background_artifact_fraction": 0.0}
             for v in rng.normal(1.0, 0.05, 20)]
    ref = fit_reference(clean, features=["noise", "background_artifact_fraction"])["features"]
    for sc in dv.scans:
        if sc.suffix != "T1w" or sc.kind == "failed":
            continue
        d = json.loads(sc.qc_path.read_text())
        feats = {"noise": float(rng.normal(1.0, 0.05)), "background_artifact_fraction": 0.0}
        name, value = (spikes or {}).get(sc.bids_name, (None, None))
        if name:
            feats[name] = value
        d.update(quality_features=feats, quality_z={k: 0.5 for k in feats}, qc_score=0.5,
                 qc_score_driver="noise", qc_score_reference=ref)
        if sc.bids_name in (driver or {}):
            d["qc_score"], d["qc_score_driver"] = driver[sc.bids_name]
            d["quality_z"][driver[sc.bids_name][1]] = driver[sc.bids_name][0]
        sc.qc_path.write_text(json.dumps(d))


@pytest.fixture
def with_quality():
    """:func:`add_quality` (a fixture: test modules cannot import conftest under importlib)."""
    return add_quality
