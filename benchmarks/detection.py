"""Detection benchmark: the paper's Table 1 protocol on our synthetic data.

Builds held-out normal heads (subject seeds drawn from ``--seed``, never used for
training: the shipped models were trained on ``itermask-qc-synth cohort --seed 1000``)
and artifact scans (fresh subjects, one artifact each, severity drawn from
``--severity``), runs every scan through the app's preprocessing and the engine, and
prints, per artifact type (that type's scans against all normal scans):
AUROC, AUPRC, FPR80, FPR90, FNR80, FNR90 for

- ``itermask3d/<schedule>``: anomaly fraction of the final IterMask3D mask,
- ``freq-mask-only``: whole brain masked once, mean squared error in the brain
  (the paper's "frequency masking only" ablation, same network),
- ``final-mean-error``: mean squared error in the brain at the final iteration
  (the paper's baseline score),
- ``qc_score_site/one`` and ``qc_score_site/half``: the group level's score, i.e. the same
  measurements scored against the scans of one site (median and ``max(MAD, reference
  scale)`` of the site): ``one``: a site of the normal scans plus this one artifact scan
  (each artifact scan in turn; the usual case of a mostly clean site); ``half``: a site
  of the normal scans plus all of this type's scans (half the site carries the same
  artifact: the worst case for a site-relative score),
- ``qc_score``: the per-scan score (``qc_pipeline.qc.score``): the largest robust z of
  the anomaly fraction and the image-quality measurements against a clean reference. The
  reference is the model card's ``qc_score`` section, or one fitted here on the normal
  scans of ``--calibration-json`` (a ``--json-out`` of normal scans with another
  ``--seed``; ``--update-card`` then also writes it into the card). A second table gives
  each measurement's own AUROC.

A scan whose preprocessing fails (e.g. NoBrainError) gets a score above every other: the app
reports it as failed, which a user treats as flagged.

Usage::

    python benchmarks/detection.py --model-dir models/t1w --n-normal 20 --n-per-artifact 20 \
        --artifacts all --schedules fast,reference

Runs can be split (e.g. one process per group of artifact types, sharing ``--cache``) with
``--json-out`` each, then merged into one table with ``--from-json a.json b.json``.
``--update-card`` records the table in the model folder's ``model_card.json``
(``evaluation``: one entry per protocol, replaced when the same protocol is rerun).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from qc_pipeline.io import atomic_write_npz, atomic_write_text

os.environ.setdefault("NIPYPE_NO_ET", "1")

#: score of a scan whose preprocessing failed: the app reports it as failed, which a user
#: treats as flagged, so it ranks above every score (a finite number: the metrics drop
#: non-finite scores)
FAILED = 1e12


def _scan_seed(base: int, group: str, i: int) -> int:
    h = sum(ord(c) * (k + 1) for k, c in enumerate(group))
    return int(np.random.default_rng([base, h, i]).integers(2**31 - 1))


def build_scan(kind: str, i: int, *, base_seed: int, contrast: str, severity: tuple[float, float],
               cortex_detail: bool = True):
    from qc_pipeline.synth import SITES, apply_artifact, make_subject

    seed = _scan_seed(base_seed, kind, i)
    site = sorted(SITES)[i % len(SITES)]
    img, meta = make_subject(seed, contrast, site=site, cortex_detail=cortex_detail)
    sev = 0.0
    if kind != "normal":
        rng = np.random.default_rng([seed, 17])
        sev = float(rng.uniform(*severity))
        extra = {"meta": meta} if kind == "different_sequence" else {}
        img = apply_artifact(img, kind, sev, rng, **extra)
    return img, seed, sev


def preprocess_cached(kind, i, cache: Path, card, args):
    from qc_pipeline.errors import InputError
    from qc_pipeline.preproc import preprocess

    from qc_pipeline.qc.score import native_measurements

    f = cache / f"{kind}_{i:03d}_s{args.seed}.npz"
    if f.is_file():
        z = np.load(f, allow_pickle=False)
        if "error" in z.files:
            return None, str(z["error"]), float(z["severity"])
        z = _with_native_measurements(f, z, kind, i, args.seed, card, args)
        return _prep_from_npz(z), None, float(z["severity"])
    img, seed, sev = build_scan(kind, i, base_seed=args.seed, contrast=card["contrast"],
                                severity=args.severity, cortex_detail=not args.plain_anatomy)
    try:
        res = preprocess(img, voxel_size=card["voxel_size"][0], grid=tuple(card["grid"]),
                         skull_strip=args.skull_strip, contrast=card["contrast"], name=f"{kind}_{i}")
    except InputError as exc:
        atomic_write_npz(f, error=str(exc), severity=sev)
        return None, str(exc), sev
    native = native_measurements(img)
    res.info.background, res.info.spectrum = native["background"], native["spectrum"]
    atomic_write_npz(f, image=res.image.astype(np.float32), mask=res.brain_mask, severity=sev,
                 signal_mask=res.signal_brain_mask, fov_mask=res.fov_mask,
                 head_image=res.head_image.astype(np.float16),
                 info=json.dumps(res.info.to_dict(), default=float))
    return _prep_from_npz(np.load(f, allow_pickle=False)), None, sev


def _with_native_measurements(path: Path, z, kind, i, seed, card, args):
    """Cache files whose native-image measurements (background statistic, spectral peak and
    line comb) came from an older version of the code (``native_measurements_stale``):
    build the scan again (same seed, so the same image), measure again and store them in
    the cache file's info."""
    from qc_pipeline.qc.score import native_measurements, native_measurements_stale

    info = json.loads(str(z["info"]))
    if not native_measurements_stale(info):
        return z
    img, _, _ = build_scan(kind, i, base_seed=seed, contrast=card["contrast"], severity=args.severity,
                           cortex_detail=not args.plain_anatomy)
    info.update(native_measurements(img))
    arrays = {k: z[k] for k in z.files}
    arrays["info"] = np.array(json.dumps(info, default=float))
    atomic_write_npz(path, **arrays)
    return np.load(path, allow_pickle=False)


