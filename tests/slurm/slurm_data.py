"""Small BIDS trees for the SLURM tests and the SLURM benchmark.

Heads are nilearn's bundled skull-stripped MNI152 brain at ~3.6 mm with per-scan noise
and an optional artifact (a bright block inside the brain), so ``--skull-strip none`` keeps
runs fast. Trees look like real data: sessions, ``acq-``/``run-`` variants, JSON sidecars,
a ``func/`` folder beside ``anat/`` and a participants.tsv with a site column.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np

MODEL_GRID = (40, 48, 40)
MODEL_VOXEL = (4.0, 4.0, 4.0)


@functools.lru_cache(maxsize=1)
def _mni_brain():
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    from scipy import ndimage as ndi

    t1 = load_mni152_template(resolution=2)
    mask = load_mni152_brain_mask(resolution=2)
    data = np.asarray(t1.dataobj, dtype=np.float32) * (np.asarray(mask.dataobj) > 0.5)
    data = ndi.zoom(data, 0.5, order=1).astype(np.float32)
    aff = np.array(t1.affine, dtype=float)
    aff[:3, :3] *= 2.0 * 0.9
    return data, aff


def head(seed: int, artifact: bool = False) -> nib.Nifti1Image:
    data, aff = _mni_brain()
    rng = np.random.default_rng(seed)
    d = data * (1.0 + 0.03 * rng.standard_normal(data.shape).astype(np.float32))
    if artifact:
        c = np.array(d.shape) // 2 + rng.integers(-3, 4, 3)
        d[c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 5, c[2] - 4:c[2] + 4] *= 3.0
    d[data <= 0] = 0
    return nib.Nifti1Image(d.astype(np.float32), aff)


def scan_relpaths(n_scans: int) -> list[str]:
    """``n_scans`` T1w paths: two-session subjects with runs, then one-scan subjects."""
    rels = []
    i = 0
    while len(rels) < n_scans:
        sub = f"{i + 1:02d}" if n_scans < 100 else f"{i + 1:04d}"
        if i % 3 == 0:  # sessions and runs
            for ses, run in (("pre", 1), ("pre", 2), ("post", 1)):
                rels.append(f"sub-{sub}/ses-{ses}/anat/sub-{sub}_ses-{ses}_run-{run}_T1w.nii.gz")
        elif i % 3 == 1:
            rels.append(f"sub-{sub}/anat/sub-{sub}_acq-fast_T1w.nii.gz")
        else:
            rels.append(f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz")
        i += 1
    return rels[:n_scans]


def make_bids(root: Path, n_scans: int = 4, *, artifact_every: int = 2) -> list[str]:
    """Write a BIDS tree with ``n_scans`` T1w scans; returns their relative paths."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "slurm-test", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    rels = scan_relpaths(n_scans)
    subjects = sorted({r.split("/")[0] for r in rels})
    (root / "participants.tsv").write_text(
        "participant_id\tsite\n"
        + "".join(f"{s}\tsite{'AB'[k % 2]}\n" for k, s in enumerate(subjects)))
    for k, rel in enumerate(rels):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(head(k, artifact=(artifact_every and k % artifact_every == 1)), path)
        stem = path.name[: -len(".nii.gz")]
        (path.parent / f"{stem}.json").write_text(json.dumps({"MagneticFieldStrength": 3}))
    func = root / subjects[0] / "func"
    func.mkdir(parents=True, exist_ok=True)
    (func / f"{subjects[0]}_task-rest_bold.json").write_text('{"RepetitionTime": 2.0}')
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)),
             func / f"{subjects[0]}_task-rest_bold.nii.gz")
    return rels


def make_model(path: Path) -> Path:
    from qc_pipeline.engine import make_random_model_folder

    return make_random_model_folder(path, grid=MODEL_GRID, voxel_size=MODEL_VOXEL,
                                    contrast="T1w", seed=0)


def qc_records(out: Path) -> dict[str, dict]:
    """``{bids_name: qc record}`` of every ``*_qc.json`` under ``out`` (not logs/)."""
    recs = {}
    for p in sorted(Path(out).glob("sub-*/**/*_qc.json")):
        rec = json.loads(p.read_text())
        recs[rec.get("bids_name") or p.name[: -len("_qc.json")]] = rec
    return recs
