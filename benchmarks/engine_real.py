#!/usr/bin/env python
"""The IterMask3D engine alone on real T1w heads: clean scanner-variation copies vs artifacts.

No image-quality measurements, no QC score: only what the engine itself returns
(``anomaly_voxels``, ``anomaly_fraction``, mean errors, the tau fit, passes, time), so that
engine / model changes can be compared on real anatomy without preprocessing every time.

Two stages:

``prepare``
    For each real head (``--scan NAME=PATH``): ``--n-clean`` clean copies
    (``benchmarks/real_scan.variant(src, v, seed)``, v = 0 .. n_clean-1) and one copy per
    artifact type (variant ``v = n_clean + the type's index in qc_pipeline.synth.ARTIFACTS``,
    so a type keeps its variant whatever ``--types`` lists; severity drawn uniformly in
    ``--severity LO HI`` from ``np.random.default_rng([seed, v, 17])``, which then drives
    ``apply_artifact``, as in ``real_scan.py``). Each copy goes through the app's
    preprocessing (``preprocess(img, voxel_size=2.0, grid=(80, 96, 80), skull_strip="auto",
    contrast="T1w")``) and is stored as ``OUT/NAME/KIND_vVV.npz``: ``image`` (float16, the
    z-scored grid image), ``brain_mask``, ``signal_mask`` (bool) and ``meta`` (a JSON string:
    head, source path, kind, v, seed, severity, variant, preprocessing warnings and a few
    preprocessing figures). A copy whose preprocessing raises an ``InputError`` (no brain,
    skull-strip failure, ...) is recorded as ``OUT/NAME/KIND_vVV.failed.json`` instead.
    Copies already stored (npz or failed json) are skipped: the stage can be resumed.
    4D files: the first volume.

``eval``
    For each ``--model-dir``: the model is loaded once and run (``seed=0``, the card's
    schedule) on every cached copy; per head and pooled (all heads as one set) it prints the
    clean copies' medians (anomaly fraction, first-pass and final mean error in the brain,
    the tau fit's stopping point t, seconds, forward passes) and AUROC (percent) of
    ``anomaly_voxels`` per artifact type against that head's clean copies (pooled: all clean
    copies against all copies of the type), the "local" types together and all types
    together. A copy whose preprocessing failed counts as detected (score 1e12, above every
    real score) and is counted in the table. ``--json-out`` keeps every copy's row.

Usage::

    NIPYPE_NO_ET=1 .venv/bin/python benchmarks/engine_real.py prepare \\
        --scan robex=PATH s1=PATH --n-clean 6 \\
        --types motion ghosting spike susceptibility chunk_top kspace_noise wrap_around blur \\
        --severity 0.5 1.0 --seed 0 --out /work/scratch/realgrid
    NIPYPE_NO_ET=1 .venv/bin/python benchmarks/engine_real.py eval --cache /work/scratch/realgrid \\
        --model-dir models/t1w --json-out engine_real.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("NIPYPE_NO_ET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/real_scan.py

#: score of a copy whose preprocessing failed: the app reports it as failed (flagged), so it
#: ranks above every real score; finite so that roc_auc_score accepts it
FAILED = 1e12
#: artifacts that change one region of the head (the rest: whole-image artifacts)
LOCAL = ("chunk_top", "susceptibility", "spike", "ghosting")
#: other names for registered artifact types
ALIASES = {"metal": "susceptibility", "missing_top_chunk": "chunk_top", "missing_top": "chunk_top",
           "top_chunk": "chunk_top", "chunk": "chunk_middle", "noise": "kspace_noise",
           "aliasing": "wrap_around", "wraparound": "wrap_around", "bias": "bias_field",
           "gibbs": "ring", "ringing": "ring"}
GRID = (80, 96, 80)
VOXEL = 2.0


def cache_grid_affine(shape, voxel_mm: float = VOXEL) -> np.ndarray:
    """Grid voxel -> mm of a cached copy: the cache keeps the model-grid arrays, not the scan's
    world, so the grid is placed centred on the origin (a template fit only needs consistency)."""
    a = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    a[:3, 3] = -voxel_mm * (np.asarray(shape) - 1) / 2.0
    return a


def run_as_the_app(model, image: np.ndarray, brain: np.ndarray, voxel_size, schedule=None):
    """The participant level's engine step on a cached copy: the test-time loop, then its mask
    against the model's normal-error map through a template fit of the copy's brain mask
    (``IterMask3D.against_normal_error``; a model without a map keeps the loop's own mask).
    ``schedule``: the card's (None) or another of its schedules. Returns ``(the loop's result,
    the app's result)``."""
    r = model.run(image, brain, voxel_size=voxel_size, seed=0, schedule=schedule)
    if model.normal_error is None:
        return r, model.against_normal_error(r, grid_affine=None, template_to_world=None)
    aff, t2w = template_fit(brain, float(voxel_size[0]))
    return r, model.against_normal_error(r, grid_affine=aff, template_to_world=t2w)


def template_fit(brain: np.ndarray, voxel_mm: float = VOXEL):
    """A cached copy's grid affine and the template fit of its brain mask (MNI mm -> grid
    world), as the app's preprocessing fits it."""
    from qc_pipeline.preproc.prior import align_template_prior

    aff = cache_grid_affine(brain.shape, float(voxel_mm))
    return aff, align_template_prior(brain, aff)["affine"]


def _copy_name(kind: str, v: int) -> str:
    return f"{kind}_v{v:02d}"


def _resolve_types(names) -> list[str]:
    from qc_pipeline.synth import ARTIFACTS

    out = []
    for n in names:
        key = n.strip().lower().replace("-", "_").replace(" ", "_")
        key = ALIASES.get(key, key)
        if key not in ARTIFACTS:
            raise SystemExit(f"unknown artifact type {n!r}; registered: {', '.join(ARTIFACTS)}")
        if ARTIFACTS[key].needs_meta:
            raise SystemExit(f"{key} needs the synthetic subject's meta; it cannot be applied to a real scan")
        if key not in out:
            out.append(key)
    return out


def _load_head(path: Path):
    """The scan as a 3D nibabel image (4D: the first volume)."""
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) > 3:
        data = np.asanyarray(img.dataobj)
        data = data.reshape(data.shape[:3] + (-1,))[..., 0]
        hdr = img.header.copy()
        img = nib.Nifti1Image(np.asarray(data), img.affine, hdr)
    return img


