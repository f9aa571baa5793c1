#!/usr/bin/env python
"""The engine's mask on real scans with a labelled lesion, through the app.

Each ``--case NAME=IMAGE,LABEL`` (NIfTI, the label a non-zero mask on the image's grid) becomes
one subject of a BIDS dataset that the real CLI screens (``participant``). The participant
level's ``desc-anomaly_mask`` (and ``desc-candidate_mask``, the mask before the model's spread
rule) are compared with the label on the scan's own grid. Printed per case: the share of the
brain masked (the qc.json's ``anomaly_fraction``), the lesion's volume, Dice, the share of the
lesion inside the mask, the mask's volume outside the lesion, whether the mask's largest
connected region (26-neighbourhood) touches the lesion, and the QC score with its driver.
Nothing here chooses a setting: the labels are read only for the table.

    python benchmarks/real_heads.py --download DL --out HEADS      # tumour1, tumour2 and labels
    NIPYPE_NO_ET=1 .venv/bin/python benchmarks/real_lesions.py --out RUN \\
        --case tumour1=HEADS/tumour1.nii.gz,HEADS/tumour1_label.nii.gz \\
        --case tumour2=HEADS/tumour2.nii.gz,HEADS/tumour2_label.nii.gz
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

os.environ.setdefault("NIPYPE_NO_ET", "1")


def _cases(items: list[str]) -> dict[str, tuple[Path, Path]]:
    out = {}
    for it in items:
        name, _, paths = it.partition("=")
        image, _, label = paths.partition(",")
        if not (name.isalnum() and image and label):
            raise SystemExit(f"--case wants NAME=IMAGE,LABEL with an alphanumeric NAME; got {it!r}")
        out[name] = (Path(image), Path(label))
    return out


def overlap(mask: np.ndarray, lesion: np.ndarray, voxel_ml: float) -> dict:
    """Dice, lesion covered, mask outside the lesion (mL) and whether the largest region of
    ``mask`` touches ``lesion``."""
    m, les = mask > 0, lesion > 0
    inter = int(np.count_nonzero(m & les))
    lab, n = ndi.label(m, structure=np.ones((3, 3, 3)))
    largest_on = False
    if n:
        sizes = np.bincount(lab.ravel())[1:]
        largest_on = bool(np.any(les[lab == int(np.argmax(sizes)) + 1]))
    return {"dice": 2.0 * inter / max(int(m.sum() + les.sum()), 1),
            "lesion_covered": inter / max(int(les.sum()), 1),
            "outside_ml": float(np.count_nonzero(m & ~les)) * voxel_ml,
            "largest_on_lesion": largest_on, "regions": int(n)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", required=True, help="NAME=IMAGE,LABEL (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="run folder (BIDS, outputs, work)")
    ap.add_argument("--model-dir", type=Path, help="model folder (default: the packaged one)")
    ap.add_argument("--nprocs", type=int, default=1)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    cases = _cases(args.case)
    bids = args.out / "bids"
    bids.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "real lesions", "BIDSVersion": "1.9.0"}))
    for name, (image, _) in cases.items():
        d = bids / f"sub-{name}" / "anat"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, d / f"sub-{name}_T1w.nii.gz")
    cmd = [sys.executable, "-m", "qc_pipeline.cli.app", str(bids), str(args.out / "out"), "participant",
           "-w", str(args.out / "work"), "--nprocs", str(args.nprocs)]
    if args.model_dir:
        cmd += ["--model-dir", str(args.model_dir)]
    rc = subprocess.run(cmd).returncode
    if rc not in (0, 1):
        raise SystemExit(f"the participant level ended with exit code {rc}")
    rows = []
    print("| case | lesion mL | brain masked % | mask | Dice | lesion covered | mask outside the lesion mL "
          "| largest region on the lesion | regions | QC score (driver) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (_, label) in cases.items():
        folder = args.out / "out" / f"sub-{name}" / "anat"
        qc = json.loads((folder / f"sub-{name}_T1w_qc.json").read_text())
        les_img = nib.load(label)
        les = np.asarray(les_img.dataobj) > 0
        voxel_ml = float(np.prod(les_img.header.get_zooms()[:3])) / 1e3
        for desc in ("anomaly", "candidate"):
            f = folder / f"sub-{name}_T1w_desc-{desc}_mask.nii.gz"
            if not f.is_file():
                continue
            m_img = nib.load(f)
            if m_img.shape[:3] != les.shape or not np.allclose(m_img.affine, les_img.affine, atol=1e-3):
                raise SystemExit(f"{f.name} is not on the grid of {label}")
            o = overlap(np.asarray(m_img.dataobj), les, voxel_ml)
            frac = qc.get("anomaly_fraction" if desc == "anomaly" else "candidate_anomaly_fraction")
            row = {"case": name, "mask": desc, "lesion_ml": float(les.sum()) * voxel_ml,
                   "brain_masked": frac, "qc_score": qc.get("qc_score"),
                   "qc_score_driver": qc.get("qc_score_driver"), **o}
            rows.append(row)
            print(f"| {name} | {row['lesion_ml']:.1f} | {100 * (frac or float('nan')):.1f} | {desc} | {o['dice']:.3f} "
                  f"| {o['lesion_covered']:.2f} | {o['outside_ml']:.0f} | {'yes' if o['largest_on_lesion'] else 'no'} "
                  f"| {o['regions']} | {qc.get('qc_score') or float('nan'):.2f} ({qc.get('qc_score_driver')}) |")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
