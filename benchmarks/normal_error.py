#!/usr/bin/env python
"""The model's normal-error map: build it into a model folder, and measure it on held-out heads.

IterMask3D's network errs on the same anatomy of every brain (ventricles, sulcal CSF, deep grey
matter), so its test-time mask is never empty on a normal brain. The map is the voxel-wise median
of the engine's error over normal heads in template space (``qc_pipeline.sitenorm``); the app
keeps a mask voxel only where the scan's error exceeds ``factor`` x the map there
(``IterMask3D.against_normal_error``).

Inputs are engine runs cached in ``--work`` (made on first use, seed 0, the card's schedule):

* ``--synthetic DIR``: preprocessed synthetic normal heads as ``benchmarks/detection.py`` caches
  them (``normal_*.npz``: image, mask, info with ``grid_affine`` and the template fit);
* ``--real DIR [DIR ...]``: copies of real heads as ``benchmarks/engine_real.py prepare`` caches
  them (``<head>/<kind>_vNN.npz``: clean scanner-variation copies and one per artifact type).

``build`` writes the map from the synthetic normals and the clean copies of the ``--fit-heads``
into ``--model-dir`` (``normal_error.nii.gz`` and the card's ``normal_error`` section, new
``model_id``) and refits the card's QC-score reference for the two measurements the map changes
(``anomaly_fraction``, ``anomaly_cluster_fraction``) on the synthetic normals, each normal's mask
taken against a map fitted without it (two folds), so the reference sees what an unseen normal
head gets. With ``--spread-k K`` it also writes the same scans' voxel-wise robust SD around the
median (``normal_error_spread.nii.gz``), and a mask voxel must then exceed the median by K of
them too; ``eval --spread-k K [K ...]`` adds a row per K. ``--open-vox N`` opens every mask
after the rule by a ball of N grid voxels (``build`` writes it into the card). ``eval``
prints, per real head and pooled (one site of different people): AUROC (percent) of the clean
copies against all artifact types and against the local ones, and the clean copies' median
masked share of the brain, for the engine's own mask and against maps fitted without the
evaluated heads.

    python benchmarks/normal_error.py eval  --synthetic SYN --real RG RGH --work W \\
        --fit-heads itk robex s1 --eval-heads colin bb1 bb2 --factor 2 3 4
    python benchmarks/normal_error.py eval  --synthetic SYN --real RG6 --work W --leave-one-out \\
        --fit-heads itk robex s1 colin bb1 bb2 --eval-heads itk robex s1 colin bb1 bb2 --factor 3 4
    python benchmarks/normal_error.py build --synthetic SYN --real RG --work W \\
        --fit-heads itk robex s1 --factor 4 --model-dir models/t1w
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import numpy as np

from qc_pipeline.engine.modelio import load_model_card, save_normal_error, write_model_card
from qc_pipeline.io import atomic_write_npz
from qc_pipeline.preproc import open_mask
from qc_pipeline.qc.score import fit_reference, largest_component_fraction
from qc_pipeline.sitenorm import normal_error_mask, site_reference_and_spread, template_grid, to_template

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/engine_real.py
from engine_real import cache_grid_affine  # noqa: E402

LOCAL = ("chunk_top", "susceptibility", "spike", "ghosting")
GRID_MM = 2.0


def _engine_runs(args) -> list[dict]:
    """One engine run per cached scan (kept in ``--work``): mask, error, brain, affines."""
    from qc_pipeline.engine import IterMask3D
    from qc_pipeline.preproc.prior import align_template_prior

    model = None
    sources = [("syn", "clean", f) for f in sorted(Path(args.synthetic).glob("normal_*.npz"))] \
        if args.synthetic else []
    for cache in args.real or []:
        sources += [(f.parent.name, f.stem.rsplit("_v", 1)[0], f) for f in sorted(Path(cache).glob("*/*.npz"))]
    out = []
    for head, kind, f in sources:
        dst = args.work / f"{head}__{f.stem}.npz"
        if not dst.is_file():
            if model is None:
                model = IterMask3D.from_folder(args.model_dir, device="cpu")
                model.normal_error = None  # the loop's own mask: the map is what is measured here
            with np.load(f) as z:
                if head == "syn":
                    info = json.loads(str(z["info"]))
                    image, brain = z["image"].astype(np.float32), z["mask"].astype(bool)
                    grid_aff = np.asarray(info["grid_affine"], dtype=float)
                    prior = info["prior"]
                    t2w = np.asarray(prior.get("affine", prior.get("template_to_subject")), dtype=float)
                else:
                    image, brain = z["image"].astype(np.float32), z["brain_mask"].astype(bool)
                    grid_aff = cache_grid_affine(brain.shape)
                    t2w = align_template_prior(brain, grid_aff)["affine"]
            r = model.run(image, brain, voxel_size=(GRID_MM,) * 3, seed=0)
            atomic_write_npz(dst, mask=r.mask, error=r.error_map.astype(np.float32), brain=brain,
                             t2w=np.asarray(t2w), grid_affine=grid_aff)
            print(f"{head} {f.stem}: engine {100 * r.anomaly_fraction:.1f}%", file=sys.stderr, flush=True)
        out.append({"head": head, "kind": kind, "file": dst})
    return out


def _load(it) -> dict:
    with np.load(it["file"]) as z:
        return {k: z[k] for k in z.files}


def _template_map(z) -> np.ndarray:
    err = np.where(z["brain"], z["error"], -1.0)
    t = to_template(err, z["grid_affine"], z["t2w"])
    t[~(t >= 0)] = np.nan
    return t


def _fit(items, cache) -> tuple[np.ndarray, np.ndarray]:
    """The normal-error map (median) and the normal heads' spread around it (robust SD)."""
    return site_reference_and_spread([cache[it["file"]] for it in items])


