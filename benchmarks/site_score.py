#!/usr/bin/env python
"""The group level's site score: one measurement's largest z against the joint distance.

``qc_pipeline.qc.score.relative_scores`` scores each scan against its site's clean side per
measurement (``relative_z``) and combines the z's into one number. Two combinations are
compared on the same z's: ``max`` (the largest z: one measurement far out) and ``joint`` (the
root of the summed squares of the positive z's, the shipped one: one far out, or several out
together). Flagged = score above ``--cut`` (the group level's ``site_z``, 5).

Two kinds of site:

``--detection-json``
    Rows of ``benchmarks/detection.py`` (synthetic normals and artifact copies with their
    ``features``): ``--draws`` sites, each all the normals plus ``--per-type`` copies of every
    artifact type drawn at random (numpy seed ``--seed``). Printed: clean scans over the cut,
    AUROC, each type's share over the cut (means over the draws).
``--run``
    A ``benchmarks/screen_real.py`` run (``out`` with the app's qc.json files,
    ``bids/truth.json``): each head as a site and each ``--pool NAME=HEAD,HEAD`` as one site
    of different people (a run whose truth names no head, as ``benchmarks/adapt_site.py``'s,
    is one site; ``--results`` names its participant output). Printed per site: AUROC (all types / the local ones), clean and
    artifact copies over the cut.

``--neighbours K`` adds a third column, ``joint, nearest``: the shipped group level's score in
a site of more than K + 1 scans, each scan against the K scans whose error maps are most like
its own (``qc_pipeline.sitenorm.site_normative``, run on the run's maps into a temporary
folder; ``relative_scores(..., neighbours=...)``). Synthetic rows carry no maps: each scan
gets K other scans of its site at random, the case of a site of different people whose
error-map likeness says nothing about their measurements.

The reference (floors of the scales, directions) is the model card's ``qc_score`` section.

    python benchmarks/site_score.py --model-dir models/t1w --detection-json A.json B.json --neighbours 16
    python benchmarks/site_score.py --model-dir models/t1w --run RUN --pool dev=itk,robex,s1 --neighbours 16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/screen_real.py

from screen_real import LOCAL, _auc  # noqa: E402

from qc_pipeline.derivatives import load_qc_records  # noqa: E402
from qc_pipeline.group import scan_maps  # noqa: E402
from qc_pipeline.qc.score import relative_scores, relative_z  # noqa: E402
from qc_pipeline.sitenorm import site_normative  # noqa: E402


def site_scores(features: list, ref: dict, neighbours: list | None = None) -> dict[str, np.ndarray]:
    """Both combinations of the same site z's: ``max`` from ``relative_z``, ``joint`` as the
    group level computes it (``relative_scores``); with ``neighbours`` (per scan, the indices
    of the scans it is compared with) also ``joint, nearest``."""
    largest = [max((v for v in z.values() if v is not None), default=math.nan)
               for z in relative_z(features, ref)]
    out = {"max": np.array(largest, dtype=float),
           "joint": np.array([math.nan if s is None else s for s, _ in relative_scores(features, ref)])}
    if neighbours is not None:
        out["joint, nearest"] = np.array([math.nan if s is None else s
                                          for s, _ in relative_scores(features, ref, neighbours=neighbours)])
    return out


def synthetic(rows: list[dict], ref: dict, *, per_type: int, draws: int, seed: int, cut: float,
              neighbours: int = 0) -> None:
    rows = [r for r in rows if r.get("features") and not r.get("error")]
    normals = [r for r in rows if r["kind"] == "normal"]
    kinds = sorted({r["kind"] for r in rows} - {"normal"})
    rng = np.random.default_rng(seed)
    acc: dict[tuple, list] = {}
    for _ in range(draws):
        picks = []
        for k in kinds:
            pool = [r for r in rows if r["kind"] == k]
            picks += [pool[i] for i in rng.choice(len(pool), min(per_type, len(pool)), replace=False)]
        site = normals + picks
        nbs = None if not neighbours else [
            list(rng.choice([j for j in range(len(site)) if j != i], neighbours, replace=False))
            for i in range(len(site))]
        scores = site_scores([r["features"] for r in site], ref, nbs)
        hows = list(scores)
        y = np.array([r["kind"] != "normal" for r in site])
        kk = np.array([r["kind"] for r in site])
        for how in hows:
            s = scores[how]
            acc.setdefault((how, "clean"), []).append(100 * np.mean(s[~y] > cut))
            acc.setdefault((how, "auc"), []).append(_auc(y.astype(int), s))
            for k in kinds:
                acc.setdefault((how, k), []).append(100 * np.mean(s[kk == k] > cut))
    print(f"\n{len(normals)} normals + {per_type} copies of each of {len(kinds)} types per site, "
          f"{draws} draws; cut {cut:g}\n")
    print("| combination | clean over the cut % | AUROC | " + " | ".join(kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    for how in hows:
        print(f"| {how} | {np.mean(acc[(how, 'clean')]):.1f} | {np.mean(acc[(how, 'auc')]):.1f} | "
              + " | ".join(f"{np.mean(acc[(how, k)]):.0f}" for k in kinds) + " |")


def _nearest(results: Path, names: list[str], k: int, tmp: Path) -> list | None:
    """Each scan's neighbours (indices into ``names``) as the group level takes them, None
    where it compares the scan with the whole site."""
    recs = {r.bids_name: r for r in load_qc_records(results) if r.bids_name in set(names)}
    maps = [dataclasses.replace(sm, out_mask=tmp / f"{sm.key}.nii.gz")
            for n in names if n in recs for sm in [scan_maps(recs[n])] if sm is not None]
    found = site_normative(maps, neighbours=k)
    index = {n: i for i, n in enumerate(names)}
    return [[index[key] for key in found[n].reference] or None if n in found else None for n in names]


def real(run: Path, ref: dict, pools: dict, *, cut: float, neighbours: int = 0,
         results: Path | None = None) -> None:
    truth = json.loads((run / "bids" / "truth.json").read_text())
    results = results or run / "out"
    feats = {}
    for name, entry in truth.items():
        label, kind, head = (list(entry) + ["all"])[:3]  # one site when the truth names no head
        sub = name.split("_")[0]
        q = json.loads(next((results / sub).rglob(f"{name}_qc.json")).read_text())
        if q.get("status") == "ok" and q.get("quality_features"):
            feats[name] = (label, kind, head, q["quality_features"])
    heads = sorted({h for _, _, h, _ in feats.values()})
    sites = {h: [h] for h in heads} | {f"pooled {p}": m for p, m in pools.items()}
    hows = ["max", "joint"] + (["joint, nearest"] if neighbours else [])
    print(f"\ncut {cut:g}; AUROC all / local; over the cut: clean % / artifacts %\n")
    print("| site | copies | " + " | ".join(f"{h}: AUROC | {h}: over the cut" for h in hows) + " |")
    print("|---|---|" + "---|---|" * len(hows))
    with tempfile.TemporaryDirectory() as tmp:
        for name, members in sites.items():
            names = [n for n, v in feats.items() if v[2] in members]
            nbs = _nearest(results, names, neighbours, Path(tmp)) if neighbours else None
            scores = site_scores([feats[n][3] for n in names], ref, nbs)
            y = np.array([feats[n][0] for n in names])
            local = np.array([feats[n][1] == "clean" or feats[n][1] in LOCAL for n in names])
            cells = []
            for how in hows:
                s = scores[how]
                cells.append(f"{_auc(y, s):.1f} / {_auc(y[local], s[local]):.1f} | "
                             f"{100 * np.mean(s[y == 0] > cut):.0f} / {100 * np.mean(s[y == 1] > cut):.0f}")
            print(f"| {name} | {len(names)} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True, help="model folder whose card holds the reference")
    p.add_argument("--detection-json", type=Path, nargs="+", default=[])
    p.add_argument("--per-type", type=int, default=2)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None,
                   help="the participant level's output folder of --run (default: RUN/out)")
    p.add_argument("--pool", action="append", default=[], metavar="NAME=HEAD,HEAD")
    p.add_argument("--cut", type=float, default=5.0)
    p.add_argument("--neighbours", type=int, default=0,
                   help="also score each scan against K nearest scans (synthetic: K random others); 0: off")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    ref = json.loads((a.model_dir / "model_card.json").read_text())["qc_score"]
    if a.detection_json:
        rows = [r for f in a.detection_json for r in json.loads(f.read_text())]
        synthetic(rows, ref, per_type=a.per_type, draws=a.draws, seed=a.seed, cut=a.cut, neighbours=a.neighbours)
    if a.run:
        pools = {s.split("=", 1)[0]: s.split("=", 1)[1].split(",") for s in a.pool}
        real(a.run, ref, pools, cut=a.cut, neighbours=a.neighbours, results=a.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
