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
  (the paper's baseline score).

A scan whose preprocessing fails (e.g. NoBrainError) gets score +inf: the app
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
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("NIPYPE_NO_ET", "1")


def _scan_seed(base: int, group: str, i: int) -> int:
    h = sum(ord(c) * (k + 1) for k, c in enumerate(group))
    return int(np.random.default_rng([base, h, i]).integers(2**31 - 1))


def build_scan(kind: str, i: int, *, base_seed: int, contrast: str, severity: tuple[float, float]):
    from qc_pipeline.synth import SITES, apply_artifact, make_subject

    seed = _scan_seed(base_seed, kind, i)
    site = sorted(SITES)[i % len(SITES)]
    img, meta = make_subject(seed, contrast, site=site)
    sev = 0.0
    if kind != "normal":
        rng = np.random.default_rng([seed, 17])
        sev = float(rng.uniform(*severity))
        extra = {"meta": meta} if kind == "different_sequence" else {}
        img = apply_artifact(img, kind, sev, rng, **extra)
    return img, seed, sev


def _save_atomic(path: Path, **arrays) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def preprocess_cached(kind, i, cache: Path, card, args):
    from qc_pipeline.errors import InputError
    from qc_pipeline.preprocessing import preprocess

    f = cache / f"{kind}_{i:03d}.npz"
    if f.is_file():
        z = np.load(f, allow_pickle=False)
        if "error" in z.files:
            return None, str(z["error"]), float(z["severity"])
        return (z["image"], z["mask"]), None, float(z["severity"])
    img, seed, sev = build_scan(kind, i, base_seed=args.seed, contrast=card["contrast"],
                                severity=args.severity)
    try:
        res = preprocess(img, voxel_size=card["voxel_size"][0], grid=tuple(card["grid"]),
                         skull_strip=args.skull_strip, contrast=card["contrast"], name=f"{kind}_{i}")
    except InputError as exc:
        _save_atomic(f, error=str(exc), severity=sev)
        return None, str(exc), sev
    _save_atomic(f, image=res.image.astype(np.float32), mask=res.brain_mask, severity=sev)
    return (res.image.astype(np.float32), res.brain_mask), None, sev


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
    p.add_argument("--cache", type=Path, default=Path("benchmark_cache"))
    p.add_argument("--json-out", type=Path, default=None, help="write per-scan scores here")
    p.add_argument("--prepare-only", action="store_true",
                   help="only build and preprocess the scans into --cache (no scoring)")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="no scoring: merge these --json-out files into one table")
    p.add_argument("--reuse-json", type=Path, nargs="+", default=None,
                   help="take the scores of scans already in these --json-out files (same model, "
                        "seed and schedules) instead of scoring them again")
    p.add_argument("--update-card", action="store_true",
                   help="write the table into the model card's evaluation list")
    args = p.parse_args(argv)
    args.severity = tuple(float(x) for x in args.severity.split(":"))

    from qc_pipeline.engine import IterMask3D
    from qc_pipeline.metrics import detection_metrics
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
        row = {"kind": kind, "i": i, "label": int(kind != "normal"), "severity": sev, "error": err}
        if vols is not None:
            image, mask = vols
            for sch in schedules:
                r = model.run(image, mask, voxel_size=card["voxel_size"], schedule=sch, seed=0)
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
    methods = [f"itermask3d/{s}" for s in schedules] + ["freq-mask-only", "final-mean-error"]

    def score(row, m):
        return math.inf if row["error"] else row[m]

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
    for a in arts:
        pos = [r for r in rows if r["kind"] == a]
        for m in methods:
            sub = normals + pos
            dm = detection_metrics([r["label"] for r in sub], [score(r, m) for r in sub])
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
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1, default=float))
    if args.update_card:
        _update_card(card.get("model_dir") or args.model_dir, table,
                     protocol=(f"benchmarks/detection.py: {len(normals)} held-out normal + "
                               f"{'/'.join(map(str, per_art))} per artifact type "
                               f"({', '.join(arts)}), severity {args.severity[0]:g}-"
                               f"{args.severity[1]:g}, base seed {args.seed}; percent"),
                     command="python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
    return 0


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"evaluation table written to {path}")


if __name__ == "__main__":
    sys.exit(main())