# --------------------------------------------------------------------------- prepare
def prepare(args) -> int:
    from qc_pipeline.errors import InputError
    from qc_pipeline.io import atomic_write_npz, atomic_write_text
    from qc_pipeline.preproc import preprocess
    from qc_pipeline.synth import ARTIFACTS, apply_artifact
    from real_scan import variant

    print("registered artifact types: " + ", ".join(
        f"{a}{' (needs meta: not for real scans)' if ARTIFACTS[a].needs_meta else ''}" for a in ARTIFACTS),
        flush=True)
    types = _resolve_types(args.types)
    print("types used: " + ", ".join(types), flush=True)
    lo, hi = args.severity
    if not 0 <= lo <= hi <= 1:
        raise SystemExit("--severity LO HI with 0 <= LO <= HI <= 1")
    reg = list(ARTIFACTS)
    heads = []
    for spec in args.scan:
        if "=" not in spec:
            raise SystemExit(f"--scan wants NAME=PATH, got {spec!r}")
        name, path = spec.split("=", 1)
        if not name or "/" in name or name.startswith("."):
            raise SystemExit(f"bad head name {name!r}")
        heads.append((name, Path(path)))
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [("clean", v) for v in range(args.n_clean)] + [(a, args.n_clean + reg.index(a)) for a in types]
    t_all = time.time()
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for name, path in heads:
        folder = args.out / name
        folder.mkdir(exist_ok=True)
        src = None
        for n, (kind, v) in enumerate(plan, 1):
            stem = _copy_name(kind, v)
            npz, failed = folder / f"{stem}.npz", folder / f"{stem}.failed.json"
            if npz.is_file() or (failed.is_file() and not args.retry_failed):
                counts["skipped"] += 1
                continue
            if src is None:
                src = _load_head(path)
            t0 = time.time()
            img, vmeta = variant(src, v, args.seed, protocol=args.protocol)
            sev = 0.0
            if kind != "clean":
                rng = np.random.default_rng([args.seed, v, 17])
                sev = float(rng.uniform(lo, hi))
                img = apply_artifact(img, kind, sev, rng)
            t1 = time.time()
            meta = {"head": name, "source": str(path), "kind": kind, "v": v, "seed": args.seed,
                    "severity": sev, "label": int(kind != "clean"), "variant": vmeta,
                    "preprocess": {"voxel_size": VOXEL, "grid": list(GRID), "skull_strip": "auto",
                                   "contrast": "T1w"}}
            try:
                prep = preprocess(img, voxel_size=VOXEL, grid=GRID, skull_strip="auto", contrast="T1w",
                                  name=f"{name}/{stem}")
            except InputError as exc:
                meta.update(failed=True, error_type=type(exc).__name__, error=str(exc),
                            seconds_make=round(t1 - t0, 2), seconds_preprocess=round(time.time() - t1, 2))
                atomic_write_text(json.dumps(meta, indent=1, default=float), failed)
                counts["failed"] += 1
                print(f"[{name} {n}/{len(plan)}] {stem} sev={sev:.3f}: FAILED {type(exc).__name__}: {exc}",
                      flush=True)
                continue
            info = prep.info
            meta.update(failed=False, warnings=list(prep.warnings), skull_strip_used=info.skull_strip,
                        native_orientation=info.orientation, oblique=bool(info.oblique),
                        signal_brain_ml=info.signal_brain_ml, expected_brain_ml=info.expected_brain_ml,
                        brain_ml_outside_fov=info.brain_ml_outside_fov,
                        brain_outside_grid_fraction=info.brain_outside_grid_fraction,
                        prior_surface_agreement=info.prior.get("surface_agreement"),
                        seconds_make=round(t1 - t0, 2), seconds_preprocess=round(time.time() - t1, 2))
            atomic_write_npz(npz, image=prep.image.astype(np.float16), brain_mask=prep.brain_mask.astype(bool),
                             signal_mask=prep.signal_brain_mask.astype(bool),
                             meta=np.array(json.dumps(meta, default=float)))
            if failed.is_file():  # an earlier failure, retried successfully
                failed.unlink()
            counts["done"] += 1
            print(f"[{name} {n}/{len(plan)}] {stem} {vmeta['voxel_size']} {vmeta['orientation']} "
                  f"sev={sev:.3f}: brain {info.expected_brain_ml:.0f} ml, signal {info.signal_brain_ml:.0f} ml, "
                  f"{len(prep.warnings)} warnings, {time.time() - t0:.1f} s", flush=True)
    print(f"prepare: {counts['done']} written, {counts['failed']} failed, {counts['skipped']} already there; "
          f"{(time.time() - t_all) / 60:.1f} min", flush=True)
    return 0


