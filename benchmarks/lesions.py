"""Synthetic lesions in clean brains: does the IterMask3D mask land on them (Dice, largest component)?

The paper's 3D segmentation section scores the final mask against a lesion's outline. Here the
lesions are drawn into preprocessed clean scans (``benchmarks/engine_real.py prepare`` caches:
real heads under scanner variation, or any folder of ``.npz`` files with ``image`` and
``brain_mask`` on the model grid): an irregular blob (an ellipsoid of random axes whose outline is
roughened by a smooth random field) of 6-20 mm radius (``--radius-mm``), at least 6 mm inside the brain, whose
voxels take a new intensity (hypointense core like a tumour or a resection cavity in T1w, or
hyperintense like a haemorrhage or an enhancing lesion) with a fine texture and a one-voxel
blended border. The engine then runs on the edited grid (the high-frequency image is made
from it, as the app does). No threshold is tuned on the lesion (the reference code's 3D Dice
picks the best threshold per scan; this one takes the final mask as it is).

Printed per base head and over all: lesions, median and mean Dice, the share of lesions whose
mask's largest connected component overlaps the lesion, the median share of the lesion
covered, and the median fraction of the brain masked outside the lesion, for the app's mask
(the loop's mask against the model's normal-error map, ``engine_real.run_as_the_app``) and, in
the last column, for the test-time loop's own mask.

``--site-reference`` adds the group level's mask (``qc_pipeline.sitenorm``): each head's clean
copies and its lesion copies make one site, the voxel-wise median of their error maps in
template space is the site's normal error, and a voxel of the app's mask stays where its error
exceeds ``DEFAULT_SITE_NORM_FACTOR`` times it and it plus ``DEFAULT_SITE_SPREAD_K`` times the
site's voxel-wise robust SD, as the group level keeps it (the median ignores a lesion, which
sits elsewhere in every copy). Copies of one head are one person's anatomy, which a real site never
has; ``--pool NAME=HEAD,HEAD`` also scores each lesion against the site made of the copies of
several heads (different people, as a real site). In a site of more than ``--neighbours`` + 1
scans (default 16, the group level's) each lesion copy is compared with the scans whose error
maps are most like its own (``qc_pipeline.sitenorm.nearest_maps``, never itself), as the group
level compares it; 0: with the whole site, the lesion copy included.

Usage::

    python benchmarks/lesions.py --cache CACHE --model-dir models/t1w --per-scan 2 --json-out lesions.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

os.environ.setdefault("NIPYPE_NO_ET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/engine_real.py
from engine_real import run_as_the_app, template_fit  # noqa: E402

from qc_pipeline.sitenorm import (DEFAULT_SITE_NEIGHBOURS, DEFAULT_SITE_NORM_FACTOR,  # noqa: E402
                                  error_to_template, from_template, nearest_maps, similarity_vector,
                                  site_anomaly_mask, site_reference_and_spread)


def draw_lesion(brain: np.ndarray, rng: np.random.Generator, voxel_mm: float = 2.0,
                radius_mm=(6.0, 20.0), margin_mm: float = 6.0):
    """A random irregular lesion inside ``brain``: (mask, params) or (None, reason)."""
    depth = ndi.distance_transform_edt(brain) * voxel_mm
    r = float(rng.uniform(*radius_mm))
    ok = np.argwhere(depth >= margin_mm + 0.5 * r)
    if ok.size == 0:
        return None, "brain too small for the lesion"
    c = ok[rng.integers(len(ok))].astype(float)
    axes = r * rng.uniform(0.7, 1.3, 3) / voxel_mm
    g = np.indices(brain.shape, dtype=np.float32)
    d = sum(((g[i] - c[i]) / axes[i]) ** 2 for i in range(3))
    rough = ndi.gaussian_filter(rng.standard_normal(brain.shape).astype(np.float32), 2.0)
    rough /= rough.std() + 1e-9
    lesion = ((np.sqrt(d) + 0.25 * rough) < 1.0) & brain
    lesion = ndi.binary_opening(lesion)
    if lesion.sum() < 8:
        return None, "lesion vanished"
    lab, n = ndi.label(lesion)
    if n > 1:
        lesion = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return lesion, {"centre": c.tolist(), "radius_mm": r, "voxels": int(lesion.sum())}


def paint(image: np.ndarray, lesion: np.ndarray, rng: np.random.Generator):
    """Give the lesion a new intensity (z-units) with texture and a blended one-voxel border."""
    hyper = bool(rng.random() < 0.35)
    level = float(rng.uniform(1.5, 3.0) if hyper else rng.uniform(-3.5, -1.5))
    tex = ndi.gaussian_filter(rng.standard_normal(image.shape).astype(np.float32), 1.0)
    tex *= 0.3 / (tex.std() + 1e-9)
    alpha = ndi.gaussian_filter(lesion.astype(np.float32), 0.7)
    alpha = np.where(lesion, np.maximum(alpha, 0.6), alpha)
    out = (1 - alpha) * image + alpha * (level + tex)
    return np.where(image != 0, out, 0.0).astype(np.float32), {"level": level, "hyper": hyper}


def largest_on_lesion(mask: np.ndarray, lesion: np.ndarray) -> bool:
    """Whether the mask's largest connected component touches the lesion."""
    lab, n = ndi.label(mask)
    if not n:
        return False
    return bool(((lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)) & lesion).any())


