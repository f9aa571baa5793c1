"""Helpers for the BIDS-App tests: small BIDS trees that look like real data.

Heads are the MNI152 brain bundled with nilearn (skull-stripped, so ``--skull-strip none``
keeps the tests fast), at 4 mm with per-scan noise and intensity changes. The trees have
sessions, ``acq-`` variants, several runs, JSON sidecars, a ``func/`` folder beside
``anat/``, ``derivatives/`` and ``code/`` folders and a participants.tsv with a site
column. The model is a tiny randomly initialised IterMask3D (40 x 48 x 40 grid at 4 mm), so scores
are meaningless but the wiring is real.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

os.environ.setdefault("NIPYPE_NO_ET", "1")

MODEL_GRID = (40, 48, 40)
MODEL_VOXEL = (4.0, 4.0, 4.0)


@functools.lru_cache(maxsize=1)
def _mni_brain() -> tuple[np.ndarray, np.ndarray]:
    """Skull-stripped MNI152 T1 downsampled 2x, 3.6 mm voxels: (float32 data, RAS affine)."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    from scipy import ndimage as ndi

    t1 = load_mni152_template(resolution=2)
    mask = load_mni152_brain_mask(resolution=2)
    data = np.asarray(t1.dataobj, dtype=np.float32) * (np.asarray(mask.dataobj) > 0.5)
    data = ndi.zoom(data, 0.5, order=1).astype(np.float32)
    aff = np.array(t1.affine, dtype=float)
    aff[:3, :3] *= 2.0 * 0.9  # a 10 % smaller head (3.6 mm voxels): a plausible brain volume
    return data, aff


def brain_image(seed: int = 0, *, scale: float = 1.0) -> nib.Nifti1Image:
    """A clean, skull-stripped head in RAS with a little noise (varies by ``seed``)."""
    data, aff = _mni_brain()
    rng = np.random.default_rng(seed)
    d = data * scale * (1.0 + 0.02 * rng.standard_normal(data.shape).astype(np.float32))
    d[data <= 0] = 0
    return nib.Nifti1Image(d.astype(np.float32), aff)


