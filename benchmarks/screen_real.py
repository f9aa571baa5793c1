#!/usr/bin/env python
"""The whole app on real heads: each head as its own site, and heads of different people pooled.

For each real T1w head (``--scan NAME=PATH``) ``--n-clean`` clean copies under scanner variation
(``--protocol``: 3D research voxels, or clinical 2D stacks of thick axial slices) and one copy
per ``--types`` artifact (``adapt_site.write_copies``) go into ONE BIDS dataset,
each copy a subject; ``participants.tsv`` names the head as ``site`` and its ``--group`` as
``pool`` (several people as one site). The dataset is screened once through the real CLI
(``participant``), then ranked twice (``group`` with ``--site-column site``, then ``pool``).

Printed per head (from the ``site`` run) and per pool (from the ``pool`` run): the clean copies'
median masked share of the brain (``anomaly_fraction``: the participant level's engine mask), AUROC
(percent) of the engine's own ``anomaly_voxels`` against all artifact types and the local ones,
AUROC of ``site_anomaly_fraction`` (the engine against the site's scans) and of
``qc_score_site``, and the flag rates of the group table: the share of clean and of artifact
copies with ``flagged``, and with any flag (``flagged``, ``background_flagged`` or
``engine_flagged``), and how often the table names the engine (an engine measurement among the
scan's ``qc_score_contributors`` or ``qc_score_site_contributors``, or its ``engine_flagged``).
The truth (which copy carries an artifact) is used only for the table.

    NIPYPE_NO_ET=1 .venv/bin/python benchmarks/screen_real.py --out RUN --nprocs 2 \\
        --scan itk=ITK robex=ROBEX s1=S1 colin=COLIN bb1=BB1 bb2=BB2 \\
        --group dev=itk,robex,s1 --group held_out=colin,bb1,bb2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("NIPYPE_NO_ET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapt_site import _cli, write_copies  # noqa: E402

LOCAL = ("chunk_top", "susceptibility", "spike", "ghosting")
TYPES = ["motion", "ghosting", "spike", "susceptibility", "chunk_top", "kspace_noise", "wrap_around", "blur"]


def build(root: Path, scans: dict, pools: dict, *, n_clean: int, types, severity, seed: int,
          protocol: str = "research") -> dict:
    """The BIDS dataset (once; reused when its truth file exists): ``{bids_name: [label, kind, head]}``."""
    if (root / "truth.json").is_file():
        return json.loads((root / "truth.json").read_text())
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "real heads", "BIDSVersion": "1.9.0"}))
    truth, rows = {}, []
    for name, path in scans.items():
        t = write_copies(Path(path), root, n_clean=n_clean, types=types, severity=severity, seed=seed,
                         prefix=name.replace("_", ""), protocol=protocol)
        for bids_name, (label, kind) in t.items():
            truth[bids_name] = [label, kind, name]
            rows.append(f"{bids_name.rsplit('_', 1)[0]}\t{name}\t{pools.get(name, 'all')}\n")
        print(f"{name}: {len(t)} copies", file=sys.stderr, flush=True)
    (root / "participants.tsv").write_text("participant_id\tsite\tpool\n" + "".join(rows))
    (root / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _yes(v) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")


def _auc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    y, s = np.asarray(y), np.asarray(s, dtype=float)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    if len(set(y.tolist())) < 2:
        return float("nan")
    return 100.0 * roc_auc_score(y, s)


def summarise(rows: dict, truth: dict, members) -> dict:
    """Measurements of the copies of ``members`` (heads) in one group table."""
    names = [n for n, (_, _, head) in truth.items() if head in members]
    y, kinds, vox, site_an, site_sc, flag, anyflag, clean_frac, failed = [], [], [], [], [], [], [], [], 0
    named = []
    for n in names:
        label, kind, _ = truth[n]
        r = rows.get(n)
        y.append(label)
        kinds.append(kind)
        if r is None or r.get("status") != "ok":  # a failed scan is reported, i.e. found
            failed += 1
            vox.append(1e12), site_an.append(1e12), site_sc.append(1e12), flag.append(True), anyflag.append(True)
            named.append(False)
            continue
        named.append(_engine_named(r))
        vox.append(_num(r["anomaly_voxels"]))
        site_an.append(_num(r.get("site_anomaly_fraction")))
        site_sc.append(_num(r.get("qc_score_site")))
        f = _yes(r["flagged"])
        flag.append(f)
        anyflag.append(f or _yes(r.get("background_flagged")) or _yes(r.get("engine_flagged")))
        if not label:
            clean_frac.append(_num(r["anomaly_fraction"]))
    y, flag, anyflag, named = np.array(y), np.array(flag), np.array(anyflag), np.array(named)
    local = np.array([k == "clean" or k in LOCAL for k in kinds])
    local_art = local & (y == 1)

    def both(s):
        s = np.asarray(s, dtype=float)
        return _auc(y, s), _auc(y[local], s[local])

    return {"n": len(names), "failed": failed,
            "clean_masked_pct": 100 * float(np.median(clean_frac)) if clean_frac else float("nan"),
            "engine": both(vox), "site_anomaly": both(site_an), "qc_score_site": both(site_sc),
            "clean_flagged_pct": 100 * float(flag[y == 0].mean()),
            "artifact_flagged_pct": 100 * float(flag[y == 1].mean()),
            "clean_any_flag_pct": 100 * float(anyflag[y == 0].mean()),
            "artifact_any_flag_pct": 100 * float(anyflag[y == 1].mean()),
            "engine_named_clean_pct": 100 * float(named[y == 0].mean()),
            "engine_named_local_pct": 100 * float(named[local_art].mean()) if local_art.any() else float("nan"),
            "engine_named_artifact_pct": 100 * float(named[y == 1].mean())}


def _engine_named(row: dict) -> bool:
    """Whether the group table names the engine for this scan: one of its measurements among
    the scan's contributors (against the model's reference or against the site), or its flag
    against the site's scans."""
    from qc_pipeline.group import contributor_names
    from qc_pipeline.qc.score import ENGINE_MEASURES

    names = set(contributor_names(row.get("qc_score_contributors")) +
                contributor_names(row.get("qc_score_site_contributors")))
    return bool(names & set(ENGINE_MEASURES)) or _yes(row.get("engine_flagged"))