def _site_cells(sel: list[dict], kind: str) -> str:
    sel = [r for r in sel if f"dice_{kind}" in r]
    if not sel:
        return " |"
    d = [r[f"dice_{kind}"] for r in sel]
    return (f" {np.median(d):.3f} / {np.mean(d):.3f}, {100 * np.mean([r[f'largest_on_lesion_{kind}'] for r in sel]):.0f} %, "
            f"{100 * np.median([r[f'outside_fraction_{kind}'] for r in sel]):.1f} |")


def dice(a, b) -> float:
    return float(2.0 * (a & b).sum() / max(int(a.sum()) + int(b.sum()), 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="folder of .npz grids (searched recursively)")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--heads", nargs="+", default=None, help="only these head folders")
    p.add_argument("--clean-only", action="store_true", default=True,
                   help="only copies whose meta says kind=clean (default)")
    p.add_argument("--per-scan", type=int, default=2, help="lesions per clean scan (one at a time)")
    p.add_argument("--max-scans", type=int, default=None, help="at most this many clean scans per head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--radius-mm", type=float, nargs=2, default=(6.0, 20.0), metavar=("LO", "HI"),
                   help="lesion radius range in mm (default 6 20; 20 35 gives tumour-sized lesions of "
                        "about 30-180 mL)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--schedule", default=None, help="one of the card's schedules (default: the card's own)")
    p.add_argument("--site-reference", action="store_true",
                   help="also score the group level's mask against each head's site (its clean and lesion copies)")
    p.add_argument("--pool", action="append", default=[], metavar="NAME=HEAD,HEAD",
                   help="with --site-reference: also against a site of these heads' copies (repeatable)")
    p.add_argument("--neighbours", type=int, default=DEFAULT_SITE_NEIGHBOURS,
                   help="with --site-reference: compare each lesion copy with this many of the site's "
                        "scans whose error maps are most like its own, as the group level does "
                        f"(default {DEFAULT_SITE_NEIGHBOURS}); 0: with the whole site")
    args = p.parse_args(argv)

    import torch

    from qc_pipeline.engine import IterMask3D

    torch.set_num_threads(max(1, args.threads))
    model = IterMask3D.from_folder(args.model_dir, device="cpu")
    vs = tuple(model.card["voxel_size"])
    files = []
    for f in sorted(args.cache.rglob("*.npz")):
        head = f.parent.name
        if args.heads and head not in args.heads:
            continue
        with np.load(f) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        if meta.get("kind", "clean") != "clean":
            continue
        files.append((head, f))
    all_clean = list(files)
    if args.max_scans:
        per: dict[str, int] = {}
        keep = []
        for head, f in files:
            per[head] = per.get(head, 0) + 1
            if per[head] <= args.max_scans:
                keep.append((head, f))
        files = keep
    rows = []
    site = {}  # head -> {"maps": template error maps, "pending": (row, error, mask, affine, t2w, lesion, brain)}
    for k, (head, f) in enumerate(files):
        z = np.load(f)
        image, brain = z["image"].astype(np.float32), z["brain_mask"].astype(bool)
        aff, t2w = template_fit(brain, vs[0]) if args.site_reference else (None, None)
        for j in range(args.per_scan):
            rng = np.random.default_rng([args.seed, k, j])
            lesion, info = draw_lesion(brain, rng, voxel_mm=vs[0], radius_mm=tuple(args.radius_mm))
            if lesion is None:
                print(f"{f.name} lesion {j}: {info}", file=sys.stderr)
                continue
            edited, look = paint(image, lesion, rng)
            t0 = time.perf_counter()
            raw, r = run_as_the_app(model, edited, brain, vs, schedule=args.schedule)
            largest_on = largest_on_lesion(r.mask, lesion)
            row = {"head": head, "file": f.name, "lesion": j, **info, **look,
                   "lesion_fraction": float(lesion.sum() / brain.sum()), "dice": dice(r.mask, lesion),
                   "covered": float((r.mask & lesion).sum() / lesion.sum()),
                   "outside_fraction": float((r.mask & ~lesion).sum() / brain.sum()),
                   "dice_loop_only": dice(raw.mask, lesion),
                   "outside_fraction_loop_only": float((raw.mask & ~lesion).sum() / brain.sum()),
                   "largest_on_lesion": largest_on, "anomaly_fraction": float(r.anomaly_fraction),
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            if args.site_reference:
                entry = site.setdefault(head, {"maps": [], "pending": []})
                entry["maps"].append(error_to_template(r.error_map, aff, t2w))
                # as the group level: the site mask starts from the mask before the model's spread rule
                start = r.mask if r.candidate_mask is None else r.candidate_mask
                entry["pending"].append((row, r.error_map, start, aff, t2w, lesion, brain))
            print(f"[{len(rows)}] {head} {f.name} lesion {j}: {row['voxels']} vox "
                  f"{'hyper' if look['hyper'] else 'hypo'} {look['level']:+.1f}: dice {row['dice']:.3f}, "
                  f"covered {row['covered']:.2f}, outside {100 * row['outside_fraction']:.1f} %, "
                  f"largest on lesion {largest_on}", flush=True)
    for head, entry in site.items():
        for f in [f for h, f in all_clean if h == head]:
            z = np.load(f)
            image, brain = z["image"].astype(np.float32), z["brain_mask"].astype(bool)
            aff, t2w = template_fit(brain, vs[0])
            _, r = run_as_the_app(model, image, brain, vs, schedule=args.schedule)
            entry["maps"].append(error_to_template(r.error_map, aff, t2w))
        print(f"{head}: {len(entry['maps'])} error maps", file=sys.stderr, flush=True)
    sites = {("site", h): [h] for h in site}
    for spec in args.pool:
        name, heads = spec.split("=", 1)
        sites[("pool", name)] = [h for h in heads.split(",") if h in site]
    for (kind, name), members in sites.items():
        if not members:
            continue
        maps = [m for h in members for m in site[h]["maps"]]
        near = bool(args.neighbours) and len(maps) > args.neighbours + 1
        vectors = np.stack([similarity_vector(m) for m in maps]) if near else None
        references = {}  # the scans a reference is made of -> (median, spread)
        start = 0
        for h in members:
            for i, (row, err, mask, aff, t2w, lesion, brain) in enumerate(site[h]["pending"]):
                # the lesion copy's own map is site[h]["maps"][i]: as the group level, never its own reference
                idx = (nearest_maps(vectors, vectors[[start + i]], args.neighbours, exclude=[start + i])[0] if near
                       else tuple(range(len(maps))))
                if idx not in references:
                    references[idx] = site_reference_and_spread([maps[j] for j in idx])
                ref_t, spread_t = references[idx]
                m = site_anomaly_mask(err, mask, from_template(ref_t, aff, err.shape, t2w), DEFAULT_SITE_NORM_FACTOR,
                                      spread=from_template(spread_t, aff, err.shape, t2w))
                row.update({f"{kind}": name, f"{kind}_scans": len(idx),
                            f"dice_{kind}": dice(m, lesion),
                            f"outside_fraction_{kind}": float((m & ~lesion).sum() / brain.sum()),
                            f"largest_on_lesion_{kind}": largest_on_lesion(m, lesion)})
            start += len(site[h]["maps"])
    if args.json_out:
        args.json_out.write_text(json.dumps({"model": str(args.model_dir), "model_id": model.card.get("model_id"),
                                             "rows": rows}, indent=1))
    extra = [(k, w) for k, w in (("site", "its head's copies"), ("pool", "the pool of heads"))
             if any(f"dice_{k}" in r for r in rows)]
    print(f"\n### lesions: {model.card.get('model_id')}\n")
    print("| head | lesions | median Dice | mean Dice | largest component on lesion | median covered | "
          "median masked outside (% of brain) | loop's own mask: median Dice / masked outside % |"
          + "".join(f" against {w}: median / mean Dice, largest component on lesion, masked outside % |"
                    for _, w in extra))
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(extra))
    groups = sorted({r["head"] for r in rows}) + ["all"]
    for g in groups:
        sel = [r for r in rows if g == "all" or r["head"] == g]
        if not sel:
            continue
        d = [r["dice"] for r in sel]
        print(f"| {g} | {len(sel)} | {np.median(d):.3f} | {np.mean(d):.3f} | "
              f"{100 * np.mean([r['largest_on_lesion'] for r in sel]):.0f} % | "
              f"{np.median([r['covered'] for r in sel]):.2f} | "
              f"{100 * np.median([r['outside_fraction'] for r in sel]):.1f} | "
              f"{np.median([r['dice_loop_only'] for r in sel]):.3f} / "
              f"{100 * np.median([r['outside_fraction_loop_only'] for r in sel]):.1f} |"
              + "".join(_site_cells(sel, k) for k, _ in extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
