#!/usr/bin/env python
"""The ``adapt`` level on real heads: one site per head (or a pool of heads), its artifacts among
the scans it adapts on.

For each real head (``--scan NAME=PATH``) a BIDS site is built, and one per ``--pool
NAME=HEAD,HEAD`` holding the copies of several heads (a site of different people):
``--n-clean`` clean copies under scanner variation (``benchmarks/real_scan.variant``: voxel
size, orientation, tilt, intensity scale, data type, extra noise) and one copy per ``--types``
artifact (a further variant with ``qc_pipeline.synth.apply_artifact``, severity drawn in
``--severity``), each copy a subject. The site is screened twice through the real CLI with the same work folder:

- ``before``: ``itermask-qc BIDS OUT/before participant`` with the base model (the packaged
  one or ``--model-dir``), then ``group``;
- ``after``: ``itermask-qc BIDS OUT/after adapt`` (the level screens, leaves out the worst
  ``--adapt-exclude`` of the site, fine-tunes, recalibrates and screens again), then ``group``.

It prints, per site and setting: the clean copies' median masked fraction
(``anomaly_fraction``, "clean masked %"), AUROC of the engine's own ``anomaly_voxels`` and of
the site-relative QC score (``qc_score_site``) of the artifact copies against the clean ones,
the group level's flag rates (share of clean copies flagged, share of artifact copies
flagged; no ratings given, so the flags are the ordinary ones) and failures, and for
``after`` the training and excluded scans, steps and minutes. ``--variant NAME=ARGS`` adds an
``after (NAME)`` row: the adapt level again with extra options (e.g. ``--adapt-steps 1``: the
site's normal error with next to no fine-tuning; ``--adapt-base-normal-error``: fine-tuning
with the base model's map). Nothing here is tuned on these
heads; the truth (which copy carries an artifact) is used only for the table.

Usage::

    NIPYPE_NO_ET=1 .venv/bin/python benchmarks/adapt_site.py --scan robex=PATH s1=PATH \\
        --n-clean 18 --types chunk_top ghosting motion spike --out RUN \\
        --adapt-minutes 12 --nprocs 2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("NIPYPE_NO_ET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_site(name: str, heads: list[tuple[str, Path]], root: Path, *, n_clean: int, types, severity,
               seed: int) -> dict:
    """Write the BIDS site ``name`` holding the copies of one or more real heads (several heads:
    a site of different people, each head's subjects prefixed with its name); returns
    ``{bids_name: (label, kind)}``."""
    if (root / "truth.json").is_file():
        return json.loads((root / "truth.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": f"adapt-{name}", "BIDSVersion": "1.9.0"}))
    truth = {}
    for head, src_path in heads:
        truth.update(write_copies(src_path, root, n_clean=n_clean, types=types, severity=severity, seed=seed,
                                  prefix=head if len(heads) > 1 else ""))
    (root / "participants.tsv").write_text("participant_id\tsite\n" + "".join(
        f"{n.rsplit('_', 1)[0]}\t{name}\n" for n in truth))
    (root / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def write_copies(src_path: Path, root: Path, *, n_clean: int, types, severity, seed: int,
                 prefix: str = "", protocol: str = "research") -> dict:
    """Write the copies of one real head into the BIDS folder ``root`` as subjects
    ``<prefix>cNN`` (clean scanner-variation copies of ``protocol``, ``real_scan.variant``) and
    ``<prefix>aNN`` (one per artifact type); returns ``{bids_name: (label, kind)}``."""
    import nibabel as nib

    from qc_pipeline.synth import ARTIFACTS, apply_artifact
    from real_scan import variant

    truth = {}
    src = nib.load(str(src_path))
    jobs = [(f"{prefix}c{v:02d}", v, None) for v in range(n_clean)]
    jobs += [(f"{prefix}a{i:02d}", n_clean + list(ARTIFACTS).index(kind), kind) for i, kind in enumerate(types)]
    for sub, v, kind in jobs:
        img, _ = variant(src, v, seed, protocol)
        if kind is not None:
            rng = np.random.default_rng([seed, v, 17])
            sev = float(rng.uniform(*severity))
            img = apply_artifact(img, kind, sev, rng)
        path = root / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        truth[f"sub-{sub}_T1w"] = [int(kind is not None), kind or "clean"]
    return truth


def _cli(*args) -> int:
    cmd = [sys.executable, "-m", "qc_pipeline.cli.app", *map(str, args)]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _metrics(out: Path, truth: dict) -> dict:
    from qc_pipeline.qc.metrics import detection_metrics

    with open(out / "group_T1w.csv", newline="") as fh:
        rows = {r["bids_name"]: r for r in csv.DictReader(fh)}

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return np.nan

    y, vox, site, flag, clean_frac, failed = [], [], [], [], [], 0
    for name, (label, _kind) in truth.items():
        r = rows.get(name)
        if r is None or r.get("status") != "ok":
            failed += 1
            y.append(label)
            vox.append(1e12)  # a failed scan is reported, i.e. found
            site.append(1e12)
            flag.append(1)
            continue
        y.append(label)
        vox.append(num(r["anomaly_voxels"]))
        site.append(num(r["qc_score_site"]))
        flag.append(int(str(r["flagged"]).lower() in ("1", "true", "yes")))
        if not label:
            clean_frac.append(num(r["anomaly_fraction"]))
    y, flag = np.array(y), np.array(flag)
    return {
        "clean_masked_pct": 100 * float(np.median(clean_frac)) if clean_frac else np.nan,
        "engine_auroc": 100 * detection_metrics(y, vox).AUROC,
        "site_score_auroc": 100 * detection_metrics(y, site).AUROC,
        "clean_flagged_pct": 100 * float(flag[y == 0].mean()),
        "artifact_flagged_pct": 100 * float(flag[y == 1].mean()),
        "failed": failed,
        "model_ids": sorted({r.get("model_id", "") for r in rows.values()}),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scan", nargs="+", required=True, help="NAME=PATH of real T1w heads")
    p.add_argument("--n-clean", type=int, default=18)
    p.add_argument("--types", nargs="+", default=["chunk_top", "ghosting", "motion", "spike"])
    p.add_argument("--severity", type=float, nargs=2, default=(0.5, 1.0))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--adapt-minutes", type=float, default=12.0)
    p.add_argument("--adapt-steps", type=int, default=400)
    p.add_argument("--adapt-exclude", type=float, default=0.2)
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--pool", action="append", default=[], metavar="NAME=HEAD,HEAD",
                   help="also one site of several --scan heads (different people), e.g. "
                        "held_out=colin,bb1,bb2 (repeatable)")
    p.add_argument("--pool-only", action="store_true", help="run the --pool sites only, not each head alone")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="also adapt with these extra level options into OUT/<head>/after_NAME "
                        "(same work folder), e.g. maponly='--adapt-steps 1' (repeatable)")
    a = p.parse_args(argv)

    paths = {}
    for spec in a.scan:
        if "=" not in spec:
            p.error(f"--scan wants NAME=PATH, got {spec!r}")
        name, path = spec.split("=", 1)
        paths[name] = Path(path)
    sites = [] if a.pool_only else [(name, [(name, path)]) for name, path in paths.items()]
    for spec in a.pool:
        name, _, members = spec.partition("=")
        unknown = [m for m in members.split(",") if m not in paths]
        if not name or not members or unknown:
            p.error(f"--pool wants NAME=HEAD,HEAD of --scan heads, got {spec!r}"
                    + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        sites.append((name, [(m, paths[m]) for m in members.split(",")]))

    results = {}
    for name, heads in sites:
        base = a.out / name
        truth = build_site(name, heads, base / "bids", n_clean=a.n_clean, types=a.types,
                           severity=a.severity, seed=a.seed)
        common = ["-w", base / "work", "--nprocs", a.nprocs, "--device", "cpu"]
        if a.model_dir:
            common += ["--model-dir", a.model_dir]
        res = {}
        t = time.time()
        _cli(base / "bids", base / "before", "participant", *common)
        _cli(base / "bids", base / "before", "group")
        res["before"] = _metrics(base / "before", truth)
        res["before"]["minutes"] = (time.time() - t) / 60
        t = time.time()
        _cli(base / "bids", base / "after", "adapt", *common, "--adapt-minutes", a.adapt_minutes,
             "--adapt-steps", a.adapt_steps, "--adapt-exclude", a.adapt_exclude)
        _cli(base / "bids", base / "after", "group")
        res["after"] = _metrics(base / "after", truth)
        res["after"]["minutes"] = (time.time() - t) / 60
        card = json.loads((base / "after" / "models" / "T1w" / "model_card.json").read_text())
        ad = card.get("adaptation") or {}
        excluded = ad.get("excluded_scans", {})
        res["adaptation"] = {
            "training": len(ad.get("training_scans", [])),
            "excluded": len(excluded),
            "artifacts_excluded": sum(1 for n in excluded if truth.get(n, [0])[0]),
            "artifacts_in_site": sum(v[0] for v in truth.values()),
            "steps": ad.get("steps"), "fine_tune_min": (ad.get("wall_time_s") or 0) / 60,
            "gamma": card.get("gamma"),
        }
        for spec in a.variant:
            vname, extra = spec.split("=", 1)
            t = time.time()
            folder = base / f"after_{vname}"
            _cli(base / "bids", folder, "adapt", *common, "--adapt-minutes", a.adapt_minutes,
                 "--adapt-steps", a.adapt_steps, "--adapt-exclude", a.adapt_exclude, *shlex.split(extra))
            _cli(base / "bids", folder, "group")
            res[f"after ({vname})"] = _metrics(folder, truth)
            res[f"after ({vname})"]["minutes"] = (time.time() - t) / 60
        results[name] = res
        _print(results)
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=1, default=float))
    return 0


def _print(results: dict) -> None:
    print()
    print("| site | setting | clean masked % | engine AUROC | site-score AUROC | clean flagged % "
          "| artifacts flagged % | failed | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        for setting in [k for k in res if k.startswith(("before", "after"))]:
            m = res[setting]
            print(f"| {name} | {setting} | {m['clean_masked_pct']:.1f} | {m['engine_auroc']:.1f} | "
                  f"{m['site_score_auroc']:.1f} | {m['clean_flagged_pct']:.1f} | {m['artifact_flagged_pct']:.1f} "
                  f"| {m['failed']} | {m['minutes']:.1f} |")
    print()
    print("| site | training scans | left out | artifacts left out | steps | fine-tune min | gamma |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        ad = res["adaptation"]
        print(f"| {name} | {ad['training']} | {ad['excluded']} | {ad['artifacts_excluded']} of "
              f"{ad['artifacts_in_site']} | {ad['steps']} | {ad['fine_tune_min']:.1f} | {ad['gamma']} |")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