# --------------------------------------------------------------------------- eval
def _read_cache(cache: Path, heads=None) -> list[dict]:
    """Every cached copy: {'file', 'meta', 'failed'} sorted by head, kind, v."""
    items = []
    for folder in sorted(p for p in cache.iterdir() if p.is_dir()):
        if heads and folder.name not in heads:
            continue
        for f in sorted(folder.glob("*.npz")):
            with np.load(f) as z:
                if "meta" not in z.files:
                    continue
                meta = json.loads(str(z["meta"]))
            items.append({"file": str(f), "meta": meta, "failed": False})
        for f in sorted(folder.glob("*.failed.json")):
            if f.with_name(f.name.replace(".failed.json", ".npz")).is_file():
                continue
            items.append({"file": str(f), "meta": json.loads(f.read_text()), "failed": True})
    items.sort(key=lambda it: (it["meta"]["head"], it["meta"]["kind"] != "clean", it["meta"]["kind"],
                               it["meta"]["v"]))
    return items


def _auroc(clean: list[dict], pos: list[dict]):
    from sklearn.metrics import roc_auc_score

    if not clean or not pos:
        return None
    y = [0] * len(clean) + [1] * len(pos)
    s = [r["score"] for r in clean + pos]
    return 100.0 * float(roc_auc_score(y, s))


def _med(rows, key, scale=1.0):
    v = np.array([r[key] for r in rows if r.get(key) is not None], float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) * scale if v.size else None


def _fmt(v, nd=1):
    return "n/a" if v is None else f"{v:.{nd}f}"