def _prep_from_npz(z):
    """A light stand-in for PreprocResult from a cache file."""
    from types import SimpleNamespace

    info = json.loads(str(z["info"]))
    return SimpleNamespace(image=z["image"], brain_mask=z["mask"], signal_brain_mask=z["signal_mask"],
                           fov_mask=z["fov_mask"], head_image=z["head_image"].astype(np.float32),
                           info=SimpleNamespace(**info), info_dict=info)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (default: packaged T1w)")
    p.add_argument("--contrast", default="T1w")
    p.add_argument("--n-normal", type=int, default=20)
    p.add_argument("--n-per-artifact", type=int, default=20)
    p.add_argument("--artifacts", default="paper", help="'paper', 'all' or a comma list")
    p.add_argument("--schedules", default="fast,reference")
    p.add_argument("--severity", default="0.5:1.0", help="LO:HI severity range")
    p.add_argument("--seed", type=int, default=5000, help="base seed of the held-out scans")
    p.add_argument("--skull-strip", default="auto")
    p.add_argument("--plain-anatomy", action="store_true",
                   help="heads from the plain averaged template (itermask-qc-synth --plain-anatomy; "
                        "the T2w/FLAIR tables and the T1w tables before 2026-11-30); use its own "
                        "--cache folder")
    p.add_argument("--cache", type=Path, default=Path("benchmark_cache"))
    p.add_argument("--json-out", type=Path, default=None, help="write per-scan scores here")
    p.add_argument("--prepare-only", action="store_true",
                   help="only build and preprocess the scans into --cache (no scoring)")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="no scoring: merge these --json-out files into one table")
    p.add_argument("--reuse-json", type=Path, nargs="+", default=None,
                   help="take the scores of scans already in these --json-out files (same model, "
                        "seed and schedules) instead of scoring them again")
    p.add_argument("--save-maps", type=Path, default=None,
                   help="also save each scan's final mask and error maps (first schedule) here; "
                        "with one schedule, scans whose maps are already there are not scored "
                        "again (resume)")
    p.add_argument("--calibration-json", type=Path, nargs="+", default=None,
                   help="fit the qc_score reference on the normal scans of these --json-out files "
                        "(scored with another --seed) instead of taking the card's")
    p.add_argument("--calibration-seed", type=int, default=3000,
                   help="base seed of --calibration-json rows that do not record theirs (default 3000)")
    p.add_argument("--engine-only", action="store_true",
                   help="score the engine alone: no image-quality measurements, no QC-score columns "
                        "(the engine's seconds per scan only)")
    p.add_argument("--features-from-maps", action="store_true",
                   help="rows without quality measurements (older or merged runs) get them from "
                        "--cache and --save-maps")
    p.add_argument("--update-card", action="store_true",
                   help="write the table into the model card's evaluation list")
    args = p.parse_args(argv)
    args.severity = tuple(float(x) for x in args.severity.split(":"))

    from qc_pipeline.engine import IterMask3D
    from qc_pipeline.qc.metrics import detection_metrics
    from qc_pipeline.qc.score import FEATURES, combine, fit_reference, relative_scores
    from qc_pipeline.synth import ARTIFACTS, PAPER_ARTIFACTS

    arts = (list(PAPER_ARTIFACTS) if args.artifacts == "paper" else list(ARTIFACTS)
            if args.artifacts == "all" else [a.strip() for a in args.artifacts.split(",") if a.strip()])
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    model = IterMask3D.from_folder(args.model_dir, contrast=args.contrast, device="cpu")
    card = model.card
    args.cache.mkdir(parents=True, exist_ok=True)

    rows = []  # per scan
    plan = [("normal", i) for i in range(args.n_normal)] + [(a, i) for a in arts for i in range(args.n_per_artifact)]
    if args.from_json:
        plan = []
        for f in args.from_json:
            for r in json.loads(f.read_text()):
                if not any(q["kind"] == r["kind"] and q["i"] == r["i"] for q in rows):
                    rows.append(r)
        kinds = {r["kind"] for r in rows}
        arts = [a for a in ARTIFACTS if a in kinds]
        schedules = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("itermask3d/")})
    known = {}
    for f in args.reuse_json or []:
        for r in json.loads(f.read_text()):
            if all(f"itermask3d/{sch}" in r or r.get("error") for sch in schedules):
                known[(r["kind"], r["i"])] = r
    t_start = time.time()
    for n, (kind, i) in enumerate(plan, 1):
        if (kind, i) in known and not args.prepare_only:
            rows.append(known[(kind, i)])
            continue
        vols, err, sev = preprocess_cached(kind, i, args.cache, card, args)
        if args.prepare_only:
            print(f"[{n}/{len(plan)}] prepared {kind} {i}" + (f" ERROR {err}" if err else ""), file=sys.stderr, flush=True)
            continue
        row = {"kind": kind, "i": i, "seed": args.seed, "label": int(kind != "normal"), "severity": sev,
               "error": err}
        if vols is not None:
            image, mask = vols.image, vols.brain_mask
            row["background_artifact_fraction"] = (vols.info_dict.get("background") or {}).get(
                "background_artifact_fraction")
            row["background"] = vols.info_dict.get("background")
            row["prep"] = {k: vols.info_dict.get(k) for k in (
                "signal_brain_ml", "expected_brain_ml", "brain_ml_outside_fov",
                "brain_outside_grid_fraction", "zscore_mean", "zscore_sd", "prior")}
            saved = (args.save_maps / f"{kind}_{i:03d}_s{args.seed}.npz") if args.save_maps else None
            if saved is not None and saved.is_file() and len(schedules) == 1:
                # resume: this scan was scored before (e.g. by a run that was stopped) and
                # its maps were saved; the scores are read back from them
                sc = _scores_from_maps(vols, saved)
                row[f"itermask3d/{schedules[0]}"] = sc["fraction"]
                row["freq-mask-only"] = sc["first_mean_error"]
                row["final-mean-error"] = sc["final_mean_error"]
                row["features"] = sc["features"]
                row["from_saved_maps"] = True
            for k, sch in enumerate(schedules if "features" not in row else []):
                r = model.run(image, mask, voxel_size=card["voxel_size"], schedule=sch, seed=0)
                # as the app: the loop's mask against the model's normal-error map, when it has one
                r = model.against_normal_error(
                    r, grid_affine=vols.info_dict.get("grid_affine"),
                    template_to_world=(vols.info_dict.get("prior") or {}).get("affine"))
                if k == 0 and not args.engine_only:
                    row["features"] = _features(vols, r.mask, r.anomaly_fraction, r.first_pass_mean_error)
                if args.save_maps is not None and sch == schedules[0]:
                    args.save_maps.mkdir(parents=True, exist_ok=True)
                    atomic_write_npz(args.save_maps / f"{kind}_{i:03d}_s{args.seed}.npz",
                                 final_mask=r.mask, error_map=r.error_map.astype(np.float16),
                                 first_error_map=r.first_pass_error_map.astype(np.float16))
                row[f"itermask3d/{sch}"] = r.anomaly_fraction
                row[f"passes/{sch}"] = r.forward_passes
                row[f"seconds/{sch}"] = r.seconds
                row.setdefault("freq-mask-only", r.first_pass_mean_error)
                row["final-mean-error"] = r.mean_error  # last schedule listed wins
        rows.append(row)
        print(f"[{n}/{len(plan)}] {kind} {i}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "severity")
            + (f" ERROR {err}" if err else ""), file=sys.stderr, flush=True)

    if args.prepare_only:
        return 0
    if args.json_out:  # written again below with the qc_score fields
        args.json_out.write_text(json.dumps(rows, indent=1, default=float))
    methods = [f"itermask3d/{s}" for s in schedules] + ["freq-mask-only", "final-mean-error"]
    if args.features_from_maps:
        for row in rows:
            if "features" not in row and not row.get("error"):
                f = _features_from_maps(row, args)
                if f is not None:
                    row["features"] = f
    reference = card.get("qc_score")
    if args.calibration_json:
        cal = [r for f in args.calibration_json for r in json.loads(f.read_text())
               if r["kind"] == "normal" and not r.get("error")]
        for r in cal:
            if "features" not in r and args.features_from_maps:
                r["features"] = _features_from_maps(r, args, seed=r.get("seed", args.calibration_seed))
        cal = [r for r in cal if r.get("features")]
        seeds = sorted({int(r.get("seed", args.calibration_seed)) for r in cal})
        reference = fit_reference([r["features"] for r in cal], source=(
            f"{len(cal)} held-out synthetic normal {card['contrast']} heads (benchmarks/detection.py "
            f"--seed {'/'.join(map(str, seeds))} --n-normal {len(cal)}), never used for training or testing"))
        print(f"qc_score reference fitted on {len(cal)} calibration normals", file=sys.stderr)
    if reference and all(r.get("features") for r in rows if not r.get("error")):
        for row in rows:
            if not row.get("error"):
                row["qc_score"] = combine(row["features"], reference).qc_score
        methods += ["qc_score", "qc_score_site/one", "qc_score_site/half"]

    def score(row, m):
        return FAILED if row["error"] else row[m]

    normals = [r for r in rows if r["kind"] == "normal"]
    per_art = sorted({sum(1 for r in rows if r["kind"] == a) for a in arts})
    print(f"\nModel: {card.get('model_id', args.model_dir)}  normals: {len(normals)}  "
          f"per artifact: {'/'.join(map(str, per_art))}  severity: {args.severity}  "
          f"wall time: {(time.time() - t_start) / 60:.1f} min")
    print(f"Normal scans failing preprocessing: {sum(1 for r in normals if r['error'])}")
    header = "| artifact | method | n | AUROC | AUPRC | FPR80 | FPR90 | FNR80 | FNR90 |"
    print("\n" + header + "\n|---|---|---|---|---|---|---|---|---|")
    names = ("AUROC", "AUPRC", "FPR80", "FPR90", "FNR80", "FNR90")
    table = []
    for a in (arts if normals else []):
        pos = [r for r in rows if r["kind"] == a]
        for m in methods:
            sub = normals + pos
            if m == "qc_score_site/half":  # the group level's score; site = normals + this type
                ok = [r for r in sub if not r["error"]]
                rel = dict(zip((id(r) for r in ok), relative_scores([r["features"] for r in ok], reference)))
                scores = [FAILED if r["error"] else rel[id(r)][0] for r in sub]
            elif m == "qc_score_site/one":  # site = the normals + this one artifact scan
                base = [r for r in normals if not r["error"]]
                rel = dict(zip((id(r) for r in base), relative_scores([r["features"] for r in base], reference)))
                for r in pos:
                    if not r["error"]:
                        rel[id(r)] = relative_scores([q["features"] for q in base + [r]], reference)[-1]
                scores = [FAILED if r["error"] else rel[id(r)][0] for r in sub]
            else:
                scores = [score(r, m) for r in sub]
            dm = detection_metrics([r["label"] for r in sub], scores)
            vals = [getattr(dm, k) for k in names]
            table.append({"artifact": a, "method": m, "n_artifact": len(pos), "n_normal": len(normals),
                          **{k: (None if v is None or not np.isfinite(v) else round(100 * float(v), 1))
                             for k, v in zip(names, vals)}})
            print(f"| {a} | {m} | {len(pos)} | " + " | ".join(
                "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}" for v in vals) + " |")
    for sch in schedules:
        passes = [r[f"passes/{sch}"] for r in rows if f"passes/{sch}" in r]
        secs = [r[f"seconds/{sch}"] for r in rows if f"seconds/{sch}" in r]
        if passes:
            print(f"\n{sch}: median {np.median(passes):.0f} forward passes, median {np.median(secs):.1f} s per scan")
    feats = [f for f in FEATURES if any(r.get("features", {}).get(f) is not None for r in rows)
             and f in ((reference or {}).get("features") or {})]
    if feats and normals and reference:
        print("\nEach measurement alone (AUROC %, signed as in the QC score; n/a = not measured; "
              "measurements the reference lacks are left out):\n")
        print("| artifact | " + " | ".join(feats) + " |\n|---|" + "---|" * len(feats))
        for a in arts:
            sub = normals + [r for r in rows if r["kind"] == a]
            vals = []
            for f in feats:
                z = [FAILED if r["error"] else combine({f: (r.get("features") or {}).get(f)},
                                                          {"features": {f: reference["features"][f]}}).qc_score
                     for r in sub]
                keep = [i for i, v in enumerate(z) if v is not None]
                dm = detection_metrics([sub[i]["label"] for i in keep], [z[i] for i in keep])
                vals.append("n/a" if dm.AUROC is None or not np.isfinite(dm.AUROC) else f"{100 * dm.AUROC:.1f}")
            print(f"| {a} | " + " | ".join(vals) + " |")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1, default=float))
    if args.update_card and args.calibration_json and reference:
        from qc_pipeline.calibrate import write_card_reference

        write_card_reference(card.get("model_dir") or args.model_dir, reference)
    if args.update_card and table:
        _update_card(card.get("model_dir") or args.model_dir, table,
                     protocol=(f"benchmarks/detection.py: {len(normals)} held-out normal + "
                               f"{'/'.join(map(str, per_art))} per artifact type "
                               f"({', '.join(arts)}), severity {args.severity[0]:g}-"
                               f"{args.severity[1]:g}, base seed {args.seed}; percent"),
                     command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
    return 0


def _features(vols, final_mask, fraction, recon_error):
    """The QC-score measurements, exactly as the app takes them (``scan_quality``)."""
    from types import SimpleNamespace

    from qc_pipeline.qc.score import scan_quality

    result = SimpleNamespace(mask=final_mask, anomaly_fraction=fraction, first_pass_mean_error=recon_error)
    return scan_quality(vols, result, None).features


def _scores_from_maps(vols, path: Path) -> dict:
    """Scores and measurements of a scan from its saved maps (``--save-maps``)."""
    m = np.load(path)
    brain = vols.brain_mask
    fm = m["final_mask"]
    fraction = float(fm.sum() / brain.sum())
    first = float(m["first_error_map"].astype(np.float32)[brain].mean())
    return {"fraction": fraction, "first_mean_error": first,
            "final_mean_error": float(m["error_map"].astype(np.float32)[brain].mean()),
            "features": _features(vols, fm, fraction, first)}


def _features_from_maps(row, args, seed=None):
    """Quality measurements of a scored row from its cached volumes and saved maps."""
    name = f"{row['kind']}_{row['i']:03d}_s{row.get('seed', args.seed) if seed is None else seed}.npz"
    if args.save_maps is None or not (args.save_maps / name).is_file() or not (args.cache / name).is_file():
        return None
    z = np.load(args.cache / name, allow_pickle=False)
    vols = _prep_from_npz(_with_native_measurements(args.cache / name, z, row["kind"], row["i"],
                                                    row.get("seed", args.seed) if seed is None else seed,
                                                    {"contrast": args.contrast}, args))
    return _scores_from_maps(vols, args.save_maps / name)["features"]


def _update_card(model_dir, table, *, protocol: str, command: str) -> None:
    """Record ``table`` in ``model_dir/model_card.json`` (atomic; same protocol replaced)."""
    import datetime

    path = Path(model_dir) / "model_card.json"
    card = json.loads(path.read_text())
    evals = card.get("evaluation")
    evals = [evals] if isinstance(evals, dict) else list(evals or [])
    evals = [e for e in evals if e.get("protocol") != protocol]
    evals.append({"protocol": protocol, "date": datetime.date.today().isoformat(),
                  "command": command, "table": table})
    card["evaluation"] = evals
    atomic_write_text(json.dumps(card, indent=1) + "\n", path)
    print(f"evaluation table written to {path}")


if __name__ == "__main__":
    sys.exit(main())
