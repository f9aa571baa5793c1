"""Background (out-of-head) artifact statistic: separation of clean and artifact scans.

Usage: python benchmarks/background_stat.py [--seeds 0-5] [--contrasts T1w,T2w,FLAIR]
       [--artifacts ghosting,wrap_around,motion,spike] [--severity 0.5] [--work-mm 3]
       [--max-voxels 2e6] [--timing] [--verbose]

Each clean head comes from ``qc_pipeline.synth.make_subject`` (site A, B, C in turn, so
voxel sizes, orientations, dtypes and noise levels vary); every artifact is applied to it
with ``apply_artifact(img, name, severity, rng=seed)``. Two clean controls test false
positives: ``clean`` and ``clean_zerofill`` (the same scan with the anterior-inferior
background and face zeroed, as after defacing, plus a zero-filled slab at one FOV edge).
:func:`qc_pipeline.qc.background.background_stats` runs on the RAS-reoriented native array.
Prints one table: per condition, how many scans gave a number, the median and range of
``background_artifact_fraction``, how many scans exceed 0 and the group flag's floor
(``qc_pipeline.group.DEFAULT_BACKGROUND_MIN_FRACTION``), and AUROC (artifact vs clean, ties = 1/2) of the fraction
and of ``ghost_ratio``. ``--timing`` adds the run time on a 1 mm (about 256^3) scan.
"""
import argparse
import os
import time
import warnings

os.environ.setdefault("NIPYPE_NO_ET", "1")
warnings.simplefilter("ignore")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from qc_pipeline.qc.background import background_stats  # noqa: E402
from qc_pipeline.group import DEFAULT_BACKGROUND_MIN_FRACTION as FLOOR  # noqa: E402
from qc_pipeline.synth import apply_artifact, make_subject  # noqa: E402


def _seeds(text):
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def _measure(img):
    can = nib.as_closest_canonical(img)
    data = np.asarray(can.dataobj, dtype=np.float32)
    t = time.perf_counter()
    st = background_stats(data, can.header.get_zooms()[:3])
    return st, time.perf_counter() - t


def _zerofill(img, rng):
    """Zero the anterior-inferior part of the head's surroundings (defacing) and a slab."""
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    can = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    d = np.asarray(can.dataobj).copy()
    nx, ny, nz = d.shape
    # RAS: anterior = high y, inferior = low z: zero a wedge in front of / below the face
    yy, zz = np.meshgrid(np.arange(ny), np.arange(nz), indexing="ij")
    wedge = (yy / ny - zz / nz) > 0.35
    d[:, wedge] = 0.0
    edge = int(rng.integers(3, 8))
    d[:edge] = 0.0  # zero-filled slab at one FOV edge
    return nib.Nifti1Image(d, can.affine)


def auroc(pos, neg):
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if not pos.size or not neg.size:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).mean()
    eq = (pos[:, None] == neg[None, :]).mean()
    return float(gt + 0.5 * eq)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0-5")
    ap.add_argument("--contrasts", default="T1w,T2w,FLAIR")
    ap.add_argument("--artifacts", default="ghosting,wrap_around,motion,spike")
    ap.add_argument("--severity", type=float, default=0.5)
    ap.add_argument("--work-mm", type=float, default=3.0)
    ap.add_argument("--max-voxels", type=float, default=2e6)
    ap.add_argument("--timing", action="store_true", help="also time a 1 mm (about 256^3) scan")
    ap.add_argument("--verbose", action="store_true", help="one line per scan")
    a = ap.parse_args(argv)
    arts = [s for s in a.artifacts.split(",") if s]
    conds = ["clean", "clean_zerofill"] + arts
    res = {c: [] for c in conds}
    times = []
    sites = "ABC"
    t_all = time.perf_counter()
    for contrast in a.contrasts.split(","):
        for seed in _seeds(a.seeds):
            site = sites[seed % 3]
            img, meta = make_subject(seed, contrast, site=site, work_mm=a.work_mm, max_voxels=a.max_voxels)
            rng = np.random.default_rng(seed)
            scans = [("clean", img), ("clean_zerofill", _zerofill(img, rng))]
            for art in arts:
                scans.append((art, apply_artifact(img, art, a.severity, rng=seed)))
            for cond, im in scans:
                st, dt = _measure(im)
                times.append(dt)
                res[cond].append(st)
                if a.verbose:
                    vs = "x".join(f"{v:.2f}" for v in img.header.get_zooms()[:3])
                    frac = "n/a" if st.background_artifact_fraction is None else f"{st.background_artifact_fraction:.4f}"
                    gr = "n/a" if st.ghost_ratio is None else f"{st.ghost_ratio:.4f}"
                    print(f"{contrast:6s} seed {seed:2d} site {site} {vs:15s} {cond:15s} frac {frac:>7s} "
                          f"ghost {gr:>8s} sigma {st.noise_sigma or float('nan'):9.4g} "
                          f"snr {st.snr or float('nan'):6.1f} bg {st.background_ml or float('nan'):6.0f} mL "
                          f"{dt:5.2f}s {st.reason or ''}", flush=True)
    clean_f = [s.background_artifact_fraction for s in res["clean"] if s.available]
    clean_g = [s.ghost_ratio for s in res["clean"] if s.available]
    print(f"\nseverity {a.severity}, contrasts {a.contrasts}, seeds {a.seeds} (sites A/B/C by seed), "
          f"work_mm {a.work_mm}, max_voxels {a.max_voxels:g}")
    print(f"{'condition':16s} {'n':>3s} {'avail':>5s} {'median frac':>11s} {'min':>8s} {'max':>8s} "
          f"{'>0':>4s} {'>floor':>6s} {'AUROC frac':>10s} {'AUROC ghost':>11s}")
    for c in conds:
        st = res[c]
        ok = [s for s in st if s.available]
        f = np.array([s.background_artifact_fraction for s in ok], float)
        g = [s.ghost_ratio for s in ok]
        au = "" if c == "clean" else f"{auroc(f, clean_f):10.3f}"
        ag = "" if c == "clean" else f"{auroc(g, clean_g):11.3f}"
        med = f"{np.median(f):11.4f}" if f.size else f"{'n/a':>11s}"
        mn = f"{f.min():8.4f}" if f.size else f"{'n/a':>8s}"
        mx = f"{f.max():8.4f}" if f.size else f"{'n/a':>8s}"
        print(f"{c:16s} {len(st):3d} {len(ok):5d} {med} {mn} {mx} {int((f > 0).sum()):4d} {int((f > FLOOR).sum()):6d} {au:>10s} {ag:>11s}")
    print(f"(>0 / >floor: scans with a fraction above 0 / above the group flag floor {FLOOR:g}; AUROC: "
          f"artifact vs clean, ties 1/2)")
    print(f"background_stats: median {np.median(times):.2f} s, max {np.max(times):.2f} s per scan "
          f"(these grids); total {time.perf_counter() - t_all:.0f} s")
    if a.timing:
        img, _ = make_subject(0, "T1w", work_mm=a.work_mm, voxel_size=1.0, max_voxels=3e7)
        for cond, im in (("clean", img), ("ghosting", apply_artifact(img, "ghosting", a.severity, rng=0))):
            st, dt = _measure(im)
            print(f"1 mm scan {'x'.join(map(str, img.shape))} ({cond}): {dt:.2f} s, "
                  f"fraction {st.background_artifact_fraction}")


if __name__ == "__main__":
    main()
