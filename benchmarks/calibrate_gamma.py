"""Fit a model's stopping slope on held-out synthetic normal heads (what the shipped cards do).

``gamma = factor x median tau(50)`` over the normal heads of a ``benchmarks/detection.py``
cache (``normal_NNN_s<seed>.npz``: the app's preprocessing of synthetic normals never used
for training or testing), with :meth:`IterMask3D.typical_error` (4 forward passes a head).
``itermask-qc-calibrate --gamma`` does the same from a participant run's qc.json files on a
site's own clean scans. Prints each head's tau(50) and, with ``--write``, sets the card's
``gamma`` and ``gamma_calibration``.

``--normative-factor F`` also sets the card's ``normative`` section (the ``normative``
schedule's threshold is ``F x median tau(50)``), makes ``normative`` the card's schedule and
refits the two measurements of the QC-score reference that the final mask gives
(``anomaly_fraction``, ``anomaly_cluster_fraction``) on the same heads screened with it (3 more
forward passes a head); the other measurements do not depend on the schedule.

Usage::

    python benchmarks/detection.py --cache C --n-normal 20 --n-per-artifact 0 --seed 3000 --prepare-only
    python benchmarks/calibrate_gamma.py --model-dir models/t1w --cache C --seed 3000 --n 20 --write
    python benchmarks/calibrate_gamma.py --model-dir models/t1w --cache C --seed 3000 --n 20 \
        --normative-factor 5 --write
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("NIPYPE_NO_ET", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--seed", type=int, default=3000)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--factor", type=float, default=None, help="default: qc_pipeline.calibrate's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--normative-factor", type=float, default=None,
                   help="also set the normative schedule's threshold factor and refit the mask's "
                        "measurements of the QC-score reference with it")
    p.add_argument("--write", action="store_true", help="write gamma into the model card")
    args = p.parse_args(argv)

    import torch

    from qc_pipeline.calibrate import DEFAULT_GAMMA_FACTOR, gamma_from_tau50, write_card_gamma
    from qc_pipeline.engine import IterMask3D

    torch.set_num_threads(max(1, args.threads))
    model = IterMask3D.from_folder(args.model_dir, device="cpu")
    vs = tuple(model.card["voxel_size"])
    tau50, heads = [], []
    for i in range(args.n):
        f = args.cache / f"normal_{i:03d}_s{args.seed}.npz"
        if not f.is_file():
            print(f"{f}: missing (prepare it with benchmarks/detection.py --prepare-only)", file=sys.stderr)
            continue
        z = np.load(f)
        if "image" not in z.files:  # detection.py keeps a failed preprocessing as its error
            print(f"{f.name}: preprocessing failed, left out", file=sys.stderr)
            continue
        heads.append((z["image"].astype(np.float32), z["mask"].astype(bool)))
        tau50.append(model.typical_error(*heads[-1], voxel_size=vs))
        print(f"{f.name}: tau(50) = {tau50[-1]:.4f}", flush=True)
    source = (f"{len(tau50)} held-out synthetic normal heads (benchmarks/detection.py --seed {args.seed}), "
              "the app's preprocessing")
    g = gamma_from_tau50(tau50, factor=args.factor or DEFAULT_GAMMA_FACTOR, source=source)
    print(f"median tau(50) {g['gamma_calibration']['median_tau50']:.4f} -> gamma {g['gamma']:.4g}")
    if args.write:
        write_card_gamma(args.model_dir, g)
    if args.normative_factor is not None:
        _normative(args, g["gamma_calibration"]["median_tau50"], heads, source)
    return 0


def _normative(args, median_tau50: float, heads, source: str) -> None:
    import json
    import re

    from qc_pipeline.engine import IterMask3D
    from qc_pipeline.engine.schedules import get_schedule
    from qc_pipeline.engine.modelio import CARD_NAME
    from qc_pipeline.io import atomic_write_text
    from qc_pipeline.qc.score import fit_reference, largest_component_fraction

    path = args.model_dir / CARD_NAME
    card = json.loads(path.read_text())
    card["normative"] = {"factor": args.normative_factor,
                         "rule": "tau_stop = factor x gamma_calibration.median_tau50 (the median error of "
                                 "clean scans half-way through the sweep)",
                         "threshold_at_calibration": round(args.normative_factor * median_tau50, 5)}
    card["gamma_calibration"]["median_tau50"] = median_tau50
    model = IterMask3D(IterMask3D.from_folder(args.model_dir, device="cpu").net, card, device="cpu")
    rows = []
    for x, b in heads:
        res = model.run(x, b, voxel_size=tuple(card["voxel_size"]), schedule="normative", seed=0)
        rows.append({"anomaly_fraction": res.anomaly_fraction,
                     "anomaly_cluster_fraction": largest_component_fraction(res.mask, int(b.sum()))})
        print(f"normative: masked {100 * res.anomaly_fraction:.2f} % of a normal head", flush=True)
    ref = fit_reference(rows, features=["anomaly_fraction", "anomaly_cluster_fraction"], source=source)
    print("median masked share of the normal heads with the normative schedule: "
          f"{100 * float(np.median([r['anomaly_fraction'] for r in rows])):.2f} %")
    if args.write:
        card["schedule"] = "normative"
        sched = get_schedule("normative")
        card.setdefault("schedules", {})["normative"] = {
            "sweep_t": list(sched.sweep_t), "refine_start": sched.refine_start, "max_refine": sched.max_refine,
            "stop": sched.stop, "shrink": sched.shrink}
        # results are keyed by the model id: another schedule or level is another model
        card["model_id"] = re.sub(r"(-normative[0-9.]+)?$", f"-normative{args.normative_factor:g}",
                                  card["model_id"], count=1)
        card.setdefault("qc_score", {}).setdefault("features", {}).update(ref["features"])
        card["qc_score"]["normative_features_source"] = f"{source}, screened with the normative schedule"
        atomic_write_text(json.dumps(card, indent=1) + "\n", path)


if __name__ == "__main__":
    sys.exit(main())