def _masked(z, maps, factor, spread_k=None, open_vox: int = 0) -> np.ndarray:
    """The participant level's rule (``IterMask3D.against_normal_error``) on one cached run."""
    if maps is None:
        return z["mask"].astype(bool)
    ref_t, spread_t = maps
    kw = {} if spread_k is None else {"spread_t": spread_t, "spread_k": spread_k}
    m = normal_error_mask(z["error"], z["mask"], ref_t, grid_affine=z["grid_affine"],
                          template_to_world=z["t2w"], factor=factor, **kw)
    return open_mask(m, open_vox)


def _auc(clean, bad) -> float:
    from sklearn.metrics import roc_auc_score

    if not clean or not bad:
        return float("nan")
    return 100.0 * roc_auc_score([0] * len(clean) + [1] * len(bad), clean + bad)


def cmd_eval(args, items, tmaps) -> None:
    heads = [h for h in args.eval_heads]

    def fit_without(skip):
        fit_items = [it for it in items if it["kind"] == "clean" and
                     (it["head"] == "syn" or (it["head"] in args.fit_heads and it["head"] != skip))]
        return fit_items, _fit(fit_items, tmaps)

    if args.leave_one_out:
        maps = {h: fit_without(h)[1] for h in heads}
        print(f"each head against a map fitted on the synthetic normals and the clean copies of the "
              f"other heads of {', '.join(args.fit_heads)}; evaluated on {', '.join(heads)}\n")
    else:
        fit_items, both = fit_without(None)
        maps = {h: both for h in heads}
        print(f"map fitted on {len(fit_items)} normal scans "
              f"({sum(it['head'] == 'syn' for it in fit_items)} synthetic, clean copies of "
              f"{', '.join(args.fit_heads) or 'no real head'}); evaluated on {', '.join(heads)}\n")
    print("| mask | factor | " + " | ".join(f"{h}: AUROC all / local / clean %" for h in heads)
          + " | pooled: AUROC all / local / clean % |")
    print("|---|---|" + "---|" * (len(heads) + 1))
    ev = [it for it in items if it["head"] in heads]
    data = {it["file"]: _load(it) for it in ev}
    rows = [("engine's own", "-", None, False)] + [
        ("against the normal-error map" + ("" if k is None else f" and {k:g} x its spread"), f, k, True)
        for f in args.factor for k in (args.spread_k or [None])]
    for label, factor, spread_k, use in rows:
        frac = {}
        for it in ev:
            z = data[it["file"]]
            ref = maps[it["head"]] if use else None
            m = _masked(z, ref, factor, spread_k, args.open_vox)
            frac[it["file"]] = float(m.sum()) / float(z["brain"].sum())
        cells = []
        for group in [[h] for h in heads] + [heads]:
            g = [it for it in ev if it["head"] in group]
            c = [frac[it["file"]] for it in g if it["kind"] == "clean"]
            a = [frac[it["file"]] for it in g if it["kind"] != "clean"]
            lo = [frac[it["file"]] for it in g if it["kind"] in LOCAL]
            cells.append(f"{_auc(c, a):.1f} / {_auc(c, lo):.1f} / {100 * np.median(c):.1f}")
        print(f"| {label} | {factor} | " + " | ".join(cells) + " |", flush=True)


