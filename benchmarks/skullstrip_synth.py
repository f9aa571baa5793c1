"""Skull-strip runtime and Dice on synthetic heads (T1w, T2w, FLAIR), per method.

Usage: python benchmarks/skullstrip_synth.py [--seeds 0,1] [--methods deepbet,robex]
       [--voxel 1.5] [--strip-mm 2.0]

Each head comes from qc_pipeline.synth.make_subject with its ground-truth brain mask. The
scan is put on the RAS lattice at --strip-mm (what ``preprocess`` does before skull
stripping) and each method's mask is compared with the truth on that lattice. Prints a table.
"""
import argparse
import os
import time
import warnings

os.environ.setdefault("NIPYPE_NO_ET", "1")
warnings.simplefilter("ignore")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from qc_pipeline.preproc.geometry import _resample, to_lattice  # noqa: E402
from qc_pipeline.preproc.skullstrip import skull_strip  # noqa: E402
from qc_pipeline.synth.subject import make_subject  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default="deepbet,robex")
    ap.add_argument("--contrasts", default="T1w,T2w,FLAIR")
    ap.add_argument("--voxel", type=float, default=1.5, help="stored voxel size of the synthetic scans (mm)")
    ap.add_argument("--strip-mm", type=float, default=2.0, help="lattice voxel size the tool sees (mm)")
    ap.add_argument("--work-mm", type=float, default=2.0)
    a = ap.parse_args(argv)
    print(f"torch threads: {torch.get_num_threads()}; scans {a.voxel} mm, stripping at {a.strip_mm} mm")
    print(f"{'contrast':8s} {'seed':>4s} {'method':8s} {'seconds':>8s} {'dice':>6s} {'vol_ml':>7s} {'true_ml':>7s}")
    for contrast in a.contrasts.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            img, meta = make_subject(seed, contrast, work_mm=a.work_mm, voxel_size=a.voxel,
                                     return_brain_mask=True, finalize=False)
            gt = meta["brain_mask"]
            lat, fov, aff = to_lattice(img, a.strip_mm)
            g, _ = _resample(np.asarray(gt.dataobj, np.float32), gt.affine, aff, lat.shape, order=1)
            g = g >= 0.5
            lat_img = nib.Nifti1Image(lat, aff)
            for meth in a.methods.split(","):
                t = time.perf_counter()
                try:
                    m = np.asarray(skull_strip(lat_img, meth).dataobj) > 0
                except Exception as exc:  # report and go on
                    print(f"{contrast:8s} {seed:4d} {meth:8s} failed: {exc}")
                    continue
                dt = time.perf_counter() - t
                d = 2 * np.count_nonzero(m & g) / (m.sum() + g.sum())
                v = a.strip_mm**3 / 1e3
                print(f"{contrast:8s} {seed:4d} {meth:8s} {dt:8.1f} {d:6.3f} {m.sum() * v:7.0f} {g.sum() * v:7.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