def _read(path: Path) -> dict:
    with open(path, newline="") as fh:
        return {r["bids_name"]: r for r in csv.DictReader(fh)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scan", nargs="+", required=True, help="NAME=PATH of real T1w heads")
    p.add_argument("--group", action="append", default=[], metavar="POOL=HEAD,HEAD",
                   help="heads screened as one site of different people (repeatable; default: all)")
    p.add_argument("--n-clean", type=int, default=6)
    p.add_argument("--types", nargs="+", default=TYPES)
    p.add_argument("--severity", type=float, nargs=2, default=(0.5, 1.0))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol", choices=["research", "clinical"], default="research",
                   help="the copies' acquisition (benchmarks/real_scan.variant): 3D research voxels, or "
                        "clinical 2D stacks of 3-6 mm axial slices")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--group-option", action="append", default=[], metavar="OPT",
                   help="an option for the group level, e.g. --group-option=--site-norm-spread=0 (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json-out", type=Path, default=None)
    a = p.parse_args(argv)

    scans = dict(s.split("=", 1) for s in a.scan)
    pools = {h: g.split("=", 1)[0] for g in a.group for h in g.split("=", 1)[1].split(",")}
    truth = build(a.out / "bids", scans, pools, n_clean=a.n_clean, types=a.types, severity=a.severity,
                  seed=a.seed, protocol=a.protocol)
    out = a.out / "out"
    common = ["-w", a.out / "work", "--nprocs", a.nprocs, "--device", "cpu"]
    if a.model_dir:
        common += ["--model-dir", a.model_dir]
    t0 = time.time()
    _cli(a.out / "bids", out, "participant", *common)
    minutes = (time.time() - t0) / 60
    tables = {}
    for column in ("pool", "site"):
        _cli(a.out / "bids", out, "group", "--site-column", column, *a.group_option)
        shutil.copyfile(out / "group_T1w.csv", a.out / f"group_T1w_by_{column}.csv")
        tables[column] = _read(a.out / f"group_T1w_by_{column}.csv")
    results = {"minutes_participant": minutes, "n_scans": len(truth), "heads": {}, "pools": {}}
    for head in scans:
        results["heads"][head] = summarise(tables["site"], truth, [head])
    for pool in sorted(set(pools.values()) or {"all"}):
        members = [h for h in scans if pools.get(h, "all") == pool]
        results["pools"][pool] = summarise(tables["pool"], truth, members)
    print(f"\n{len(truth)} copies, participant level {minutes:.1f} min ({a.nprocs} processes)\n")
    print("| site | copies (failed) | clean masked % | engine AUROC all / local | site_anomaly AUROC all / local "
          "| qc_score_site AUROC all / local | flagged: clean % / artifacts % | any flag: clean % / artifacts % "
          "| engine named: clean % / local % / all artifacts % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, group in (("", results["heads"]), ("pooled ", results["pools"])):
        for name, m in group.items():
            print(f"| {kind}{name} | {m['n']} ({m['failed']}) | {m['clean_masked_pct']:.1f} | "
                  f"{m['engine'][0]:.1f} / {m['engine'][1]:.1f} | "
                  f"{m['site_anomaly'][0]:.1f} / {m['site_anomaly'][1]:.1f} | "
                  f"{m['qc_score_site'][0]:.1f} / {m['qc_score_site'][1]:.1f} | "
                  f"{m['clean_flagged_pct']:.0f} / {m['artifact_flagged_pct']:.0f} | "
                  f"{m['clean_any_flag_pct']:.0f} / {m['artifact_any_flag_pct']:.0f} | "
                  f"{m['engine_named_clean_pct']:.0f} / {m['engine_named_local_pct']:.0f} / "
                  f"{m['engine_named_artifact_pct']:.0f} |")
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