def cmd_build(args, items, tmaps) -> None:
    if len(args.factor) != 1 or len(args.spread_k or [None]) != 1:
        raise SystemExit("build takes one --factor and at most one --spread-k")
    factor = float(args.factor[0])
    spread_k = args.spread_k[0] if args.spread_k else None
    syn = [it for it in items if it["head"] == "syn"]
    real = [it for it in items if it["head"] in args.fit_heads and it["kind"] == "clean"]
    if len(syn) < 8:
        raise SystemExit(f"build needs >= 8 synthetic normals, found {len(syn)}")
    maps = _fit(syn + real, tmaps)
    # the QC-score reference: each synthetic normal against a map fitted without it
    rows = []
    for k in range(2):
        held = syn[k::2]
        ref_k = _fit([it for it in syn if it not in held] + real, tmaps)
        for it in held:
            z = _load(it)
            m = _masked(z, ref_k, factor, spread_k, args.open_vox)
            n = int(z["brain"].sum())
            rows.append({"anomaly_fraction": float(m.sum()) / n,
                         "anomaly_cluster_fraction": largest_component_fraction(m, n)})
    card = load_model_card(args.model_dir)
    base_id = str(card["model_id"]).split("-ne")[0]
    _, t_aff = template_grid()
    section = {
        "factor": factor,
        "space": "MNI152 brain-mask grid, 2 mm (qc_pipeline.sitenorm.template_grid)",
        "statistic": "voxel-wise median of the engine's squared error over the normal scans that cover the "
                     "voxel (template fit of each scan's preprocessing), grey-dilated by one voxel",
        "rule": "a mask voxel stays where error > factor x normal_error" + (
            "" if spread_k is None else " and error > normal_error + spread_k x spread")
                + ("" if not args.open_vox else ", then the mask is opened by a ball of open_vox grid voxels")
                + " (IterMask3D.against_normal_error)",
        "n_scans": len(syn) + len(real),
        "training_data": {"synthetic_normals": len(syn), "real_heads": list(args.fit_heads),
                          "real_clean_copies": len(real),
                          "held_out": "the real heads of docs/benchmarks.md not named here"},
        "fitted_for_model_id": base_id,
        "date": _dt.date.today().isoformat(),
        "command": "python benchmarks/normal_error.py build " + " ".join(sys.argv[2:]),
    }
    if args.open_vox:
        section["open_vox"] = int(args.open_vox)
    if spread_k is not None:
        section["spread_k"] = spread_k
        section["spread_statistic"] = ("voxel-wise normal-consistent MAD of the same scans' errors around that "
                                       "median, grey-dilated by one voxel")
    save_normal_error(args.model_dir, maps[0], t_aff, section, spread_t=None if spread_k is None else maps[1])
    card = load_model_card(args.model_dir)
    # the id names the map's data too: results of another map are never reused under it
    card["model_id"] = (f"{base_id}-ne{factor:g}" + ("" if spread_k is None else f"s{spread_k:g}")
                        + (f"r{len(args.fit_heads)}" if args.fit_heads else "")
                        + (f"o{args.open_vox}" if args.open_vox else ""))
    feats = fit_reference(rows, features=["anomaly_fraction", "anomaly_cluster_fraction"])["features"]
    card["qc_score"]["features"].update(feats)
    card["qc_score"]["normal_error_features_source"] = (
        f"{len(rows)} synthetic normals, each against a normal-error map fitted without it (two folds)")
    write_model_card(args.model_dir, card)
    med = np.median([r["anomaly_fraction"] for r in rows])
    print(f"wrote {args.model_dir}/normal_error.nii.gz from {len(syn)} synthetic + {len(real)} real clean "
          f"scans; model_id {card['model_id']}; synthetic normals' masked share (unseen map) median "
          f"{100 * med:.2f} %")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["build", "eval"])
    ap.add_argument("--synthetic", type=Path, help="detection.py cache with normal_*.npz")
    ap.add_argument("--real", nargs="+", type=Path, help="engine_real.py prepare folders")
    ap.add_argument("--work", type=Path, required=True, help="engine runs per scan (kept between runs)")
    ap.add_argument("--model-dir", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "t1w")
    ap.add_argument("--fit-heads", nargs="*", default=[], help="real heads whose clean copies join the map")
    ap.add_argument("--eval-heads", nargs="*", default=[], help="real heads to evaluate (eval)")
    ap.add_argument("--factor", nargs="+", type=float, default=[4.0])
    ap.add_argument("--spread-k", nargs="*", type=float, default=[],
                    help="also require error > map + k x the normal heads' spread (eval: each k; "
                         "build: one k, written into the model folder)")
    ap.add_argument("--open-vox", type=int, default=0,
                    help="open the mask after the rule by a ball of this many grid voxels (eval: every row; "
                         "build: written into the card as normal_error.open_vox)")
    ap.add_argument("--leave-one-out", action="store_true",
                    help="eval: each evaluated head against a map fitted without its own copies "
                         "(evaluated heads may then be in --fit-heads)")
    args = ap.parse_args(argv)
    if set(args.fit_heads) & set(args.eval_heads) and not args.leave_one_out:
        raise SystemExit(f"heads both fitted and evaluated: {sorted(set(args.fit_heads) & set(args.eval_heads))}")
    args.work.mkdir(parents=True, exist_ok=True)
    items = _engine_runs(args)
    tmaps = {it["file"]: _template_map(_load(it)) for it in items
             if it["kind"] == "clean" and (it["head"] == "syn" or it["head"] in args.fit_heads)}
    (cmd_build if args.command == "build" else cmd_eval)(args, items, tmaps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
