"""``itermask-qc-train``: train an IterMask3D reconstructor from a BIDS dataset.

The scans of one suffix go through exactly the app's preprocessing
(:func:`qc_pipeline.preproc.preprocess`), are cached on the model grid in the
work directory (so a re-run skips them), and feed :func:`train_model`. The result is
a model folder (``weights.pt`` + ``model_card.json``) that the app takes with
``--model-dir``; training resumes from ``<out>/checkpoint.pt`` when interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="itermask-qc-train",
        description="Train an IterMask3D model on the clean scans of a BIDS dataset "
                    "(a synthetic cohort from itermask-qc-synth, or a site's own clean scans).",
    )
    p.add_argument("bids_dir", type=Path, help="BIDS dataset of normal (artifact-free) scans")
    p.add_argument("model_dir", type=Path, help="output model folder (weights.pt + model_card.json)")
    p.add_argument("--suffix", default="T1w", choices=["T1w", "T2w", "FLAIR"], help="contrast to train")
    p.add_argument("--participant-label", nargs="+", default=None, help="subjects to use (default: all)")
    p.add_argument("--exclude-labels", type=Path, default=None,
                   help="TSV with bids_name and label columns; scans labelled 1/bad are left out "
                        "(default: <bids_dir>/sourcedata/qc_labels.tsv when present)")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps (default 3000)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch", type=int, nargs="+", default=[64],
                   help="random crop size, one or three ints (default 64); 0 = whole volume")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--features", type=int, nargs="+", default=None, help="UNet channel widths")
    p.add_argument("--voxel-size", type=float, default=2.0, help="model voxel size in mm (default 2)")
    p.add_argument("--grid", type=int, nargs=3, default=[80, 96, 80], help="model grid (default 80 96 80)")
    p.add_argument("--skull-strip", default="auto", choices=["auto", "deepbet", "robex", "none"])
    p.add_argument("-w", "--work-dir", type=Path, default=None,
                   help="cache of preprocessed volumes (default <model_dir>/../<name>_work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--init-from", type=Path, default=None, metavar="MODEL_DIR",
                   help="start from the weights of this model folder (fine-tuning, e.g. T2w from "
                        "the packaged T1w model); same --features needed")
    p.add_argument("--no-resume", action="store_true", help="start again even if a checkpoint exists")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def _excluded(bids_dir: Path, labels_path: Path | None) -> set[str]:
    import pandas as pd

    path = labels_path or bids_dir / "sourcedata" / "qc_labels.tsv"
    if not path.is_file():
        return set()
    df = pd.read_csv(path, sep="\t", dtype=str)
    if "bids_name" not in df or "label" not in df:
        raise SystemExit(f"--exclude-labels {path}: expected columns bids_name and label")
    bad = df["label"].str.strip().str.lower().isin(["1", "bad", "true"])
    return set(df.loc[bad, "bids_name"])


def prepare_volumes(scans, work_dir: Path, *, voxel_size: float, grid, skull_strip: str, contrast: str):
    """Preprocess each scan once (cached as ``.npz`` in ``work_dir``); skip failures."""
    import numpy as np

    from qc_pipeline.errors import InputError
    from qc_pipeline.io import atomic_write_npz, load_image
    from qc_pipeline.preproc import preprocess

    work_dir.mkdir(parents=True, exist_ok=True)
    pairs, used, skipped = [], [], []
    for i, scan in enumerate(scans, 1):
        cache = work_dir / f"{scan.bids_name}_vs{voxel_size:g}_{'x'.join(map(str, grid))}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                pairs.append((z["image"], z["mask"]))
            used.append(scan.bids_name)
            continue
        try:
            img = load_image(scan.path, name=scan.relpath)
            res = preprocess(img, voxel_size=voxel_size, grid=grid, skull_strip=skull_strip,
                             contrast=contrast, name=scan.relpath)
        except InputError as exc:
            log.warning("skipping %s: %s", scan.relpath, exc)
            skipped.append((scan.bids_name, str(exc)))
            continue
        atomic_write_npz(cache, image=res.image.astype("float32"), mask=res.brain_mask)
        pairs.append((res.image.astype("float32"), res.brain_mask))
        used.append(scan.bids_name)
        log.info("preprocessed %d/%d %s", i, len(scans), scan.relpath)
    return pairs, used, skipped


def _check_args(args) -> str | None:
    """The first bad option (one line), checked before any scan is read; None when all fit."""
    if args.steps < 1:
        return f"--steps must be at least 1, got {args.steps}"
    if args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if not args.lr > 0:
        return f"--lr must be positive, got {args.lr}"
    if any(p < 0 for p in args.patch) or len(args.patch) not in (1, 3):
        return f"--patch takes one size or three (0 = whole volumes), got {' '.join(map(str, args.patch))}"
    if not args.voxel_size > 0 or any(g < 8 for g in args.grid):
        return f"--voxel-size must be positive and --grid at least 8 per axis, got {args.voxel_size}, {args.grid}"
    if args.features is not None and (len(args.features) < 2 or any(f < 1 for f in args.features)):
        return f"--features needs two or more positive widths, got {args.features}"
    if args.device == "cuda":
        from qc_pipeline.engine.inference import cuda_problem

        problem = cuda_problem()
        if problem:
            return f"--device cuda: {problem}"
    if args.init_from is not None:
        from qc_pipeline.engine.errors import EngineError
        from qc_pipeline.engine.modelio import load_model_card

        try:
            load_model_card(args.init_from)
        except EngineError as exc:
            return f"--init-from {args.init_from}: {exc}"
        if not (Path(args.init_from) / "weights.pt").is_file():
            return f"--init-from {args.init_from}: no weights.pt (expected a model folder)"
    return None


def main(argv=None) -> int:
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"itermask-qc-train: {problem}", file=sys.stderr)
        return 64
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from qc_pipeline.bids import BIDSInputError, collect_scans
    from qc_pipeline.engine import train_model

    try:
        scans = collect_scans(args.bids_dir, suffixes=[args.suffix], participant_label=args.participant_label)
    except BIDSInputError as exc:
        print(f"itermask-qc-train: {exc}", file=sys.stderr)
        return 66
    excluded = _excluded(args.bids_dir, args.exclude_labels)
    scans = [s for s in scans if s.bids_name not in excluded]
    if not scans:
        print(f"itermask-qc-train: no clean {args.suffix} scans in {args.bids_dir}", file=sys.stderr)
        return 18
    work = args.work_dir or args.model_dir.parent / f"{args.model_dir.name}_work"
    t0 = time.time()
    pairs, used, skipped = prepare_volumes(scans, work, voxel_size=args.voxel_size, grid=tuple(args.grid),
                                           skull_strip=args.skull_strip, contrast=args.suffix)
    if not pairs:
        print("itermask-qc-train: every scan failed preprocessing", file=sys.stderr)
        return 1
    prep_s = time.time() - t0
    desc = {}
    dd = args.bids_dir / "dataset_description.json"
    if dd.is_file():
        desc = json.loads(dd.read_text())
    patch = None if args.patch == [0] else (args.patch[0] if len(args.patch) == 1 else args.patch)
    card_extra = {
        "training_data": {
            "dataset": desc.get("Name", str(args.bids_dir.name)),
            "bids_dir": str(args.bids_dir.resolve()),
            "suffix": args.suffix,
            "n_scans": len(used),
            "n_subjects": len({u.split("_")[0] for u in used}),
            "n_excluded_labelled": len(excluded),
            "n_failed_preprocessing": len(skipped),
            "scans": used,
            "preprocessing": {"skull_strip": args.skull_strip, "voxel_size_mm": args.voxel_size,
                              "grid": list(args.grid), "normalisation": "iterative z-score in brain (4 passes, 2 SD)"},
            "preprocessing_wall_time_s": round(prep_s, 1),
        },
    }
    from qc_pipeline.engine.errors import EngineError

    try:
        res = train_model(pairs, args.model_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          patch=patch, seed=args.seed, resume=not args.no_resume, card_extra=card_extra,
                          device=args.device, features=args.features,
                          voxel_size=(args.voxel_size,) * 3, contrast=args.suffix,
                          init_from=args.init_from)
    except EngineError as exc:  # e.g. --init-from a network of another shape
        print(f"itermask-qc-train: {exc}", file=sys.stderr)
        return 2
    print(f"model written to {res['model_dir']} (final loss {res['final_loss']:.4f}, "
          f"{res['wall_time_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
