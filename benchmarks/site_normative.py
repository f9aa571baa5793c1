#!/usr/bin/env python
"""The engine's mask against the site's own scans (``qc_pipeline.sitenorm``) on real heads.

Reads the copies cached by ``benchmarks/engine_real.py prepare`` (clean scanner-variation copies
and one copy per artifact type of each real head), runs the engine once per copy (the card's
schedule, seed 0; results kept in ``--work`` so a rerun only re-scores), fits the MNI brain mask
to each copy's brain mask (``preprocessing.align_template_prior``, as the participant level
does on the scan), and scores each copy by

* ``engine``: the engine's own mask (``anomaly_fraction``, what the participant level writes);
* ``site``: that mask against the site's reference (``sitenorm.site_reference`` over the
  site's copies, ``site_anomaly_mask`` at ``--factor``), for two kinds of site:
  each head as its own site (one person, scanner variation), and all heads of a ``--group``
  pooled as one site of different people.

It prints, per head and pooled: AUROC (percent) of clean vs all artifact types and vs the local
types (missing chunk, susceptibility, spike, ghosting), and the clean copies' median masked
share of the brain (percent). Grid-space maps are used (the app uses the native-space
derivatives; the functions are the same).

    python benchmarks/site_normative.py --cache DEV_CACHE HELD_OUT_CACHE --work OUT \\
        --group dev=itk,robex,s1 --group held_out=colin,bb1,bb2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/engine_real.py
from engine_real import cache_grid_affine  # noqa: E402

LOCAL = ("chunk_top", "susceptibility", "spike", "ghosting")
GRID_MM = 2.0


def _engine_outputs(caches, work: Path, model_dir):
    from qc_pipeline.engine import IterMask3D
    from qc_pipeline.preprocessing import align_template_prior

    model = None
    out = []
    for cache in caches:
        for f in sorted(Path(cache).glob("*/*.npz")):
            head, copy = f.parent.name, f.stem
            dst = work / f"{head}__{copy}.npz"
            if not dst.is_file():
                if model is None:
                    model = IterMask3D.from_folder(model_dir, device="cpu")
                with np.load(f) as z:
                    image, brain = z["image"].astype(np.float32), z["brain_mask"].astype(bool)
                r = model.run(image, brain, voxel_size=(GRID_MM,) * 3, seed=0)
                fit = align_template_prior(brain, cache_grid_affine(brain.shape))
                np.savez_compressed(dst, mask=r.mask, error=r.error_map.astype(np.float32), brain=brain,
                                    fraction=r.anomaly_fraction, t2w=fit["affine"])
                print(f"{head} {copy}: engine {100 * r.anomaly_fraction:.1f}%", file=sys.stderr, flush=True)
            out.append({"head": head, "kind": copy.rsplit("_v", 1)[0], "file": dst})
    return out


def _site_scores(items, factor: float) -> dict:
    from qc_pipeline.sitenorm import from_template, site_anomaly_mask, site_reference, to_template

    maps = {}
    for it in items:
        with np.load(it["file"]) as z:
            err = np.where(z["brain"], z["error"], -1.0)
            t = to_template(err, cache_grid_affine(err.shape), z["t2w"])
        t[~(t >= 0)] = np.nan
        maps[it["file"]] = t
    ref_t = site_reference(list(maps.values()))
    out = {}
    for it in items:
        with np.load(it["file"]) as z:
            ref = from_template(ref_t, cache_grid_affine(z["error"].shape), z["error"].shape, z["t2w"])
            m = site_anomaly_mask(z["error"], z["mask"], ref, factor)
            out[it["file"]] = float(m.sum()) / float(z["brain"].sum())
    return out


def _row(items, score):
    from sklearn.metrics import roc_auc_score

    c = [score[it["file"]] for it in items if it["kind"] == "clean"]
    a = [score[it["file"]] for it in items if it["kind"] != "clean"]
    lo = [score[it["file"]] for it in items if it["kind"] in LOCAL]

    def auc(p):
        return 100.0 * roc_auc_score([0] * len(c) + [1] * len(p), c + p) if c and p else float("nan")

    return auc(a), auc(lo), 100.0 * float(np.median(c)) if c else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", nargs="+", type=Path, required=True, help="engine_real.py prepare folders")
    ap.add_argument("--work", type=Path, required=True, help="engine outputs per copy (kept between runs)")
    ap.add_argument("--model-dir", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "t1w")
    ap.add_argument("--group", action="append", default=[], metavar="NAME=HEAD,HEAD",
                    help="heads pooled as one site of different people (repeatable)")
    ap.add_argument("--factor", nargs="+", type=float, default=[3.0])
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    items = _engine_outputs(args.cache, args.work, args.model_dir)
    engine = {}
    for it in items:
        with np.load(it["file"]) as z:
            engine[it["file"]] = float(z["fraction"])
    groups = [(g.split("=")[0], g.split("=")[1].split(",")) for g in args.group] or \
        [("all", sorted({it["head"] for it in items}))]
    print("| group | score | factor | " + " | ".join(["head", "AUROC all", "AUROC local", "clean masked %"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for gname, heads in groups:
        g_items = [it for it in items if it["head"] in heads]
        rows = [("engine mask", "-", {h: engine for h in heads}, engine)]
        for f in args.factor:
            per_head = {h: _site_scores([it for it in g_items if it["head"] == h], f) for h in heads}
            merged = {k: v for d in per_head.values() for k, v in d.items()}
            rows.append((f"vs own head's copies", f"{f:g}", per_head, merged))
            pooled = _site_scores(g_items, f)
            rows.append((f"vs pooled {gname} site", f"{f:g}", {h: pooled for h in heads}, pooled))
        for label, fac, per_head, pooled_scores in rows:
            for h in heads:
                hi = [it for it in g_items if it["head"] == h]
                a, lo, cm = _row(hi, per_head[h])
                print(f"| {gname} | {label} | {fac} | {h} | {a:.1f} | {lo:.1f} | {cm:.1f} |")
            a, lo, cm = _row(g_items, pooled_scores)
            print(f"| {gname} | {label} | {fac} | pooled ({len(heads)} people) | {a:.1f} | {lo:.1f} | {cm:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