def to_lps(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same scan stored LPS (x and y axes flipped; same world image)."""
    data = np.asarray(img.dataobj)[::-1, ::-1, :]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    shape = np.array(img.shape[:3])
    shift = np.eye(4)
    shift[:3, 3] = [shape[0] - 1, shape[1] - 1, 0]
    aff = img.affine @ shift @ flip
    return nib.Nifti1Image(np.ascontiguousarray(data), aff)


def to_oblique(img: nib.Nifti1Image, degrees: float = 12.0) -> nib.Nifti1Image:
    """The same head resampled onto a grid rotated ``degrees`` about z (oblique affine)."""
    from scipy import ndimage as ndi

    th = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    centre = img.affine @ np.r_[(np.array(img.shape[:3]) - 1) / 2.0, 1]
    to_c = np.eye(4)
    to_c[:3, 3] = -centre[:3]
    back = np.eye(4)
    back[:3, 3] = centre[:3]
    new_aff = back @ rot @ to_c @ img.affine
    vox = np.linalg.inv(img.affine) @ new_aff  # new voxel -> old voxel
    data = ndi.affine_transform(np.asarray(img.dataobj, dtype=np.float32), vox[:3, :3], vox[:3, 3],
                                output_shape=img.shape[:3], order=1)
    return nib.Nifti1Image(data.astype(np.float32), new_aff)


# --------------------------------------------------------------------------- bad inputs
def write_bad(path: Path, kind: str) -> None:
    """Write one of the bad inputs the app must turn into an error row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    good = brain_image(99)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        nib.save(good, path)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "4d":
        d = np.stack([np.asarray(good.dataobj)] * 3, axis=-1)
        nib.save(nib.Nifti1Image(d, good.affine), path)
    elif kind == "2d":
        d = np.asarray(good.dataobj)[:, :, 20:21]
        nib.save(nib.Nifti1Image(d, good.affine), path)
    elif kind == "nan":
        d = np.asarray(good.dataobj).copy()
        d[: d.shape[0] // 2] = np.nan
        nib.save(nib.Nifti1Image(d, good.affine), path)
    elif kind == "zero":
        nib.save(nib.Nifti1Image(np.zeros(good.shape, np.float32), good.affine), path)
    elif kind == "voxel":
        aff = good.affine.copy()
        aff[:3, :3] *= 10.0  # 40 mm voxels
        nib.save(nib.Nifti1Image(np.asarray(good.dataobj), aff), path)
    elif kind == "nobrain":
        rng = np.random.default_rng(5)
        d = np.zeros(good.shape, np.float32)
        d[18:26, 20:30, 10:40] = 100 + rng.random((8, 10, 30)).astype(np.float32)  # a rod
        nib.save(nib.Nifti1Image(d, good.affine), path)
    else:  # pragma: no cover
        raise ValueError(kind)


BAD_KINDS = ("empty", "truncated", "4d", "2d", "nan", "zero", "voxel", "nobrain")


# --------------------------------------------------------------------------- trees
def _sidecar(path: Path, **extra) -> None:
    meta = {"MagneticFieldStrength": 3, "Manufacturer": "Synth", "RepetitionTime": 2.3}
    meta.update(extra)
    stem = path.name.replace(".nii.gz", "").replace(".nii", "")
    (path.parent / f"{stem}.json").write_text(json.dumps(meta))


def save_scan(root: Path, rel: str, img: nib.Nifti1Image | None = None, *, seed: int = 0) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img if img is not None else brain_image(seed), path)
    _sidecar(path)
    return path


def make_dataset(root: Path, *, bad: tuple[str, ...] = (), orientations: bool = False,
                 extra_subjects: int = 0) -> dict:
    """A small realistic BIDS tree; returns {"root", "scans": [relpaths of T1w/FLAIR]}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "app-test", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (root / "README").write_text("synthetic test dataset\n")
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsite\n"
        "sub-01\t31\tsiteA\n"
        "sub-02\t45\tsiteB\n"
        "sub-03\t60\tsiteB\n"
        + "".join(f"sub-{10 + i:02d}\t50\tsiteA\n" for i in range(extra_subjects))
    )
    rels = [
        "sub-01/ses-pre/anat/sub-01_ses-pre_run-1_T1w.nii.gz",
        "sub-01/ses-pre/anat/sub-01_ses-pre_run-2_T1w.nii.gz",
        "sub-01/ses-post/anat/sub-01_ses-post_acq-mprage_T1w.nii.gz",
        "sub-02/anat/sub-02_acq-fast_rec-norm_run-01_T1w.nii.gz",
    ]
    for i, rel in enumerate(rels):
        save_scan(root, rel, seed=i)
    for i in range(extra_subjects):
        save_scan(root, f"sub-{10 + i:02d}/anat/sub-{10 + i:02d}_T1w.nii.gz", seed=20 + i)
    # a FLAIR next to the T1w (screened only with a FLAIR model)
    save_scan(root, "sub-02/anat/sub-02_FLAIR.nii.gz", seed=7)
    # sessions.tsv overrides the site of sub-01's post session (scanner upgrade)
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\tsite\nses-pre\t2020-01-01\tsiteA\nses-post\t2021-01-01\tsiteC\n")
    # unrelated modalities and folders beside anat/
    for sub_dir, stem in (("sub-01/ses-pre", "sub-01_ses-pre"), ("sub-02", "sub-02")):
        func = root / sub_dir / "func"
        func.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)),
                 func / f"{stem}_task-rest_bold.nii.gz")
        (func / f"{stem}_task-rest_bold.json").write_text('{"RepetitionTime": 2.0}')
        (func / f"{stem}_task-rest_events.tsv").write_text("onset\tduration\n0\t1\n")
    (root / "code").mkdir(exist_ok=True)
    (root / "code" / "convert.py").write_text("# heudiconv\n")
    der = root / "derivatives" / "fmriprep" / "sub-01" / "anat"
    der.mkdir(parents=True, exist_ok=True)
    nib.save(brain_image(3), der / "sub-01_desc-preproc_T1w.nii.gz")
    if orientations:
        # the same head stored RAS, LPS and oblique: must score alike
        head = brain_image(42)
        for acq, img in (("ras", head), ("lps", to_lps(head)), ("obl", to_oblique(head))):
            rel = f"sub-03/anat/sub-03_acq-{acq}_T1w.nii.gz"
            save_scan(root, rel, img)
            rels.append(rel)
    for kind in bad:
        rel = f"sub-02/anat/sub-02_acq-{kind}_T1w.nii.gz"
        write_bad(root / rel, kind)
        _sidecar(root / rel)
        rels.append(rel)
    return {"root": root, "t1w": rels}


def qc_of(out: Path, rel: str) -> dict:
    """The ``_qc.json`` of a BIDS relative path under the output folder."""
    rel_p = Path(rel)
    stem = rel_p.name.replace(".nii.gz", "").replace(".nii", "")
    return json.loads((out / rel_p.parent / f"{stem}_qc.json").read_text())


def base_args(ds_root: Path, out: Path, work: Path, model: Path, *extra: str) -> list[str]:
    return [str(ds_root), str(out), "participant", "-w", str(work), "--model-dir", str(model),
            "--skull-strip", "none", "--device", "cpu", *extra]


# --------------------------------------------------------------------------- hostile files
def write_hostile(path: Path, kind: str) -> None:
    """Files that are not scans, or scans whose header lies: each must end as an error row
    found before any voxel is read. ``kind``: dangling, fifo, devzero, dir, huge (a header
    claiming 1400^3 voxels in a few KB), bomb (gzip streamed from 72 MB of zeros)."""
    import gzip
    import zlib

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "dangling":
        os.symlink(path.parent / ".git" / "annex" / "objects" / "missing", path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "devzero":
        os.symlink("/dev/zero", path)
    elif kind == "dir":
        path.mkdir()
    elif kind in ("huge", "bomb"):
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((1400, 1400, 1400) if kind == "huge" else (330, 330, 330))
        hdr.set_data_dtype(np.int16)
        hdr.set_qform(np.diag([0.5, 0.5, 0.5, 1.0]), 1)
        hdr["vox_offset"] = 352
        head = hdr.binaryblock + b"\0" * 4
        if kind == "huge":
            path.write_bytes(gzip.compress(head + b"\1" * 4096))
        else:
            comp = zlib.compressobj(6, zlib.DEFLATED, 31)  # a gzip member, streamed
            zeros = b"\0" * (1 << 21)
            with open(path, "wb") as fh:
                fh.write(comp.compress(head))
                left = 330 ** 3 * 2
                while left > 0:
                    fh.write(comp.compress(zeros[:min(left, len(zeros))]))
                    left -= len(zeros)
                fh.write(comp.flush())
    else:  # pragma: no cover
        raise ValueError(kind)


HOSTILE_KINDS = {"dangling": "broken symlink", "fifo": "FIFO", "devzero": "device file",
                 "dir": "is a directory", "huge": "1400 x 1400 x 1400 voxels",
                 "bomb": "decompression bomb"}