def tables(rows: list[dict], model_label: str) -> str:
    heads = sorted({r["head"] for r in rows})
    kinds = [k for k in dict.fromkeys(r["kind"] for r in rows) if k != "clean"]
    local = [k for k in kinds if k in LOCAL]
    groups = [(h, [r for r in rows if r["head"] == h]) for h in heads]
    if len(heads) > 1:
        groups.append(("pooled", rows))
    out = [f"### {model_label}", "",
           "Clean copies (medians over the head's clean copies that preprocessed; failed = clean copies "
           "whose preprocessing failed). anomaly % = percent of the brain mask in the final mask; errors "
           "in z-units^2 inside the brain; t_stop = the tau fit's crossing (percent of brain unmasked); "
           "fallback = clean copies whose tau_stop came from the finite-difference fallback.", "",
           "| head | clean ok | failed | anomaly % | first-pass error | final error | t_stop % | fallback "
           "| s/scan | passes |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for g, sub in groups:
        cl = [r for r in sub if r["kind"] == "clean"]
        ok = [r for r in cl if not r["failed"]]
        out.append(f"| {g} | {len(ok)} | {len(cl) - len(ok)} | {_fmt(_med(ok, 'anomaly_fraction', 100), 2)} | "
                   f"{_fmt(_med(ok, 'first_pass_mean_error'), 3)} | {_fmt(_med(ok, 'mean_error'), 3)} | "
                   f"{_fmt(_med(ok, 't_stop'), 1)} | {sum(1 for r in ok if r['fit_path'] == 'fallback')} | "
                   f"{_fmt(_med(ok, 'seconds'), 1)} | {_fmt(_med(ok, 'forward_passes'), 0)} |")
    out += ["", "AUROC (percent) of anomaly_voxels, artifact copies vs the same head's clean copies "
            "(pooled: all clean vs all copies of the type, every head). Preprocessing failures score as "
            "detected. Cell: AUROC (artifact copies n; failed f).", ""]
    cols = kinds + (["local"] if local else []) + ["all types"]
    out.append("| head | " + " | ".join(cols) + " |")
    out.append("|---|" + "---|" * len(cols))
    for g, sub in groups:
        cl = [r for r in sub if r["kind"] == "clean"]
        cells = []
        for c in cols:
            if c == "local":
                pos = [r for r in sub if r["kind"] in local]
            elif c == "all types":
                pos = [r for r in sub if r["kind"] != "clean"]
            else:
                pos = [r for r in sub if r["kind"] == c]
            a = _auroc(cl, pos)
            nf = sum(r["failed"] for r in pos)
            cells.append(f"{_fmt(a)} ({len(pos)}" + (f"; f{nf})" if nf else ")"))
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    if local:
        out += ["", f"local = {', '.join(local)}"]
    # artifact copies' own numbers, per type pooled
    out += ["", "Artifact copies, pooled over heads (medians; anomaly % of those that preprocessed):", "",
            "| kind | n | failed | anomaly % | first-pass error | final error | t_stop % |", "|---|---|---|---|---|---|---|"]
    for k in ["clean"] + kinds:
        sub = [r for r in rows if r["kind"] == k]
        ok = [r for r in sub if not r["failed"]]
        out.append(f"| {k} | {len(sub)} | {len(sub) - len(ok)} | {_fmt(_med(ok, 'anomaly_fraction', 100), 2)} | "
                   f"{_fmt(_med(ok, 'first_pass_mean_error'), 3)} | {_fmt(_med(ok, 'mean_error'), 3)} | "
                   f"{_fmt(_med(ok, 't_stop'), 1)} |")
    return "\n".join(out)


def evaluate(args) -> int:
    import torch

    from qc_pipeline.engine import IterMask3D

    if args.threads:
        torch.set_num_threads(args.threads)
    items = _read_cache(args.cache, set(args.heads) if args.heads else None)
    if not items:
        raise SystemExit(f"no cached copies in {args.cache}" + (f" for heads {args.heads}" if args.heads else ""))
    print(f"{len(items)} cached copies ({sum(it['failed'] for it in items)} failed preprocessing) from "
          f"{len({it['meta']['head'] for it in items})} heads", file=sys.stderr, flush=True)
    previous = {}
    if args.json_out and args.json_out.is_file() and args.resume:
        for m in json.loads(args.json_out.read_text()).get("models", []):
            for r in m["rows"]:
                previous[(m["model_dir"], m.get("model_id"), r["file"])] = r
    report = {"cache": str(args.cache), "models": []}
    texts = []
    for mdir in args.model_dir:
        model = IterMask3D.from_folder(mdir, device=args.device)
        vs = tuple(model.card.get("voxel_size") or (VOXEL,) * 3)
        label = f"{model.model_id} ({mdir})"
        rows = []
        entry = {"model_dir": str(mdir), "model_id": model.model_id, "device": str(model.device),
                 "schedule": model.default_schedule, "gamma": model.gamma,
                 "gamma_mode": getattr(model, "gamma_mode", None), "rows": rows}
        report["models"].append(entry)
        t0 = time.time()
        for n, it in enumerate(items, 1):
            meta = it["meta"]
            key = (str(mdir), model.model_id, it["file"])
            if key in previous:
                rows.append(previous[key])
                continue
            row = {"file": it["file"], "head": meta["head"], "kind": meta["kind"], "v": meta["v"],
                   "seed": meta.get("seed"), "severity": meta.get("severity"), "label": int(meta["kind"] != "clean"),
                   "failed": it["failed"], "variant": meta.get("variant")}
            if it["failed"]:
                row.update(error=f"{meta.get('error_type')}: {meta.get('error')}", score=FAILED)
            else:
                with np.load(it["file"]) as z:
                    image = z["image"].astype(np.float32)
                    brain = z["brain_mask"].astype(bool)
                _, r = run_as_the_app(model, image, brain, vs)
                row.update(anomaly_voxels=int(r.anomaly_voxels), anomaly_fraction=float(r.anomaly_fraction),
                           raw_anomaly_fraction=r.raw_anomaly_fraction, normal_error=r.normal_error,
                           first_pass_mean_error=float(r.first_pass_mean_error), mean_error=float(r.mean_error),
                           t_stop=float(r.fit.t_stop), tau_stop=float(r.tau_stop), fit_path=r.fit.path,
                           fit_r2=float(r.fit.r2), crossed=bool(r.fit.crossed), forward_passes=int(r.forward_passes),
                           refine_passes=int(r.refine_passes), converged=bool(r.converged),
                           brain_voxels=int(r.brain_voxels), seconds=float(r.seconds),
                           gamma=float(r.gamma), gamma_mode=getattr(r, "gamma_mode", None),
                           score=float(r.anomaly_voxels))
            row.setdefault("fit_path", None)
            rows.append(row)
            print(f"[{mdir} {n}/{len(items)}] {meta['head']} {_copy_name(meta['kind'], meta['v'])}: "
                  + ("FAILED preprocessing" if it["failed"] else
                     f"anomaly {100 * row['anomaly_fraction']:.2f}% ({row['anomaly_voxels']} vox), "
                     f"err {row['first_pass_mean_error']:.3f}->{row['mean_error']:.3f}, t_stop {row['t_stop']:.1f}, "
                     f"{row['forward_passes']} passes, {row['seconds']:.1f} s"), file=sys.stderr, flush=True)
            if args.json_out and n % 10 == 0:  # partial results survive an interruption (--resume)
                _write_json(args.json_out, report)
        entry["seconds_total"] = time.time() - t0
        text = tables(rows, label)
        texts.append(text)
        print(text + "\n", flush=True)
        if args.json_out:
            _write_json(args.json_out, report)
    return 0


def _write_json(path: Path, report: dict) -> None:
    from qc_pipeline.io import atomic_write_text

    def clean(o):  # JSON-safe: numpy scalars to Python, NaN/Inf to null
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, np.generic):
            o = o.item()
        if isinstance(o, float) and not np.isfinite(o):
            return None
        return o

    atomic_write_text(json.dumps(clean(report), indent=1, default=str), path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    pp = sub.add_parser("prepare", help="make and preprocess the copies, cache them as npz")
    pp.add_argument("--scan", nargs="+", required=True, metavar="NAME=PATH", help="real T1w heads")
    pp.add_argument("--n-clean", type=int, default=6, help="clean copies per head")
    pp.add_argument("--types", nargs="+",
                    default=["motion", "ghosting", "spike", "susceptibility", "chunk_top", "kspace_noise",
                             "wrap_around", "blur"], help="artifact types, one copy each per head")
    pp.add_argument("--severity", nargs=2, type=float, default=[0.5, 1.0], metavar=("LO", "HI"))
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--out", type=Path, required=True, help="cache folder")
    pp.add_argument("--protocol", choices=("research", "clinical"), default="research",
                    help="the copies' acquisitions: research 3D (0.9-1.5 mm voxels, any orientation) or "
                         "clinical 2D (3-6 mm axial slices with a slice profile; real_scan.variant)")
    pp.add_argument("--retry-failed", action="store_true", help="preprocess failed copies again")
    pe = sub.add_parser("eval", help="run the engine on the cached copies")
    pe.add_argument("--cache", type=Path, required=True)
    pe.add_argument("--model-dir", type=Path, nargs="+", required=True)
    pe.add_argument("--heads", nargs="+", default=None, help="only these heads (folder names)")
    pe.add_argument("--device", default="cpu")
    pe.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    pe.add_argument("--json-out", type=Path, default=None)
    pe.add_argument("--resume", action="store_true",
                    help="reuse rows already in --json-out (same model folder, model id and file)")
    args = p.parse_args(argv)
    return prepare(args) if args.stage == "prepare" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
